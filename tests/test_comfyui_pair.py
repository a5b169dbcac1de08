"""The DynFuse LoRA pair and selection map nodes on the fake ComfyUI (tests/fakehost/comfyui): `static` gives
LoraLoader's image, the choosing methods decide per image and per part, the rest of the graph's LoRAs and models
are as ComfyUI makes them, and nothing stays on the model after an interrupt or an error."""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

HARNESS = Path(__file__).parent / "fakehost/comfyui/comfyui_harness.py"
_spec = importlib.util.spec_from_file_location("comfyui_harness", HARNESS)
ch = sys.modules.get("comfyui_harness") or importlib.util.module_from_spec(_spec)
if "comfyui_harness" not in sys.modules:
    sys.modules["comfyui_harness"] = ch
    _spec.loader.exec_module(ch)


@pytest.fixture(params=["sd15"])
def host(request, tmp_path):
    with ch.comfy_host(tmp_path, family=request.param) as host:
        ch.write_test_loras(host)
        yield host


def loraloader_pair(host, model=None, clip=None):
    model, clip = host.lora_loader(model or host.model, clip or host.clip, "subject.safetensors", 0.8)
    return host.lora_loader(model, clip, "style.safetensors", 1.0)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal within float32 rounding carried through a few sampling steps (the CPU's matrix products already
    differ in the last bits when the same weights sit at other addresses)."""
    return bool((a - b).abs().max() <= rel * b.abs().max())


def hooks_on(model) -> int:
    return sum(len(m._forward_hooks) for m in model.model.modules())


@pytest.mark.parametrize("host", ["sd15", "sdxl", "flux"], indirect=True)
def test_static_gives_loraloaders_image(host):
    fused, fused_clip = host.pair(method="static")
    merged, merged_clip = loraloader_pair(host)
    assert close(host.sample(fused, fused_clip, steps=1), host.sample(merged, merged_clip, steps=1), 1e-5)
    assert close(host.sample(fused, fused_clip), host.sample(merged, merged_clip))


def test_the_text_encoder_gets_loraloaders_merge_and_the_unet_none(host):
    original = host.weights()
    fused, fused_clip = host.pair(method="kl")
    _, merged_clip = loraloader_pair(host)
    with torch.inference_mode():
        assert torch.equal(fused_clip.encode(ch.PROMPT), merged_clip.encode(ch.PROMPT))
    assert fused.patches == {} and len(fused_clip.patcher.patches) == len(merged_clip.patcher.patches)
    seen = []
    fused.add_wrapper_with_key("apply_model", "probe", lambda ex, *a, **k: seen.append(host.weights()) or ex(*a, **k))
    host.sample(fused, fused_clip, steps=2)
    assert seen and all(torch.equal(w[k], original[k]) for w in seen for k in original)


def test_kl_decides_per_image_and_differs_from_static(host):
    fused, clip = host.pair(method="kl")
    static, _ = host.pair(method="static")
    kl_image = host.sample(fused, clip, batch=2)
    assert not close(kl_image, host.sample(static, clip, batch=2), 1e-3)
    image, share = host.run("DynFuseSelectionMap", model=fused, samples={"samples": kl_image})
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= image.min() <= image.max() <= 1
    shares = [float(part.rsplit(" ", 1)[1]) for part in share.split("; ")]
    assert share.startswith("image 0: subject ") and len(shares) == 2 and shares[0] != shares[1]


def test_the_uncond_rows_follow_their_image_whatever_the_chunks(host):
    """ComfyUI batches uncond first, or one chunk per call when memory is short: the same decisions either way."""
    fused, clip = host.pair(method="kl")
    together = host.sample(fused, clip, batch=2)
    log_together = ch_log(fused)
    host.model_management.max_batch_rows = 2
    apart = host.sample(fused, clip, batch=2)
    assert close(apart, together, 1e-5)
    assert [d.subject_weight for d in ch_log(fused).decisions()] == [d.subject_weight for d in log_together.decisions()]


def ch_log(model):
    from lib_dynfuse.hosts.comfyui import fusion_of

    return fusion_of(model).last_log


@pytest.mark.parametrize("host", ["flux"], indirect=True)
def test_flux_slices_become_parts_decided_apart(host):
    fused, clip = host.pair(method="kl")
    host.sample(fused, clip, batch=2)
    layers = {name.removeprefix("diffusion_model.") for name in ch_log(fused).layers}
    assert {"double_blocks.0.img_attn.qkv:q", "double_blocks.0.img_attn.qkv:k", "double_blocks.0.img_attn.qkv:v",
            "single_blocks.0.linear1:q", "single_blocks.0.linear1:mlp"} <= layers
    assert "double_blocks.0.img_attn.proj" not in layers  # the style's alone: added, nothing to decide


def test_other_loras_stay_as_comfyui_applies_them(host):
    before, before_clip = host.lora_loader(host.model, host.clip, "other.safetensors", 0.5)
    fused, clip = host.pair(before, before_clip, method="static")
    after, after_clip = host.lora_loader(fused, clip, "other.safetensors", 0.5)
    other_entries = [e for entries in after.patches.values() for e in entries]
    assert len(other_entries) == 2 * len([e for entries in before.patches.values() for e in entries])
    merged, merged_clip = loraloader_pair(host, before, before_clip)
    reference, reference_clip = host.lora_loader(merged, merged_clip, "other.safetensors", 0.5)
    assert close(host.sample(after, after_clip), host.sample(reference, reference_clip))


def test_models_of_one_checkpoint_do_not_affect_each_other(host):
    plain = host.sample(host.model)
    fused, clip = host.pair(method="kl")
    first = host.sample(fused, clip)
    assert close(host.sample(host.model), plain, 1e-5)
    static, _ = host.pair(method="static")
    host.sample(static, clip)
    with_other, _ = host.lora_loader(fused, clip, "other.safetensors", 0.5)  # a clone of the DynFuse model
    host.sample(with_other, clip)
    assert close(host.sample(fused, clip), first, 1e-5)
    assert close(host.sample(host.model), plain, 1e-5)


def test_an_interrupt_or_an_error_leaves_the_model_as_it_was(host):
    plain = host.sample(host.model)
    original = host.weights()
    fused, clip = host.pair(method="kl")
    host.model_management.interrupt_current_processing(True)
    with pytest.raises(host.model_management.InterruptProcessingException):
        host.sample(fused, clip, steps=3)
    assert close(host.sample(host.model), plain, 1e-5)
    failing = fused.clone()
    failing.add_wrapper_with_key("apply_model", "broken", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        host.sample(failing, clip)
    assert close(host.sample(host.model), plain, 1e-5)
    host.model_management.unload_all_models()
    assert hooks_on(host.model) == 0
    assert all(torch.equal(v, original[k]) for k, v in host.weights().items())


def test_memory_stays_flat_over_twenty_runs(host):
    fused, clip = host.pair(method="kl")

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(3):
        host.sample(fused, clip, steps=2)
    start = live_tensors()
    for _ in range(20):
        host.sample(fused, clip, steps=2)
    assert live_tensors() == start
    assert hooks_on(host.model) == len({id(t.module) for t in ch_fusion(fused).targets})


def ch_fusion(model):
    from lib_dynfuse.hosts.comfyui import fusion_of

    return fusion_of(model)


def test_a_lora_without_weights_for_the_model_merges_statically_and_says_so(host, tmp_path, capsys):
    from lora_files import write

    write(host.lora_dir / "foreign.safetensors", {"lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2),
                                                   "lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4)})
    fused, clip = host.pair(style="foreign.safetensors")
    assert "style LoRA 'foreign' has no weights for this model" in capsys.readouterr().out
    assert ch_fusion(fused) is None and fused.patches and fused.injections == {}


def test_one_pair_per_model_and_the_map_needs_a_finished_sampling(host):
    from lib_dynfuse.hosts.comfyui import DynFuseInputError

    fused, clip = host.pair()
    with pytest.raises(DynFuseInputError, match="already comes from a DynFuse LoRA pair"):
        host.pair(fused, clip)
    with pytest.raises(DynFuseInputError, match="no sampling with this MODEL has finished"):
        host.run("DynFuseSelectionMap", model=fused, samples={})
    with pytest.raises(DynFuseInputError, match="has no DynFuse LoRA pair"):
        host.run("DynFuseSelectionMap", model=host.model, samples={})
