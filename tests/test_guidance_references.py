from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lib_dynfuse.guidance import (
    ReferenceImageError,
    find_preview,
    load_image,
    lora_reference,
    preview_candidates,
)
from lib_dynfuse.guidance.references import embedded_preview
from lib_dynfuse.settings import UnreadableImage


def png_bytes(color=(10, 200, 30), size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_candidates_follow_the_hosts_extensions_plain_name_before_preview(tmp_path):
    lora = tmp_path / "dog.safetensors"
    stem = str(tmp_path / "dog")
    assert preview_candidates(lora) == [
        f"{stem}.png", f"{stem}.preview.png", f"{stem}.jpg", f"{stem}.preview.jpg", f"{stem}.jpeg",
        f"{stem}.preview.jpeg", f"{stem}.webp", f"{stem}.preview.webp", f"{stem}.gif", f"{stem}.preview.gif"]
    assert preview_candidates(lora, ("avif", ".png"))[-2:] == [f"{stem}.avif", f"{stem}.preview.avif"]


def test_find_preview_takes_the_first_existing_candidate(tmp_path):
    lora = tmp_path / "dog.safetensors"
    lora.write_bytes(b"")
    assert find_preview(lora) is None
    for name in ("dog.preview.gif", "dog.webp", "dog.preview.jpg", "dog.png"):
        (tmp_path / name).write_bytes(png_bytes())
        assert find_preview(lora) == str(tmp_path / name)
    assert find_preview(tmp_path / "cat.safetensors") is None


def test_load_image_accepts_pil_path_bytes_base64_and_data_urls(tmp_path):
    data = png_bytes((1, 2, 3))
    (tmp_path / "a.png").write_bytes(data)
    text = base64.b64encode(data).decode()
    sources = [Image.new("L", (8, 6), 7), str(tmp_path / "a.png"), tmp_path / "a.png", data, text,
               "data:image/png;base64," + text]
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (8, 6)
    assert load_image(text).getpixel((0, 0)) == (1, 2, 3)


def test_unreadable_sources_name_themselves(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ReferenceImageError, match=r"'.*broken.png' is not a readable image"):
        load_image(str(tmp_path / "broken.png"))
    with pytest.raises(ReferenceImageError, match="'no such file' is neither an image file nor base64 image data"):
        load_image("no such file")
    with pytest.raises(ReferenceImageError, match="'aGVsbG8=' is not a readable image"):
        load_image("aGVsbG8=")  # valid base64, not an image
    with pytest.raises(ReferenceImageError, match="a int value is not an image"):
        load_image(3)
    with pytest.raises(ReferenceImageError, match="^style_ref is not a base64-encoded image$"):
        load_image(UnreadableImage("style_ref is not a base64-encoded image"))


def test_lora_reference_uses_preview_then_embedded_cover_then_says_why_not(tmp_path):
    lora = tmp_path / "style.safetensors"
    cover = base64.b64encode(png_bytes((9, 9, 9))).decode()
    save_file({"w": torch.zeros(1)}, str(lora), metadata={"ssmd_cover_images": json.dumps(["", cover])})
    image, note = lora_reference(lora)
    assert note == "cover image in style.safetensors" and image.getpixel((0, 0)) == (9, 9, 9)
    (tmp_path / "style.preview.png").write_bytes(png_bytes((4, 5, 6)))
    image, note = lora_reference(lora)
    assert note == "preview style.preview.png" and image.getpixel((0, 0)) == (4, 5, 6)
    (tmp_path / "style.png").write_bytes(b"damaged")
    image, note = lora_reference(lora)
    assert image is None and note.startswith("the preview of style.safetensors is unreadable")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    assert embedded_preview(plain) is None
    assert lora_reference(plain) == (None, "plain.safetensors has no preview image")
    assert lora_reference(None) == (None, "the LoRA's file is not known")
