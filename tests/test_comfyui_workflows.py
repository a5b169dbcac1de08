"""The repository as a ComfyUI custom node: ComfyUI's loader finds `comfy_entrypoint` in the root __init__.py and
gets the three nodes; anything else importing that file gets nothing; the example workflows (UI format) fit the
nodes' schemas and link outputs to inputs of the same type."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
HARNESS = Path(__file__).parent / "fakehost/comfyui/comfyui_harness.py"
_spec = importlib.util.spec_from_file_location("comfyui_harness", HARNESS)
ch = sys.modules.get("comfyui_harness") or importlib.util.module_from_spec(_spec)
if "comfyui_harness" not in sys.modules:
    sys.modules["comfyui_harness"] = ch
    _spec.loader.exec_module(ch)

SOCKETS = {"MODEL", "CLIP", "VAE", "IMAGE", "LATENT", "CONDITIONING", "MASK"}
# ComfyUI 0.30's core nodes the workflows use: socket inputs and output types (nodes.py, nodes_preview_any.py).
STOCK = {
    "CheckpointLoaderSimple": ({}, ["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": ({"clip": "CLIP"}, ["CONDITIONING"]),
    "EmptyLatentImage": ({}, ["LATENT"]),
    "KSampler": ({"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"},
                 ["LATENT"]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"]),
    "SaveImage": ({"images": "IMAGE"}, []),
    "PreviewImage": ({"images": "IMAGE"}, []),
    "PreviewAny": ({"source": "*"}, ["STRING"]),
    "LoadImage": ({}, ["IMAGE", "MASK"]),
}


def load_like_comfyui(name: str = "sd-webui-dynfuse"):
    """What ComfyUI's load_custom_node does with a folder: its __init__.py as a module named after the folder."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.fixture(scope="module")
def schemas(tmp_path_factory):
    with ch.comfy_host(tmp_path_factory.mktemp("comfy")) as host:
        module = load_like_comfyui()
        extension = asyncio.run(module.comfy_entrypoint())
        nodes = asyncio.run(extension.get_node_list())
        yield {cls.GET_SCHEMA().node_id: cls.GET_SCHEMA() for cls in nodes}, host


def test_comfyui_gets_three_nodes_in_the_dynfuse_category(schemas):
    found, _ = schemas
    assert sorted(found) == ["DynFuseGuidance", "DynFuseLoraPair", "DynFuseSelectionMap"]
    assert {s.category for s in found.values()} == {"DynFuse"}
    assert [s.display_name for s in found.values()] == ["DynFuse LoRA pair", "DynFuse guidance",
                                                         "DynFuse selection map"]


def test_the_pair_offers_every_method_and_engine_option(schemas):
    from lib_dynfuse.engine.policies import METHODS
    from lib_dynfuse.settings import DEFAULTS

    found, _ = schemas
    inputs = {i.id: i for i in found["DynFuseLoraPair"].inputs}
    assert inputs["method"].options == list(METHODS) and inputs["method"].default == DEFAULTS.method
    assert {"measure", "temperature", "decide_per", "switch_every", "klora_schedule", "decide_every",
            "max_tokens"} <= set(inputs)
    assert [o.io_type for o in found["DynFuseLoraPair"].outputs] == ["MODEL", "CLIP"]
    assert [o.io_type for o in found["DynFuseSelectionMap"].outputs] == ["IMAGE", "STRING"]


def test_without_comfyui_the_root_module_is_empty(tmp_path):
    """A process without ComfyUI (a WebUI, pytest collecting the folder as a package) gets an empty module."""
    probe = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('probe', sys.argv[1]); "
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
             "print(sorted(k for k in vars(m) if not k.startswith('_')), 'lib_dynfuse' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, str(ROOT / "__init__.py")], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["['importlib',", "'os',", "'sys']", "False"]


def widget_ok(spec, value) -> bool:
    if spec.io_type == "COMBO":
        return value in spec.options or (spec.id.endswith("_lora") and str(value).endswith(".safetensors"))
    if spec.io_type == "BOOLEAN":
        return isinstance(value, bool)
    if spec.io_type == "STRING":
        return isinstance(value, str)
    kind = int if spec.io_type == "INT" else (int, float)
    return (isinstance(value, kind) and not isinstance(value, bool)
            and (spec.min is None or value >= spec.min) and (spec.max is None or value <= spec.max))


def test_there_are_the_documented_workflows():
    assert {p.stem for p in WORKFLOWS} == {"sd15_subject_style", "sdxl_subject_style", "sd15_subject_style_guidance",
                                           "sdxl_subject_style_guidance", "sd15_static_vs_kl"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_a_workflow_fits_the_nodes_schemas(schemas, path):
    found, _ = schemas
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        kind = node["type"]
        sockets = {i["name"]: i["type"] for i in node["inputs"]}
        if kind in found:
            schema = found[kind]
            assert sockets == {i.id: i.io_type for i in schema.inputs if i.io_type in SOCKETS}, kind
            required = [i.id for i in schema.inputs if i.io_type in SOCKETS and not i.optional]
            assert all(next(x for x in node["inputs"] if x["name"] == r)["link"] is not None for r in required)
            widgets = [i for i in schema.inputs if i.io_type not in SOCKETS]
            assert len(node["widgets_values"]) == len(widgets), kind
            bad = [(w.id, v) for w, v in zip(widgets, node["widgets_values"]) if not widget_ok(w, v)]
            assert bad == [], kind
            assert [o["type"] for o in node["outputs"]] == [o.io_type for o in schema.outputs]
        else:
            assert kind in STOCK, kind
            assert sockets == STOCK[kind][0] and [o["type"] for o in node["outputs"]] == STOCK[kind][1]
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        output, target_input = nodes[source]["outputs"][slot], nodes[target]["inputs"][target_slot]
        assert output["type"] == kind and link_id in output["links"]
        assert target_input["link"] == link_id and target_input["type"] in (kind, "*")
    methods = [n["widgets_values"][4] for n in nodes.values() if n["type"] == "DynFuseLoraPair"]
    assert methods == (["static", "kl"] if "static" in path.stem else ["kl"])
    assert any(n["type"] == "DynFuseGuidance" for n in nodes.values()) == ("guidance" in path.stem)


def test_the_api_graph_fits_the_nodes_schemas(schemas):
    """workflows/api/: the graph POSTed to /prompt for a scripted check (kl, static and LoraLoader side by side)."""
    found, _ = schemas
    graph = json.loads((ROOT / "workflows/api/sd15_kl_static_loraloader.json").read_text())
    for node in graph.values():
        schema = found.get(node["class_type"])
        inputs = node["inputs"]
        for value in inputs.values():
            if isinstance(value, list):
                assert value[0] in graph  # a link: [node id, output slot]
        if schema is None:
            continue
        by_id = {i.id: i for i in schema.inputs}
        assert set(inputs) <= set(by_id)
        assert {i.id for i in schema.inputs if not i.optional} <= set(inputs)
        assert all(widget_ok(by_id[k], v) for k, v in inputs.items() if by_id[k].io_type not in SOCKETS)
    methods = sorted(n["inputs"]["method"] for n in graph.values() if n["class_type"] == "DynFuseLoraPair")
    assert methods == ["kl", "static"]
