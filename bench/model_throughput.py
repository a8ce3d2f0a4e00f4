"""Model-only training throughput of ERM and AlignCLIP: what the training loop runs per step (alignclip.train's
train_step, then the BMA update when the method has one), on a fixed batch already on the device, so no data
loading. Prints step time, images/s, FLOP per image (torch.utils.flop_counter, forward + backward), MFU against
the accelerator's dense BF16 peak, and peak GPU memory; ``--json`` also writes them for bench/gpu_check.sh.

    python bench/model_throughput.py [--model vit-b-16] [--per-domain 36] [--domains 3] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Dense BF16 peak per accelerator name (vendor data sheets); MFU is printed only for a known accelerator or --peak-tflops.
METHODS = ("erm", "clipood", "alignclip")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(model_name: str, method_name: str, batch: int, device: torch.device, steps: int):
    from alignclip.bma import BetaMovingAverage
    from alignclip.classifier import make_visual
    from alignclip.methods import get_method
    from alignclip.presets import load_clip
    from alignclip.similarity import class_similarity_matrix
    from alignclip.train import make_optimizer

    torch.manual_seed(0)
    bundle = load_clip(model_name, "none", device=device)
    method = get_method(method_name).for_model(bundle.tau)  # as train.setup: the loaded CLIP's own temperature
    visual = make_visual(bundle, method).to(device).train()
    optimizer = make_optimizer(bundle, visual, lr=1e-6, weight_decay=0.1, fused=device.type == "cuda")
    bma = BetaMovingAverage(visual, steps + 10, method.bma_beta) if method.bma else None
    dim = bundle.model.text_projection.shape[1] if bundle.model.text_projection is not None else 512
    text = torch.nn.functional.normalize(torch.randn(65, dim, device=device), dim=-1)  # OfficeHome's 65 classes
    sim = class_similarity_matrix(text)
    images = torch.randn(batch, 3, bundle.image_size, bundle.image_size, device=device)
    targets = torch.arange(batch, device=device) % 65
    return method, visual, optimizer, bma, text, sim, images, targets


def one_step(state, device: torch.device) -> None:
    from alignclip.train import autocast_for, train_step

    method, visual, optimizer, bma, text, sim, images, targets = state
    train_step(method, visual, optimizer, images, targets, text, sim, autocast_for(device))
    if bma is not None:
        bma.update(visual)


def flop_per_image(state, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        one_step(state, device)
    return counter.get_total_flops() / state[6].shape[0]


def measure(model_name: str, method_name: str, batch: int, steps: int, device: torch.device) -> dict:
    state = build(model_name, method_name, batch, device, steps)
    flops = flop_per_image(state, device)
    for _ in range(3):  # warm-up (kernel selection, allocator)
        one_step(state, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        tic = time.perf_counter()
        one_step(state, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tic)
    step_s = statistics.median(times)
    result = {"method": method_name, "step_s": step_s, "images_per_s": batch / step_s, "gflop_per_image": flops / 1e9}
    peak = peak_tflops(device)
    result["mfu"] = flops * batch / step_s / (peak * 1e12) if peak else None
    result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    del state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-b-16")
    parser.add_argument("--per-domain", type=int, default=36)
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.per_domain * args.domains
    results = {m: measure(args.model, m, batch, args.steps, device) for m in METHODS}
    results["ratio"] = results["alignclip"]["step_s"] / results["erm"]["step_s"]
    results["ratio_clipood"] = results["alignclip"]["step_s"] / results["clipood"]["step_s"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} on {name}, batch {batch} ({args.per_domain} x {args.domains} domains), median of {args.steps} steps")
    print(f"{'method':10s} {'s/step':>8s} {'images/s':>9s} {'GFLOP/img':>10s} {'MFU':>6s} {'peak MiB':>9s}")
    for m in METHODS:
        r = results[m]
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else f"{'-':>6s}"
        peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9s}"
        print(f"{m:10s} {r['step_s']:8.4f} {r['images_per_s']:9.0f} {r['gflop_per_image']:10.1f} {mfu} {peak}")
    print(f"AlignCLIP / ERM step time: {results['ratio']:.3f} (target <= 1.05); AlignCLIP / CLIPood: "
          f"{results['ratio_clipood']:.3f} (paper, appendix C.1: 0.21 s / 0.19 s = 1.10). ERM has no BMA; the others do.")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "device": name, "batch": batch, **results}, handle, indent=2)


if __name__ == "__main__":
    main()
