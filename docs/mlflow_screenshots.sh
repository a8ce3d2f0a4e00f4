#!/usr/bin/env bash
# How docs/mlflow-runs.png and docs/mlflow-compare.png are taken: the MLflow UI (mlflow ui of the lock's MLflow)
# over a store the code made (`make demo`'s mlflow.db, or the KFP local run of tests/test_pipeline.py), shot by
# a real headless Chromium (Debian's `chromium` package).
#   usage: docs/mlflow_screenshots.sh sqlite:////abs/path/mlflow.db [experiment] [held-out domain]
set -euo pipefail
cd "$(dirname "$0")/.."
store=$1
experiment=${2:-demo-domain-shift}
domain=${3:-rotated_0}
port=${PORT:-5077}
export MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/mlflow ui --backend-store-uri "$store" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
ui=$!
trap 'kill $ui' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 2; done

# the experiment id and the cell runs of one held-out domain, as the UI's URLs want them
read -r experiment_id runs < <(.venv/bin/python - "$store" "$experiment" "$domain" <<'EOF'
import json, sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name(sys.argv[2])
cells = client.search_runs([experiment.experiment_id], f"tags.run_type = 'cell' and tags.held_out_domain = '{sys.argv[3]}'")
print(experiment.experiment_id, json.dumps([r.info.run_id for r in cells], separators=(",", ":")))
EOF
)
shot() {  # shot <file> <url>: the single-page app needs virtual time to fetch and render
  chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size=1800,1050 \
    --virtual-time-budget=30000 --screenshot="$1" "$2" 2>/dev/null
}
ui_url="http://127.0.0.1:$port/#"
# workflowType=machine_learning: MLflow 3.17's model-training view (the sidebar's "Model training" toggle)
filter=$(.venv/bin/python -c "import urllib.parse; print(urllib.parse.quote(\"tags.run_type = 'cell' and tags.held_out_domain = '$domain'\"))")
shot docs/mlflow-runs.png "$ui_url/experiments/$experiment_id/runs?workflowType=machine_learning&searchFilter=$filter"
shot docs/mlflow-compare.png "$ui_url/compare-runs?runs=$runs&experiments=[\"$experiment_id\"]&workflowType=machine_learning"
echo "docs/mlflow-runs.png docs/mlflow-compare.png"
