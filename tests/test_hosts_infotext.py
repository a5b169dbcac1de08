"""What the infotext says on the fake Forge and Forge Neo (AUTOMATIC1111: tests/test_a1111_generation.py and
test_a1111_robustness.py): each image's own selection, in batches, hires passes and batch counts; and, when DynFuse
turns itself off, the note alone, without the settings that would turn it on again on paste."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from lib_dynfuse.hosts.base import NOTE_KEY
from lib_dynfuse.settings import DynFuseSettings, from_infotext
from family_harnesses import fh, nh
from test_a1111_generation import _opened_sessions


HOSTS = {"forge": (fh.forge_host, "lib_dynfuse.hosts.forge", "ForgeAdapter"),
         "neo": (nh.neo_host, "lib_dynfuse.hosts.neo", "NeoAdapter")}
PROMPT = fh.PROMPT
# The keys that turn DynFuse on, or choose its LoRAs, when an infotext is pasted.
SETTINGS_KEYS = ("DynFuse method", "DynFuse subject", "DynFuse style")


@pytest.fixture(params=sorted(HOSTS))
def which(request):
    return request.param


@pytest.fixture
def host(which, tmp_path):
    with HOSTS[which][0](tmp_path) as host:
        fh.write_test_loras(tmp_path, host.sd_model)
        yield host


def dynfuse(which, host, **settings):
    _factory, module, name = HOSTS[which]
    adapter = getattr(importlib.import_module(module), name)()
    script = fh.AdapterScript(host, adapter, DynFuseSettings(enabled=True, **settings))
    return script, host.scripts.ScriptRunner([script])


# The WebUIs' own pattern for one "key: value" of the parameters line (modules/infotext_utils.py, re_param).
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parsed(infotext: str) -> dict[str, str]:
    """The parameters line as the WebUI's paste reads it (quoted values unquoted)."""
    return {key: json.loads(value) if value.startswith('"') else value for key, value in PARAM.findall(infotext)}


def _share(logs, image: int) -> str:
    weights = [d.subject_weight for log in logs for d in log.decisions() if d.unit == image]
    return f"subject {sum(weights) / len(weights):.2f}"


@pytest.mark.parametrize("method", ["kl", "kl-soft"])
def test_each_image_writes_its_own_selection_and_map(which, host, monkeypatch, method):
    """Two batches of two images (four seeds), with hires fix: each image's share over its own decisions in its
    batch's first and hires passes, and a map of its own with its infotext."""
    from lib_dynfuse import report

    sessions = _opened_sessions(monkeypatch)
    script, runner = dynfuse(which, host, method=method, show_map=True)
    processed, _p = host.txt2img(PROMPT, runner=runner, steps=3, batch_size=2, n_iter=2, seed=1, enable_hr=True,
                                 denoising_strength=0.6)
    assert not script.job.failed
    passes = [s.log for s in sessions if len(s.log)]
    assert len(passes) == 4 and len(processed.images) == 8 and len(processed.infotexts) == 8
    shares = []
    for image in range(4):
        batch, in_batch = divmod(image, 2)
        logs = passes[2 * batch: 2 * batch + 2]
        shares.append(_share(logs, in_batch))
        assert parsed(processed.infotexts[image])["DynFuse selection"] == shares[-1]
        expected = report.selection_map(logs, title=f"image {image + 1}: ", image=in_batch)
        assert processed.images[4 + image].tobytes() == expected.tobytes()
        assert processed.infotexts[4 + image] == processed.infotexts[image]
    assert len(set(shares)) > 1, shares


def test_deciding_per_row_gives_each_image_the_share_of_its_rows(which, host, monkeypatch):
    sessions = _opened_sessions(monkeypatch)
    _script, runner = dynfuse(which, host, decide_per="row")
    processed, _p = host.txt2img(PROMPT, runner=runner, steps=3, batch_size=2, seed=3)
    log = sessions[-1].log
    assert len(log.images) == 2
    for image in (0, 1):
        assert parsed(processed.infotexts[image])["DynFuse selection"] == f"subject {log.subject_share(image):.2f}"


def _corrupt_style(folder: Path, sd_model) -> str:
    (folder / "style.safetensors").write_bytes(b"not a safetensors file")
    return ("the style 'style' LoRA has no UNet weights loaded by {host}: style.safetensors is not a .safetensors "
            "file or is damaged (Error while deserializing header: header too large).")


def _damaged_style(folder: Path, sd_model) -> str:
    line, _note = fh.write_damaged(folder, sd_model, "style", "down", float("nan"), "1 NaN value")
    return line.removeprefix("DynFuse: ")


def _failing_takeover(folder: Path, sd_model) -> str:
    from lib_dynfuse.hosts import forge_family

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    forge_family.split_patches = broken
    return "could not take over the LoRAs: RuntimeError: boom."


@pytest.mark.parametrize("cause", [_corrupt_style, _damaged_style, _failing_takeover])
def test_when_dynfuse_turns_itself_off_the_infotext_has_the_note_and_nothing_to_turn_it_on(
        which, host, tmp_path, monkeypatch, capsys, cause):
    from lib_dynfuse.hosts import forge_family

    monkeypatch.setattr(forge_family, "split_patches", forge_family.split_patches)  # undone after the test
    line = cause(tmp_path, host.sd_model).replace("{host}", "Forge" if which == "forge" else "Forge Neo")
    clean, _ = host.txt2img(PROMPT, steps=2, batch_size=2)
    capsys.readouterr()
    script, runner = dynfuse(which, host)
    processed, p = host.txt2img(PROMPT, runner=runner, steps=2, batch_size=2)
    out = [text for text in capsys.readouterr().out.splitlines() if text.startswith("DynFuse")]
    assert script.job.failed
    assert any(text.startswith(f"DynFuse: {line}") for text in out), out
    for infotext in processed.infotexts:
        params = parsed(infotext)
        assert params[NOTE_KEY].startswith("off: ")
        assert not [key for key in params if key.startswith("DynFuse ") and key != NOTE_KEY]
        assert "enabled" not in from_infotext(params)
    # The WebUI's own image (NaN too, with a NaN factor).
    torch.testing.assert_close(torch.stack(processed.latents), torch.stack(clean.latents), equal_nan=True)


def test_a_missing_package_is_named_with_how_to_install_it(which, host, monkeypatch, capsys):
    """A WebUI whose installer did not run: the console says which package is missing and how to install it, in
    one line; the note says it in a few words; the fusion runs."""
    from PIL import Image

    from lib_dynfuse.guidance import scorers

    def no_timm(config):
        raise ModuleNotFoundError("No module named 'timm'", name="timm")

    _factory, module, name = HOSTS[which]
    monkeypatch.setattr(getattr(importlib.import_module(module), name), "guidance_factories",
                        {"clip_factory": no_timm, "dino_factory": no_timm})
    refs = {"subject_refs": (Image.new("RGB", (32, 32), (250, 10, 10)),),
            "style_ref": Image.new("RGB", (32, 32), (10, 10, 250))}
    capsys.readouterr()
    try:
        script, runner = dynfuse(which, host, **refs)
        processed, _p = host.txt2img(PROMPT, runner=runner, steps=2)
    finally:
        scorers.unload()
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse")]
    assert out == [f"DynFuse: no CLIP/DINO scores for this generation: could not load the DINO model "
                   f"'vit_small_patch16_224.dino': the Python package timm is not installed. Restart the WebUI so "
                   f"that DynFuse's install.py installs it, or run \"{sys.executable}\" -m pip install timm. To skip "
                   "the scores, turn off Settings > DynFuse > Write CLIP/DINO scores to the infotext. Not said again "
                   "until a CLIP/DINO setting changes."]
    params = parsed(processed.infotexts[0])
    assert params[NOTE_KEY] == "no scores: timm not installed" and params["DynFuse method"] == "kl"
    assert not script.job.failed


def test_kl_soft_chooses_between_loras_of_different_strength(which, host):
    """The style at three times the subject's weight moves most layers more: kl-soft gives it most of each blend,
    not half (its temperature is relative to the divergences' scale, whatever the model)."""
    script, runner = dynfuse(which, host, method="kl-soft")
    processed, _p = host.txt2img(PROMPT.replace("subj:0.8", "subj:0.3"), runner=runner, steps=3, batch_size=2)
    weights = torch.tensor([d.subject_weight for d in script.job.last_log.decisions()])
    assert float((weights - 0.5).abs().mean()) > 0.2, weights
    share = float(parsed(processed.infotexts[0])["DynFuse selection"].removeprefix("subject "))
    assert share < 0.3
