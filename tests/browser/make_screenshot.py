"""Write docs/screenshot.png, the README's picture: `python tests/browser/make_screenshot.py [PATH]`.

Needs Chromium at /usr/bin/chromium and the playwright Python package (no `playwright install`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hostpage

OUTPUT = hostpage.ROOT / "docs" / "screenshot.png"


def take(page, path: Path) -> None:
    """Type a prompt with two LoRA tags, open the accordion, pick both LoRAs and photograph the panel."""
    hostpage.type_prompt(page, hostpage.PROMPT)
    hostpage.wait_for_tags(page, hostpage.PROMPT_TAGS)
    hostpage.open_accordion(page)
    hostpage.choose(page, "subject", hostpage.PROMPT_TAGS[0])
    hostpage.choose(page, "style", hostpage.PROMPT_TAGS[1])
    strength = "#dynfuse_txt2img_subject_strength"
    page.locator(f"{strength} textarea, {strength} input").fill("0.9")
    page.mouse.click(2, 2)  # close any list and let the fade-out finish before the picture
    page.wait_for_timeout(500)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.locator("#tab_txt2img").screenshot(path=str(path))


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    with hostpage.serve() as url, hostpage.browser_page(url) as page:
        take(page, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
