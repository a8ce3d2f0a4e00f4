import subprocess
import sys

import pytest
from typer.testing import CliRunner

from alignclip import __version__
from alignclip.cli import app

runner = CliRunner()
COMMANDS = [[], ["version"], ["data"], ["data", "digits"], ["prepare"], ["similarity"], ["train"], ["evaluate"],
            ["report"], ["recipes"], ["pipeline"], ["pipeline", "compile"], ["pipeline", "submit"], ["pipeline", "run"],
            ["config"], ["config", "show"], ["tracking"], ["tracking", "sync"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(command):
    result = runner.invoke(app, command + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_version():
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0 and result.output.strip() == __version__


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "alignclip", "prepare", "mnist", str(tmp_path), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "error: unknown dataset 'mnist'" in done.stderr and "Traceback" not in done.stderr


def test_recipes_list_sources():
    result = runner.invoke(app, ["recipes"])
    assert "domain_shift/domain_net" in result.output and "zhyhan/AlignCLIP scripts/traindomainnet-1.sh:17" in result.output
    assert "paper appendix A.1" in result.output


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_bad_worker_count_is_one_clear_line_and_exit_2(tmp_path, command):
    args = [str(tmp_path), str(tmp_path / "o")] if command == "train" else [str(tmp_path), str(tmp_path / "m.pt"), str(tmp_path / "o")]
    done = subprocess.run([sys.executable, "-m", "alignclip", command, *args, "--num-workers", "lots"],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "--num-workers 'lots': expected a count >= 0 or 'auto'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_logs_off_a_terminal_are_one_plain_line_per_record_on_stderr(tmp_path):
    """Pod logs and CI: no colour codes, no wrapping at 80 columns (a long path stays on its line), nothing on stdout."""
    import re

    out = tmp_path / ("a-folder-name-long-enough-to-have-been-wrapped-by-a-console-of-eighty-columns" * 2) / "digits"
    done = subprocess.run([sys.executable, "-m", "alignclip", "data", "digits", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "wrote RotatedDigits" in line]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d INFO alignclip\.data\.digits: wrote RotatedDigits .*", line)
    assert str(out) in line and "\x1b[" not in done.stderr
    assert "wrote RotatedDigits" not in done.stdout
