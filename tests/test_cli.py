import json
import subprocess

import pytest

from mixprec import FORMATS
from mixprec.cli import main


def test_formats_table_lists_every_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for fmt in FORMATS.values():
        assert fmt.name in out
    assert "65504" in out and "2^-24" in out and "448" in out and "57344" in out


def test_formats_json_matches_the_library(capsys):
    assert main(["formats", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [json.loads(json.dumps(f.describe())) for f in FORMATS.values()]
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
