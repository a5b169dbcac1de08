"""Where gradio 3.41 (AUTOMATIC1111) and gradio 4.40 (Forge) differ for the UI, in one place.

The UI is written against what both versions accept (`gr.update`, `gr.Group`, no `.style()`, no `_js`/`js`,
dropdowns with `allow_custom_value`, `gr.File` without `type`). What remains are value shapes and the one
rendering difference below, handled here so that no other module has to tell the versions apart.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import gradio as gr
from PIL import Image

from lib_dynfuse.guidance.references import ReferenceImageError, load_image
from lib_dynfuse.settings import UnreadableImage

# gradio 4 leaves components made with visible=False out of the page, so a textbox that the page script
# writes into must stay "visible" and be hidden by CSS (style.css: .dynfuse-hidden) in both versions.
HIDDEN_BY_CSS = {"visible": True, "elem_classes": ["dynfuse-hidden"]}


def dropdown_update(choices: Sequence[str], value: str) -> dict:
    """Replace a dropdown's choices and value together (gradio 4 rejects a value that is not a choice unless
    the dropdown allows custom values; sending both keeps the two in step on either version)."""
    return gr.update(choices=list(choices), value=value)


def file_path(item: object) -> object:
    """The local path of one `gr.File` value item.

    3.41 gives tempfile wrappers (path in `.name`), 4.x gives `NamedString` paths; a FileData-like dict
    ("path" in 4, "name" in 3) is accepted too. Anything else is returned unchanged.
    """
    if isinstance(item, dict):
        return item.get("path") or item.get("name") or item
    if isinstance(item, str):
        return item
    return getattr(item, "name", item)


def files_to_images(value: object) -> tuple[object, ...]:
    """PIL images from a multi-file `gr.File` value (either version) or from images/base64 strings of an API
    call; items that are not files are passed through for the settings module to decode or reject. A file that
    is not a readable image becomes an UnreadableImage: guidance then turns that side off, the rest runs."""
    if value is None:
        return ()
    items: Iterable[object] = [value] if isinstance(value, (str, Image.Image, dict)) else value
    images: list[object] = []
    for item in items:
        path = file_path(item)
        if isinstance(path, str) and os.path.isfile(path):
            try:
                # Loaded and converted now: gradio may delete its temporary upload after the call.
                images.append(load_image(path))
            except ReferenceImageError as error:
                images.append(UnreadableImage(str(error)))
        else:
            images.append(path)
    return tuple(images)
