from __future__ import annotations

import pytest
import torch
from conftest_guidance import CPU, FULL, TINY, guidance_release_models  # noqa: F401
from PIL import Image
from torch import nn

from lib_dynfuse.guidance import (
    Guidance,
    GuidanceParams,
    Scorers,
    eps_from_x0,
    format_scores,
    private_module,
    shift_eps,
    unload,
    x0_from_eps,
)
from lib_dynfuse.guidance.decoders import TaesdDecoder

SUBJECT = Image.new("RGB", (40, 40), (220, 40, 30))
STYLE = Image.new("RGB", (48, 32), (20, 60, 210))
NOT_FINITE = ("DynFuse guidance: the gradient was not finite at step 7; guidance is off for this image. "
              "Lower Guidance strength or use decoder 'approx'.")


def guidance(params=None, decoder="approx", factories=TINY, **kwargs) -> Guidance:
    kwargs.setdefault("subject_refs", [SUBJECT])
    kwargs.setdefault("style_ref", STYLE)
    messages = []
    g = Guidance.prepare(family="SD1.5", params=params or GuidanceParams(), decoder=decoder,
                         scorer_config=CPU, log=messages.append,
                         **factories, **kwargs)
    assert g.messages == messages
    return g


def latents(rows=2, seed=0, size=16):
    torch.manual_seed(seed)
    x0 = torch.randn(rows, 4, size, size)
    return x0, x0 + 0.05 * torch.randn_like(x0)


@pytest.mark.parametrize("balance", [1.0, 0.0])
def test_a_small_step_raises_the_guided_similarity(balance):
    g = guidance(GuidanceParams(strength=0.2, balance=balance))
    x0, uncond = latents()
    with torch.no_grad():
        guided = g.correct(x0, uncond, progress=0.5, step=4)
    before, after = g.loss(x0), g.loss(guided)
    assert (after < before).all(), (before, after)
    key = "subject-DINO" if balance == 1.0 else "style-CLIP"
    assert all(a[key] > b[key] for a, b in zip(g.scores(guided), g.scores(x0)))
    assert g.losses == [(4, pytest.approx(float(before.mean()), abs=1e-5))]


def test_step_size_is_strength_times_the_cfg_update_per_row():
    g = guidance(GuidanceParams(strength=0.3))
    x0, uncond = latents()
    uncond[1] = x0[1] + 3 * (uncond[1] - x0[1])
    change = g.correct(x0, uncond, progress=0.5, step=0) - x0
    rms = lambda t: t.pow(2).flatten(1).mean(1).sqrt()
    torch.testing.assert_close(rms(change), 0.3 * rms(x0 - uncond), rtol=1e-4, atol=1e-6)
    # Without an unconditional estimate, x0 itself sets the scale.
    change = g.correct(x0, None, progress=0.5, step=0) - x0
    torch.testing.assert_close(rms(change), 0.3 * rms(x0), rtol=1e-4, atol=1e-6)


def test_nothing_changes_at_strength_zero_outside_the_window_or_between_every_n():
    x0, uncond = latents()
    off = guidance(GuidanceParams(strength=0.0))
    assert off.correct(x0, uncond, progress=0.5, step=2) is x0
    g = guidance(GuidanceParams(start=0.2, end=0.7, every=3))
    assert g.correct(x0, uncond, progress=0.19, step=3) is x0
    assert g.correct(x0, uncond, progress=0.71, step=3) is x0
    assert g.correct(x0, uncond, progress=0.5, step=4) is x0
    assert not torch.equal(g.correct(x0, uncond, progress=0.5, step=3), x0)
    assert g.correct(x0, uncond, progress=0.2, step=0) is not x0
    assert [step for step, _ in g.losses] == [3, 0]


def test_only_the_chosen_rows_change():
    g = guidance()
    x0, uncond = latents(rows=4)
    guided = g.correct(x0, uncond, progress=0.5, step=0, rows=[0, 2])
    assert torch.equal(guided[[1, 3]], x0[[1, 3]])
    assert not torch.equal(guided[0], x0[0]) and not torch.equal(guided[2], x0[2])
    assert g.correct(x0, uncond, progress=0.5, step=0, rows=[]) is x0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_shape_dtype_and_device_are_preserved(dtype):
    g = guidance()
    x0, uncond = latents(rows=3, size=12)
    x0, uncond = x0.to(dtype), uncond.to(dtype)
    guided = g.correct(x0, uncond, progress=0.5, step=0, rows=[1])
    assert guided.shape == x0.shape and guided.dtype == dtype and guided.device == x0.device
    assert torch.equal(guided[[0, 2]], x0[[0, 2]]) and not torch.equal(guided[1], x0[1])


def test_works_under_no_grad_and_autocast_like_a1111():
    g = guidance()
    x0, uncond = latents()
    expected = g.correct(x0, uncond, progress=0.5, step=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        guided = g.correct(x0, uncond, progress=0.5, step=0)
    assert not guided.requires_grad
    torch.testing.assert_close(guided, expected)


class HostVae(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 3, 3, padding=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(nn.functional.interpolate(z, scale_factor=2.0)))


def test_works_under_inference_mode_with_inference_weights_like_forge():
    with torch.inference_mode():
        host_vae = HostVae()  # Forge loads its models under inference mode
    g = guidance(decoder="vae", vae=private_module(host_vae))
    x0, uncond = latents()
    expected = g.correct(x0, uncond, progress=0.5, step=0)
    with torch.inference_mode():
        x0_inf, uncond_inf = x0.clone(), uncond.clone()
        guided = g.correct(x0_inf, uncond_inf, progress=0.5, step=0)
    assert guided.is_inference() and g.messages == []
    torch.testing.assert_close(guided, expected)
    assert not torch.equal(guided, x0)


def test_the_host_module_itself_cannot_be_differentiated_and_guidance_stops_cleanly():
    with torch.inference_mode():
        host_vae = HostVae()
    g = guidance(decoder="vae", vae=host_vae)
    x0, uncond = latents()
    with torch.inference_mode():
        x0 = x0.clone()
        assert g.correct(x0, uncond, progress=0.5, step=2) is x0
    assert not g.active and len(g.messages) == 1
    assert g.messages[0].startswith("DynFuse guidance failed at step 2 (")
    assert g.messages[0].endswith("guidance is off for this image.")


def test_taesd_decoder_guides_under_inference_mode(tmp_path):
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in TaesdDecoder().state_dict().items()}
    torch.save(state, tmp_path / "taesd_decoder.pth")
    g = guidance(decoder="auto", taesd_dir=tmp_path)
    assert g.decoder_kind == "taesd"
    x0, uncond = latents(size=8)
    with torch.inference_mode():
        guided = g.correct(x0.clone(), uncond.clone(), progress=0.5, step=0)
    assert g.messages == [] and not torch.equal(guided, x0)


def test_taesd_guides_through_a_shrunk_decode_and_moves_every_latent_pixel():
    torch.manual_seed(0)
    decoder = TaesdDecoder(decode_size=64).eval().requires_grad_(False)
    decoded = []
    decoder[1].register_forward_hook(lambda _module, args, _out: decoded.append(tuple(args[0].shape)))
    g = Guidance(decoder, Scorers(CPU, **TINY), GuidanceParams(balance=1.0), subject_refs=[SUBJECT],
                 log=lambda _: None)
    x0, uncond = latents(size=16)
    guided = g.correct(x0, uncond, progress=0.5, step=0)
    assert decoded == [(2, 4, 8, 8)]  # TAESD saw the latent at a quarter of its area
    assert guided.shape == x0.shape and bool(((guided - x0).abs() > 0).all())
    assert (g.loss(guided) < g.loss(x0)).all()


class NanDecoder(nn.Module):
    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return latent[:, :3] * float("nan")


def test_non_finite_gradient_switches_guidance_off_with_one_message():
    messages = []
    scorers = Scorers(CPU, **TINY)
    g = Guidance(NanDecoder(), scorers, subject_refs=[SUBJECT], style_ref=STYLE, log=messages.append)
    x0, uncond = latents()
    assert g.correct(x0, uncond, progress=0.5, step=7) is x0
    assert g.correct(x0, uncond, progress=0.5, step=8) is x0
    assert messages == [NOT_FINITE] and g.messages == [NOT_FINITE] and not g.active
    assert not g.due(0.5, 9) and g.losses == []


def test_missing_references_switch_their_side_off_with_a_message(tmp_path):
    lora = tmp_path / "dog.safetensors"
    lora.write_bytes(b"")
    g = guidance(subject_refs=[], subject_lora=str(lora), style_ref="not-an-image")
    assert g.messages == [
        ("DynFuse guidance: no subject reference (dog.safetensors has no preview image); the subject side is "
         "off. Add a subject reference image to guide it."),
        "DynFuse guidance: style reference skipped: 'not-an-image' is neither an image file nor base64 image data.",
        ("DynFuse guidance: no style reference (the given image could not be read); the style side is off. "
         "Add a style reference image to guide it."),
    ]
    assert g.sides == {"subject": "off (dog.safetensors has no preview image)",
                       "style": "off (the given image could not be read)"}
    x0, uncond = latents()
    assert not g.due(0.5, 0) and g.correct(x0, uncond, progress=0.5, step=0) is x0
    assert g.scores(x0) == [{}, {}]


def test_a_preview_beside_the_lora_becomes_the_reference(tmp_path):
    SUBJECT.save(tmp_path / "dog.preview.png")
    g = guidance(subject_refs=[], subject_lora=str(tmp_path / "dog.safetensors"),
                 params=GuidanceParams(balance=1.0))
    assert g.sides["subject"] == "preview dog.preview.png" and g.messages == []
    assert g.scores([SUBJECT])[0]["subject-DINO"] == pytest.approx(1.0, abs=1e-5)


def test_scores_for_images_pixels_and_latents_and_their_infotext():
    g = guidance(prompt="a red dog <lora:dog:0.8>, watercolor")
    assert g.prompt == "a red dog , watercolor"
    by_pil = g.scores([SUBJECT, STYLE])
    assert set(by_pil[0]) == {"subject-DINO", "style-CLIP", "clip-T"}
    assert by_pil[0]["subject-DINO"] == pytest.approx(1.0, abs=1e-5)
    assert by_pil[1]["style-CLIP"] == pytest.approx(1.0, abs=1e-5)
    pixels = torch.stack([torch.tensor([220, 40, 30]).view(3, 1, 1).expand(3, 40, 40) / 255.0])
    assert g.scores(pixels)[0]["subject-DINO"] == pytest.approx(1.0, abs=1e-5)
    assert len(g.scores(latents()[0])) == 2
    assert format_scores({"clip-T": 0.30149, "subject-DINO": 0.41234, "style-CLIP": 0.6551}) == \
        "subject-DINO 0.412, style-CLIP 0.655, clip-T 0.301"
    assert format_scores({"style-CLIP": 0.5}) == "style-CLIP 0.500"


def test_epsilon_conversions_round_trip_and_match_x0_guidance():
    torch.manual_seed(1)
    x0, x_t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    abar = torch.tensor([0.3, 0.8])
    eps = eps_from_x0(x_t, x0, abar)
    torch.testing.assert_close(x0_from_eps(x_t, eps, abar), x0)
    delta = 0.1 * torch.randn_like(x0)
    torch.testing.assert_close(x0_from_eps(x_t, shift_eps(eps, delta, abar), abar), x0 + delta, rtol=1e-4,
                               atol=1e-5)
    assert torch.equal(shift_eps(eps, torch.zeros_like(eps), 0.5), eps)

    g = guidance()
    eps_uncond = eps + 0.05 * torch.randn_like(eps)
    guided_eps = g.correct_eps(eps, x_t, abar, eps_uncond, progress=0.5, step=0)
    guided_x0 = g.correct(x0_from_eps(x_t, eps, abar), x0_from_eps(x_t, eps_uncond, abar), progress=0.5, step=0)
    torch.testing.assert_close(x0_from_eps(x_t, guided_eps, abar), guided_x0, rtol=1e-4, atol=1e-5)
    assert g.correct_eps(eps, x_t, abar, progress=0.9, step=0) is eps


def test_loss_plot_draws_one_point_per_guided_step():
    curve_colour = (200, 60, 40)
    g = guidance()
    empty = g.loss_plot()
    assert empty.size == (512, 256) and curve_colour not in set(empty.getdata())
    x0, uncond = latents()
    for step in range(3):
        x0 = g.correct(x0, uncond, progress=0.5, step=step)
    image = g.loss_plot()
    assert len(g.losses) == 3 and curve_colour in set(image.getdata())
    # the curve spans the frame: first step at its left edge, last at its right
    columns = {x for x in range(512) for y in range(256) if image.getpixel((x, y)) == curve_colour}
    assert min(columns) <= 50 and max(columns) >= 498


@pytest.mark.slow
def test_full_size_encoders_one_step_raises_both_similarities():
    try:
        for balance, key in ((1.0, "subject-DINO"), (0.0, "style-CLIP")):
            g = guidance(GuidanceParams(strength=0.2, balance=balance), factories=FULL)
            x0, uncond = latents(rows=1, size=32)
            guided = g.correct(x0, uncond, progress=0.5, step=0)
            assert g.scores(guided)[0][key] > g.scores(x0)[0][key]
    finally:
        unload()
