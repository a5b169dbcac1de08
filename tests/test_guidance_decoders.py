from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_dynfuse.guidance import DecoderError, make_decoder, private_module, taesd_path
from lib_dynfuse.guidance.decoders import ApproxDecoder, TaesdDecoder, VaeDecoder, family_key, shrink_latent
from lib_dynfuse.guidance.scorers import CLIP_MEAN, CLIP_STD, preprocess

SD1_TABLE = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173],
                          [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])
SDXL_TABLE = torch.tensor([[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250],
                           [0.1074, 0.0886, -0.0163], [-0.3730, -0.2499, -0.2088]])


def taesd_state_dict_keys() -> list[str]:
    """The key names of madebyollin/taesd's taesd_decoder.pth, written out from its published layout:
    0 clamp, 1 conv, 2 relu, then three stages of 3 blocks + upsample + bias-free conv, one block, a conv."""
    keys = ["1.weight", "1.bias"]
    blocks = [3, 4, 5, 8, 9, 10, 13, 14, 15, 18]
    for b in blocks:
        for c in (0, 2, 4):
            keys += [f"{b}.conv.{c}.weight", f"{b}.conv.{c}.bias"]
    keys += ["7.weight", "12.weight", "17.weight", "19.weight", "19.bias"]
    return keys


def test_approx_is_the_hosts_linear_table_mapped_to_unit_range():
    latent = torch.randn(2, 4, 8, 8)
    for family, table in (("SD1.5", SD1_TABLE), ("SDXL", SDXL_TABLE)):
        expected = torch.einsum("bchw,cr->brhw", latent, table) * 0.5 + 0.5
        torch.testing.assert_close(ApproxDecoder(family)(latent), expected)


def test_family_names_are_normalised_and_unknown_ones_refused():
    assert family_key("sd15") == "SD1.5" and family_key("SD-XL") == "SDXL" and family_key("SD2") == "SD2"
    assert family_key("Flux") == "FLUX"
    with pytest.raises(DecoderError, match="no decoder for the model family 'Wan'"):
        family_key("Wan")


def test_taesd_has_the_real_key_names_and_loads_a_saved_state_dict(tmp_path):
    model = TaesdDecoder()
    assert sorted(model.state_dict()) == sorted(taesd_state_dict_keys())
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "taesd_decoder.pth")
    decoder, kind = make_decoder("taesd", "SD1.5", taesd_dir=tmp_path)
    assert kind == "taesd"
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert decoder.decode_size == 224
    assert decoder(torch.randn(1, 4, 8, 8)).shape == (1, 3, 64, 64)
    assert not any(p.requires_grad for p in decoder.parameters())


def test_auto_picks_taesd_only_when_the_family_file_exists(tmp_path):
    torch.save(TaesdDecoder().state_dict(), tmp_path / "taesdxl_decoder.pth")
    assert make_decoder("auto", "SD1.5", taesd_dir=tmp_path)[1] == "approx"
    assert make_decoder("auto", "SD1.5")[1] == "approx"
    assert make_decoder("auto", "SDXL", taesd_dir=tmp_path)[1] == "taesd"
    assert taesd_path("SDXL", tmp_path) == str(tmp_path / "taesdxl_decoder.pth")


def test_taesd_missing_or_damaged_file_gives_one_clear_message(tmp_path):
    with pytest.raises(DecoderError, match=r"the TAESD decoder file .*taesd_decoder.pth is missing; choose "
                                           r"decoder 'approx' or 'auto'"):
        make_decoder("taesd", "SD1.5", taesd_dir=tmp_path)
    (tmp_path / "taesd_decoder.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DecoderError, match="could not load the TAESD decoder"):
        make_decoder("taesd", "SD1.5", taesd_dir=tmp_path)


def test_unknown_kind_and_vae_without_a_model_are_refused():
    with pytest.raises(DecoderError, match="unknown decoder 'full'"):
        make_decoder("full", "SD1.5")
    with pytest.raises(DecoderError, match="needs the model's VAE"):
        make_decoder("vae", "SD1.5")


@pytest.mark.parametrize("kind,family,files,reason", [
    ("taesd", "SD1.5", {}, "TAESD file missing"),
    ("taesd", "SD1.5", {"taesd_decoder.pth": b"not a checkpoint"}, "TAESD file does not load"),
    ("vae", "SD1.5", {}, "no VAE for decoder 'vae'"),
    ("full", "SD1.5", {}, "unknown decoder 'full'"),
    ("approx", "Wan", {}, "no decoder for this model"),
])
def test_each_refusal_says_why_in_a_few_words_for_the_infotext(tmp_path, kind, family, files, reason):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DecoderError) as info:
        make_decoder(kind, family, taesd_dir=tmp_path)
    assert info.value.reason == reason and "\n" not in str(info.value)


class FakeVae(nn.Module):
    """Stands in for a host first_stage_model: decode(z) -> pixels in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 3, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(z))


def test_vae_decoder_unscales_the_latent_and_maps_to_unit_range():
    vae = FakeVae()
    decoder, kind = make_decoder("vae", "SDXL", vae=vae)
    latent = torch.randn(1, 4, 4, 4)
    assert kind == "vae" and isinstance(decoder, VaeDecoder)
    torch.testing.assert_close(decoder(latent), vae.decode(latent / 0.13025) * 0.5 + 0.5)


def test_private_module_makes_inference_weights_differentiable():
    with torch.inference_mode():
        host = FakeVae()  # like Forge: weights created under inference mode
    assert host.proj.weight.is_inference()
    twin = private_module(host)
    assert not any(t.is_inference() for t in list(twin.parameters()) + list(twin.buffers()))
    torch.testing.assert_close(twin.proj.weight, host.proj.weight.clone())
    z = torch.randn(1, 4, 2, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(twin.decode(z).sum(), z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("shape, shrunk", [((64, 64), (28, 28)), ((64, 96), (28, 42)), ((96, 64), (42, 28)),
                                           ((128, 128), (28, 28)), ((29, 29), (28, 28))])
def test_a_large_latent_is_shrunk_to_the_encoders_size_keeping_its_aspect_ratio(shape, shrunk):
    latent = torch.randn(1, 4, *shape, dtype=torch.float16)
    out = shrink_latent(latent, 224, 8)
    assert out.shape == (1, 4, *shrunk) and out.dtype == torch.float16


def test_small_latents_the_linear_map_and_decode_size_none_are_left_alone():
    big = torch.randn(1, 4, 64, 64)
    for latent, decode_size, upscale in ((torch.randn(1, 4, 28, 40), 224, 8), (torch.randn(1, 4, 20, 20), 224, 8),
                                         (big, None, 8), (big, 224, 1)):
        assert shrink_latent(latent, decode_size, upscale) is latent
    assert ApproxDecoder.decode_size is None and VaeDecoder.decode_size is None


def test_a_flat_latent_stays_flat():
    latent = torch.full((1, 4, 64, 96), 0.7)
    torch.testing.assert_close(shrink_latent(latent, 224, 8), torch.full((1, 4, 28, 42), 0.7))


def test_taesd_decodes_at_its_decode_size_and_none_means_full_size():
    torch.manual_seed(0)
    latent = torch.randn(1, 4, 16, 24)
    assert TaesdDecoder(decode_size=64)(latent).shape == (1, 3, 64, 96)
    assert TaesdDecoder(decode_size=None)(latent).shape == (1, 3, 128, 192)


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (rows: frequencies)."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    c = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2 / n)
    c[0] /= math.sqrt(2)
    return c


def high_band_share(grad: torch.Tensor, band: int) -> float:
    """Share of the energy of ``grad`` [..., n, n] in the frequencies a band x band grid cannot hold (DCT
    index >= band on either axis). A resampling grid prints itself there; a smooth field has ~none."""
    c = dct_matrix(grad.shape[-1])
    energy = (c @ grad.double() @ c.T).pow(2).flatten(0, -3).sum(0)
    return float(1 - energy[:band, :band].sum() / energy.sum())


def input_gradient(resize, upstream: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    z = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((resize(z) * upstream).sum(), z)
    return grad


def smooth_field(channels: int, size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([torch.cos(2 * math.pi * (x + 0.3 * c)) * torch.sin(1.5 * math.pi * y) + 0.3
                        for c in range(channels)]).unsqueeze(0)


def test_the_gradient_through_the_shrink_carries_no_resampling_grid():
    """A smooth loss of the 28x28 latent sends a smooth gradient to the 64x64 one: flat for the mean (away
    from the border) and with almost no energy beyond what 28 samples hold. Nearest sampling and area
    averaging, which fail both, show the check can fail."""
    x0 = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = lambda z: shrink_latent(z, 224, 8)
    controls = {"nearest": lambda z: F.interpolate(z, size=(28, 28), mode="nearest"),
                "area": lambda z: F.interpolate(z, size=(28, 28), mode="area")}

    def ripple(resize) -> float:
        flat = input_gradient(resize, torch.ones(1, 4, 28, 28), x0)[..., 4:-4, 4:-4]
        return float((flat.max() - flat.min()) / flat.mean())

    def share(resize) -> float:
        return high_band_share(input_gradient(resize, smooth_field(4, 28), x0), 28)

    assert ripple(ours) < 0.05 and share(ours) < 0.01
    for resize in controls.values():
        assert ripple(resize) > 0.5 and share(resize) > 0.1


def test_the_gradient_through_a_shrunk_taesd_decode_carries_no_resampling_grid():
    """End to end as guidance runs it: shrink, TAESD, the encoders' resize, a smooth loss of the image.
    The gradient on the full latent has less high-band energy than with the full-size decode, unlike
    with a nearest or area shrink."""
    torch.manual_seed(0)
    shrunk = TaesdDecoder(decode_size=112).eval().requires_grad_(False)
    full = TaesdDecoder(decode_size=None).eval().requires_grad_(False)
    full.load_state_dict(shrunk.state_dict())
    x0 = F.interpolate(torch.randn(1, 4, 6, 6), size=(32, 32), mode="bicubic") + 0.3 * torch.randn(1, 4, 32, 32)
    field = smooth_field(3, 112)

    def share(decode) -> float:
        encoder_input = lambda z: preprocess(decode(z), (112, 112), CLIP_MEAN, CLIP_STD, torch.float32)
        return high_band_share(input_gradient(encoder_input, field, x0), 14)

    ours, reference = share(shrunk), share(full)
    nearest = share(lambda z: full(F.interpolate(z, size=(14, 14), mode="nearest")))
    area = share(lambda z: full(F.interpolate(z, size=(14, 14), mode="area")))
    assert ours < 0.05 and ours < reference / 4, (ours, reference)
    assert nearest > 0.5 and area > 0.1, (nearest, area)
