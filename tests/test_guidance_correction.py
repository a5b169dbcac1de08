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
from lib_dynfuse.guidance.plot import CURVE
from lib_dynfuse.settings import UnreadableImage

SUBJECT = Image.new("RGB", (40, 40), (220, 40, 30))
STYLE = Image.new("RGB", (48, 32), (20, 60, 210))
NOT_FINITE = ("DynFuse: guidance: the gradient was not finite at step 7; guidance is off for the rest of this "
              "generation. Lower Guidance strength or choose Decoder 'approx'.")


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
    assert not g.active and len(g.messages) == 1 and g.off_reason == "failed at step 2 (RuntimeError)"
    assert g.messages[0].startswith("DynFuse: guidance: failed at step 2 (RuntimeError: Inference tensors ")
    assert g.messages[0].endswith("); guidance is off for the rest of this generation. If it happens again, choose "
                                  "Decoder 'approx'.")


def test_running_out_of_memory_in_a_step_names_the_device_setting(monkeypatch):
    g = guidance()

    def too_big(images):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(g.scorers, "dino_image", too_big)
    x0, uncond = latents()
    assert g.correct(x0, uncond, progress=0.5, step=3) is x0
    assert g.messages == [
        ("DynFuse: guidance: out of memory at step 3; guidance is off for the rest of this generation. Choose Decoder "
         "'approx', or set Settings > DynFuse > CLIP/DINO device (auto, cpu, cuda:0, ...) to cpu.")]
    assert not g.active and g.off_reason == "out of memory at step 3"


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
    assert g.off_reason == "the gradient was not finite at step 7"


def test_missing_references_switch_their_side_off_with_one_message(tmp_path):
    lora = tmp_path / "dog.safetensors"
    lora.write_bytes(b"")
    g = guidance(subject_refs=[], subject_lora=str(lora), style_ref="not-an-image")
    assert g.messages == [
        ("DynFuse: guidance: the subject side is off (no image under Subject references, and dog.safetensors has no "
         "preview image); the style side is off (Style reference: 'not-an-image' is neither an image file nor "
         "base64 image data). Add an image under Subject references / Style reference in the DynFuse panel, or put "
         "a preview image beside the LoRA file.")]
    assert g.reference_notes() == ["guidance subject side off: no reference image",
                                   "guidance style side off: unreadable reference"]
    x0, uncond = latents()
    assert not g.due(0.5, 0) and g.correct(x0, uncond, progress=0.5, step=0) is x0
    assert g.scores(x0) == [{}, {}]


def test_only_sides_that_count_are_reported_and_skipped_references_are_named():
    g = guidance(subject_refs=[SUBJECT, UnreadableImage("subject_refs[1] is not a base64-encoded image")],
                 style_ref=None, params=GuidanceParams(balance=1.0))
    # balance 1 gives the style no weight: its missing reference is no loss
    assert g.messages == [("DynFuse: guidance: Subject references: subject_refs[1] is not a base64-encoded image; "
                           "skipped.")]
    assert g.reference_notes() == ["guidance: 1 unreadable subject reference(s) skipped"]
    assert g.subject_embedding is not None and g.due(0.5, 0)
    assert g.sides == {"subject": "2 image(s) given", "style": "off (no image under Style reference, and the LoRA's "
                                                                "file is not known)"}


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
    outside = guidance(GuidanceParams(start=0.2, end=0.7))
    assert outside.correct_eps(eps, x_t, abar, progress=0.9, step=0) is eps  # past its window: untouched


def curve_columns(image) -> list[int]:
    """Per image column, how many pixels the loss curve paints there."""
    pixels = image.load()
    return [sum(pixels[x, y] == CURVE for y in range(image.size[1])) for x in range(image.size[0])]


def test_loss_plot_draws_one_point_per_guided_step():
    g = guidance()
    empty = g.loss_plot()
    assert empty.size == (512, 256) and CURVE not in set(empty.getdata())
    x0, uncond = latents()
    for step in range(3):
        x0 = g.correct(x0, uncond, progress=0.5, step=step)
    image = g.loss_plot()
    assert len(g.losses) == 3 and CURVE in set(image.getdata())
    # the curve spans the frame: first step at its left edge, last at its right
    columns = [x for x, n in enumerate(curve_columns(image)) if n]
    assert min(columns) <= 50 and max(columns) >= 498


def test_loss_plot_draws_one_line_per_sampling_run():
    """Batches and hires passes start their steps over: each is its own line, none joins the end of one run to the
    start of the next across the plot."""
    g = guidance(GuidanceParams(start=0.0, end=1.0))
    x0, uncond = latents()
    for step in (0, 1, 2, 0, 1, 2):  # two batches of three guided steps
        g.correct(x0, uncond, progress=step / 3, step=step)
    assert g.runs == [0, 3] and len(g.losses) == 6
    counts = curve_columns(g.loss_plot())
    # one line per run: a column between two steps holds two line pieces at most (a third would be the
    # zigzag back from step 2 to step 0 crossing them)
    middle = counts[150:200] + counts[300:350]
    assert max(middle) <= 2 * 3 and min(middle) > 0
    single = g.loss_plot()
    g.runs = [0]  # as if it were one run: the line back from the last step crosses the middle again
    assert max(curve_columns(g.loss_plot())[150:200]) > max(curve_columns(single)[150:200])


def test_clip_t_compares_each_image_with_its_own_prompt():
    g = guidance(prompt="a red dog <lora:dog:0.8>")
    images = [SUBJECT, SUBJECT]
    own = g.scores(images, prompts=["a red dog <lora:dog:1>", "a blue boat"])
    with torch.no_grad():
        image = torch.nn.functional.normalize(g.scorers.clip_image(
            torch.tensor([220, 40, 30]).view(1, 3, 1, 1).expand(1, 3, 40, 40) / 255.0), dim=-1)[0]
        texts = torch.nn.functional.normalize(g.scorers.clip_text(["a red dog", "a blue boat"]), dim=-1)
    assert [row["clip-T"] for row in own] == pytest.approx((texts @ image).tolist(), abs=1e-5)
    assert own[0]["clip-T"] != pytest.approx(own[1]["clip-T"], abs=1e-4)
    assert [row["clip-T"] for row in g.scores(images)] == pytest.approx([own[0]["clip-T"]] * 2, abs=1e-5)


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
