"""Train-step cost of AlignCLIP relative to ERM (paper appendix C.1: 0.21 s vs 0.19 s per batch, ratio 1.10;
our target: below 1.05), on the tiny preset and on ViT-B/16 with random weights.

Step times of both methods are measured in one process, interleaved, after warm-up (median of N steps).
Peak memory: CUDA's max_memory_allocated on a GPU; on CPU each (model, method) runs in a child process and its
peak resident set size (ru_maxrss) is reported, since torch's CPU allocator has no peak counter.

    python bench/train_step.py [--models tiny vit-b-16] [--steps 6] [--batch 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def setup(model_name: str, method_name: str, batch: int, device: str):
    from alignclip.methods import get_method
    from alignclip.presets import load_clip
    from alignclip.classifier import make_visual
    from alignclip.similarity import class_similarity_matrix
    from alignclip.train import make_optimizer

    torch.manual_seed(0)
    bundle = load_clip(model_name, "none", device=device)
    method = get_method(method_name).for_model(bundle.tau)  # as train.setup: the loaded CLIP's own temperature
    visual = make_visual(bundle, method).to(device).train()
    optimizer = make_optimizer(bundle, visual, lr=1e-6, weight_decay=0.1)
    dim = bundle.model.text_projection.shape[1] if bundle.model.text_projection is not None else 512
    text = torch.nn.functional.normalize(torch.randn(10, dim, device=device), dim=-1)
    sim = class_similarity_matrix(text)
    images = torch.randn(batch, 3, bundle.image_size, bundle.image_size, device=device)
    targets = torch.arange(batch, device=device) % 10
    return method, visual, optimizer, text, sim, images, targets


def step(state, device):
    """The training loop's own step (alignclip.train.train_step), so the figures measure what training runs."""
    from alignclip.train import autocast_for, train_step

    method, visual, optimizer, text, sim, images, targets = state
    train_step(method, visual, optimizer, images, targets, text, sim, autocast_for(torch.device(device)))
    if device == "cuda":
        torch.cuda.synchronize()


def timing(model_name: str, batch: int, steps: int, device: str) -> dict:
    states = {m: setup(model_name, m, batch, device) for m in ("erm", "alignclip")}
    for state in states.values():  # warm-up
        step(state, device)
        step(state, device)
    times = {m: [] for m in states}
    for _ in range(steps):
        for name, state in states.items():  # interleaved, so drift hits both equally
            tic = time.perf_counter()
            step(state, device)
            times[name].append(time.perf_counter() - tic)
    erm, align = statistics.median(times["erm"]), statistics.median(times["alignclip"])
    return {"model": model_name, "device": device, "batch": batch, "erm_s": erm, "alignclip_s": align, "ratio": align / erm}


def saved_for_backward_mib(state, device) -> float:
    """Bytes autograd keeps for the backward pass of one step (unique storages): the part of training memory
    that a method's extra forward work adds to, measurable on CPU too."""
    from alignclip.objective import compute_loss

    method, visual, _, text, sim, images, targets = state
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = compute_loss(method, visual, images, targets, text, sim)
    loss.backward()
    return sum(storages.values()) / 2**20


def peak_memory_child(model_name: str, method: str, batch: int, device: str) -> dict:
    state = setup(model_name, method, batch, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step(state, device)
    saved = saved_for_backward_mib(state, device)
    if device == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "saved_mib": saved}
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "saved_mib": saved}  # KiB -> MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vit-b-16"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(peak_memory_child(args.child[0], args.child[1], args.batch, args.device)))
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    peak = "peak MiB (CUDA)" if args.device == "cuda" else "peak RSS MiB"
    print(f"{'model':10s} {'device':6s} {'batch':>5s} {'ERM s/step':>11s} {'AlignCLIP s/step':>17s} {'ratio':>6s} "
          f"{'ERM ' + peak:>20s} {'AlignCLIP ' + peak:>26s} {'ERM saved MiB':>14s} {'AlignCLIP saved MiB':>20s}")
    for model in args.models:
        result = timing(model, args.batch, args.steps, args.device)
        peaks = {}
        for method in ("erm", "alignclip"):
            out = subprocess.run([sys.executable, __file__, "--child", model, method, "--batch", str(args.batch), "--device", args.device],
                                 capture_output=True, text=True, check=True)
            peaks[method] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{model:10s} {args.device:6s} {args.batch:5d} {result['erm_s']:11.4f} {result['alignclip_s']:17.4f} {result['ratio']:6.3f} "
              f"{peaks['erm']['peak_mib']:20.0f} {peaks['alignclip']['peak_mib']:26.0f} "
              f"{peaks['erm']['saved_mib']:14.1f} {peaks['alignclip']['saved_mib']:20.1f}")
    print("CPU peak RSS is reached while the model is built, before any step; 'saved' is what autograd keeps for backward.")
    print("paper (V100, ViT-B/16, batch 36): CLIPood 0.19 s, AlignCLIP 0.21 s, ratio 1.10; target < 1.05")


if __name__ == "__main__":
    main()
