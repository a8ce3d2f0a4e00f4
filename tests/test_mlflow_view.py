"""The MLflow URL the stages print opens on the comparison: the stored view (the experiment tag MLflow 3.17's Share
button writes) selects the pipeline's cells, flat, with the display accuracy and the method, formulation, held-out
domain and seed columns; a headless Chromium with a fresh profile, loading the URL and clicking nothing, shows every
cell's accuracy, method and held-out domain. The store is made in-process by the project's tracking code
(docs/mlflow_screenshots.py, which also takes the README's screenshot)."""

import importlib.util
import json
import os
import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mlflow_screenshots", ROOT / "docs" / "mlflow_screenshots.py")
shots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shots)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("view")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        line, cells = shots.make_store(uri)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None) if old is None else os.environ.update(MLFLOW_TRACKING_URI=old)
    return uri, line, cells


def test_the_printed_url_names_the_stored_view_of_the_pipelines_cells(store):
    from mlflow import MlflowClient

    uri, line, cells = store
    assert line.startswith("MLflow: http://127.0.0.1:5000/#/experiments/") and f"mlflow ui --backend-store-uri {uri}" in line
    url = urlsplit(shots.url_of(line).split("#", 1)[1])
    query = parse_qs(url.query)
    assert query["workflowType"] == ["machine_learning"]  # the model-training view, not the GenAI one
    experiment_id = url.path.split("/")[2]
    client = MlflowClient(tracking_uri=uri)
    tags = client.get_experiment(experiment_id).tags
    state = json.loads(tags["mlflow.sharedViewState." + query["viewStateShareKey"][0]])
    # the filter selects exactly the cells (not the parent); sorted by anything but start time, the UI shows them flat
    selected = client.search_runs([experiment_id], filter_string=state["searchFilter"])
    assert sorted(r.info.run_name for r in selected) == sorted(c["name"] for c in cells)
    assert state["orderByKey"] != "attributes.start_time"
    assert state["selectedColumns"] == ["metrics.`test_acc_pct_1dp`", "tags.`method`", "tags.`formulation`",
                                        "tags.`held_out_domain`", "tags.`seed`", "tags.`variant`", "tags.`setting`"]
    for run in selected:  # the display metric is the full one rounded; the full one is kept
        full = run.data.metrics["test_acc_pct"]
        assert run.data.metrics["test_acc_pct_1dp"] == round(full, 1) and full != round(full, 1)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(shots.CHROMIUM), reason="needs Chromium (apt-get install chromium)")
def test_a_fresh_browser_shows_every_cell_without_a_click(store):
    from tests.servers import free_port

    uri, line, cells = store
    with shots.serve(uri, free_port()) as base:
        url = shots.url_of(line).replace("http://127.0.0.1:5000", base)
        rows = shots.table_rows(shots.load(url))
    assert len(rows) == len(cells)  # the cells and nothing else: no parent row, none collapsed under it
    for cell in cells:
        (row,) = [row for row in rows if cell["name"] in row]
        # the display accuracy, then the six tag columns (the UI orders tag columns its own way)
        assert row[-7] == cell["accuracy"], repr(row)
        assert sorted(row[-6:]) == sorted([cell["method"], cell["formulation"], cell["domain"], "0", cell["variant"], cell["setting"]]), repr(row)
