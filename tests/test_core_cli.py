import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lib_dynfuse.cli import inspect, main
from lib_dynfuse.loras.files import deltas_for_model, read_lora, resolve_layers
from lib_dynfuse.engine.policies import EngineOptions
from lib_dynfuse.engine.session import FusionSession, LayerTarget, StepClock
from tests.lora_files import kohya_key, lora_tensors, write
from tests.tiny_unet import LAYERS, TinyUNet, make_inputs

ALL = [f"model.diffusion_model.{p}" for p, _, _ in LAYERS]
TO_Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
ROW = re.compile(r"^  (\S+) +(-?[\d.]+) +(\d+|never)(?:  (.+))?$")


@pytest.fixture
def pair(tmp_path):
    model = TinyUNet()
    subject = write(tmp_path / "dog.safetensors", lora_tensors(model, ALL, rank=2, alpha=1.0, seed=1))
    style = write(tmp_path / "ink.safetensors", lora_tensors(model, ALL[2:10], rank=4, alpha=None, seed=2))
    return subject, style


def layer_rows(lines):
    """The per-layer table of ``inspect``: LoRA layer key → (switch step column, style steps column)."""
    return {m.group(1): (m.group(3), m.group(4)) for m in map(ROW.match, lines) if m}


def test_inspect_describes_both_files_and_lists_every_shared_layer(pair, capsys):
    assert main(["inspect", str(pair[0]), str(pair[1]), "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "subject: " in out and "style: " in out
    assert "  rank         : 2\n" in out and "  rank         : 4\n" in out
    assert "  alpha        : 1\n" in out and "  alpha        : none (scale 1)\n" in out
    assert "  UNet layers  : 16" in out and "  UNet layers  : 8" in out
    assert "overlap: 8 layers touched by both, 8 by the subject only, 0 by the style only" in out
    assert "K-LoRA (gamma" in out and "S(t) = 1.5*t + 0.5, 20 steps" in out
    rows = layer_rows(out.splitlines())
    assert sorted(rows) == sorted(kohya_key(n).removeprefix("lora_unet_") for n in ALL[2:10])
    assert all(style_steps is None for _, style_steps in rows.values())


def test_summary_leaves_out_the_layer_list(pair, capsys):
    assert main(["inspect", str(pair[0]), str(pair[1]), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "K-LoRA (gamma" in out and layer_rows(out.splitlines()) == {}


def engine_style_steps(subject_path, style_path, steps, options):
    """Run the engine for ``steps`` steps on the tiny UNet: LoRA layer key → steps at which the style won."""
    model = TinyUNet().eval()
    subject, style = read_lora(subject_path), read_lora(style_path)
    d_subject, d_style = deltas_for_model(subject, model), deltas_for_model(style, model)
    key_of = {module: layer.key for module, layer in resolve_layers(subject, model).items()}
    modules = dict(model.named_modules())
    targets = [LayerTarget(n, modules[n], d_subject.get(n), d_style.get(n)) for n in sorted(set(d_subject) | set(d_style))]
    x, context = make_inputs(batch=1)
    session = FusionSession(targets, options)
    with session, torch.no_grad():
        for step in range(steps):
            session.set_step(StepClock(step, steps))
            model(x, context)
    won: dict[str, list[int]] = {key_of[name]: [] for name in d_subject if name in d_style}
    for decision in sorted(session.log.decisions(), key=lambda d: d.step):
        if decision.winner == "style":
            won[key_of[decision.layer]].append(decision.step)
    return won


def first_style_step(style_steps):
    return str(style_steps[0]) if style_steps else "never"


def rank1_lora(path, down_row):
    """A rank-1 LoRA on attn1.to_q whose ΔW is e1·down_row: top-1 entry 1, L1 norm sum(|down_row|)."""
    down = torch.zeros(1, 8)
    down[0, :len(down_row)] = torch.tensor(down_row)
    up = torch.zeros(8, 1)
    up[0, 0] = 1.0
    key = kohya_key(TO_Q)
    return write(path, {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})


@pytest.mark.parametrize("subject_row,style_row,steps,ratio,switch", [
    ([1.0], [1.0, 0.25], 2, "1.250", "never"),  # S(t) = 0.5, 1.25: R == S at the last step keeps the subject
    ([1.0], [1.0, 0.25], 4, "1.250", "3"),
    ([1.0, 1.0], [1.0], 3, "0.500", "1"),  # R == β: the subject keeps the first step
])
def test_switch_step_is_the_engines_at_exact_boundaries(tmp_path, subject_row, style_row, steps, ratio, switch):
    subject, style = rank1_lora(tmp_path / "s.safetensors", subject_row), rank1_lora(tmp_path / "t.safetensors", style_row)
    lines = inspect(str(subject), str(style), steps=steps)
    key = kohya_key(TO_Q).removeprefix("lora_unet_")
    assert any(re.match(rf"^  {key} +{re.escape(ratio)} +{switch}$", line) for line in lines), lines
    engine = engine_style_steps(subject, style, steps, EngineOptions(method="k-lora"))
    assert layer_rows(lines)[key][0] == first_style_step(engine[key]) == switch


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 1000), steps=st.integers(1, 12), alpha=st.floats(0.5, 3.0), beta=st.floats(0.0, 1.5),
       schedule=st.sampled_from(["S", "S*"]), style_scale=st.floats(0.2, 2.0))
def test_cli_columns_match_the_engines_decisions(seed, steps, alpha, beta, schedule, style_scale):
    model = TinyUNet()
    options = EngineOptions(method="k-lora", klora_alpha=alpha, klora_beta=beta, klora_schedule=schedule)
    with tempfile.TemporaryDirectory() as folder:
        subject = write(Path(folder) / "s.safetensors", lora_tensors(model, ALL, rank=2, seed=seed))
        style = write(Path(folder) / "t.safetensors",
                      lora_tensors(model, ALL[3:13], rank=3, alpha=2.0, seed=seed + 1, scale=style_scale))
        rows = layer_rows(inspect(str(subject), str(style), steps=steps, options=options))
        engine = engine_style_steps(subject, style, steps, options)
    assert set(rows) == set(engine)
    for key, style_steps in engine.items():
        assert rows[key][0] == first_style_step(style_steps)
        if schedule == "S*":
            listed = [] if rows[key][1] == "none" else [
                s for part in rows[key][1].split(", ") for s in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
            assert listed == style_steps


KEY = kohya_key(ALL[3])
DAMAGED = "damaged or not a .safetensors file"


def write_broken(path, case):
    """Write the broken file ``case`` to ``path`` (nothing for "missing")."""
    good = lora_tensors(TinyUNet(), ALL[3:5], seed=3)
    if case == "missing":
        return
    if case == "garbage":
        path.write_bytes(b"garbage" * 20)
        return
    if case in ("header_cut", "data_cut"):
        whole = write(path, good).read_bytes()
        path.write_bytes(whole[:200] if case == "header_cut" else whole[:-100])
        return
    tensors = {
        "checkpoint": {"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)},
        "te_only": {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 12),
                    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(12, 2)},
        "two_alphas": {**good, f"{KEY}.alpha": torch.tensor([1.0, 2.0])},
        "ranks": {**good, f"{KEY}.lora_up.weight": torch.randn(8, 3)},
    }[case]
    write(path, tensors)


@pytest.mark.parametrize("case,expected", [
    ("garbage", f"cannot read garbage.safetensors: {DAMAGED}"),
    ("header_cut", f"cannot read header_cut.safetensors: {DAMAGED}"),
    ("data_cut", f"cannot read data_cut.safetensors: {DAMAGED}"),
    ("checkpoint", "checkpoint.safetensors is not a LoRA file: it has no lora_down/lora_up or lora_A/lora_B tensors"),
    ("te_only", "te_only.safetensors has no UNet layers (text encoder only): there is nothing for DynFuse to fuse"),
    ("two_alphas", f"two_alphas.safetensors: layer {KEY}: alpha holds 2 values instead of one; the file is damaged"),
    ("ranks", f"ranks.safetensors: layer {KEY}: mismatched factors: lora_down.weight [2, 8] has rank 2, "
              "lora_up.weight [8, 3] has rank 3; the file is damaged"),
    ("missing", "LoRA file not found: "),
])
def test_bad_files_give_exactly_one_line_and_exit_code_2(pair, tmp_path, case, expected):
    broken = tmp_path / f"{case}.safetensors"
    write_broken(broken, case)
    result = subprocess.run([sys.executable, "-m", "lib_dynfuse", "inspect", str(pair[0]), str(broken)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"error: {expected}"), result.stderr
    assert "Traceback" not in result.stderr


def test_an_unexpected_error_is_cut_to_its_first_line(pair, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("first line\nsecond line\nthird line")

    monkeypatch.setattr("lib_dynfuse.cli.KLoraPolicy.prepare", fail)
    assert main(["inspect", str(pair[0]), str(pair[1])]) == 2
    assert capsys.readouterr().err == "error: RuntimeError: first line\n"


CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2"  # a 3x3 conv, fused through a LoCon mid factor
CONV_KEY = kohya_key(CONV)
TE_KEY = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def good_tensors():
    """Two linear layers, a LoCon conv layer with a mid factor and a text-encoder layer."""
    model = TinyUNet()
    return {**lora_tensors(model, ALL[3:5], seed=3), **lora_tensors(model, [CONV], mid=True, seed=4),
            f"{TE_KEY}.lora_down.weight": torch.randn(2, 12), f"{TE_KEY}.lora_up.weight": torch.randn(12, 2)}


def damaged(case):
    """good_tensors() with one layer damaged as ``case`` says."""
    tensors = good_tensors()
    nan_up = tensors[f"{KEY}.lora_up.weight"].clone()
    nan_up[3, 1] = float("nan")
    change = {
        "nan": {f"{KEY}.lora_up.weight": nan_up},
        "inf": {f"{KEY}.lora_down.weight": torch.full((2, 8), float("inf")).half()},
        "no_up": {f"{KEY}.lora_up.weight": None},
        "no_down": {f"{KEY}.lora_down.weight": None},
        "rank": {f"{KEY}.lora_down.weight": torch.randn(3, 8)},
        "mid_shape": {f"{CONV_KEY}.lora_mid.weight": torch.randn(2, 3, 3, 3)},
        "te_nan": {f"{TE_KEY}.lora_down.weight": torch.full((2, 12), float("nan"))},
    }[case]
    for name, tensor in change.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    return tensors


@pytest.mark.parametrize("case,message", [
    ("nan", f"layer {KEY}: lora_up.weight holds 1 NaN value (of 16)"),
    ("inf", f"layer {KEY}: lora_down.weight holds 16 infinite values (of 16)"),
    ("no_up", f"layer {KEY}: lora_down.weight without its up factor"),
    ("no_down", f"layer {KEY}: lora_up.weight without its down factor"),
    ("rank", f"layer {KEY}: mismatched factors: lora_down.weight [3, 8] has rank 3, lora_up.weight [8, 2] has rank 2"),
    ("mid_shape", f"layer {CONV_KEY}: mismatched factors: lora_mid.weight has shape [2, 3, 3, 3]; between factors "
                  "of rank 2 it is [2, 2, kernel height, kernel width]"),
    ("te_nan", f"layer {TE_KEY}: lora_down.weight holds 24 NaN values (of 24)"),
])
@pytest.mark.parametrize("side", ["subject", "style"])
def test_a_damaged_layer_is_one_error_line_naming_it_and_exit_code_2(pair, tmp_path, capsys, case, message, side):
    broken = write(tmp_path / f"{case}.safetensors", damaged(case))
    files = [str(pair[0]), str(broken)] if side == "style" else [str(broken), str(pair[1])]
    assert main(["inspect", *files]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {case}.safetensors: {message}; the file is damaged\n"


def test_the_undamaged_file_of_those_cases_passes(pair, tmp_path, capsys):
    assert main(["inspect", str(pair[0]), str(write(tmp_path / "good.safetensors", good_tensors()))]) == 0
    assert "(LoCon/Tucker mid factors)" in capsys.readouterr().out
