"""The fake Forge host behaves like Forge main where dynfuse depends on it (call order, batching, merging,
inference mode, callbacks). If one of these fails, the Forge adapter tests prove nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("forge_harness", Path(__file__).parent / "fakehost/forge/forge_harness.py")
fh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fh)


@pytest.fixture
def host(tmp_path):
    with fh.forge_host(tmp_path) as host:
        fh.write_test_loras(tmp_path, host.sd_model)
        yield host


class Recorder:
    """An always-on script and CFG callbacks that record what Forge hands to extensions."""

    filename = "recorder"

    def __init__(self, host):
        self.host = host
        self.events = []
        self.denoiser = []
        self.after = []
        self.chunks = []
        host.script_callbacks.on_cfg_denoiser(self.on_denoiser)
        host.script_callbacks.on_cfg_after_cfg(self.on_after)

    def process(self, p):
        self.events.append(("process", torch.is_inference_mode_enabled()))

    def process_before_every_sampling(self, p, **kwargs):
        self.events.append(("before_sampling", torch.is_inference_mode_enabled()))
        unet = p.sd_model.forge_objects.unet.clone()

        def wrapper(apply_model, args):
            self.chunks.append((list(args["cond_or_uncond"]), tuple(args["input"].shape),
                                args["c"]["transformer_options"]["sigmas"].shape))
            return apply_model(args["input"], args["timestep"], **args["c"])

        unet.set_model_unet_function_wrapper(wrapper)
        p.sd_model.forge_objects.unet = unet

    def postprocess(self, p, processed):
        self.events.append(("postprocess", torch.is_inference_mode_enabled()))

    def on_denoiser(self, params):
        self.denoiser.append((tuple(params.x.shape), tuple(params.sigma.shape), params.sampling_step,
                              params.denoiser.step))

    def on_after(self, params):
        self.after.append(params.x.clone())


def test_call_order_inference_mode_and_three_sampling_hooks_with_hires(host):
    rec = Recorder(host)
    runner = host.scripts.ScriptRunner([rec])
    processed, _ = host.txt2img(fh.PROMPT, runner=runner, steps=3, enable_hr=True, batch_size=2)
    assert rec.events == [("process", False), ("before_sampling", True), ("before_sampling", True),
                          ("before_sampling", True), ("postprocess", False)]
    assert processed.images[0].shape == (3, 128, 128)
    # first pass 3 steps; hires asks img2img for 3 steps, which it runs as the last 3 of a 6-step schedule
    assert [d[3] for d in rec.denoiser] == [0, 1, 2, 0, 1, 2]
    assert [d[2] for d in rec.denoiser] == [0, 0, 1, 0, 0, 1]       # shared.state.sampling_step lags by one
    assert rec.denoiser[0][:2] == ((2, 4, 8, 8), (2,))                # [B], not the cond+uncond batch


def test_cond_and_uncond_share_a_call_uncond_first_and_split_when_memory_is_short(host):
    rec = Recorder(host)
    runner = host.scripts.ScriptRunner([rec])
    host.txt2img(fh.PROMPT, runner=runner, steps=2, batch_size=2)
    assert rec.chunks[0] == ([1, 0], (4, 4, 8, 8), (2,))

    rec.chunks.clear()
    one_chunk = host.sd_model.forge_objects.unet.model.memory_required([2, 4, 8, 8])
    host.memory_management.free_memory_bytes = one_chunk * 1.5
    host.txt2img(fh.PROMPT, runner=runner, steps=2, batch_size=2)
    assert [c[0] for c in rec.chunks] == [[1], [0], [1], [0]]
    assert rec.chunks[0][1] == (2, 4, 8, 8)


def test_cfg_one_drops_the_uncond_chunk(host):
    rec = Recorder(host)
    host.txt2img(fh.PROMPT, runner=host.scripts.ScriptRunner([rec]), steps=2, cfg_scale=1.0)
    assert [c[0] for c in rec.chunks] == [[0], [0]]


def test_after_cfg_x_is_the_x0_prediction_and_replacing_it_changes_the_result(host):
    rec = Recorder(host)
    runner = host.scripts.ScriptRunner([rec])
    base, _ = host.txt2img("a dog", runner=runner, steps=3)
    assert rec.after[0].shape == (1, 4, 8, 8) and rec.after[0].is_inference()

    host.script_callbacks.on_cfg_after_cfg(lambda params: setattr(params, "x", params.x * 0.5))
    changed, _ = host.txt2img("a dog", runner=runner, steps=3)
    assert not torch.equal(base.images[0], changed.images[0])


def test_model_parameters_are_inference_tensors_and_forge_linear_is_not_nn_linear(host):
    model = host.sd_model.forge_objects.unet.model
    q = model.get_submodule("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    conv = model.get_submodule("diffusion_model.input_blocks.1.0.in_layers.2")
    assert not isinstance(q, torch.nn.Linear)
    assert isinstance(conv, torch.nn.Conv2d)
    assert all(p.is_inference() for p in model.parameters())


def test_lora_store_layout_and_merge_only_when_the_key_list_changes(host, tmp_path):
    original = fh.unet_weights(host.sd_model)
    host.txt2img(fh.PROMPT, steps=2)
    unet = host.sd_model.forge_objects.unet
    loader = unet.lora_loader
    key = (str(tmp_path / "subj.safetensors"), 0.8, 1.0, False)
    assert next(iter(unet.lora_patches)) == key
    entry = unet.lora_patches[key]["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"][0]
    assert entry[0] == 0.8 and entry[1][0] == "lora" and entry[2:] == [1.0, None, None]
    up, down, alpha, mid, dora = entry[1][1]
    assert up.shape == (8, 2) and down.shape == (2, 8) and alpha == 1.0 and mid is None and dora is None
    assert loader.merge_count == 1

    host.txt2img(fh.PROMPT, steps=2)
    assert loader.merge_count == 1                      # same key list: no re-merge

    host.txt2img("a dog", steps=2)                      # no LoRA: originals restored
    assert loader.merge_count == 2
    after = fh.unet_weights(host.sd_model)
    assert all(torch.equal(original[k], after[k]) for k in original)


def test_unet_lora_merge_matches_the_low_rank_product(host, tmp_path):
    host.txt2img("a dog <lora:subj:0.8>", steps=1)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    assert key in fh.unet_weights(host.sd_model)
    sd = host.networks.load_lora_state_dict(str(tmp_path / "subj.safetensors"))
    prefix = fh.kohya_keys()[key]
    expected = (host.sd_model.forge_objects.unet.lora_loader.backup[key]
                + 0.8 * 1.0 / 2 * sd[f"{prefix}.lora_up.weight"] @ sd[f"{prefix}.lora_down.weight"])
    torch.testing.assert_close(fh.unet_weights(host.sd_model)[key], expected)
