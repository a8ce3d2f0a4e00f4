"""The cost of the portable CPU kernels (alignclip/determinism.py): pretraining and train-step time of the tiny
CLIP with them (ALIGNCLIP_CPU_KERNELS=portable, what every CPU run uses) and with the host's fastest kernels
(native: ATen's AVX2/AVX-512 build, MKL's own dispatch, oneDNN), one thread each, as the demo runs.

Each mode runs in its own process (the kernels are chosen before torch loads), the modes alternate, and the
figure is the median over rounds, so a busy machine's drift hits both. Measured:

* pretraining: ``alignclip.pretrain.build`` on a shortened schedule (the default's batch of 64 images and 50
  captions, ``--pretrain-steps`` steps, a source of 210 images) -> seconds per step, excluding start-up and the
  source rendering; times 400 it is the default build's training loop.
* train step: ``alignclip.train.train_step`` (what `alignclip train` runs per step) for ERM and AlignCLIP on a
  batch of 80 images (the demo's 16 per training domain x 5 domains), after warm-up, median of ``--steps``.
* process start: importing torch and open_clip, and loading the tiny CLIP (the same in both modes).

    python bench/portable_kernels.py [--rounds 3] [--pretrain-steps 20] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(pretrain_steps: int, steps: int) -> dict:
    """One mode's figures (this process's ALIGNCLIP_CPU_KERNELS)."""
    from alignclip import determinism

    determinism.pin_process("cpu")  # what the CLI does for a CPU run; nothing in native mode
    started = time.perf_counter()
    import open_clip  # noqa: F401
    import torch

    from alignclip import pretrain

    determinism.configure_torch("cpu", warn_only=True)
    import_s = time.perf_counter() - started
    from dataclasses import replace

    import tempfile

    settings = replace(pretrain.PretrainSettings(), variants=1, val_variants=1, steps=pretrain_steps, warmup_steps=2)
    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "log.csv"
        tic = time.perf_counter()
        images = pretrain.source_images(settings.variants, settings.seed)  # rendering, timed to subtract it
        render_s = (time.perf_counter() - tic) * (1 + settings.val_variants / settings.variants)
        del images
        summary = pretrain.build(Path(scratch) / "w.pt", settings, log_path=log_path)
    determinism.configure_torch("cpu", warn_only=True)  # build restores the caller's settings
    pretrain_step_s = max(0.0, summary["seconds"] - render_s) / pretrain_steps

    sys.path.insert(0, str(ROOT / "bench"))
    from train_step import setup, step

    train = {}
    for method in ("erm", "alignclip"):
        state = setup("tiny", method, 80, "cpu")
        for _ in range(2):
            step(state, "cpu")
        times = []
        for _ in range(steps):
            tic = time.perf_counter()
            step(state, "cpu")
            times.append(time.perf_counter() - tic)
        train[method] = statistics.median(times)
    return {"state": determinism.state(), "import_s": import_s, "pretrain_step_s": pretrain_step_s,
            "erm_step_s": train["erm"], "alignclip_step_s": train["alignclip"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.pretrain_steps, args.steps)))
        return
    results: dict[str, list[dict]] = {"portable": [], "native": []}
    for _ in range(args.rounds):
        for mode in results:
            env = {**os.environ, "ALIGNCLIP_CPU_KERNELS": mode, "OMP_NUM_THREADS": "1"}
            for name in ("ATEN_CPU_CAPABILITY", "MKL_CBWR"):  # the host's choice unless the mode pins it
                env.pop(name, None)
            out = subprocess.run([sys.executable, __file__, "--child", "--pretrain-steps", str(args.pretrain_steps),
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True, env=env)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    from alignclip.determinism import cpu_model

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; one thread per process; median of {args.rounds} rounds")
    print(f"{'kernels':9s} {'ATen':8s} {'MKL_CBWR':10s} {'oneDNN':6s} {'start s':>8s} {'pretrain s/step':>16s} "
          f"{'x400 steps s':>13s} {'ERM s/step':>11s} {'AlignCLIP s/step':>17s}")
    figures = {}
    for mode, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("import_s", "pretrain_step_s", "erm_step_s", "alignclip_step_s")}
        figures[mode] = med
        state = rows[0]["state"]
        print(f"{mode:9s} {state['aten_cpu_capability']:8s} {state['mkl_cbwr'] or '-':10s} {str(state['mkldnn']):6s} "
              f"{med['import_s']:8.2f} {med['pretrain_step_s']:16.4f} {400 * med['pretrain_step_s']:13.1f} "
              f"{med['erm_step_s']:11.4f} {med['alignclip_step_s']:17.4f}")
    p, n = figures["portable"], figures["native"]
    print(f"portable / native: pretraining x{p['pretrain_step_s'] / n['pretrain_step_s']:.2f}, ERM step "
          f"x{p['erm_step_s'] / n['erm_step_s']:.2f}, AlignCLIP step x{p['alignclip_step_s'] / n['alignclip_step_s']:.2f}")


if __name__ == "__main__":
    main()
