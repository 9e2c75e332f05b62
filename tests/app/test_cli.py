import argparse
import json
import subprocess

import pytest

from mixprec import FORMATS
from mixprec.app.cli import build_parser, main
from mixprec.formats import ALL_FORMATS, BLOCK_FORMATS


def test_formats_table_lists_every_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for fmt in FORMATS.values():
        assert fmt.name in out
    words = " ".join(out.split())
    for fmt in BLOCK_FORMATS.values():  # with their element, block size and scale format
        assert f"{fmt.name} {fmt.element.name} {fmt.block_size} {fmt.scale}" in words
    assert "fp4_e2m1" in out
    assert "65504" in out and "2^-24" in out and "448" in out and "57344" in out


def test_formats_json_matches_the_library(capsys):
    assert main(["formats", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [json.loads(json.dumps(f.describe())) for f in ALL_FORMATS.values()]
    assert [r["name"] for r in rows][: len(FORMATS)] == list(FORMATS)
    fp16 = next(r for r in rows if r["name"] == "fp16")
    assert fp16["max"] == 65504.0 and fp16["has_inf"] is True


def test_unknown_subcommand_fails_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fromats"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fromats'" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run(
        ["mixprec", "formats"], capture_output=True, text=True, check=True, timeout=120
    )
    assert "bf16" in result.stdout


def _walk(parser, path=("mixprec",)):
    for action in parser._actions:  # argparse has no public way to list a parser's actions
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def test_every_flag_and_command_has_a_help_text():
    actions = list(_walk(build_parser()))
    assert {" ".join(path) for path, _ in actions} >= {
        "mixprec",
        "mixprec train",
        "mixprec compare",
        "mixprec advise",
        "mixprec doctor",
        "mixprec formats",
    }
    missing = [
        f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}"
        for path, a in actions
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert missing == []
    subcommands = next(a for _, a in actions if isinstance(a, argparse._SubParsersAction))
    helped = {c.dest for c in subcommands._choices_actions if c.help}
    assert helped == set(subcommands.choices)  # each COMMAND is described in `mixprec -h`


def test_python_dash_m_runs_the_command(capsys):
    import subprocess
    import sys

    module = subprocess.run(
        [sys.executable, "-m", "mixprec", "formats", "--json"], capture_output=True, text=True
    )
    assert module.returncode == 0, module.stderr
    assert main(["formats", "--json"]) == 0
    assert json.loads(module.stdout) == json.loads(capsys.readouterr().out)


def test_doctor_says_what_auto_and_fp8_resolve_to(capsys):
    from mixprec.compute.fp8_linear import fp8_backend
    from mixprec.hardware import probe, recommend

    assert main(["doctor", "--no-measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    choice = recommend(probe("cpu", measure=False))
    assert out["auto"] == {
        "policy": str(choice.policy),
        "backend": choice.backend,
        "reason": choice.reason,
    }
    backend, reason = fp8_backend("auto", "cpu", "tensorwise")
    assert out["fp8"]["tensorwise"] == {"backend": backend, "reason": reason}
    assert main(["doctor", "--no-measure"]) == 0
    assert "fp8 tensorwise" in capsys.readouterr().out
