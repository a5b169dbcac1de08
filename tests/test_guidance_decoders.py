from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_dynfuse.guidance import DecoderError, make_decoder, private_module, taesd_path
from lib_dynfuse.guidance.decoders import ApproxDecoder, TaesdDecoder, VaeDecoder, family_key

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
    with pytest.raises(DecoderError, match="no decoder for the model family 'Flux'"):
        family_key("Flux")


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
