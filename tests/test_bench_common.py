"""bench/common.py: one provenance record, header and writer for every benchmark and eval file."""

import json
import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from sparvar.bench.common import PROVENANCE, header, provenance, write
from sparvar.cli import main

PACKAGE = Path(__file__).parent.parent / "sparvar"


def test_the_record_says_card_date_versions_commit_and_command():
    record = provenance("sparvar bench x --y", "cpu")
    assert tuple(record) == PROVENANCE and record["command"] == "sparvar bench x --y"
    assert record["card"].startswith("CPU") and datetime.fromisoformat(record["date"]).utcoffset().total_seconds() == 0
    head = subprocess.run(["git", "-C", str(PACKAGE.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: its commit, marked when tracked files changed
        assert re.fullmatch(head.stdout.strip() + r"(\+dirty)?", record["commit"])
    lines = header("Title", record)
    assert lines[0] == "# Title" and record["card"] in lines[2] and f"commit {record['commit']}." in lines[2]
    assert lines[3] == "Command: `sparvar bench x --y`"


def test_the_writer_makes_strict_json_and_markdown(tmp_path):
    json_file, md_file = write(tmp_path / "new", "name", {"a": 1.5}, "# md\n")
    assert json.loads(json_file.read_text()) == {"a": 1.5} and md_file.read_text() == "# md\n"
    with pytest.raises(ValueError):
        write(tmp_path, "nan", {"a": float("nan")}, "")


def test_every_bench_and_eval_writer_goes_through_the_common_writer():
    """No module of bench/ or eval/ writes its own JSON or builds its own date."""
    own = re.compile(r"json\.dump\(|write_text\(json|datetime\.now|date\.today|get_device_name")
    found = [f"{path.relative_to(PACKAGE)}:{i}" for folder in ("bench", "eval") for path in (PACKAGE / folder).glob("*.py")
             if path.name != "common.py" for i, line in enumerate(path.read_text().splitlines(), 1) if own.search(line)]
    assert not found


@pytest.mark.slow
def test_cpu_attention_is_a_sparvar_command(tmp_path, capsys):
    assert main(["bench", "cpu-attention", "--heads", "1", "--depth", "1", "--repeats", "1", "--e2e", "--out",
                 str(tmp_path), "--name", "cpu"]) == 0
    result = json.loads((tmp_path / "cpu.json").read_text())
    assert result["command"].startswith("sparvar bench cpu-attention") and result["rows"]
    assert result["e2e"]["dense"]["attention_flops_saved"] == 0 < result["e2e"]["default"]["attention_flops_saved"]
    assert (tmp_path / "cpu.md").read_text().startswith("# CPU attention")


def test_kernel_variants_is_a_sparvar_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["bench", "kernel-variants", "--help"])
    assert done.value.code == 0 and "usage: sparvar bench kernel-variants" in capsys.readouterr().out
