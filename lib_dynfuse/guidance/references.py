"""Reference images for guidance: user-given images or the LoRA's preview image beside its file."""
from __future__ import annotations

import base64
import binascii
import io
import json
import os

from PIL import Image, UnidentifiedImageError

from lib_dynfuse.settings import UnreadableImage

# The hosts' LoRA browser (ui_extra_networks.find_preview) accepts these, plus the host's own
# samples_format, as "<stem>.<ext>" or "<stem>.preview.<ext>". It iterates a set, so its order is not
# defined; ours is fixed: extension by extension, plain name before ".preview".
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")


class ReferenceImageError(ValueError):
    """A reference image could not be read; the message names the source and the reason."""


def preview_candidates(lora_path: str | os.PathLike, extra_extensions: tuple[str, ...] = ()) -> list[str]:
    """Every file name the preview search tries for ``lora_path``, in order."""
    stem = os.path.splitext(os.fspath(lora_path))[0]
    extensions = list(PREVIEW_EXTENSIONS) + [e.lstrip(".").lower() for e in extra_extensions
                                             if e.lstrip(".").lower() not in PREVIEW_EXTENSIONS]
    return [name for ext in extensions for name in (f"{stem}.{ext}", f"{stem}.preview.{ext}")]


def find_preview(lora_path: str | os.PathLike, extra_extensions: tuple[str, ...] = ()) -> str | None:
    """The preview image file beside a LoRA file, or None. ``extra_extensions``: e.g. the host's
    ``opts.samples_format``."""
    return next((name for name in preview_candidates(lora_path, extra_extensions) if os.path.isfile(name)), None)


def embedded_preview(lora_path: str | os.PathLike) -> Image.Image | None:
    """The first cover image stored in a .safetensors file's metadata (``ssmd_cover_images``), or None."""
    path = os.fspath(lora_path)
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            covers = json.loads((handle.metadata() or {}).get("ssmd_cover_images", "[]"))
        first = next((c for c in covers if c), None)
        return load_image(first) if first else None
    except Exception:  # noqa: BLE001 -- a damaged cover is no reason to fail; the caller reports "no reference"
        return None


def load_image(source: object) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, bytes, or base64 text (with or without a
    ``data:image/...;base64,`` prefix). Raises ReferenceImageError, also for an UnreadableImage (with its reason)."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, UnreadableImage):
        raise ReferenceImageError(source.reason)
    data = source
    if isinstance(source, str) and not os.path.isfile(source):
        text = source.split(",", 1)[1] if source.startswith("data:") else source
        try:
            data = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ReferenceImageError(f"{_describe(source)} is neither an image file nor base64 image data"
                                      ) from None
    if isinstance(data, (bytes, bytearray)):
        data = io.BytesIO(data)
    elif isinstance(data, (str, os.PathLike)):
        data = os.fspath(data)
    else:
        raise ReferenceImageError(f"{_describe(source)} is not an image, a file path or base64 image data")
    try:
        with Image.open(data) as image:
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ReferenceImageError(f"{_describe(source)} is not a readable image (unknown format)") from None
    except (OSError, ValueError) as error:
        raise ReferenceImageError(f"{_describe(source)} is not a readable image ({error})") from error


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)) and len(os.fspath(source)) < 200:
        return f"'{os.fspath(source)}'"
    return f"a {type(source).__name__} value"


def lora_reference(lora_path: str | os.PathLike | None,
                   extra_extensions: tuple[str, ...] = ()) -> tuple[Image.Image | None, str]:
    """The default reference of a LoRA: its preview file, else its embedded cover image.

    Returns ``(image, note)``; note says where the image came from, or why there is none.
    """
    if not lora_path:
        return None, "the LoRA's file is not known"
    name = os.path.basename(os.fspath(lora_path))
    preview = find_preview(lora_path, extra_extensions)
    if preview is not None:
        try:
            return load_image(preview), f"preview {os.path.basename(preview)}"
        except ReferenceImageError as error:
            return None, f"the preview of {name} is unreadable: {error}"
    cover = embedded_preview(lora_path)
    if cover is not None:
        return cover, f"cover image in {name}"
    return None, f"{name} has no preview image"


__all__ = ["PREVIEW_EXTENSIONS", "ReferenceImageError", "embedded_preview", "find_preview", "load_image",
           "lora_reference", "preview_candidates"]
