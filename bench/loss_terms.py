"""Magnitudes of the AlignCLIP loss terms and of their gradients, for each reading of eq. 4's temperature.

Part 1 (always, seconds): on one demo training batch (RotatedDigits, held-out rotated_75, 16 images per training
domain: 80 images) and the tiny preset's pre-trained weights, at step 0 of the paper formulation with
``aal_tau`` = model (the loaded CLIP's tau), 0.01 (the old fixed value) and none (the released code):

* the attention term KL(A_c || G_DV) and the similarity term KL(G || G_DV) (eq. 6), as compute_loss returns them;
* how peaked G_DV is: mean mass of its top token, and the mean number of tokens holding 99% of the mass;
* the bound both terms obey: KL(p || q) <= -sum_i p_i log q_i <= max_i -log q_i, and for q = softmax(s / tau)
  over M tokens, -log q_i = log sum_j exp((s_j - s_i) / tau) <= log M + (max_j s_j - s_i) / tau, so
  KL <= log M + (max s - min s) / tau, s = cos(D-V token, T_y): the range of the cosines over tau, not log M
  (the mean over the batch of each image's bound is printed);
* the gradient norm of each term (as it enters the total) w.r.t. the trainable encoder, train_step's own figures.

Part 2 (``--train``, minutes): the demo's training settings (200 steps, batch 16 per domain, lr 1e-3, no flip,
seed 0, held-out rotated_75) for ERM, AlignCLIP without the alignment loss (``aal=false``) and AlignCLIP with
``aal_tau`` = model and 0.01; prints each run's loss terms and gradient norms at the logged steps (means over
early / middle / late thirds of training) and its source_val and held-out accuracy.

    python bench/loss_terms.py [--train] [--steps 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

HELD_OUT = "rotated_75"
DEMO = dict(batch_size=16, lr=1e-3, hflip=False, seed=0, recipe="demo", test_domain=HELD_OUT, progress=False)
AAL_TAUS = {"model": "model", "0.01": 0.01, "none": None}


def prepared(root: Path) -> Path:
    from alignclip.data.digits import build_rotated_digits
    from alignclip.data.prepare import PrepareSettings, prepare, write_prepared

    if not (root / "prepared" / "meta.json").exists():
        build_rotated_digits(root / "raw")
        manifest, meta = prepare(PrepareSettings("rotated_digits", str(root / "raw")))
        write_prepared(manifest, meta, root / "prepared")
    return root / "prepared"


def step_zero(prep: Path) -> list[dict]:
    from alignclip import losses
    from alignclip.train import TrainSettings, autocast_for, setup, train_step

    rows = []
    for label, aal_tau in AAL_TAUS.items():
        run = setup(prep, TrainSettings(method="alignclip", steps=1, overrides={"aal_tau": aal_tau}, num_workers=0, **DEMO))
        images, targets = next(iter(run.loader))
        text = run.text
        with torch.no_grad():
            out = run.visual(images, align=True)
            g_dv = losses.token_text_similarity(out.dv_tokens, text[targets], run.method.aal_tau)
            cos = torch.einsum("bmd,bd->bm", torch.nn.functional.normalize(out.dv_tokens.float(), dim=-1), text[targets])
        tau = run.method.aal_tau if run.method.aal_tau is not None else 1.0
        m = g_dv.shape[-1]
        bound = (math.log(m) + (cos.max(-1).values - cos.min(-1).values) / tau).mean().item()
        ordered = g_dv.sort(dim=-1, descending=True).values.cumsum(-1)
        tokens_99 = ((ordered < 0.99).sum(-1) + 1).float().mean().item()
        run.visual.train()
        parts = train_step(run.method, run.visual, run.optimizer, images, targets, text, run.class_sim,
                           autocast_for(run.device), grad_norms=True)
        rows.append({
            "aal_tau": label, "value": run.method.aal_tau, "images": len(images), "tokens": m,
            "cls_loss": float(parts["cls_loss"]), "aal_attn": float(parts["aal_attn"]), "aal_sim": float(parts["aal_sim"]),
            "bound": bound, "log_M": math.log(m), "cos_range": (cos.max(-1).values - cos.min(-1).values).mean().item(),
            "top_token_mass": g_dv.max(-1).values.mean().item(), "tokens_for_99pct": tokens_99,
            **{k: float(v) for k, v in parts.items() if k.startswith("grad_norm")},
        })
    return rows


def trained(prep: Path, out: Path, steps: int) -> list[dict]:
    import pandas as pd

    from alignclip.evaluate import evaluate
    from alignclip.train import TrainSettings, train

    runs = {"erm": ("erm", {}), "alignclip[aal=False]": ("alignclip", {"aal": False}),
            "alignclip (aal_tau model)": ("alignclip", {}), "alignclip[aal_tau=0.01]": ("alignclip", {"aal_tau": 0.01})}
    rows = []
    for label, (method, switches) in runs.items():
        folder = out / label.replace(" ", "_").replace("[", "_").replace("]", "").replace("(", "").replace(")", "").replace("=", "-")
        summary = train(prep, folder, TrainSettings(method=method, steps=steps, overrides=switches, num_workers=0, **DEMO))
        metrics = evaluate(prep, folder / "model.pt", folder, num_workers=0)
        log = pd.read_csv(folder / "train_log.csv")
        measured = log.dropna(subset=[c for c in log.columns if c.startswith("grad_norm")])
        thirds = {"early": measured[measured["step"] <= steps / 3], "middle": measured[(measured["step"] > steps / 3) & (measured["step"] <= 2 * steps / 3)],
                  "late": measured[measured["step"] > 2 * steps / 3]}
        columns = [c for c in ("cls_loss", "aal_attn", "aal_sim", "grad_norm_cls_loss", "grad_norm_aal_attn", "grad_norm_aal_sim", "grad_norm_loss") if c in log]
        rows.append({"run": label, "tau": summary["method"]["tau"], "aal_tau": summary["method"]["aal_tau"],
                     "source_val": metrics["views"]["source_val"]["accuracy"], "held_out": metrics["views"]["test"]["accuracy"],
                     "held_out_images": metrics["views"]["test"]["total"], "source_val_images": metrics["views"]["source_val"]["total"],
                     "step1": {c: float(measured.iloc[0][c]) for c in columns},
                     **{phase: {c: float(part[c].mean()) for c in columns} for phase, part in thirds.items()}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="also the short training runs (minutes)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="folder for the data and runs (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        prep = prepared(root)
        print("step 0, paper formulation, tiny preset, one demo batch:")
        for row in step_zero(prep):
            print(json.dumps(row))
        if args.train:
            print(f"\ntraining, {args.steps} steps, demo settings, held out {HELD_OUT}:")
            for row in trained(prep, root / "runs", args.steps):
                print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
