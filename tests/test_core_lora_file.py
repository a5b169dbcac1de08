import csv
import re
from pathlib import Path

import pytest
import torch

from lib_dynfuse.engine.deltas import LayerGeometry
from lib_dynfuse.loras.files import LoraFileError, deltas_for_model, ldm_candidates, read_lora, resolve_layers
from tests.lora_files import lora_tensors, write
from tests.tiny_unet import LAYERS, TinyUNet

DATA = Path(__file__).parent / "data"
ALL = [f"model.diffusion_model.{p}" for p, _, _ in LAYERS]


def table(name):
    with open(DATA / name, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_every_sd15_kohya_key_maps_to_its_ldm_module():
    for row in table("sd15-unet-layers.tsv"):
        key = row["kohya_key"].removeprefix("lora_unet_")
        target = row["module"].removeprefix("model.diffusion_model.").replace(".", "_")
        assert target in [key, *ldm_candidates(key)], row["kohya_key"]


def test_sdxl_kohya_keys_are_ldm_paths_already():
    for row in table("sdxl-unet-layers.tsv"):
        key = row["kohya_key"].removeprefix("lora_unet_")
        assert key == row["module"].removeprefix("model.diffusion_model.").replace(".", "_")


def test_kohya_file_round_trip_onto_the_model(tmp_path):
    model = TinyUNet()
    tensors = lora_tensors(model, ALL, rank=3, alpha=1.5, seed=1)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.randn(3, 12)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(12, 3)
    lora = read_lora(write(tmp_path / "dog.safetensors", tensors, {"ss_network_dim": "3"}))
    assert lora.name == "dog" and lora.rank == 3 and len(lora.layers) == len(ALL)
    assert lora.text_encoder_keys == ["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert lora.metadata == {"ss_network_dim": "3"}
    deltas = deltas_for_model(lora, model, strength=0.5)
    assert sorted(deltas) == sorted(ALL)
    name = ALL[3]
    base = name.replace("model.diffusion_model.", "lora_unet_").replace(".", "_")
    expected = tensors[f"{base}.lora_up.weight"] @ tensors[f"{base}.lora_down.weight"] * 0.5 * 1.5 / 3
    geometry = LayerGeometry.of(dict(model.named_modules())[name])
    torch.testing.assert_close(deltas[name].dense_weight(geometry), expected)


def test_diffusers_named_kohya_keys_map_onto_ldm_modules(tmp_path):
    model = TinyUNet()
    rows = {r["module"]: r["kohya_key"] for r in table("sd15-unet-layers.tsv")}
    tensors = lora_tensors(model, ALL, key=lambda name: rows[name], seed=2)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in tensors)
    lora = read_lora(write(tmp_path / "diffusers_named.safetensors", tensors))
    assert sorted(resolve_layers(lora, model)) == sorted(ALL)


def test_peft_layout(tmp_path):
    model = TinyUNet()
    names = [n for n in ALL if "attn" in n]
    lora = read_lora(write(tmp_path / "peft.safetensors", lora_tensors(model, names, layout="peft", seed=3)))
    assert all(layer.alpha is None for layer in lora.layers.values())
    deltas = deltas_for_model(lora, model)
    assert sorted(deltas) == sorted(names)
    assert all(d.scale == 1.0 for d in deltas.values())


def test_locon_mid_factors(tmp_path):
    model = TinyUNet()
    conv = ["model.diffusion_model.input_blocks.1.0.in_layers.2"]
    lora = read_lora(write(tmp_path / "locon.safetensors", lora_tensors(model, conv, mid=True, seed=4)))
    layer = next(iter(lora.layers.values()))
    assert layer.mid is not None and tuple(layer.mid.shape) == (2, 2, 3, 3)
    assert deltas_for_model(lora, model)[conv[0]].mid is not None


def test_missing_file(tmp_path):
    with pytest.raises(LoraFileError, match="LoRA file not found"):
        read_lora(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    good = write(tmp_path / "good.safetensors", lora_tensors(TinyUNet(), ALL, seed=5))
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraFileError, match=r"cannot read truncated.safetensors: damaged or not a .safetensors file"):
        read_lora(bad)


def test_garbage_file(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(LoraFileError, match="cannot read garbage.safetensors"):
        read_lora(bad)


def test_a_checkpoint_is_not_a_lora(tmp_path):
    path = write(tmp_path / "model.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)})
    with pytest.raises(LoraFileError, match="model.safetensors is not a LoRA file"):
        read_lora(path)


def test_mismatched_factors(tmp_path):
    tensors = lora_tensors(TinyUNet(), ALL[3:4], seed=6)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = torch.randn(8, 5)
    with pytest.raises(LoraFileError, match="layer lora_unet_.*: mismatched factors"):
        read_lora(write(tmp_path / "bad.safetensors", tensors))


def test_a_lora_for_another_model_family_does_not_fit(tmp_path):
    model = TinyUNet()
    tensors = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(2, 2048),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(640, 2),
    }
    lora = read_lora(write(tmp_path / "xl.safetensors", tensors))
    assert lora.family == "SDXL"
    with pytest.raises(LoraFileError, match=r"xl.safetensors does not fit this model: .*SDXL LoRA"):
        deltas_for_model(lora, model)
    unrelated = read_lora(write(tmp_path / "other.safetensors", {
        "lora_unet_label_emb_0_0.lora_down.weight": torch.randn(2, 2816),
        "lora_unet_label_emb_0_0.lora_up.weight": torch.randn(1280, 2)}))
    with pytest.raises(LoraFileError, match="none of its 1 UNet layers exist in it"):
        deltas_for_model(unrelated, model)


@pytest.mark.parametrize("metadata,dims,family", [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, 768, "SDXL"),
    ({"ss_base_model_version": "sd_v2"}, 768, "SD2"),
    ({"ss_base_model_version": "sd_v2_v"}, 2048, "SD2"),
    ({"ss_base_model_version": "sd_v1"}, 1024, "SD1.5"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, 2048, "SD1.5"),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, 768, "SD2"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, 768, "SDXL"),
    ({"ss_base_model_version": "flux1"}, 2048, "SDXL"),  # not a UNet family: the shapes decide
    ({}, 768, "SD1.5"),
    ({}, 1024, "SD2"),
    ({}, 2048, "SDXL"),
    ({}, 4096, "unknown"),
])
@pytest.mark.parametrize("block", ["input_blocks_1_1", "output_blocks_3_1"])
def test_family_guess(tmp_path, metadata, dims, family, block):
    tensors = {
        f"lora_unet_{block}_transformer_blocks_0_attn2_to_v.lora_down.weight": torch.randn(2, dims),
        f"lora_unet_{block}_transformer_blocks_0_attn2_to_v.lora_up.weight": torch.randn(320, 2),
    }
    assert read_lora(write(tmp_path / "f.safetensors", tensors, metadata)).family == family


@pytest.mark.parametrize("proj_down,family", [((2, 320, 1, 1), "SD1.5"), ((2, 320), "SD2")])
def test_family_from_the_transformer_projection_when_no_context_layer_is_there(tmp_path, proj_down, family):
    tensors = {
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.randn(proj_down),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.randn(320, 2, *proj_down[2:]),
    }
    assert read_lora(write(tmp_path / "f.safetensors", tensors)).family == family


def test_a_text_encoder_only_lora_has_no_unet_layers(tmp_path):
    lora = read_lora(write(tmp_path / "te.safetensors", {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(3, 12),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(12, 3)}))
    assert lora.layers == {} and lora.rank == 0
    assert lora.text_encoder_keys == ["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    message = "te.safetensors has no UNet layers (text encoder only): there is nothing for DynFuse to fuse"
    with pytest.raises(LoraFileError, match=re.escape(message)):
        deltas_for_model(lora, TinyUNet())


KEY = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
TO_Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2"  # 8 -> 8 channels, 3x3
CONV_KEY = "lora_unet_input_blocks_1_0_in_layers_2"
NAN_UP = torch.randn(8, 2).index_put_((torch.tensor([1, 4]), torch.tensor([0, 1])), torch.tensor(float("nan")))


@pytest.mark.parametrize("change,message", [
    ({f"{KEY}.alpha": torch.tensor([4.0, 4.0])}, f"layer {KEY}: alpha holds 2 values instead of one"),
    ({f"{KEY}.alpha": torch.tensor(float("nan"))}, f"layer {KEY}: alpha is nan"),
    ({f"{KEY}.lora_up.weight": torch.randn(8, 5)},
     f"layer {KEY}: mismatched factors: lora_down.weight [2, 8] has rank 2, lora_up.weight [8, 5] has rank 5"),
    ({f"{KEY}.lora_down.weight": torch.randn(8)},
     f"layer {KEY}: mismatched factors: lora_down.weight has shape [8]; a factor has 2 dimensions (linear) or 4 "
     "(conv)"),
    ({f"{KEY}.lora_down.weight": torch.ones(2, 8, dtype=torch.int64)},
     f"layer {KEY}: lora_down.weight holds torch.int64 values, not floats"),
    ({f"{KEY}.lora_up.weight": NAN_UP}, f"layer {KEY}: lora_up.weight holds 2 NaN values (of 16)"),
    ({f"{KEY}.lora_down.weight": torch.tensor([[float("inf")] * 8, [0.0] * 7 + [float("-inf")]])},
     f"layer {KEY}: lora_down.weight holds 9 infinite values (of 16)"),
    ({f"{KEY}.lora_down.weight": torch.tensor([[float("nan")] * 8, [float("inf")] * 8]).half()},
     f"layer {KEY}: lora_down.weight holds 8 NaN and 8 infinite values (of 16)"),
])
def test_damaged_factors_are_named(tmp_path, change, message):
    tensors = lora_tensors(TinyUNet(), [TO_Q], seed=6)
    tensors.update(change)
    with pytest.raises(LoraFileError, match="^" + re.escape(f"bad.safetensors: {message}") + "; the file is damaged$"):
        read_lora(write(tmp_path / "bad.safetensors", tensors))


@pytest.mark.parametrize("dropped,message", [
    ("lora_up.weight", "lora_down.weight without its up factor"),
    ("lora_down.weight", "lora_up.weight without its down factor"),
])
def test_a_layer_missing_a_factor_is_named(tmp_path, dropped, message):
    """The host refuses such a file; among many good layers, the one without its pair is the one named."""
    tensors = lora_tensors(TinyUNet(), ALL, seed=6)
    del tensors[f"{KEY}.{dropped}"]
    with pytest.raises(LoraFileError, match="^" + re.escape(f"bad.safetensors: layer {KEY}: {message}; the file "
                                                                "is damaged") + "$"):
        read_lora(write(tmp_path / "bad.safetensors", tensors))


def test_a_peft_layer_missing_a_factor_is_named(tmp_path):
    tensors = lora_tensors(TinyUNet(), [TO_Q], layout="peft", seed=6)
    (name,) = [k for k in tensors if k.endswith("lora_A.weight")]
    del tensors[name]
    layer = name.removesuffix(".lora_A.weight")
    with pytest.raises(LoraFileError, match=re.escape(f"layer {layer}: lora_B.weight without its down factor")):
        read_lora(write(tmp_path / "bad.safetensors", tensors))


def test_a_mid_factor_alone_is_named(tmp_path):
    tensors = {**lora_tensors(TinyUNet(), [TO_Q], seed=6), f"{CONV_KEY}.lora_mid.weight": torch.randn(2, 2, 3, 3)}
    with pytest.raises(LoraFileError, match=re.escape(f"layer {CONV_KEY}: lora_mid.weight without its down and up factors")):
        read_lora(write(tmp_path / "bad.safetensors", tensors))


def test_an_alpha_alone_belongs_to_a_layer_of_another_type_and_is_left_out(tmp_path):
    tensors = {**lora_tensors(TinyUNet(), [TO_Q], seed=6), f"{CONV_KEY}.alpha": torch.tensor(1.0),
               f"{CONV_KEY}.hada_w1_a": torch.randn(8, 2)}
    assert list(read_lora(write(tmp_path / "loha_mix.safetensors", tensors)).layers) == [
        KEY.removeprefix("lora_unet_")]


@pytest.mark.parametrize("role,factor,message", [
    ("mid", torch.randn(2, 3, 3, 3),
     "lora_mid.weight has shape [2, 3, 3, 3]; between factors of rank 2 it is [2, 2, kernel height, kernel width]"),
    ("mid", torch.randn(2, 2, 9),
     "lora_mid.weight has shape [2, 2, 9]; between factors of rank 2 it is [2, 2, kernel height, kernel width]"),
    ("down", torch.randn(2, 8, 3, 3),
     "lora_down.weight [2, 8, 3, 3] has a 3x3 kernel; beside a mid factor, which holds the kernel, it is 1x1"),
    ("up", torch.randn(8, 2, 3, 3),
     "lora_up.weight [8, 2, 3, 3] has a 3x3 kernel; an up factor's kernel is 1x1"),
])
def test_a_locon_layer_whose_factors_do_not_fit_is_named(tmp_path, role, factor, message):
    tensors = lora_tensors(TinyUNet(), [CONV], mid=True, seed=6)
    tensors[f"{CONV_KEY}.lora_{role}.weight"] = factor
    with pytest.raises(LoraFileError, match="^" + re.escape(f"bad.safetensors: layer {CONV_KEY}: mismatched "
                                                                f"factors: {message}; the file is damaged") + "$"):
        read_lora(write(tmp_path / "bad.safetensors", tensors))


TE_KEY = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def test_text_encoder_factors_are_checked_when_asked(tmp_path):
    tensors = {**lora_tensors(TinyUNet(), [TO_Q], seed=6), f"{TE_KEY}.lora_down.weight": torch.randn(2, 12),
               f"{TE_KEY}.lora_up.weight": torch.full((12, 2), float("nan"))}
    path = write(tmp_path / "te_nan.safetensors", tensors)
    assert read_lora(path).text_encoder_keys == [TE_KEY]  # the host's part, not read by default
    with pytest.raises(LoraFileError, match=re.escape(f"layer {TE_KEY}: lora_up.weight holds 24 NaN values")):
        read_lora(path, text_encoder=True)


class SpyOpen:
    """Wraps safetensors.safe_open and records every tensor whose data is read."""

    def __init__(self, real):
        self.real, self.loaded = real, []

    def __call__(self, *args, **kwargs):
        spy = self

        class Handle:
            def __enter__(self):
                self.f = spy.real(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def get_tensor(self, name):
                spy.loaded.append(name)
                return self.f.get_tensor(name)

        return Handle()


@pytest.fixture
def spy_open(monkeypatch):
    import safetensors

    spy = SpyOpen(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", spy)
    return spy


def test_a_file_without_lora_keys_is_turned_away_before_any_tensor_is_read(tmp_path, spy_open):
    path = write(tmp_path / "model.safetensors", {f"model.diffusion_model.layer{i}.weight": torch.zeros(64, 64)
                                                  for i in range(5)})
    with pytest.raises(LoraFileError, match="model.safetensors is not a LoRA file"):
        read_lora(path)
    assert spy_open.loaded == []


def test_only_the_unet_factors_are_read(tmp_path, spy_open):
    model = TinyUNet()
    tensors = lora_tensors(model, ALL[3:5], seed=7)
    others = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 12),
              "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(12, 2),
              "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0),
              "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}
    lora = read_lora(write(tmp_path / "mixed.safetensors", {**tensors, **others}))
    assert sorted(spy_open.loaded) == sorted(tensors)
    assert len(lora.layers) == 2 and lora.text_encoder_keys == ["lora_te_text_model_encoder_layers_0_mlp_fc1"]


K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize("tensors,family,expected", [
    (None, "SD1.5", "x.safetensors is not a .safetensors file or is damaged (Error while deserializing header: "
                    "header too large)"),
    ({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, "SD1.5",
     "x.safetensors holds no LoRA weights (no lora_down/lora_up or lora_A/lora_B tensors)"),
    ({f"{K}.lora_down.weight": torch.zeros(2, 768)}, "SD1.5",
     f"x.safetensors has missing or damaged factors (layer {K}: lora_down.weight without its up factor; the file is "
     "damaged)"),
    ({f"{K}.lora_down.weight": torch.zeros(2, 2048), f"{K}.lora_up.weight": torch.zeros(320, 2)}, "SD1.5",
     "x.safetensors is made for SDXL and this model is SD1.5"),
    ({f"{K}.lora_down.weight": torch.zeros(2, 2048), f"{K}.lora_up.weight": torch.zeros(320, 2)}, None,
     "x.safetensors is made for SDXL and this model is of another family"),
    ({f"{K}.lora_down.weight": torch.zeros(2, 768), f"{K}.lora_up.weight": torch.zeros(320, 2)}, "SD1.5", None),
    ({f"{K}.hada_w1_a": torch.zeros(320, 2), f"{K}.hada_w1_b": torch.zeros(2, 768)}, "SD1.5", None),  # LoHa
])
def test_file_problem_names_what_the_file_shows(tmp_path, tensors, family, expected):
    """Why a WebUI may have loaded nothing of a LoRA file, read from the file; None when it looks fine (or is a kind
    this reader does not read)."""
    from safetensors.torch import save_file

    from lib_dynfuse.loras.files import file_problem

    path = tmp_path / "x.safetensors"
    if tensors is None:
        path.write_bytes(b"not a safetensors file")
    else:
        save_file(tensors, str(path))
    assert file_problem(path, family) == expected
    assert file_problem(tmp_path / "gone.safetensors", family) == "its file gone.safetensors is missing"
