"""The check every fake-host test runs on what DynFuse prints (console_lines), and DynFuse's own line-keeping."""

from __future__ import annotations

import importlib.util

import pytest
from console_lines import PROJECT, dynfuse_console
from test_a1111_generation import PROMPT, write_pair

OWN_FILE = str(PROJECT / "lib_dynfuse" / "hosts" / "example.py")
MULTILINE_ERROR = "CUDA error: an illegal memory access\nCompile with TORCH_USE_CUDA_DSA for details."
ONE_LINE = ("DynFuse: could not take over the LoRAs: RuntimeError: CUDA error: an illegal memory access Compile with "
            "TORCH_USE_CUDA_DSA for details. The generation continues without DynFuse.")

_spec = importlib.util.spec_from_file_location("neo_harness", PROJECT / "tests/fakehost/neo/neo_harness.py")
nh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nh)


@pytest.mark.parametrize("text", ["two\nlines", "DynFuse: two\nlines", "no prefix", "DynFuse:no space"])
def test_a_print_of_our_code_that_is_not_one_dynfuse_line_fails_the_check(text):
    with pytest.raises(AssertionError, match="not one 'DynFuse: ' line"), dynfuse_console():
        exec(compile(f"print({text!r})", OWN_FILE, "exec"), {})


def test_what_others_print_is_left_alone():
    with dynfuse_console() as printed:
        exec(compile("print('DynFuse: fine')", OWN_FILE, "exec"), {})
        print("a host's line\nwith a second line")
    assert printed == ["DynFuse: fine\n"]


def test_an_error_text_of_several_lines_is_said_on_one_line(a1111, capsys, monkeypatch):
    import checks

    from lib_dynfuse.engine import session

    def broken_install(self):
        raise RuntimeError(MULTILINE_ERROR)

    ui = a1111()
    write_pair(ui)
    monkeypatch.setattr(session.FusionSession, "install", broken_install)
    capsys.readouterr()
    _p, res = ui.txt2img(PROMPT, steps=2, seed=5, dynfuse=checks.dynfuse_args())
    assert capsys.readouterr().out.splitlines() == [ONE_LINE]
    assert 'DynFuse note: "off: could not take over the LoRAs (RuntimeError)"' in res.infotexts[0]


def test_the_fake_forge_neo_checks_what_dynfuse_prints(tmp_path):
    with pytest.raises(AssertionError, match="not one 'DynFuse: ' line"), nh.neo_host(tmp_path):
        exec(compile("print('DynFuse: two\\nlines')", OWN_FILE, "exec"), {})


def test_an_error_text_of_several_lines_is_said_on_one_line_on_forge_neo(tmp_path, capsys, monkeypatch):
    from lib_dynfuse.engine import session

    def broken_install(self):
        raise RuntimeError(MULTILINE_ERROR)

    with nh.neo_host(tmp_path) as host:
        nh.write_test_loras(tmp_path, host.sd_model)
        monkeypatch.setattr(session.FusionSession, "install", broken_install)
        script, runner = nh.dynfuse(host)
        capsys.readouterr()
        _processed, p = host.txt2img(nh.PROMPT, runner=runner, steps=2)
        assert [line for line in capsys.readouterr().out.splitlines() if "DynFuse" in line] == [ONE_LINE]
        assert p.extra_generation_params["DynFuse note"] == "off: could not take over the LoRAs (RuntimeError)"
        assert script.job.session is None
