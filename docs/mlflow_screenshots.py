"""How docs/mlflow-runs.png is taken, and what tests/test_mlflow_view.py checks: the MLflow URL a stage prints (the
experiment's stored comparison view, alignclip.tracking.runs.comparison_view), opened by a plain page load in headless
Chromium (Debian's `chromium` package) with a fresh profile: nothing is clicked, typed or expanded first.

    .venv/bin/python docs/mlflow_screenshots.py                            # a small store made here, in-process
    .venv/bin/python docs/mlflow_screenshots.py sqlite:///$PWD/mlflow.db   # the store of a `make demo` run

Without an argument the store is made by the project's tracking code, in-process, as the stages log: one pipeline
run (alignclip.tracking.open_pipeline_run, which stores the view) and one cell run per (method, held-out domain) under
it, with the accuracies and tags evaluate logs (the numbers are made up: this shows the view, not results). The UI
is the lock's MLflow (`.venv/bin/mlflow ui`) on a free port; only the standard library is needed besides.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
EXPERIMENT = "demo-domain-shift"
METHODS = (("zeroshot", "paper"), ("erm", "paper"), ("clipood", "paper"), ("alignclip", "paper"), ("alignclip", "release"))
DOMAINS = ("rotated_0", "rotated_75")


def make_store(uri: str) -> tuple[str, list[dict]]:
    """A pipeline run and its cells, logged the way the stages log them; returns the URL line a stage prints and
    what each cell's row must show (run name, display accuracy, method, formulation, held-out domain, variant,
    grid setting)."""
    os.environ["MLFLOW_TRACKING_URI"] = uri  # as each stage's tracking resolves it (a URI set earlier cannot win)
    from alignclip import tracking
    from alignclip.tracking import runs

    parent = runs.open_pipeline_run(EXPERIMENT, "dvc repro: rotated_digits (domainbed)", {"data.dataset": "rotated_digits",
                                                                                          "data.protocol": "domainbed"})
    cells, run_id = [], None
    for index, (method, formulation) in enumerate(METHODS):
        for domain in DOMAINS:
            variant = method if formulation == "paper" else f"{method}+{formulation}"
            name = runs.cell_run_name(variant, domain, 0)
            hparams = {} if method == "zeroshot" else {"lr": 0.001}  # a selection grid's setting (zero-shot: none)
            tags = runs.cell_tags("rotated_digits", "domainbed", method, variant, formulation, domain, 0, hparams)
            # an accuracy as evaluate computes one (correct / images), at full precision
            accuracy = float(Fraction(19 + 7 * index + (11 if domain == DOMAINS[1] else 0), 59) * 100)
            flat = {"test_acc_pct": accuracy, "source_val_acc_pct": 100.0 - accuracy / 3}
            with tracking.start_run(EXPERIMENT, name, parent_run_id=parent, tags=tags) as tracker:
                tracker.log_metrics({**flat, **runs.display_metrics(flat), "test_images": 59})
                run_id = tracker.run_id
            cells.append({"name": name, "accuracy": f"{round(accuracy, 1):g}", "method": method,
                          "formulation": formulation, "domain": domain, "variant": variant, "setting": tags["setting"]})
    line = tracking.view_line(parent, run_id)
    return line, cells


def url_of(line: str) -> str:
    return line.split()[1]


@contextmanager
def serve(uri: str, port: int):
    """`mlflow ui` over the store on 127.0.0.1:port, stopped afterwards; yields its base URL."""
    base = f"http://127.0.0.1:{port}"
    # no job runner (GenAI evaluation jobs): eight more processes and 30 s of CPU at start, for nothing here
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    ui = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri, "--host",
                           "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if ui.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"error: mlflow ui on {base} did not start")
                time.sleep(1)
        yield base
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)


def load(url: str, screenshot: Path | None = None, width: int = 1800, height: int = 900) -> str:
    """The page's DOM after a plain load in headless Chromium with a fresh profile (and a screenshot if asked)."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
                  f"--window-size={width},{height}", "--virtual-time-budget=30000"]
        if screenshot is not None:
            subprocess.run(common + [f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=300)
        return subprocess.run(common + ["--dump-dom", url], check=True, capture_output=True, text=True, timeout=300).stdout


class _Rows(HTMLParser):
    """The runs table's rows (ag-grid: role="row" with a row-index), each as the texts of its cells."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, list[str]] = {}
        self._stack: list[str | None] = []

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:  # no end tag follows
            return
        attrs = dict(attrs)
        row = attrs.get("row-index") if attrs.get("role") == "row" else None
        self._stack.append(row if row is not None else (self._stack[-1] if self._stack else None))

    def handle_endtag(self, tag):
        if self._stack and tag not in self.VOID:
            self._stack.pop()

    def handle_data(self, data):
        if self._stack and self._stack[-1] is not None and data.strip():
            self.rows.setdefault(self._stack[-1], []).append(data.strip())


def table_rows(dom: str) -> list[list[str]]:
    """The text of each row of the runs table (pinned or left and centre column blocks merged by row index)."""
    parser = _Rows()
    parser.feed(dom)
    return [parser.rows[key] for key in sorted(parser.rows, key=lambda k: int(k) if re.fullmatch(r"\d+", k) else -1)]


def main(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from tests.servers import free_port

    if argv:
        uri = argv[0]
        os.environ["MLFLOW_TRACKING_URI"] = uri
        from alignclip.tracking import runs

        found = runs.dvc_pipeline_view(argv[1] if len(argv) > 1 else EXPERIMENT, str(ROOT))
        if found is None:
            raise SystemExit(f"error: {uri} holds no pipeline run of {ROOT} with a stored view")
        url = runs.view_url(uri, *found)
    else:
        folder = Path(tempfile.mkdtemp(prefix="alignclip-view-"))
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        line, _ = make_store(uri)
        url = url_of(line)
    with serve(uri, free_port()) as base:
        url = url.replace(url.split("/#/")[0], base)
        load(url, ROOT / "docs" / "mlflow-runs.png")
    print(f"docs/mlflow-runs.png <- {url}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
