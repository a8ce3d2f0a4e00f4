"""How long the CLI takes to answer: `--help` of every command and a few refused values, each the wall time of a
fresh `python -m alignclip ...` process (interpreter start included), as a user or a pod meets it.

Targets (issue 21, issue 20): every `--help` under 1 s and a bad value refused under 2 s on an idle machine; both
hold because torch, open_clip, mlflow, pandas and kfp are imported only where a command runs, after its checks
(tests/test_cli.py checks the import property itself, which a loaded machine cannot blur). Each figure is the
median of --repeat runs; the process's CPU time (user + system) is printed beside it, the part a busy machine
stretches least.

    python bench/cli_latency.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def commands() -> list[list[str]]:
    """Every command and group of the CLI, read from its click tree (a new command is measured without an edit)."""
    import typer.main

    from alignclip.cli import app

    found = []

    def walk(command, path):
        found.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return found


def refusals(tmp: Path) -> list[list[str]]:
    bad_params = tmp / "params.yaml"
    bad_params.write_text("train:\n  steps: many\n")
    return [
        ["train", str(tmp / "prep"), str(tmp / "out"), "--steps", "-5"],
        ["train", str(tmp / "prep"), str(tmp / "out"), "--method", "sgd"],
        ["train", str(tmp / "prep"), str(tmp / "out"), "--params-file", str(bad_params)],
        ["evaluate", str(tmp / "prep"), str(tmp / "model.pt"), str(tmp / "out"), "--num-workers", "many"],
        ["prepare", "pacs", str(tmp / "data"), str(tmp / "out"), "--holdout-fraction", "2"],
        ["pipeline", "compile", "demo", "--param", "train_lr=-1", "-o", str(tmp / "p.yaml")],
    ]


def timed(args: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system of the child) and the exit code of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "alignclip", *args], capture_output=True, text=True)
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.returncode


def measure(label: str, args: list[str], repeat: int, expected_code: int) -> float:
    runs = [timed(args) for _ in range(repeat)]
    codes = {code for _, _, code in runs}
    if codes != {expected_code}:
        raise SystemExit(f"`alignclip {' '.join(args)}` exited {sorted(codes)}, expected {expected_code}")
    wall = statistics.median(w for w, _, _ in runs)
    cpu = statistics.median(c for _, c, _ in runs)
    print(f"  {wall:6.2f} s wall  {cpu:6.2f} s CPU  {label}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the median is printed")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    print(f"CPUs: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (figures stretch on a loaded machine)")
    print("--help (target < 1 s each):")
    helps = [measure(f"alignclip {' '.join(c + ['--help'])}", c + ["--help"], args.repeat, 0) for c in commands()]
    print("refused values (target < 2 s each, exit 2):")
    with tempfile.TemporaryDirectory(prefix="alignclip-cli-latency-") as tmp:
        refused = [measure(f"alignclip {' '.join(Path(a).name if '/' in a else a for a in r)}", r, args.repeat, 2)
                   for r in refusals(Path(tmp))]
    print(f"slowest --help {max(helps):.2f} s (target 1 s); slowest refusal {max(refused):.2f} s (target 2 s)")


if __name__ == "__main__":
    main()
