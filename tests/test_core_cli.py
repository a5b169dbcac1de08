import subprocess
import sys

import pytest

from lib_dynfuse.cli import main
from tests.lora_files import lora_tensors, write
from tests.tiny_unet import LAYERS, TinyUNet

ALL = [f"model.diffusion_model.{p}" for p, _, _ in LAYERS]


@pytest.fixture
def pair(tmp_path):
    model = TinyUNet()
    subject = write(tmp_path / "dog.safetensors", lora_tensors(model, ALL, rank=2, alpha=1.0, seed=1))
    style = write(tmp_path / "ink.safetensors", lora_tensors(model, ALL[2:10], rank=4, alpha=None, seed=2))
    return subject, style


def test_inspect_describes_both_files(pair, capsys):
    assert main(["inspect", str(pair[0]), str(pair[1]), "--steps", "20", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "subject: " in out and "style: " in out
    assert "  rank         : 2\n" in out and "  rank         : 4\n" in out
    assert "  alpha        : 1\n" in out and "  alpha        : none (scale 1)\n" in out
    assert "  UNet layers  : 16" in out and "  UNet layers  : 8" in out
    assert "overlap: 8 layers touched by both, 8 by the subject only, 0 by the style only" in out
    assert "K-LoRA (gamma" in out and "20 steps" in out
    assert "input_blocks_1_1_transformer_blocks_0_attn1_to_q" in out


@pytest.mark.parametrize("content,expected", [
    (b"garbage" * 20, "error: cannot read broken.safetensors: damaged or not a .safetensors file"),
    (None, "error: LoRA file not found"),
])
def test_broken_files_give_one_line_and_exit_code_2(pair, tmp_path, content, expected):
    broken = tmp_path / "broken.safetensors"
    if content is not None:
        broken.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "lib_dynfuse", "inspect", str(pair[0]), str(broken)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected)
    assert "Traceback" not in result.stderr


def test_truncated_file_exit_code(pair, tmp_path, capsys):
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(pair[1].read_bytes()[:200])
    assert main(["inspect", str(pair[0]), str(truncated)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read cut.safetensors")
