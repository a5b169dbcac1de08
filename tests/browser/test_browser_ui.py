"""The accordion in a real page with headless Chromium: typed <lora:...> tags reach both dropdowns.

Needs /usr/bin/chromium (Debian package `chromium`) and the playwright Python package; skipped otherwise.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not os.path.exists("/usr/bin/chromium"):
    pytest.skip("headless Chromium is missing: apt-get install -y chromium", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install playwright")

import hostpage
import make_screenshot


@pytest.fixture(scope="module")
def page():
    with hostpage.serve() as url, hostpage.browser_page(url) as page:
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        yield page


def test_typed_tags_fill_both_dropdowns(page):
    assert hostpage.tags_value(page) == "[]"
    hostpage.type_prompt(page, hostpage.PROMPT)
    hostpage.wait_for_tags(page, hostpage.PROMPT_TAGS)
    hostpage.open_accordion(page)
    for role in ("subject", "style"):
        options = [text.replace("✓", "").strip() for text in hostpage.dropdown_options(page, role)]
        assert options == ["Auto", *hostpage.PROMPT_TAGS]
    assert hostpage.status_text(page) == "LoRA tags in the prompt: 2"
    assert not page.locator("#dynfuse_txt2img_tags").is_visible()
    assert page.errors == []


def test_removing_a_tag_updates_the_choices_and_flags_unknown_loras(page):
    textarea = page.locator("#txt2img_prompt textarea")
    textarea.fill("portrait <lora:sks_dog:1> <lora:not_installed:0.5>")  # fill fires one input event
    hostpage.wait_for_tags(page, ["sks_dog", "not_installed"])
    page.wait_for_function("() => document.querySelector('#dynfuse_txt2img_tag_status')"
                           ".innerText.includes('not_installed')")
    assert hostpage.status_text(page).endswith("not found among the installed LoRAs: not_installed")
    options = [text.replace("✓", "").strip() for text in hostpage.dropdown_options(page, "style")]
    assert options == ["Auto", "sks_dog", "not_installed"]


def test_a_prompt_set_by_the_page_is_noticed(page):
    """Pasted infotext and "Send to" set the prompt without an input event; the poll catches it."""
    page.eval_on_selector("#txt2img_prompt textarea", "e => { e.value = 'x <lora:papercut:1>'; }")
    hostpage.wait_for_tags(page, ["papercut"])
    assert json.loads(hostpage.tags_value(page)) == ["papercut"]


def test_screenshot(page, tmp_path):
    page.locator("#txt2img_prompt textarea").fill("")
    hostpage.wait_for_tags(page, [])
    path = tmp_path / "screenshot.png"
    make_screenshot.take(page, path)
    assert path.stat().st_size > 10_000
    assert page.errors == []
