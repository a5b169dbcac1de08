"""Infotext paste, X/Y/Z axes, the API, the Settings section, Reload UI and host detection in the fake A1111."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_a1111_generation import PROMPT, write_pair


def _pasted_settings(ui, infotext):
    """PNG Info -> Send to txt2img, then the values the DynFuse accordion would send."""
    from lib_dynfuse.hosts import ui as dui
    from modules import infotext_utils

    runner = ui.runner(False)
    script = ui.script("DynFuse")
    pasted = dict(zip((id(c) for c, _ in runner.infotext_fields), ui.paste(infotext)))
    values = []
    for control in script.controls:
        value = pasted.get(id(control), infotext_utils.KEEP)
        values.append(control.value if value is infotext_utils.KEEP else value)
    return dui.values_to_settings(values)


def test_infotext_round_trip(a1111):
    import checks

    from lib_dynfuse.hosts import ui as dui

    ui = a1111()
    write_pair(ui)
    fields = {"method": "kl-soft", "soft_temperature": 2.5, "temperature": 1.5, "subject_strength": 0.7, "measure": "js",
              "decide_per": "row", "subject": "subj", "style": "sty", "show_map": True}
    _, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(**fields))
    expected = dui.values_to_settings(checks.dynfuse_args(**fields))
    assert _pasted_settings(ui, res.infotexts[0]) == expected
    # "Auto" is written as the LoRA it resolved to, so a pasted infotext names both LoRAs; the weights written
    # are the prompt's, so the strength boxes stay empty and keep following the tags.
    _, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
    assert 'DynFuse subject: "subj:1", DynFuse style: "sty:0.8"' in res.infotexts[0]
    pasted = _pasted_settings(ui, res.infotexts[0])
    defaults = dui.values_to_settings(checks.dynfuse_args())
    assert pasted == dataclasses.replace(defaults, subject="subj", style="sty")
    # The alias module kept since 1.8 parses the same way.
    from modules import generation_parameters_copypaste

    assert generation_parameters_copypaste.parse_generation_parameters(res.infotexts[0])["DynFuse method"] == "kl"


CHOOSING = ("kl", "kl-soft", "k-lora", "switch")


@pytest.mark.parametrize("method", [*CHOOSING, "static", "subject-only", "style-only"])
def test_selection_share_is_written_only_by_methods_that_choose(a1111, method):
    import checks

    ui = a1111()
    write_pair(ui)
    _, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args(method=method))
    assert f"DynFuse method: {method}" in res.infotexts[0]
    # static applies both LoRAs and *-only one of them everywhere: a share "won by the subject" would mislead.
    assert ("DynFuse selection: subject " in res.infotexts[0]) == (method in CHOOSING)


def test_pasting_an_infotext_without_dynfuse_changes_nothing(a1111):
    from modules import infotext_utils

    ui = a1111()
    _, res = ui.txt2img("a dog", steps=3, seed=5)
    assert all(v is infotext_utils.KEEP for v in ui.paste(res.infotexts[0]))


# ---- X/Y/Z ----------------------------------------------------------------------------------------------------

def _xyz():
    from lib_dynfuse.hosts import xyz

    return xyz.find_xyz_module()


def test_xyz_axes_registered_once(a1111):
    a1111()
    labels = [o.label for o in _xyz().axis_options if o.label.startswith("[DynFuse]")]
    assert labels == ["[DynFuse] Enabled", "[DynFuse] Method", "[DynFuse] Subject strength",
                      "[DynFuse] Style strength", "[DynFuse] KL temperature", "[DynFuse] Decide every",
                      "[DynFuse] Divergence tokens", "[DynFuse] Guidance strength",
                      "[DynFuse] Guidance balance", "[DynFuse] Guidance start", "[DynFuse] Guidance end"]
    from modules import script_callbacks

    script_callbacks.before_ui_callback()  # the UI built again
    assert [o.label for o in _xyz().axis_options].count("[DynFuse] Method") == 1
    method = next(o for o in _xyz().axis_options if o.label == "[DynFuse] Method")
    assert "kl" in method.choices() and "static" in method.choices()


def test_xyz_cells_override_ui_settings(a1111):
    import checks

    ui = a1111()
    write_pair(ui)
    p = ui.make_p(PROMPT, dynfuse=checks.dynfuse_args(method="kl"), steps=3, seed=5)
    cells = _xyz().run_axis(p, "[DynFuse] Method", "static, subject-only")
    assert [x for x, _, _ in cells] == ["static", "subject-only"]
    assert "DynFuse method: static" in cells[0][2].infotexts[0]
    assert "DynFuse method: subject-only" in cells[1][2].infotexts[0]
    assert not hasattr(p, "_dynfuse_xyz")  # the plot's own p is untouched

    cells = _xyz().run_axis(p, "[DynFuse] Subject strength", "0.5, 1.25")
    assert 'DynFuse subject: "subj:0.5"' in cells[0][2].infotexts[0]

    cells = _xyz().run_axis(p, "[DynFuse] Divergence tokens", "0, 16")
    assert "divergence tokens" not in cells[0][2].infotexts[0]
    assert "DynFuse divergence tokens: 16" in cells[1][2].infotexts[0]

    cells = _xyz().run_axis(p, "[DynFuse] Enabled", "True, False", vals_dropdown=["True", "False"])
    assert "DynFuse method" in cells[0][2].infotexts[0]
    assert "DynFuse" not in cells[1][2].infotexts[0]  # cells share one extra_generation_params dict


def test_xyz_values_are_confirmed_before_any_image(a1111):
    import checks

    from lib_dynfuse.settings import SettingsError

    ui = a1111()
    write_pair(ui)
    p = ui.make_p(PROMPT, dynfuse=checks.dynfuse_args(), steps=3, seed=5)
    with pytest.raises(SettingsError, match="temperature is -1; use a value > 0 and <= 100"):
        _xyz().run_axis(p, "[DynFuse] KL temperature", "1, -1")
    with pytest.raises(SettingsError, match="method 'fancy' is unknown"):
        _xyz().run_axis(p, "[DynFuse] Method", "kl, fancy")
    assert p.fake_latents == []


# ---- API ------------------------------------------------------------------------------------------------------

def _payload(args, prompt=PROMPT, steps=3):
    # The README's script key; the host matches it against the lowercased script title.
    return {"prompt": prompt, "steps": steps, "seed": 5, "alwayson_scripts": {"dynfuse": {"args": args}}}


def _png_data_url(color=(40, 90, 200)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _readme_request() -> dict:
    """The body of the README's curl request, as printed there."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    body = re.search(r"curl -s http://127\.0\.0\.1:7860/sdapi/v1/txt2img .*? -d '(\{.*?\n\})'", readme, re.DOTALL)
    return json.loads(body.group(1))


def _readme_settings() -> dict:
    return _readme_request()["alwayson_scripts"]["dynfuse"]["args"][0]


def test_readme_request_settings():
    from lib_dynfuse.settings import DEFAULTS, from_api

    assert from_api(_readme_settings()) == dataclasses.replace(
        DEFAULTS, enabled=True, subject="my_dog", style="watercolor", style_strength=0.8, show_map=True)


def test_readme_request_through_the_api(a1111):
    pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    import loras
    from conftest_guidance import CPU, TINY

    from lib_dynfuse.guidance import scorers

    ui = a1111(api_only=True)
    from lib_dynfuse.hosts import a1111 as adapter
    from lib_dynfuse.hosts import detect
    from modules import shared

    adapter.A1111Adapter.guidance_factories = dict(TINY)  # random-weight CLIP and DINO of the real classes
    shared.opts.set("dynfuse_device", CPU.device)
    shared.opts.set("dynfuse_precision", CPU.precision)
    keys = loras.attention_keys()
    loras.write_lora(os.path.join(ui.lora_dir, "my_dog.safetensors"), ui.model, keys, seed=1)
    loras.write_lora(os.path.join(ui.lora_dir, "watercolor.safetensors"), ui.model, keys[2:], seed=2)
    try:
        # The README's request, with guidance on as in its Python example (reference images as base64).
        settings = {**_readme_settings(), "guidance": True, "guidance_strength": 0.2, "guidance_balance": 0.5,
                    "subject_refs": [_png_data_url((200, 120, 40))], "style_ref": _png_data_url()}
        res = ui.api_txt2img(_payload([settings], "my dog <lora:my_dog:1> <lora:watercolor:1>", 5))
        assert detect.get_adapter().last_job.guided.losses  # guided by the reference images
    finally:
        scorers.unload()
    info = res["info"]
    guidance = 'DynFuse guidance: "strength 0.2, balance 0.5, start 0, end 1, every 1, decoder auto"'
    for written in ("DynFuse method: kl", 'DynFuse subject: "my_dog:1"', 'DynFuse style: "watercolor:0.8"',
                    "DynFuse show map: True", guidance, "DynFuse selection: subject "):
        assert written in info
    assert "DynFuse note" not in info
    assert len(res["images"]) == 2  # the image and the selection map


def test_api_dict_args(a1111):
    ui = a1111(api_only=True)
    write_pair(ui)
    res = ui.api_txt2img(_payload([{"enabled": True, "method": "static", "style_strength": "0.5"}]))
    assert "DynFuse method: static" in res["info"] and 'DynFuse style: "sty:0.5"' in res["info"]


def test_api_positional_args_like_the_page(a1111):
    import checks

    ui = a1111(api_only=True)
    write_pair(ui)
    res = ui.api_txt2img(_payload(checks.dynfuse_args(method="switch")[:6]))
    assert "DynFuse method: switch" in res["info"]


def test_api_unknown_key_and_bad_value(a1111, capsys):
    ui = a1111(api_only=True)
    write_pair(ui)
    capsys.readouterr()
    res = ui.api_txt2img(_payload([{"enabled": True, "methd": "static"}]))
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse: ")]
    assert len(out) == 1 and "methd" in out[0] and out[0].endswith("DynFuse is off for this generation.")
    assert "DynFuse note" in res["info"] and "methd" in res["info"] and "DynFuse method" not in res["info"]

    res = ui.api_txt2img(_payload([{"enabled": True, "temperature": -2}]))
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse: ")]
    assert out == ["DynFuse: temperature is -2; use a value > 0 and <= 100. DynFuse is off for this generation."]
    assert 'DynFuse note: "off: temperature is -2; use a value > 0 and <= 100"' in res["info"]


def test_api_unknown_script_name_is_422(a1111):
    from fastapi.exceptions import HTTPException

    ui = a1111(api_only=True)
    payload = _payload([{"enabled": True}])
    payload["alwayson_scripts"] = {"dynfusion": {"args": []}}
    with pytest.raises(HTTPException) as e:
        ui.api_txt2img(payload)
    assert e.value.status_code == 422


@pytest.mark.parametrize("api_only", [False, True])
def test_routes(a1111, api_only):
    from fastapi.testclient import TestClient

    ui = a1111(api_only=api_only)
    client = TestClient(ui.app)
    assert client.get("/dynfuse/v1/version").json() == {"version": "0.1.0"}
    schema = client.get("/dynfuse/v1/schema").json()
    assert "method" in schema["properties"]


# ---- settings, reload, detection ------------------------------------------------------------------------------

def test_settings_section(a1111):
    from lib_dynfuse.hosts import options
    from modules import shared

    a1111()
    assert shared.opts.dynfuse_clip_model == "ViT-B-32"
    assert shared.opts.data_labels["dynfuse_dino_model"].section == ("dynfuse", "DynFuse")
    shared.opts.set("dynfuse_device", "cpu")
    config = options.scorer_config()
    assert (config.device, config.clip_pretrained, config.dino_model) == ("cpu", "openai", "vit_small_patch16_224.dino")
    assert options.read_option("dynfuse_unload_after") is False


def test_the_settings_tab_switches_the_compiled_divergence_on(a1111, monkeypatch):
    import checks

    from lib_dynfuse.engine import compiled
    from lib_dynfuse.engine.session import FusionSession
    from modules import shared

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")  # the graph capture, without code generation
    seen = []
    opened = FusionSession.__init__
    monkeypatch.setattr(FusionSession, "__init__", lambda self, targets, options, **kw: (
        seen.append(options.compiled), opened(self, targets, options, **kw))[1])
    ui = a1111()
    write_pair(ui)
    shares = []
    for flag in (False, True):
        shared.opts.set("dynfuse_compiled_divergence", flag)
        _, res = ui.txt2img(PROMPT, steps=3, seed=5, dynfuse=checks.dynfuse_args())
        shares.append(res.infotexts[0].split("DynFuse selection: ")[1][:12])
    compiled.reset()
    assert seen == [False, True]
    assert shares[0] == shares[1]  # the same share of decisions won by the subject


def test_reload_ui_registers_everything_once(a1111):
    from modules import script_callbacks

    ui = a1111()
    ui.unload()
    ui = a1111()
    names = [c.name for c in script_callbacks.callback_map["callbacks_cfg_denoiser"]]
    assert names == ["base/dynfuse.py/cfg_denoiser/dynfuse_cfg_denoiser"]
    assert [o.label for o in _xyz().axis_options].count("[DynFuse] Enabled") == 1


def _package(root, name, files=("__init__.py",)):
    for f in files:
        path = os.path.join(root, name, f)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()


def test_detect_hosts(a1111, tmp_path, monkeypatch, capsys):
    import checks

    from lib_dynfuse.hosts import detect
    from modules import paths

    a1111()
    assert detect.detect_host() == detect.A1111
    root = tmp_path / "forge"
    _package(str(root), "modules_forge", ("__init__.py", "forge_version.py"))
    _package(str(root), "ldm_patched")
    monkeypatch.setattr(paths, "script_path", str(root))
    monkeypatch.syspath_prepend(str(root))

    def detect_with(version: str = "", lora_module: str = "") -> str:
        (root / "modules_forge" / "forge_version.py").write_text(f"version = {version!r}\n")
        if (root / "backend").is_dir():
            (root / "backend" / "patcher" / "lora.py").write_text(lora_module)
        for name in [n for n in sys.modules if n.split(".")[0] in ("modules_forge", "ldm_patched", "backend")]:
            del sys.modules[name]
        return detect.detect_host()

    assert detect_with("0.0.17v1.8.0rc") == detect.OLD_FORGE
    assert detect_with("classic") == detect.FORGE_CLASSIC
    _package(str(root), "ldm_patched", ("modules/__init__.py", "modules/weight_adapter/__init__.py"))
    assert detect_with("1.0.0v2-v1.10.1RC") == detect.REFORGE
    _package(str(root), "backend", ("__init__.py", "patcher/__init__.py", "patcher/lora.py",
                                    "diffusion_engine/__init__.py", "diffusion_engine/base.py"))
    # Forge merges per file with its LoraLoader; Forge Neo's backend has ComfyUI's patcher instead.
    assert detect_with("2.0.1v1.10.1", "class LoraLoader:\n    pass\n") == detect.FORGE
    assert detect_with("neo", "def merge_lora_to_weight(patches, weight, key, computation_dtype=None):\n"
                              "    return weight\n") == detect.NEO

    messages = {}
    for host in (detect.REFORGE, detect.FORGE_CLASSIC, detect.OLD_FORGE):
        adapter = detect.UnsupportedHost(detect.UNSUPPORTED[host], host)
        from modules import processing

        p = processing.StableDiffusionProcessingTxt2Img(prompt=PROMPT)
        settings = dataclasses.replace(__import__("lib_dynfuse.settings", fromlist=["DEFAULTS"]).DEFAULTS,
                                       enabled=True)
        capsys.readouterr()
        assert adapter.begin_job(p, settings) is None
        messages[host] = capsys.readouterr().out
        assert p.extra_generation_params["DynFuse note"] == "off: unsupported WebUI"
    assert messages[detect.REFORGE].startswith("DynFuse: this WebUI is reForge (")
    assert messages[detect.FORGE_CLASSIC].startswith("DynFuse: this WebUI is Forge Classic (")
    assert messages[detect.OLD_FORGE].startswith("DynFuse: this WebUI is old Forge (")
    assert all("supports AUTOMATIC1111 1.9-1.10.1, Forge (main) and Forge Neo" in m for m in messages.values())
    assert checks  # fixture bookkeeping
