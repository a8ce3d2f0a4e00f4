"""How docs/mlflow-runs.png and docs/mlflow-compare.png are taken: the MLflow UI of the lock's MLflow over a store the
code made (`make demo`'s mlflow.db), driven in a real headless Chromium (Debian's `chromium` package) by Playwright.

    python3 -m venv /tmp/shots && /tmp/shots/bin/pip install playwright   # no browser download: the system's is used
    /tmp/shots/bin/python docs/mlflow_screenshots.py sqlite:///$PWD/mlflow.db [experiment] [held-out domain]

It does what a user does: opens the experiment in the model-training view, closes the assistant panel, expands the
`dvc repro` parent run to its cells, shows the held-out accuracy and the variant/domain tags as columns, and opens
the compare page of the cells of one held-out domain. Only the standard library and Playwright are needed here; the
UI itself is `.venv/bin/mlflow ui`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
COLUMNS = ("test_acc_pct", "variant", "held_out_domain", "formulation")


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/ajax-api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"error: {url} did not answer within {timeout:.0f}s")


def toggle_column(page, name: str) -> None:
    """In the open Columns menu: search for ``name`` and tick (or untick) the entry titled exactly that."""
    page.get_by_placeholder("Search columns").fill(name)
    page.wait_for_timeout(500)
    title = page.locator(".du-bois-light-tree-title", has_text=re.compile(f"^{re.escape(name)}$"))
    page.locator(".du-bois-light-tree-treenode", has=title).first.locator(".du-bois-light-tree-checkbox").click()
    page.wait_for_timeout(300)


def widen(page, header: str, pixels: int) -> None:
    """Drag the right edge of the column headed ``header`` by ``pixels``."""
    cell = page.locator(".ag-header-cell", has_text=re.compile(rf"^\s*{re.escape(header)}\s*$")).first
    box = cell.bounding_box()  # ag-grid's resize handle is the cell's right edge
    if box is None:
        return
    x, y = box["x"] + box["width"] - 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + pixels, y, steps=8)
    page.mouse.up()


def main(store: str, experiment: str = "demo-domain-shift", domain: str = "rotated_0") -> int:
    from playwright.sync_api import sync_playwright

    port = int(os.environ.get("PORT", "5077"))
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    ui = subprocess.Popen([str(ROOT / ".venv" / "bin" / "mlflow"), "ui", "--backend-store-uri", store,
                           "--host", "127.0.0.1", "--port", str(port)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"{base}/health")
        found = api(base, "experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment}))
        experiment_id = found["experiment"]["experiment_id"]
        cells = api(base, "runs/search", {
            "experiment_ids": [experiment_id], "max_results": 100,
            "filter": f"tags.run_type = 'cell' and tags.held_out_domain = '{domain}'"})["runs"]
        run_ids = [run["info"]["run_id"] for run in cells]
        # workflowType=machine_learning: MLflow 3's model-training view (the sidebar's "Model training" toggle)
        runs_url = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        compare_url = (f"{base}/#/compare-runs?runs={json.dumps(run_ids, separators=(',', ':'))}"
                       f"&experiments={json.dumps([experiment_id])}&workflowType=machine_learning")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            page.goto(runs_url)
            page.wait_for_selector("button[data-component-id*=runnamecellrenderer]", timeout=60_000)
            if page.locator("button[aria-label=Close]").count():
                page.click("button[aria-label=Close]")  # the assistant panel
            page.click("button[data-component-id*=runnamecellrenderer]")  # expand the parent run to its cells
            page.click("button:has-text('Columns')")
            for name in ("Source", "Models", *COLUMNS):  # Source and Models off: room for the results
                toggle_column(page, name)
            page.keyboard.press("Escape")
            widen(page, "Run Name", 170)  # "method | held-out domain | seed" reads whole
            widen(page, "test_acc_pct", 40)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ROOT / "docs" / "mlflow-runs.png"))
            page.goto(compare_url)
            page.wait_for_timeout(8000)
            if page.locator("button[aria-label=Close]").count():
                page.click("button[aria-label=Close]")
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ROOT / "docs" / "mlflow-compare.png"))
            browser.close()
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    print("docs/mlflow-runs.png docs/mlflow-compare.png")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    sys.exit(main(*sys.argv[1:4]))
