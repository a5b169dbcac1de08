"""Every model family Forge Neo runs LoRAs on, end to end through the fake Forge Neo: Z-Image and Lumina 2
(NextDiT, fused attention.qkv), Qwen-Image, Chroma and Flux.2 (FLUX-style fused qkv and linear1), Wan and Krea 2,
each with its real layer names at a tiny width, and LoRA files in the layouts Neo's key maps read for it
(tests/fakehost/neo/family_loras.py). DynFuse takes the subject's and style's patches over on each, decides every
layer and every slice of a fused layer per image, leaves the other LoRA with Neo's merge and the weights as they
were; what it cannot take over it refuses with a line and a note."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from lib_dynfuse.hosts.base import NOTE_KEY
from lib_dynfuse.settings import DynFuseSettings
from family_harnesses import fl, nh


PROMPT = "a dog <lora:subj:0.8> <lora:style:1> <lora:other:0.5>"
SIZE = dict(width=32, height=32)

# (family, subject layout, style layout): every layout Neo reads for the family at least once, sliced ones with
# whole ones where the family fuses layers.
CASES = [("zimage", "diffusers", "diffusers"), ("zimage", "native", "kohya"), ("zimage", "kohya", "diffusers"),
         ("lumina2", "native", "kohya"),
         ("qwen", "diffusers", "bare"), ("qwen", "kohya", "diffusers"),
         ("chroma", "diffusers", "diffusers"), ("chroma", "kohya", "native"), ("chroma", "native", "diffusers"),
         ("flux2", "diffusers", "diffusers"), ("flux2", "kohya", "native"),
         ("wan", "native", "kohya"),
         ("krea2", "diffusers", "native"), ("krea2", "kohya", "diffusers")]
FIRST = {family: (family, subject, style) for family, subject, style in reversed(CASES)}  # one case per family


class Opened:
    """The fake Forge Neo with the family's tiny model loaded and the three LoRA files written."""

    def __init__(self, folder: Path, family: str, subject: str, style: str, **loader):
        self.context = nh.neo_host(folder, family=family, **loader)
        self.folder, self.family, self.layouts = folder, family, (subject, style)

    def __enter__(self):
        host = self.context.__enter__()
        fl.write_family_loras(self.folder, host.sd_model, self.family, *self.layouts)
        return host

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


def dynfuse(host, **settings):
    adapter = importlib.import_module("lib_dynfuse.hosts.neo").NeoAdapter()
    script = nh.AdapterScript(host, adapter, DynFuseSettings(enabled=True, **settings))
    return script, host.scripts.ScriptRunner([script])


def model_of(host):
    return host.sd_model.forge_objects_original.unet.model


def hooks_on(host) -> int:
    return sum(len(m._forward_hooks) for m in model_of(host).modules())


def files_in_store(unet) -> set[str]:
    recorder = importlib.import_module("lib_dynfuse.hosts.neo").RECORDER
    files = recorder.files(unet)
    return {Path(recorder.file_of(e, files)).name for entries in unet.patches.values() for e in entries}


def equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the fake models ------------------------------------------------------------------------------------------------
FUSED_SHAPES = {  # (module, (out, in)) of each family's fused layers at the fake's widths
    "zimage": ("layers.0.attention.qkv", (48, 16)),          # q, k, v: 16 each
    "lumina2": ("layers.0.attention.qkv", (64, 32)),         # q 32, k and v 16 each (4 heads, 2 kv heads)
    "chroma": ("single_blocks.0.linear1", (112, 16)),        # q, k, v, MLP input 64
    "flux2": ("single_blocks.0.linear1", (48 + 96, 16)),     # q, k, v, SiLU-gated MLP input 2 x 48
}


@pytest.mark.parametrize("family", sorted(FUSED_SHAPES))
def test_the_fused_layers_have_the_families_shapes(tmp_path, family):
    with nh.neo_host(tmp_path, family=family) as host:
        path, shape = FUSED_SHAPES[family]
        assert tuple(model_of(host).diffusion_model.get_submodule(path).weight.shape) == shape


def test_each_family_has_its_own_layer_names_and_repo(tmp_path):
    names = {"zimage": "noise_refiner.0.adaLN_modulation.0", "lumina2": "noise_refiner.0.adaLN_modulation.1",
             "qwen": "transformer_blocks.0.img_mlp.net.0.proj", "chroma": "distilled_guidance_layer.out_proj",
             "flux2": "double_stream_modulation_img.lin", "wan": "blocks.0.cross_attn.o",
             "krea2": "txtfusion.projector"}
    for family, name in names.items():
        folder = tmp_path / family
        folder.mkdir()
        with nh.neo_host(folder, family=family) as host:
            model = model_of(host).diffusion_model
            assert isinstance(model.get_submodule(name), torch.nn.Linear), family
            assert not host.sd_model.is_sd1 and not host.sd_model.is_sdxl
            assert host.sd_model.is_wan == (family == "wan")


# ---- static = Neo's merge -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "subject", "style"), CASES)
def test_the_static_method_reproduces_neos_merge(tmp_path, family, subject, style):
    with Opened(tmp_path, family, subject, style) as host:
        original = nh.unet_weights(host.sd_model)
        merged, _ = host.txt2img(PROMPT, steps=3, cfg_scale=3.0, **SIZE)
        merged_weights = nh.unet_weights(host.sd_model)
        script, runner = dynfuse(host, method="static")
        seen = {}
        host.script_callbacks.on_cfg_denoiser(lambda params: seen.setdefault(
            "files", files_in_store(host.sd_model.forge_objects.unet)))
        fused, p = host.txt2img(PROMPT, runner=runner, steps=3, cfg_scale=3.0, **SIZE)
        assert seen["files"] == {"other.safetensors"}  # only the LoRA DynFuse does not fuse is merged
        torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=1e-4, atol=1e-4)
        assert set(script.job.last_log.layers) == fl.decided_layers(family, subject, style)
        assert NOTE_KEY not in p.extra_generation_params and hooks_on(host) == 0
        host.txt2img(PROMPT, steps=3, cfg_scale=3.0, **SIZE)
        assert equal_weights(nh.unet_weights(host.sd_model), merged_weights)
        host.txt2img("a dog", steps=1, **SIZE)
        assert equal_weights(nh.unet_weights(host.sd_model), original)


@pytest.mark.parametrize("family", sorted(FIRST))
def test_the_other_lora_stays_merged_as_it_alone_would_be(tmp_path, family):
    case = FIRST[family]
    with Opened(tmp_path, *case) as host:
        _script, runner = dynfuse(host)
        during = {}
        host.script_callbacks.on_cfg_denoiser(
            lambda params: during.setdefault("weights", nh.unet_weights(host.sd_model)))
        host.txt2img(PROMPT, runner=runner, steps=2, **SIZE)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with Opened(fresh, *case) as host:
        host.txt2img("a dog <lora:other:0.5>", steps=1, **SIZE)
        assert equal_weights(during["weights"], nh.unet_weights(host.sd_model))


@pytest.mark.parametrize("family", ["zimage", "qwen", "chroma"])
def test_bf16_weights_are_fused_in_bf16_and_left_as_they_were(tmp_path, family):
    with Opened(tmp_path, *FIRST[family], storage_dtype=torch.bfloat16) as host:
        merged, _ = host.txt2img(PROMPT, steps=3, cfg_scale=3.0, **SIZE)
        weights = nh.unet_weights(host.sd_model)
        script, runner = dynfuse(host, method="static")
        fused, _ = host.txt2img(PROMPT, runner=runner, steps=3, cfg_scale=3.0, **SIZE)
        # Neo rounds its merge into bf16 weights, the hooks add the deltas to bf16 outputs: bf16's 8 bits apart.
        torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=0.1, atol=0.1)
        assert set(script.job.last_log.layers) == fl.decided_layers(*FIRST[family])
        host.txt2img(PROMPT, steps=3, cfg_scale=3.0, **SIZE)
        assert equal_weights(nh.unet_weights(host.sd_model), weights) and hooks_on(host) == 0


# ---- kl: per image, per layer and part ------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "subject", "style"), CASES)
def test_kl_decides_every_layer_and_part_for_each_image(tmp_path, family, subject, style):
    with Opened(tmp_path, family, subject, style) as host:
        script, runner = dynfuse(host, method="kl")
        processed, _ = host.txt2img(PROMPT, runner=runner, steps=3, batch_size=2, cfg_scale=3.0, **SIZE)
        log = script.job.last_log
        expected = fl.decided_layers(family, subject, style)
        assert set(log.layers) == expected
        decided = {(d.layer, d.step, d.unit) for d in log.decisions()}
        assert decided == {(layer, step, image) for layer in expected for step in range(3) for image in (0, 1)}
        assert all(d.d_subject is not None and d.d_style is not None for d in log.decisions())
        assert len(processed.images) == 2 and hooks_on(host) == 0


def test_a_lumina2_layer_with_neos_too_wide_k_slice_stays_with_neos_merge(tmp_path, capsys):
    """Lumina 2's grouped-query qkv is q 32, k 16, v 16 wide; Neo's z_image_to_diffusers gives to_k the slice
    [32, 64) (the hidden width), where its merge adds the 16 rows of the patch to the first 16. DynFuse leaves the
    subject on that layer to Neo's merge, with one line and a note, and fuses its other layers."""
    with Opened(tmp_path, "lumina2", "kohya", "native") as host:
        g = torch.Generator().manual_seed(5)
        extra = {}
        for i in (0, 1):
            for x, rows in (("q", 32), ("k", 16)):
                extra[f"transformer.layers.{i}.attention.to_{x}.lora_A.weight"] = torch.randn(2, 32, generator=g) * .3
                extra[f"transformer.layers.{i}.attention.to_{x}.lora_B.weight"] = \
                    torch.randn(rows, 2, generator=g) * .3
        fl.write_family_lora(tmp_path / "subj.safetensors", host.sd_model, "lumina2", "kohya",
                             ["layers.0.feed_forward.w1"], extra=extra)
        merged, _ = host.txt2img(PROMPT, steps=2, **SIZE)
        script, runner = dynfuse(host, method="static")
        capsys.readouterr()
        fused, p = host.txt2img(PROMPT, runner=runner, steps=2, **SIZE)
        torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=1e-4, atol=1e-4)
        assert script.job.last_log.layers == ["diffusion_model.layers.0.feed_forward.w1"]
        line = ("diffusion_model.layers.0.attention.qkv and 1 more layers keep the subject LoRA merged statically (a "
                "patch of 16 output channels on 32 channels of the layer)")
        assert [text for text in capsys.readouterr().out.splitlines() if "merged statically" in text] == [
            f"DynFuse: {line}"]
        assert line in p.extra_generation_params[NOTE_KEY]


# ---- cleanup --------------------------------------------------------------------------------------------------------
LAYER = {"zimage": "layers.0.attention.qkv", "lumina2": "layers.0.attention.qkv",
         "qwen": "transformer_blocks.0.attn.to_q", "chroma": "single_blocks.0.linear1",
         "flux2": "single_blocks.0.linear1", "wan": "blocks.0.self_attn.q", "krea2": "blocks.0.attn.wq"}


@pytest.mark.parametrize("family", sorted(FIRST))
def test_an_exception_inside_the_model_leaves_no_hook_and_the_weights_as_they_were(tmp_path, monkeypatch, family):
    with Opened(tmp_path, *FIRST[family]) as host:
        clean, _ = host.txt2img(PROMPT, steps=3, **SIZE)
        weights = nh.unet_weights(host.sd_model)
        script, runner = dynfuse(host)
        with monkeypatch.context() as patch:
            hooks_at_error = nh.crash_at_step_1(host, patch, True, f"diffusion_model.{LAYER[family]}")
            with pytest.raises(RuntimeError, match="out of memory"):
                host.txt2img(PROMPT, runner=runner, steps=3, **SIZE)
        assert hooks_at_error[0] > 0 and hooks_on(host) == 0
        script.settings = DynFuseSettings(enabled=False)
        after, _ = host.txt2img(PROMPT, runner=runner, steps=3, **SIZE)
        assert torch.equal(after.images[0], clean.images[0])
        assert equal_weights(nh.unet_weights(host.sd_model), weights)


# ---- refusals -------------------------------------------------------------------------------------------------------
def refused_run(host, capsys, runner):
    capsys.readouterr()
    processed, p = host.txt2img(PROMPT, runner=runner, steps=2, **SIZE)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse")]
    return processed, p, lines


def test_a_nunchaku_model_is_refused_with_its_family_and_why(tmp_path, capsys):
    """Forge Neo hands an SVDQ model (Qwen-Image, Z-Image, FLUX) the LoRA files' names: no patch is in the store."""
    with Opened(tmp_path, "qwen", "diffusers", "diffusers") as host:
        importlib.import_module("backend.args").dynamic_args["nunchaku"] = True
        model_of(host).diffusion_model.loras = []
        plain, _ = host.txt2img(PROMPT, steps=2, **SIZE)
        assert [Path(f).name for f, _ in model_of(host).diffusion_model.loras] == [
            "subj.safetensors", "style.safetensors", "other.safetensors"]
        assert not host.sd_model.forge_objects_after_applying_lora.unet.patches
        script, runner = dynfuse(host)
        processed, p, lines = refused_run(host, capsys, runner)
        why = ("Forge Neo runs this Qwen-Image model with Nunchaku (SVDQ), which composes LoRAs into its quantised "
               "weights instead of weight patches DynFuse can take over.")
        assert lines == [f"DynFuse: {why} DynFuse is off for this generation."]
        assert p.extra_generation_params[NOTE_KEY] == f"off: {why}"
        assert script.job is None and hooks_on(host) == 0
        assert torch.equal(processed.images[0], plain.images[0])


def test_an_int8_model_is_refused_with_its_family_and_why(tmp_path, capsys):
    """Neo's int8 layers (quantised, `_is_quantized`) belong to a patcher that keeps online LoRAs outside `patches`."""
    with Opened(tmp_path, "zimage", "diffusers", "diffusers") as host:
        model_of(host).diffusion_model.get_submodule("layers.0.attention.qkv")._is_quantized = True
        plain, _ = host.txt2img(PROMPT, steps=2, **SIZE)
        weights = nh.unet_weights(host.sd_model)
        script, runner = dynfuse(host)
        processed, p, lines = refused_run(host, capsys, runner)
        why = ("Forge Neo runs this Z-Image model in int8, whose patcher keeps online LoRAs out of its patch store and "
               "merges the others into rotated, requantised weights; DynFuse cannot take them over.")
        assert lines == [f"DynFuse: {why} DynFuse is off for this generation."]
        assert p.extra_generation_params[NOTE_KEY] == f"off: {why}"
        assert torch.equal(processed.images[0], plain.images[0])
        assert equal_weights(nh.unet_weights(host.sd_model), weights) and hooks_on(host) == 0
