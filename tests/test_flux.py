"""FLUX end to end through the fake Forge and the fake Forge Neo: a FLUX-shaped transformer with the real module names
and fused shapes, LoRA files in kohya, BFL and diffusers layouts. DynFuse takes the subject's and style's patches
over, the sliced ones (q, k, v and the MLP input of the fused layers) included, decides every slice on its own
channels, ties decisions to images at FLUX's distilled guidance (CFG 1: one row per image), and leaves the weights,
the other LoRAs and the WebUI's stores as a run without it would."""

from __future__ import annotations

import csv
import importlib
import re
from pathlib import Path

import pytest
import torch
import tolerances as tol

from lib_dynfuse.hosts.base import NOTE_KEY, SELECTION_KEY
from lib_dynfuse.settings import DynFuseSettings
from family_harnesses import fh, nh


TABLE = Path(__file__).parent / "data" / "flux-dev-layers.tsv"
PROMPT = "a dog <lora:subj:0.8> <lora:style:1> <lora:other:0.5>"
SIZE = dict(width=32, height=32, cfg_scale=1.0)  # FLUX dev: distilled guidance, no uncond pass
DOUBLE_QKV = [f"diffusion_model.double_blocks.0.img_attn.qkv:{x}" for x in "qkv"]
LINEAR1 = [f"diffusion_model.single_blocks.{i}.linear1:{x}" for i in (0, 1) for x in ("q", "k", "v", "mlp")]
HOSTS = {"forge": (fh.forge_host, "lib_dynfuse.hosts.forge", "ForgeAdapter"),
         "neo": (nh.neo_host, "lib_dynfuse.hosts.neo", "NeoAdapter")}


@pytest.fixture(params=sorted(HOSTS))
def which(request):
    return request.param


def open_host(which, folder, subject="diffusers", style="diffusers", **loader):
    """The fake WebUI with the tiny FLUX loaded and the three LoRA files written."""
    factory = HOSTS[which][0]
    return _Opened(factory, folder, subject, style, loader)


class _Opened:
    def __init__(self, factory, folder, subject, style, loader):
        self.context = factory(folder, family="flux", **loader)
        self.folder, self.layouts = folder, (subject, style)

    def __enter__(self):
        host = self.context.__enter__()
        fh.write_flux_loras(self.folder, host.sd_model, *self.layouts)
        return host

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


def dynfuse(which, host, **settings):
    """An always-on script running a new adapter of this host with DynFuse on, and a script runner holding it."""
    _factory, module, name = HOSTS[which]
    adapter = getattr(importlib.import_module(module), name)()
    script = fh.AdapterScript(host, adapter, DynFuseSettings(enabled=True, **settings))
    return script, host.scripts.ScriptRunner([script])


def model_of(host):
    return host.sd_model.forge_objects_original.unet.model


def hooks_on(host) -> int:
    return sum(len(m._forward_hooks) for m in model_of(host).modules())


def files_in_store(which, unet) -> set[str]:
    """The LoRA files whose patches the WebUI merges for ``unet``."""
    if which == "forge":
        return {Path(key[0]).name for key in unet.lora_patches}
    recorder = importlib.import_module("lib_dynfuse.hosts.neo").RECORDER
    files = recorder.files(unet)
    return {Path(recorder.file_of(e, files)).name for entries in unet.patches.values() for e in entries}


def equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the fake model and the LoRA files ------------------------------------------------------------------------------
def table_rows():
    with open(TABLE, encoding="utf-8") as f:
        return list(csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t"))


def shape(expression: str, widths: dict[str, int]) -> tuple[int, ...]:
    """A table shape ("7h,h") in the given widths."""
    return tuple(int(m[1] or 1) * widths[m[2]] if m[2] else int(m[1])
                 for m in (re.fullmatch(r"(\d*)([a-z]?)", dim) for dim in expression.split(",")))


def test_the_fake_flux_has_flux_dev_layers_and_fused_shapes_at_width_16(tmp_path):
    with open_host("forge", tmp_path) as host:
        model = model_of(host).diffusion_model
        widths = dict(h=16, d=8, c=64, v=16, t=16)
        for row in table_rows():
            module = model.get_submodule(row["module"])
            weight = module.scale if row["kind"] == "norm" else module.weight
            assert tuple(weight.shape) == shape(row["shape"], widths), row["module"]
        # Every Linear of a block is in the table (block 0 stands for all).
        linears = {name for name, m in model.named_modules() if hasattr(m, "in_features")
                   if not re.search(r"blocks\.[1-9]", name)}
        assert linears == {row["module"] for row in table_rows() if row["kind"] == "linear"}
        assert not (host.sd_model.is_sd1 or host.sd_model.is_sdxl) and host.sd_model.use_distilled_cfg_scale


def test_the_diffusers_lora_names_are_flux_devs_and_each_covers_its_part(tmp_path):
    with open_host("forge", tmp_path) as host:
        layers = fh.flux_diffusers_layers(host.sd_model)
    parts = {"q": 16, "k": 16, "v": 16, "mlp": 64}
    block_rows = [row for row in table_rows() if row["kind"] == "linear" and "blocks.0." in row["diffusers"]]
    assert {name for name in layers if "blocks.0." in name} == {row["diffusers"] for row in block_rows}
    for row in block_rows:
        out, in_features = shape(row["shape"], dict(h=16))
        assert layers[row["diffusers"]] == ((parts[row["part"]] if row["part"] else out), in_features)


@pytest.mark.parametrize("layouts", [("diffusers", "diffusers"), ("kohya", "diffusers"), ("bfl", "kohya")])
def test_the_static_method_reproduces_the_webuis_merge_for_every_lora_layout(which, tmp_path, layouts):
    with open_host(which, tmp_path, *layouts) as host:
        original = fh.unet_weights(host.sd_model)
        merged, _ = host.txt2img(PROMPT, steps=3, **SIZE)
        merged_weights = fh.unet_weights(host.sd_model)
        script, runner = dynfuse(which, host, method="static")
        seen = {}
        host.script_callbacks.on_cfg_denoiser(lambda params: seen.setdefault(
            "files", files_in_store(which, host.sd_model.forge_objects.unet)))
        fused, p = host.txt2img(PROMPT, runner=runner, steps=3, **SIZE)
        assert seen["files"] == {"other.safetensors"}  # only the LoRA DynFuse does not fuse is merged
        tol.assert_sampled_close(fused.latents[0], merged.latents[0],
                                 fh.diffusion_model(host.sd_model), steps=3)
        layers = script.job.last_log.layers
        sliced = "diffusers" in layouts
        assert layers == (DOUBLE_QKV + LINEAR1 if sliced else
                          [f"diffusion_model.{name}" for name in ("double_blocks.0.img_attn.qkv",
                                                                  "single_blocks.0.linear1", "single_blocks.1.linear1")])
        assert NOTE_KEY not in p.extra_generation_params and hooks_on(host) == 0
        host.txt2img(PROMPT, steps=3, **SIZE)
        assert equal_weights(fh.unet_weights(host.sd_model), merged_weights)
        host.txt2img("a dog", steps=1, **SIZE)
        assert equal_weights(fh.unet_weights(host.sd_model), original)


def test_the_other_lora_stays_merged_by_the_webui_as_it_alone_would_be(which, tmp_path):
    with open_host(which, tmp_path) as host:
        _script, runner = dynfuse(which, host)
        during = {}
        host.script_callbacks.on_cfg_denoiser(lambda params: during.setdefault("weights", fh.unet_weights(host.sd_model)))
        host.txt2img(PROMPT, runner=runner, steps=2, **SIZE)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with open_host(which, fresh) as host:
        host.txt2img("a dog <lora:other:0.5>", steps=1, **SIZE)
        assert equal_weights(during["weights"], fh.unet_weights(host.sd_model))


# ---- decisions per slice and per image --------------------------------------------------------------------------
def layouts_seen(script) -> list:
    """The row layouts the session is told, one per UNet call (filled by the next generation)."""
    seen = []
    original = type(script.adapter).take_over

    def take_over(self, p, job):
        original(self, p, job)
        if job.session is not None:
            set_layout = job.session.set_layout
            job.session.set_layout = lambda layout: seen.append(layout) or set_layout(layout)

    script.adapter.take_over = take_over.__get__(script.adapter)
    return seen


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_every_slice_decides_for_each_image_at_distilled_and_real_cfg(which, tmp_path, cfg):
    """CFG 1 (FLUX dev's distilled guidance): one cond row per image; CFG 3: Forge's uncond chunk comes first."""
    with open_host(which, tmp_path) as host:
        script, runner = dynfuse(which, host, show_map=True)
        layouts = layouts_seen(script)
        processed, p = host.txt2img(PROMPT, runner=runner, steps=3, batch_size=2, **{**SIZE, "cfg_scale": cfg})
        rows = {1.0: ((0, 1), (True, True)), 3.0: ((0, 1, 0, 1), (False, False, True, True))}[cfg]
        assert {(layout.image_of_row, layout.is_cond) for layout in layouts} == {rows} and len(layouts) == 3
        log = script.job.last_log
        assert log.layers == DOUBLE_QKV + LINEAR1
        decided = {(d.layer, d.step, d.unit) for d in log.decisions()}
        assert decided == {(layer, step, image) for layer in log.layers for step in range(3) for image in (0, 1)}
        assert all(d.d_subject is not None and d.d_style is not None for d in log.decisions())
        for image in (0, 1):  # each image's own share
            selection = re.search(rf"{SELECTION_KEY}: subject (\d\.\d\d)", processed.infotexts[image])
            assert selection and float(selection[1]) == pytest.approx(log.subject_share(image), abs=0.005)
        assert len(processed.images) == 4  # the two images and their selection maps


def test_each_images_slices_follow_its_own_decisions(which, tmp_path, monkeypatch):
    """Batch 2 at CFG 1: each image's rows of the fused qkv get, slice by slice, the delta that image chose."""
    from lib_dynfuse.engine import fusion as engine
    from lib_dynfuse.engine.deltas import LayerGeometry

    calls = []
    fuse = engine.SlicedLayerFusion.fuse

    def recorded(self, x, base, state):
        out = fuse(self, x, base, state)
        calls.append((self, x.clone(), base.clone(), out.clone()))
        return out

    monkeypatch.setattr(engine.SlicedLayerFusion, "fuse", recorded)
    with open_host(which, tmp_path) as host:
        script, runner = dynfuse(which, host)
        layer = model_of(host).get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
        host.txt2img(PROMPT, runner=runner, steps=1, batch_size=2, **SIZE)
    fusion, x, base, fused = next(call for call in calls if call[0].module is layer)
    winners = {(d.layer, d.unit): d.winner for d in script.job.last_log.decisions()}
    assert [part.name for part in fusion.parts] == DOUBLE_QKV
    for part in fusion.parts:
        channels = slice(part.start, part.stop)
        for image in (0, 1):
            chosen = part.subject if winners[(part.name, image)] == "subject" else part.style
            expected = base[image, :, channels] + chosen.output(x[image], LayerGeometry("linear", (16, 16)))
            tol.assert_reordered_close(fused[image, :, channels], expected, terms=16, depth=2)


# ---- storage: bf16, fp8 with online LoRAs --------------------------------------------------------------------------
def test_bf16_weights_are_fused_in_bf16_and_left_as_they_were(which, tmp_path):
    with open_host(which, tmp_path, storage_dtype=torch.bfloat16) as host:
        merged, _ = host.txt2img(PROMPT, steps=3, **SIZE)
        weights = fh.unet_weights(host.sd_model)
        script, runner = dynfuse(which, host, method="static")
        fused, _ = host.txt2img(PROMPT, runner=runner, steps=3, **SIZE)
        # The WebUI rounds its merge into bf16 weights; the hooks add the deltas in bf16 outputs.
        torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=0.05, atol=0.05)
        script.settings = DynFuseSettings(enabled=True)
        host.txt2img(PROMPT, runner=runner, steps=3, **SIZE)
        assert script.job.last_log.layers == DOUBLE_QKV + LINEAR1
        host.txt2img(PROMPT, steps=3, **SIZE)
        assert equal_weights(fh.unet_weights(host.sd_model), weights)


def online_patches(which, layer) -> bool:
    """Whether the WebUI merges LoRA patches into ``layer``'s weight at every forward ("(fp16 LoRA)")."""
    return bool(getattr(layer, "forge_online_loras", None)) if which == "forge" else bool(layer.weight_function)


def test_fp8_weights_with_online_loras_keep_the_other_lora_online(which, tmp_path):
    """"(fp16 LoRA)" on an fp8 FLUX: the WebUI merges every LoRA per forward; DynFuse takes its two out and the other
    stays online on the layers it shares with them."""
    with open_host(which, tmp_path, storage_dtype=torch.float8_e4m3fn, computation_dtype=torch.bfloat16) as host:
        importlib.import_module("backend.args").dynamic_args["online_lora"] = True
        original = fh.unet_weights(host.sd_model)
        merged, _ = host.txt2img(PROMPT, steps=2, **SIZE)
        assert equal_weights(fh.unet_weights(host.sd_model), original)
        script, runner = dynfuse(which, host, method="static")
        qkv = model_of(host).get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
        online = []
        host.script_callbacks.on_cfg_denoiser(lambda params: online.append(online_patches(which, qkv)))
        fused, _ = host.txt2img(PROMPT, runner=runner, steps=2, **SIZE)
        assert online == [True, True]  # "other" is still merged per forward on the fused qkv
        torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=0.05, atol=0.05)
        assert script.job.last_log.layers == DOUBLE_QKV + LINEAR1
        assert equal_weights(fh.unet_weights(host.sd_model), original) and hooks_on(host) == 0


@pytest.mark.parametrize("online", [False, True], ids=["merged", "fp16-lora"])
def test_gguf_layers_take_the_two_loras_on_their_output(tmp_path, online):
    """A GGUF FLUX on Forge: the WebUI dequantizes a layer to merge LoRAs and quantizes it again (or, with "(fp16
    LoRA)", merges at every forward); DynFuse adds its two LoRAs to the layers' outputs, unquantized."""
    with open_host("forge", tmp_path, storage_dtype="gguf") as host:
        importlib.import_module("backend.args").dynamic_args["online_lora"] = online
        qkv = model_of(host).get_submodule("diffusion_model.double_blocks.0.img_attn.qkv")
        assert qkv.weight.gguf_cls is not None and tuple(qkv.weight.shape) == (48, 16)
        original = fh.unet_weights(host.sd_model)
        merged, _ = host.txt2img(PROMPT, steps=3, **SIZE)
        script, runner = dynfuse("forge", host, method="static")
        fused, p = host.txt2img(PROMPT, runner=runner, steps=3, **SIZE)
        # Forge's merge rounds every merged layer to 8 bits again; the hooks add the exact deltas.
        torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=0.05, atol=0.05)
        assert script.job.last_log.layers == DOUBLE_QKV + LINEAR1 and NOTE_KEY not in p.extra_generation_params
        host.txt2img("a dog", steps=1, **SIZE)
        assert equal_weights(fh.unet_weights(host.sd_model), original) and hooks_on(host) == 0


def test_a_dora_lora_on_gguf_layers_stays_with_forges_merge_there_with_one_line_and_a_note(tmp_path, capsys):
    """DoRA rescales the weight it is added to, which a hook cannot read from a quantized layer: those layers keep the
    LoRA in Forge's merge, the layers without DoRA are fused."""
    with open_host("forge", tmp_path, storage_dtype="gguf") as host:
        fused_qkv = ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"]
        g = torch.Generator().manual_seed(6)
        dora = {f"lora_unet_{name.replace('.', '_')}.dora_scale": torch.rand(rows, 1, generator=g) + 0.5
                for name, rows in (("double_blocks.0.img_attn.qkv", 48), ("single_blocks.0.linear1", 112))}
        fh.write_flux_lora(tmp_path / "subj.safetensors", host.sd_model, "kohya",
                           fused_qkv + ["single_blocks.1.linear1"], seed=1, alpha=1.0, extra=dora)
        merged, _ = host.txt2img(PROMPT, steps=2, **SIZE)
        script, runner = dynfuse("forge", host, method="static")
        capsys.readouterr()
        fused, p = host.txt2img(PROMPT, runner=runner, steps=2, **SIZE)
        line = ("diffusion_model.double_blocks.0.img_attn.qkv and 1 more layers keep the subject LoRA merged statically "
                "(the patch (DoRA, GLoRA, OFT, ...) needs the layer's weight, which is stored quantised)")
        assert [text for text in capsys.readouterr().out.splitlines() if "merged statically" in text] == [
            f"DynFuse: {line}"]
        assert line in p.extra_generation_params[NOTE_KEY]
        # The style alone on the layers the subject's DoRA stays merged on; both on single_blocks.1.linear1.
        decided = script.job.last_log.layers
        assert decided == [f"diffusion_model.single_blocks.1.linear1:{x}" for x in ("q", "k", "v", "mlp")]
        torch.testing.assert_close(fused.latents[0], merged.latents[0], rtol=0.05, atol=0.05)


# ---- failures -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inside_unet", [False, True], ids=["between-unet-calls", "inside-a-unet-call"])
def test_an_exception_leaves_no_hook_and_the_weights_as_they_were(which, tmp_path, monkeypatch, inside_unet):
    with open_host(which, tmp_path) as host:
        clean, _ = host.txt2img(PROMPT, steps=3, **SIZE)
        weights = fh.unet_weights(host.sd_model)
        script, runner = dynfuse(which, host)
        with monkeypatch.context() as patch:
            hooks_at_error = fh.crash_at_step_1(host, patch, inside_unet, "diffusion_model.single_blocks.0.linear1")
            with pytest.raises(RuntimeError, match="out of memory"):
                host.txt2img(PROMPT, runner=runner, steps=3, **SIZE)
        assert (hooks_at_error[0] > 0) == inside_unet and hooks_on(host) == 0
        script.settings = DynFuseSettings(enabled=False)
        after, _ = host.txt2img(PROMPT, runner=runner, steps=3, **SIZE)
        assert torch.equal(after.images[0], clean.images[0])
        assert equal_weights(fh.unet_weights(host.sd_model), weights)


def test_an_interrupt_removes_everything_and_the_next_image_is_the_webuis(which, tmp_path):
    with open_host(which, tmp_path) as host:
        clean, _ = host.txt2img(PROMPT, steps=3, **SIZE)
        weights = fh.unet_weights(host.sd_model)
        script, runner = dynfuse(which, host)
        interrupting = [True]

        def interrupt(params):
            if interrupting[0] and params.denoiser.step == 1:
                host.shared.state.interrupt()

        host.script_callbacks.on_cfg_denoiser(interrupt)
        processed, _ = host.txt2img(PROMPT, runner=runner, steps=4, **SIZE)
        assert len(processed.images) == 1 and script.job.last_log.steps == [0, 1]
        assert hooks_on(host) == 0 and script.adapter.job is None
        interrupting[0] = False
        after, _ = host.txt2img(PROMPT, steps=3, **SIZE)
        assert torch.equal(after.images[0], clean.images[0])
        assert equal_weights(fh.unet_weights(host.sd_model), weights)


# ---- Forge Neo's own key: linear1_qkv ------------------------------------------------------------------------------
def test_neos_linear1_qkv_patch_is_cut_into_the_q_k_and_v_the_other_lora_patches(tmp_path):
    """Forge Neo maps `single_blocks.N.linear1_qkv` to one slice over q, k and v (channels 0 to 3 hidden)."""
    with open_host("neo", tmp_path) as host:
        qkv = {f"diffusion_model.single_blocks.{i}.linear1_qkv": (48, 16) for i in (0, 1)}
        g = torch.Generator().manual_seed(4)
        tensors = {}
        for name, (out, in_features) in qkv.items():
            tensors[f"{name}.lora_A.weight"] = torch.randn(2, in_features, generator=g) * 0.3
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, 2, generator=g) * 0.3
        fh.write_flux_lora(tmp_path / "subj.safetensors", host.sd_model, "bfl", [], extra=tensors)
        merged, _ = host.txt2img(PROMPT, steps=2, **SIZE)
        script, runner = dynfuse("neo", host, method="static")
        fused, _ = host.txt2img(PROMPT, runner=runner, steps=2, **SIZE)
        tol.assert_sampled_close(fused.latents[0], merged.latents[0],
                                 fh.diffusion_model(host.sd_model), steps=2)
        assert [name for name in script.job.last_log.layers if name.startswith("diffusion_model.single")] == [
            f"diffusion_model.single_blocks.{i}.linear1:{x}" for i in (0, 1) for x in "qkv"]

