"""`make demo`: the embedded default end to end with `dvc repro`, tracked in a local MLflow store.

Builds RotatedDigits into ``data/`` if it is missing (the build is byte-identical, so it matches ``data.dvc``),
then runs the DVC pipeline (prepare, pretrain -> similarity -> train x evaluate -> report), prints the results
tables and says where everything is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def print_tables(report: Path) -> None:
    """The report's tables (Markdown) with what they were computed on."""
    summary = json.loads((report / "report.json").read_text())
    for name in summary["tables"]:
        print(f"\n{name}\n\n{(report / (name + '.md')).read_text()}{summary.get('captions', {}).get(name, '')}")


def mlflow_view(env: dict, root: Path, bin_dir: Path) -> str:
    """The URL of this pipeline run's comparison view (its cells, their accuracy, method and held-out domain), and
    how to serve the UI for it."""
    uri = env["MLFLOW_TRACKING_URI"]
    serve = f"{bin_dir / 'mlflow'} ui --backend-store-uri {uri}"
    try:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        from alignclip.tracking import runs

        found = runs.dvc_pipeline_view(env["ALIGNCLIP_EXPERIMENT"], str(root))
    except Exception:  # noqa: BLE001 - a link is a convenience; the results are printed above
        found = None
    if found is None:
        return f"{uri}  (open: {serve})"
    return f"{runs.view_url(uri, *found)}  (after: {serve})"


def cpu_model() -> str:
    """The CPU the demo ran on (its numbers are that machine's: docs/reliability.md)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_readme_table(root: Path, report: Path, seconds: float) -> Path:
    """outputs/demo_table.md: the report's tables with the sha256 of the tiny weights this run used and the CPU it
    ran on, the block the README shows (paste it there as is)."""
    import hashlib

    summary = json.loads((report / "report.json").read_text())
    weights = sorted((root / "outputs" / "pretrained").glob("*.pt"))
    digests = [f"`{w.name}` sha256 `{hashlib.sha256(w.read_bytes()).hexdigest()}`" for w in weights]
    lines = [f"Demo run on {cpu_model()} ({os.cpu_count()} CPUs), {seconds / 60:.1f} min; tiny weights: "
             + (", ".join(digests) or "none found") + "."]
    for name in summary["tables"]:
        lines += ["", f"**{name}**", "", (report / (name + ".md")).read_text().rstrip(),
                  summary.get("captions", {}).get(name, "").strip()]
    path = root / "outputs" / "demo_table.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def main() -> int:
    started = time.perf_counter()
    root = Path.cwd()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("ALIGNCLIP_EXPERIMENT", "demo-domain-shift")
    # One intra-op thread per stage: the tiny model's operations are too small to gain from a second one, and on
    # a busy machine spinning OpenMP threads make each step several times slower. It also fixes the order of
    # float reductions, so the demo's numbers do not depend on the core count.
    env.setdefault("OMP_NUM_THREADS", "1")
    if not (root / "data" / "rotated_digits").is_dir():
        subprocess.run([bin_dir / "alignclip", "data", "digits", "data/rotated_digits"], check=True, env=env)
    dvc = [str(bin_dir / "dvc")]
    if not (root / ".git").exists():
        subprocess.run(dvc + ["config", "--local", "core.no_scm", "true"], check=True, env=env)
    subprocess.run(dvc + ["repro"], check=True, env=env)
    report = root / "outputs" / "report"
    print_tables(report)
    table = write_readme_table(root, report, time.perf_counter() - started)
    print(f"\n{table.read_text().splitlines()[0]}")
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    print(
        f"\nDemo finished in {minutes} min {seconds} s.\n"
        f"  results page : {report / 'index.html'} (Markdown: {report / 'index.md'})\n"
        f"  tables       : {report}/*.csv (README block: {table})\n"
        f"  models       : {root / 'outputs' / 'runs'}/*/model.pt\n"
        f"  MLflow       : {mlflow_view(env, root, bin_dir)}\n"
        f"  DVC          : dvc metrics show / dvc plots show\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
