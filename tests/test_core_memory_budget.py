"""The divergence's memory budget in bytes: past it the divergence is measured in chunks that stay under it; the
default keeps every layer a kohya LoCon LoRA touches in SD1.5 and SDXL in one piece at the sizes users run."""

from unittest import mock

import pytest
import torch

from lib_dynfuse.bench.memory import AllocationTracker
from lib_dynfuse.bench.unets import CONFIGS, lora_layers, unet_inputs
from lib_dynfuse.engine import divergence, fusion
from lib_dynfuse.engine.divergence import CPU_BUDGET, memory_budget, needed_bytes
from lib_dynfuse.engine.measure import MeasureOptions
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.engine.session import BatchLayout, FusionSession, LayerTarget, StepClock
from tests.test_core_op_counts import low_rank

MB = 1 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_small_budget_chunks_the_divergence_and_its_peak_stays_under_it(kind, dtype):
    """One image with CFG, 4096 tokens of 320 channels: the divergence takes 15.7 MB in one piece. (A 1x1
    convolution: the CPU's half-precision 3x3 convolutions are slow, and the divergence sees only the output.)"""
    layer = (torch.nn.Linear(320, 320) if kind == "linear" else torch.nn.Conv2d(320, 320, 1)).to(dtype)
    x = (torch.randn(2, 4096, 320) if kind == "linear" else torch.randn(2, 320, 64, 64)).to(dtype)
    kernel = (1, 1) if kind == "conv" else ()
    targets = [LayerTarget("layer", layer, low_rank(layer, 1, kernel).to(dtype=dtype),
                           low_rank(layer, 2, kernel).to(dtype=dtype))]
    peaks, chunks = [], []
    original_sums, original_measure = fusion.divergence_sums, divergence.measure_tokens

    def tracked(*args, **kwargs):
        with AllocationTracker() as tracker:
            result = original_sums(*args, **kwargs)
        peaks.append(tracker.peak)
        return result

    for budget_mb in (4, 0):
        chunks.append(0)

        def counted(*args):
            chunks[-1] += 1
            return original_measure(*args)

        session = FusionSession(targets, EngineOptions(divergence_budget_mb=budget_mb))
        with torch.no_grad(), session, mock.patch.object(fusion, "divergence_sums", tracked), \
                mock.patch.object(divergence, "measure_tokens", counted):
            session.set_layout(BatchLayout.a1111(1))
            session.set_step(StepClock(0, 10))
            layer(x)
    assert chunks == [4, 1]
    assert peaks[0] <= 4 * MB < peaks[1] <= 16 * MB


# SD1.5's and SDXL's text encoders and VAE, in parameters: what else an 8 GB GPU holds while the UNet samples.
TEXT_ENCODERS = {"sd15": 123_060_480, "sdxl": 817_000_000}
VAE = 83_653_863
OTHER_ACTIVATIONS = 1 << 30  # the UNet's own activations and skip connections, generously
GPU = 8 << 30


def largest_needs(model, size):
    """Per LoCon layer of ``model`` at ``size``² pixels, one image with CFG in fp16: what its divergence takes in one
    piece and what its call holds beside it (the layer output and the two candidates), in bytes; and the UNet's
    parameters. On the meta device: shapes only."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIGS[model]).half().eval()
    needs = []

    def record(module, args, output):
        base = output[:1]  # the cond row decides
        candidates = output.expand(2, *output.shape)
        channel_dim = 1 if isinstance(module, torch.nn.Conv2d) else -1
        needs.append((needed_bytes(base, candidates[:, :1], channel_dim=channel_dim, options=MeasureOptions()),
                      3 * output.numel() * output.element_size()))

    for layer in lora_layers(unet, "all").values():
        layer.register_forward_hook(record)
    with torch.no_grad():
        unet(**unet_inputs(model, size, batch=2, device="meta", dtype=torch.float16))
    return needs, sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("model,size", [("sd15", 1536), ("sdxl", 1536)])
def test_on_an_8_gb_gpu_the_default_budget_keeps_every_layer_in_one_piece(model, size):
    """The largest size users run (1024 with a 1.5x hires pass; smaller sizes need less), fp16, with the allocator
    reporting what an 8 GB GPU has free during the layer's call: the weights (SDXL's text encoders off the GPU
    while sampling, as A1111's --medvram-sdxl and Forge's memory management keep them), the layer's output and
    candidates, and 1 GiB of other activations taken from 8 GiB."""
    needs, unet_params = largest_needs(model, size)
    weights = 2 * (unet_params + VAE + (TEXT_ENCODERS[model] if model == "sd15" else 0))
    for need, beside in needs:
        free = GPU - weights - beside - OTHER_ACTIVATIONS
        with mock.patch.object(torch.cuda, "mem_get_info", return_value=(free, GPU)), \
                mock.patch.object(torch.cuda, "memory_reserved", return_value=0), \
                mock.patch.object(torch.cuda, "memory_allocated", return_value=0):
            assert need <= memory_budget(torch.device("cuda", 0))


@pytest.mark.parametrize("model,size", [("sd15", 1152), ("sdxl", 1536)])
def test_on_the_cpu_the_default_budget_keeps_every_layer_in_one_piece(model, size):
    """SD1.5 up to 768 with a 1.5x hires pass, SDXL up to 1024 with one; SD1.5 at 1536 takes two pieces."""
    needs, _ = largest_needs(model, size)
    assert max(need for need, _ in needs) <= memory_budget(torch.device("cpu")) == CPU_BUDGET


def test_the_settings_tabs_budget_replaces_the_default():
    assert memory_budget(torch.device("cpu"), 256) == 256 * MB
    with mock.patch.object(torch.cuda, "mem_get_info", side_effect=AssertionError("not read")):
        assert memory_budget(torch.device("cuda", 0), 300) == 300 * MB
