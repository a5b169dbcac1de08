"""Smoke test of the guidance benchmark (python -m lib_dynfuse.bench --guidance): tiny sizes, toy models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest_guidance import guidance_release_models, tiny_clip, tiny_dino  # noqa: F401

from lib_dynfuse.bench import main as unet_bench
from lib_dynfuse.bench import unets
from lib_dynfuse.bench import guidance as bench


class TinyUnet(torch.nn.Module):
    """Takes what the SD1.5 UNet takes (diffusers' keywords) and returns a sample-shaped tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.conv(sample) + encoder_hidden_states.mean()


@pytest.fixture
def toy_models(monkeypatch):
    built = []

    def build_unet(model, device="cpu", dtype=torch.float32):
        built.append((model, dtype))
        return TinyUnet().to(device, dtype)

    monkeypatch.setattr(unets, "build_unet", build_unet)
    monkeypatch.setattr(bench, "_random_clip", tiny_clip)
    monkeypatch.setattr(bench, "_random_dino", tiny_dino)
    return built


def test_guidance_bench_reports_each_decoders_cost_against_a_unet_step(toy_models):
    result = bench.run(decoders=("approx",), size=64, device="cpu", repeats=1, dtype=torch.bfloat16)
    assert set(result) == {"guided_step_over_unet_step", "guided_step_s", "unet_step_s", "decode_size",
                           "decoded_image", "device", "dtype", "latent", "encoders", "repeats", "threads"}
    assert set(result["guided_step_over_unet_step"]) == {"approx"} and result["guided_step_over_unet_step"]["approx"] > 0
    assert result["guided_step_s"]["approx"] > 0 and result["unet_step_s"] > 0
    assert result["decoded_image"] == {"approx": [8, 8]} and result["latent"] == [1, 4, 8, 8]
    assert (result["dtype"], result["repeats"], result["device"]) == ("bfloat16", 1, "cpu")
    assert toy_models == [("sd15", torch.bfloat16)]
    json.dumps(result)  # the CLI prints it as its last line


def test_the_cli_passes_repeats_and_dtype_to_the_guidance_bench(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "run", lambda **kwargs: calls.append(kwargs) or {"ok": True})
    assert unet_bench.main(["--guidance", "--device", "cpu", "--size", "64", "--repeats", "2",
                            "--dtype", "bfloat16"]) == 0
    assert calls == [{"size": 64, "device": "cpu", "repeats": 2, "dtype": torch.bfloat16}]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ok": True}
