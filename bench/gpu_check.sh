#!/usr/bin/env bash
# One prepared check for a machine with a GPU (written for an H200; under 8 minutes), printing one table at the end:
#   - ERM / CLIPood / AlignCLIP train-step time at BF16, ViT-B/16 (random weights), 36 images x 3 domains: ratio,
#     images/s, MFU, peak GPU memory (bench/model_throughput.py: model only, batch already on the GPU);
#   - end-to-end images/s of `alignclip train` (ERM) through the real loader with 0 and with auto workers, and the
#     mean wait for data per step (its train_log.csv, windows after the first);
#   - `alignclip evaluate` images/s (its metrics.json);
#   - loader images/s per worker count, and S3 read paths (bench/input_pipeline.py).
# Usage: bench/gpu_check.sh [work dir]   (PYTHON=... to choose the interpreter; default .venv/bin/python)
# A quick run of the script itself on a CPU: MODEL=tiny PER_DOMAIN=4 STEPS=20 IMAGES=40 bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true ALIGNCLIP_LOG_LEVEL=WARNING PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset MLFLOW_TRACKING_URI  # nothing is tracked: the figures come from the files the commands write
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
CLI=("$PY" -m alignclip)
MODEL=${MODEL:-vit-b-16}
PER_DOMAIN=${PER_DOMAIN:-36}
STEPS=${STEPS:-60}
IMAGES=${IMAGES:-600}
started=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - started ))s] $*" >&2; }

stamp "model-only step times"
"$PY" bench/model_throughput.py --model "$MODEL" --per-domain "$PER_DOMAIN" --domains 3 --steps 20 --json "$WORK/model.json" | tee "$WORK/model.txt"

stamp "JPEG dataset (4 PACS-named domains x $IMAGES images, 300-640 px)"
"$PY" bench/input_pipeline.py --make-dataset "$WORK/pacs" --images "$IMAGES"
"${CLI[@]}" prepare pacs "$WORK/pacs" "$WORK/prepared" >/dev/null

for workers in 0 auto; do
  stamp "train ERM, $MODEL, $STEPS steps of $PER_DOMAIN x 3, --num-workers $workers"
  "${CLI[@]}" train "$WORK/prepared" "$WORK/train-$workers" --method erm --model "$MODEL" --pretrained none \
    --test-domain sketch --steps "$STEPS" --batch-size "$PER_DOMAIN" --lr 1e-5 --num-workers $workers --no-progress >/dev/null
done

stamp "evaluate (all $IMAGES images of the held-out domain, batch 512)"
"${CLI[@]}" evaluate "$WORK/prepared" "$WORK/train-auto/model.pt" "$WORK/eval" --test-domain sketch --test-split full >/dev/null

stamp "loader and S3 figures"
"$PY" bench/input_pipeline.py --images "$(( IMAGES + IMAGES / 5 ))" | tee "$WORK/input.txt"

"$PY" - "$WORK" <<'PY'
import json, sys
from pathlib import Path

import pandas as pd

work = Path(sys.argv[1])
model = json.loads((work / "model.json").read_text())


def window_figures(run):
    log = pd.read_csv(work / run / "train_log.csv")
    # one row per window of 10 steps (the logging interval), the first (start-up, warm-up) dropped
    windows = log[(log["step"] % 10 == 0) | (log["step"] == log["step"].max())]
    windows = windows.iloc[1:] if len(windows) > 1 else windows
    summary = json.loads((work / run / "train.json").read_text())
    return windows["images_per_s"].median(), windows["data_wait_s"].median(), summary["num_workers"]


rows = []
for m in ("erm", "clipood", "alignclip"):
    r = model[m]
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    peak = f"peak {r['peak_mib']:.0f} MiB" if r["peak_mib"] is not None else ""
    rows.append((f"model only, {m}", f"{r['step_s']:.4f} s/step", f"{r['images_per_s']:.0f}", mfu, peak))
rows.append(("AlignCLIP / ERM step time", f"{model['ratio']:.3f}", "", "", "target <= 1.05"))
rows.append(("AlignCLIP / CLIPood step time", f"{model['ratio_clipood']:.3f}", "", "", "paper 1.10"))
erm_model = model["erm"]["images_per_s"]
for run in ("train-0", "train-auto"):
    rate, wait, workers = window_figures(run)
    mfu = f"{100 * model['erm']['mfu'] * rate / erm_model:.1f}%" if model["erm"]["mfu"] is not None else "-"
    rows.append((f"end to end, ERM, {workers} workers", f"data wait {wait * 1000:.1f} ms/step", f"{rate:.0f}", mfu,
                 f"{rate / erm_model:.2f} x model only (target >= 0.9)"))
evaluation = json.loads((work / "eval" / "metrics.json").read_text())
rows.append((f"evaluate, {evaluation['num_workers']} workers", "", f"{evaluation['images_per_s']:.0f}", "", ""))
print(f"\n{model['device']}, {model['model']}, batch {model['batch']} (BF16 autocast on a GPU, FP32 on a CPU)")
print(f"{'what':34s} {'time':>24s} {'images/s':>9s} {'MFU':>6s}  notes")
for what, time_, rate, mfu, note in rows:
    print(f"{what:34s} {time_:>24s} {rate:>9s} {mfu:>6s}  {note}")
print("\nloader and S3 (bench/input_pipeline.py):")
print((work / "input.txt").read_text())
PY
stamp "done"
