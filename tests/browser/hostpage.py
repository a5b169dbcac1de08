"""A small page that mounts the DynFuse accordion the way the WebUI does, and helpers to drive it.

The page has a txt2img-like prompt (`#txt2img_prompt`) and the accordion from `build_ui` with the test
stand-in InputAccordion. Scripts and styles reach the page as in the host (modules/ui_gradio_extensions.py):
the template response of gradio's index route is wrapped, `<script src="file=...">` tags go before `</head>`
(a stand-in for the host's script.js first, then the extension's javascript/*.js) and `<link>` tags for the
style sheets before `</body>`.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (ROOT, ROOT / "tests"):  # as pytest's pythonpath does, also when run as a script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import gradio as gr
import gradio.routes
from ui_stand_ins import InputAccordion

from lib_dynfuse.hosts import ui

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a photo of sks dog on a beach, <lora:sks_dog:0.9>, watercolor painting <lora:watercolor_v2:0.7>"
PROMPT_TAGS = ["sks_dog", "watercolor_v2"]
INSTALLED_LORAS = ["sks_dog", "watercolor_v2", "papercut"]


def _webpath(path: Path) -> str:
    return f"file={path}?{os.path.getmtime(path)}"


def _head_and_body() -> tuple[str, str]:
    scripts = [HERE / "host_script.js", *sorted((ROOT / "javascript").glob("*.js"))]
    head = "".join(f'<script type="text/javascript" src="{_webpath(p)}"></script>\n' for p in scripts)
    styles = [HERE / "host_style.css", ROOT / "style.css"]
    body = "".join(f'<link rel="stylesheet" property="stylesheet" href="{_webpath(p)}">' for p in styles)
    return head, body


def _inject_into_template() -> None:
    """Wrap gradio's template response like the host does; returns nothing, undone by _restore_template."""
    head, body = _head_and_body()
    original = gradio.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        # gradio 3.41 calls TemplateResponse(name, context); newer starlette wants the request first.
        if args and isinstance(args[0], str) and len(args) > 1 and "request" in args[1]:
            args = (args[1]["request"], *args)
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{head}</head>".encode())
        res.body = res.body.replace(b"</body>", f"{body}</body>".encode())
        res.init_headers()
        return res

    template_response.original = original
    gradio.routes.templates.TemplateResponse = template_response


def _restore_template() -> None:
    gradio.routes.templates.TemplateResponse = gradio.routes.templates.TemplateResponse.original


def build_page() -> tuple[gr.Blocks, ui.UiBuild]:
    with gr.Blocks(title="DynFuse", analytics_enabled=False) as demo, gr.Column(elem_id="tab_txt2img"):
        gr.Textbox(label="Prompt", lines=3, elem_id="txt2img_prompt", show_label=False,
                   placeholder="Prompt (press Ctrl+Enter to generate)")
        built = ui.build_ui(is_img2img=False, input_accordion=InputAccordion,
                            lora_names=lambda: INSTALLED_LORAS)
    return demo, built


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve() -> Iterator[str]:
    """Serve the page on 127.0.0.1 and yield its URL."""
    demo, _ = build_page()
    _inject_into_template()
    try:
        demo.queue()
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True,
                                quiet=True, allowed_paths=[str(ROOT)], show_api=False)
        try:
            yield url
        finally:
            demo.close()
    finally:
        _restore_template()


@contextmanager
def browser_page(url: str, width: int = 980) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)
            page.goto(url)
            page.wait_for_selector("#txt2img_prompt textarea")
            yield page
        finally:
            browser.close()


def tags_value(page) -> str:
    return page.locator("#dynfuse_txt2img_tags textarea, #dynfuse_txt2img_tags input").input_value()


def dropdown_options(page, role: str) -> list[str]:
    """The option texts a user sees after clicking the dropdown (closed again afterwards)."""
    field = page.locator(f"#dynfuse_txt2img_{role} input")
    field.click()
    options = page.locator(f"#dynfuse_txt2img_{role} ul.options li")
    options.first.wait_for()
    texts = [text.strip() for text in options.all_inner_texts()]
    page.keyboard.press("Escape")
    page.locator("#txt2img_prompt").click(position={"x": 5, "y": 5})
    return texts


def choose(page, role: str, name: str) -> None:
    page.locator(f"#dynfuse_txt2img_{role} input").click()
    page.locator(f"#dynfuse_txt2img_{role} ul.options li", has_text=name).first.click()


def type_prompt(page, text: str) -> None:
    page.locator("#txt2img_prompt textarea").press_sequentially(text, delay=5)


def open_accordion(page) -> None:
    if page.locator("#dynfuse_txt2img_method").is_visible():
        return
    page.locator("#dynfuse_txt2img .label-wrap").first.click()
    page.locator("#dynfuse_txt2img_method").wait_for(state="visible")


def status_text(page) -> str:
    # gradio 3 repeats an HTML component's elem_id on its inner element; the outer one holds the text.
    return page.locator("#dynfuse_txt2img_tag_status").first.inner_text().strip()


def wait_for_tags(page, names: list[str]) -> None:
    """Wait until the page script has sent these tag names and the server's answer has reached the page."""
    expected = json.dumps(names, separators=(",", ":"))  # as JSON.stringify writes it
    page.wait_for_function(
        """expected => {
            const e = document.querySelector('#dynfuse_txt2img_tags textarea, #dynfuse_txt2img_tags input');
            return e && e.value === expected;
        }""", arg=expected, timeout=10_000)
    # The status line is refreshed by the same server call as the dropdowns.
    status = f"LoRA tags in the prompt: {len(names)}" if names else "No "
    page.wait_for_function(
        """status => document.querySelector('#dynfuse_txt2img_tag_status').innerText.trim().startsWith(status)""",
        arg=status, timeout=10_000)
