"""CLIP/DINO scores in each image's infotext, with guidance on or off, through the fake A1111 and Forge hosts
(random-weight CLIP / DINO stand-ins)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_a1111_generation import PROMPT, write_pair

pytest.importorskip("open_clip")
pytest.importorskip("timm")

SCORES = re.compile(r'DynFuse scores: "subject-DINO (-?\d\.\d{3}), style-CLIP (-?\d\.\d{3}), clip-T (-?\d\.\d{3})"')
REFS = {"subject_refs": (Image.new("RGB", (32, 32), (250, 10, 10)),),
        "style_ref": Image.new("RGB", (32, 32), (10, 10, 250))}
SKIP = "To skip the scores, turn off Settings > DynFuse > Write CLIP/DINO scores to the infotext."
NO_REFERENCE = ("DynFuse: no CLIP/DINO scores for this generation: no reference image (add subject or style images "
                f"in the DynFuse panel, or put a preview image beside the LoRA files). {SKIP} Not said again for these "
                "LoRAs until the WebUI restarts.")
UNTIL_SETTINGS_CHANGE = "Not said again until a CLIP/DINO setting changes."
NOT_TRIED_AGAIN = "Not tried or said again until a CLIP/DINO setting changes or the WebUI restarts."


@pytest.fixture
def webui(a1111):
    """The fake A1111 with DynFuse, the two LoRAs and random-weight encoders on the CPU."""
    from conftest_guidance import CPU, TINY

    from lib_dynfuse.guidance import scorers

    ui = a1111()
    write_pair(ui)
    from lib_dynfuse.hosts import a1111 as adapter
    from modules import shared

    adapter.A1111Adapter.guidance_factories = dict(TINY)
    shared.opts.set("dynfuse_device", CPU.device)
    shared.opts.set("dynfuse_precision", CPU.precision)
    yield ui
    scorers.unload()


def dynfuse_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("DynFuse")]


def spy_batches(monkeypatch) -> list[tuple[int, torch.Tensor, object]]:
    """Every score_batch call: the batch number, the decoded images and the job's scorer."""
    from lib_dynfuse.hosts.base import HostAdapter

    seen = []
    original = HostAdapter.score_batch

    def spy(self, p, job, images, batch_number):
        seen.append((batch_number, images.clone(), job.scorer))
        return original(self, p, job, images, batch_number)

    monkeypatch.setattr(HostAdapter, "score_batch", spy)
    return seen


@pytest.mark.parametrize("guidance", [False, True])
def test_every_image_gets_the_scores_of_its_own_decoded_image(webui, monkeypatch, guidance):
    import checks

    from lib_dynfuse.guidance import format_scores

    seen = spy_batches(monkeypatch)
    extra = {"guidance": True, "guidance_start": 0.0, "guidance_end": 1.0} if guidance else {}
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, batch_size=2, n_iter=2,
                           dynfuse=checks.dynfuse_args(**REFS, **extra))
    assert [n for n, _, _ in seen] == [0, 1]
    expected = [format_scores(row) for _, images, scorer in seen for row in scorer.scores(images)]
    found = [SCORES.search(text) for text in res.infotexts]
    assert all(found)
    assert [f"subject-DINO {m[1]}, style-CLIP {m[2]}, clip-T {m[3]}" for m in found] == expected
    assert len(set(expected)) == 4  # four different images, four different lines
    from lib_dynfuse.hosts import detect

    job = detect.get_adapter().last_job
    assert (job.guided is not None) == guidance and job.scorer is None  # the scorer is dropped at the end


def test_scores_parse_back_and_pasting_ignores_them(webui):
    import checks

    from lib_dynfuse.hosts import ui as dui
    from modules import infotext_utils

    args = checks.dynfuse_args(method="kl-soft", **REFS)
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=args)
    parsed = infotext_utils.parse_generation_parameters(res.infotexts[0])
    assert re.fullmatch(r"subject-DINO -?\d\.\d{3}, style-CLIP -?\d\.\d{3}, clip-T -?\d\.\d{3}",
                        parsed["DynFuse scores"])
    assert parsed["DynFuse method"] == "kl-soft"
    runner = webui.runner(False)
    script = webui.script("DynFuse")
    pasted = dict(zip((id(c) for c, _ in runner.infotext_fields), webui.paste(res.infotexts[0])))
    values = [pasted.get(id(c), infotext_utils.KEEP) for c in script.controls]
    values = [c.value if v is infotext_utils.KEEP else v for c, v in zip(script.controls, values)]
    pasted_settings = dui.values_to_settings(values)
    assert (pasted_settings.enabled, pasted_settings.method) == (True, "kl-soft")
    assert pasted_settings == dui.values_to_settings(checks.dynfuse_args(method="kl-soft", subject="subj",
                                                                         style="sty"))


def test_lora_preview_images_are_the_default_references(webui):
    import os

    import checks
    import networks

    Image.new("RGB", (24, 24), (0, 200, 0)).save(os.path.join(webui.lora_dir, "subj.png"))
    networks.list_available_networks()  # the LoRA page's refresh: the files were written after start-up
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args())
    # Only the subject has a preview: no style score, and the text score is always there.
    assert re.search(r'DynFuse scores: "subject-DINO -?\d\.\d{3}, clip-T -?\d\.\d{3}"', res.infotexts[0])


def test_no_reference_writes_no_scores_and_says_so_once_per_pair_of_loras(webui, capsys):
    import checks

    from lib_dynfuse.guidance import loaded_models

    capsys.readouterr()
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, n_iter=2, dynfuse=checks.dynfuse_args())
    assert all("DynFuse scores" not in text for text in res.infotexts)
    assert "DynFuse method: kl" in res.infotexts[0]
    assert dynfuse_lines(capsys) == [NO_REFERENCE]
    assert [note(text) for text in res.infotexts] == [None, None]  # the common case: not worth a note
    assert loaded_models() == []
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args())  # the same LoRAs again
    assert dynfuse_lines(capsys) == [] and note(res.infotexts[0]) is None
    _, res = webui.txt2img("a dog <lora:sty:1> <lora:subj:1>", steps=2, seed=5, dynfuse=checks.dynfuse_args())
    assert dynfuse_lines(capsys) == []  # the same LoRAs in the other roles
    write_pair(webui, third=True)
    _, res = webui.txt2img("a dog <lora:subj:1> <lora:third:1>", steps=2, seed=5, dynfuse=checks.dynfuse_args())
    assert dynfuse_lines(capsys) == [NO_REFERENCE]  # another pair


def test_a_job_dynfuse_turned_off_writes_no_scores(webui, capsys):
    import checks

    capsys.readouterr()
    _, res = webui.txt2img("a dog <lora:subj:1> <lora:gone:1>", steps=2, seed=5, dynfuse=checks.dynfuse_args(**REFS))
    assert "DynFuse scores" not in res.infotexts[0] and 'DynFuse note: "off: LoRA gone not loaded"' in res.infotexts[0]
    assert [line for line in dynfuse_lines(capsys) if "scores" in line] == []


def test_the_setting_turns_the_scores_and_their_models_off(webui, capsys):
    import checks

    from lib_dynfuse.guidance import loaded_models
    from modules import shared

    shared.opts.set("dynfuse_scores", False)
    capsys.readouterr()
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(**REFS))
    assert "DynFuse scores" not in res.infotexts[0] and "DynFuse method: kl" in res.infotexts[0]
    assert dynfuse_lines(capsys) == [] and loaded_models() == []


def test_dynfuse_off_loads_nothing_and_writes_no_scores(webui):
    import checks

    from lib_dynfuse.guidance import loaded_models

    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(False, **REFS))
    assert "DynFuse" not in res.infotexts[0] and loaded_models() == []


def test_models_that_cannot_load_give_one_line_naming_the_setting(webui, capsys):
    import checks

    from lib_dynfuse.hosts import a1111 as adapter

    def broken(config):
        raise OSError("no such file")

    adapter.A1111Adapter.guidance_factories = {"clip_factory": broken, "dino_factory": broken}
    capsys.readouterr()
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(**REFS))
    assert "DynFuse scores" not in res.infotexts[0] and "DynFuse method: kl" in res.infotexts[0]
    assert dynfuse_lines(capsys) == [
        ("DynFuse: no CLIP/DINO scores for this generation: could not load the DINO model "
         "'vit_small_patch16_224.dino' (no such file). Set a local weights file in Settings > DynFuse > DINO "
         f"weights path (a local file; overrides the timm download). {SKIP} {NOT_TRIED_AGAIN}")]


def note(infotext: str) -> str | None:
    from modules import infotext_utils

    return infotext_utils.parse_generation_parameters(infotext).get("DynFuse note")


def offline_factory():
    """A model factory as on a machine without internet: the hub cannot be reached. Counts its calls."""
    def offline(config):
        offline.calls += 1
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.")

    offline.calls = 0
    return offline


OFFLINE_LINE = (
    "DynFuse: no CLIP/DINO scores for this generation: could not load the DINO model 'vit_small_patch16_224.dino' "
    "(We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached files.). "
    "Set a local weights file in Settings > DynFuse > DINO weights path (a local file; overrides the timm download). "
    f"{SKIP} {NOT_TRIED_AGAIN}")


def test_offline_the_models_are_tried_and_said_once_until_a_setting_changes(webui, capsys):
    """The scores are on by default: without internet, every generation would wait for the hub and say so."""
    import checks

    from lib_dynfuse.hosts import a1111 as adapter
    from modules import shared

    offline = offline_factory()
    adapter.A1111Adapter.guidance_factories = {"clip_factory": offline, "dino_factory": offline}
    capsys.readouterr()

    def generate(**fields):
        _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(**REFS, **fields))
        assert "DynFuse method: kl" in res.infotexts[0] and "DynFuse scores" not in res.infotexts[0]
        return dynfuse_lines(capsys), note(res.infotexts[0])

    assert generate() == ([OFFLINE_LINE], "no scores: DINO weights not available offline")
    assert generate() == ([], None)
    assert generate(guidance=True) == ([], "guidance off: DINO weights not available offline")
    assert offline.calls == 1
    shared.opts.set("dynfuse_cache_dir", "/models/cache")
    assert generate() == ([OFFLINE_LINE], "no scores: DINO weights not available offline")
    assert generate(guidance=True) == ([], "guidance off: DINO weights not available offline")
    assert offline.calls == 2


def test_offline_with_guidance_on_says_why_guidance_is_off(webui, capsys):
    import checks

    from lib_dynfuse.hosts import a1111 as adapter

    adapter.A1111Adapter.guidance_factories = {"clip_factory": offline_factory(), "dino_factory": offline_factory()}
    said = ("DynFuse: guidance: could not load the DINO model 'vit_small_patch16_224.dino' (We couldn't connect to "
            "'https://huggingface.co' to load the files, and couldn't find them in the cached files.). Set a local "
            "weights file in Settings > DynFuse > DINO weights path (a local file; overrides the timm download), or "
            "turn guidance off. Guidance is off for this generation and no CLIP/DINO scores are written; the fusion "
            f"still runs. {NOT_TRIED_AGAIN}")
    capsys.readouterr()
    for lines in ([said], []):
        _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(guidance=True, **REFS))
        assert dynfuse_lines(capsys) == lines
        assert note(res.infotexts[0]) == "guidance off: DINO weights not available offline"


def test_a_device_torch_does_not_know_names_the_device_setting(webui, capsys):
    import checks

    from modules import shared

    shared.opts.set("dynfuse_device", "gpu")
    capsys.readouterr()
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(guidance=True, **REFS))
    assert dynfuse_lines(capsys) == [
        ("DynFuse: guidance: the CLIP/DINO device 'gpu' is not a device name. Set Settings > DynFuse > CLIP/DINO device "
         "(auto, cpu, cuda:0, ...) to auto, cpu or cuda:0, or turn guidance off. Guidance is off for this generation "
         f"and no CLIP/DINO scores are written; the fusion still runs. {UNTIL_SETTINGS_CHANGE}")]
    assert "DynFuse selection: subject " in res.infotexts[0] and "DynFuse scores" not in res.infotexts[0]


def test_clip_t_scores_each_image_against_its_own_prompt(webui, monkeypatch):
    import checks

    seen = spy_batches(monkeypatch)
    prompts = [PROMPT, "a watercolor boat <lora:subj:1> <lora:sty:0.8>"]
    _, res = webui.txt2img(prompts, steps=2, seed=5, batch_size=2, dynfuse=checks.dynfuse_args(**REFS))
    ((_, images, scorer),) = seen
    with torch.no_grad():
        image = torch.nn.functional.normalize(scorer.scorers.clip_image(images), dim=-1)
        text = torch.nn.functional.normalize(scorer.scorers.clip_text(["a dog", "a watercolor boat"]), dim=-1)
    expected = [f"{value:.3f}" for value in (image * text).sum(-1).tolist()]
    assert [SCORES.search(infotext)[3] for infotext in res.infotexts] == expected
    assert expected[0] != expected[1]


def test_a_preview_in_the_hosts_image_format_is_a_reference(webui):
    """As the host's LoRA browser, which also shows previews saved in its samples_format."""
    import os

    import checks
    import networks

    from modules import shared

    Image.new("RGB", (24, 24), (0, 200, 0)).save(os.path.join(webui.lora_dir, "subj.bmp"))
    networks.list_available_networks()
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args())
    assert "DynFuse scores" not in res.infotexts[0]
    shared.opts.set("samples_format", "bmp")
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args())
    assert re.search(r'DynFuse scores: "subject-DINO -?\d\.\d{3}, clip-T -?\d\.\d{3}"', res.infotexts[0])


def test_turning_the_unload_option_on_frees_the_models_at_once(webui):
    import checks

    from lib_dynfuse.guidance import loaded_models
    from modules import shared

    webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(**REFS))
    assert loaded_models() == ["clip", "dino"]  # kept between generations
    shared.opts.set("dynfuse_unload_after", True)  # the Settings tab's Apply
    assert loaded_models() == []


@pytest.mark.parametrize("dynfuse", [False, True])
def test_with_the_unload_option_on_any_job_frees_the_models(webui, dynfuse):
    import checks

    from lib_dynfuse.guidance import loaded_models
    from modules import shared

    webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(**REFS))
    shared.opts.data["dynfuse_unload_after"] = True  # saved without its callback (a settings file, another script)
    assert loaded_models() == ["clip", "dino"]
    shared.opts.set("dynfuse_scores", False)
    webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(dynfuse))  # a job that loads no model
    assert loaded_models() == []


def test_xyz_over_methods_writes_one_scores_line_per_cell_image(webui):
    import checks

    from lib_dynfuse.hosts import xyz

    p = webui.make_p(PROMPT, dynfuse=checks.dynfuse_args(**REFS), steps=2, seed=5)
    cells = xyz.find_xyz_module().run_axis(p, "[DynFuse] Method", "static, subject-only")
    texts = [res.infotexts[0] for _, _, res in cells]
    assert [t.count("DynFuse scores:") for t in texts] == [1, 1]
    assert all(SCORES.search(t) for t in texts)
    assert SCORES.search(texts[0])[0] != SCORES.search(texts[1])[0]  # each cell its own image's scores


def test_settings_labels_name_what_the_messages_name(a1111):
    from lib_dynfuse.hosts import options
    from modules import shared

    a1111()
    labels = {key: info.label for key, info in shared.opts.data_labels.items() if key.startswith("dynfuse_")}
    assert labels["dynfuse_scores"] == "Write CLIP/DINO scores to the infotext"
    assert labels["dynfuse_clip_weights"].startswith("CLIP weights path")
    assert labels["dynfuse_dino_weights"].startswith("DINO weights path")
    assert shared.opts.dynfuse_scores is True and options.read_option("dynfuse_scores") is True


# ---- Forge ----------------------------------------------------------------------------------------------------

_spec = importlib.util.spec_from_file_location("forge_harness", Path(__file__).parent / "fakehost/forge/forge_harness.py")
fh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fh)


@pytest.fixture
def forge(tmp_path, monkeypatch):
    from conftest_guidance import TINY

    from lib_dynfuse.hosts.forge import ForgeAdapter

    with fh.forge_host(tmp_path) as host:
        fh.write_test_loras(tmp_path, host.sd_model)
        host.shared.opts.data.update(dynfuse_device="cpu", dynfuse_precision="fp32")
        monkeypatch.setattr(ForgeAdapter, "guidance_factories", dict(TINY))
        yield host


@pytest.mark.parametrize("guidance", [False, True])
def test_forge_writes_each_images_scores(forge, guidance):
    from lib_dynfuse.hosts.forge import ForgeAdapter
    from lib_dynfuse.settings import DynFuseSettings

    extra = {"guidance": True, "guidance_start": 0.0, "guidance_end": 1.0} if guidance else {}
    script = fh.AdapterScript(forge, ForgeAdapter(), DynFuseSettings(enabled=True, **REFS, **extra))
    processed, _ = forge.txt2img(fh.PROMPT, runner=forge.scripts.ScriptRunner([script]), steps=2, batch_size=2,
                                 n_iter=2)
    found = [SCORES.search(text) for text in processed.infotexts]
    assert all(found) and len({m[0] for m in found}) == 4
    assert (script.job.guided is not None) == guidance


def test_forge_without_references_writes_no_scores(forge, capsys):
    from lib_dynfuse.hosts.forge import ForgeAdapter
    from lib_dynfuse.settings import DynFuseSettings

    script = fh.AdapterScript(forge, ForgeAdapter(), DynFuseSettings(enabled=True))
    capsys.readouterr()
    processed, _ = forge.txt2img(fh.PROMPT, runner=forge.scripts.ScriptRunner([script]), steps=2)
    assert "DynFuse scores" not in processed.infotexts[0] and "DynFuse method: kl" in processed.infotexts[0]
    assert [line for line in dynfuse_lines(capsys) if "scores" in line] == [NO_REFERENCE]


def test_a_missing_package_says_which_and_how_to_install_it(webui, capsys):
    """A WebUI whose installer did not run (open_clip or timm missing): one line naming the package and how to
    install it; guidance is off, the fusion runs."""
    import sys

    import checks

    from lib_dynfuse.hosts import a1111 as adapter

    def no_open_clip(config):
        raise ModuleNotFoundError("No module named 'open_clip'", name="open_clip")

    adapter.A1111Adapter.guidance_factories = {"clip_factory": no_open_clip, "dino_factory": no_open_clip}
    capsys.readouterr()
    _, res = webui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args(guidance=True, **REFS))
    assert dynfuse_lines(capsys) == [
        "DynFuse: guidance: could not load the DINO model 'vit_small_patch16_224.dino': the Python package "
        "open_clip_torch is not installed. Restart the WebUI so that DynFuse's install.py installs it, or run "
        f"\"{sys.executable}\" -m pip install open_clip_torch, or turn guidance off. Guidance is off for this "
        f"generation and no CLIP/DINO scores are written; the fusion still runs. {UNTIL_SETTINGS_CHANGE}"]
    assert note(res.infotexts[0]) == "guidance off: open_clip_torch not installed"
    assert "DynFuse method: kl" in res.infotexts[0]
