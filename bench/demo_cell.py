"""CPU seconds of the parts of one `make demo` grid cell, as a grid worker runs it (portable kernels, one thread):
reading the training batches (decode + augmentation + collation, BalancedLoader), and the evaluation pass's reading
(the held-out domain's and the validation images through the evaluation loader), each with the images decoded by
the cell (``*_own``) and with the copies `alignclip grid` decodes once before forking its cells (``*_shared``,
``images.preload``; ``preload_s`` is that one-time cost per grid stage). CPU time (``time.process_time``),
so a busy shared machine inflates it less than wall time; median of ``--rounds``.

Needs the demo's prepared data: ``outputs/prepared`` (``dvc repro prepare`` or a `make demo`).

    python bench/demo_cell.py [--prepared outputs/prepared] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", default=str(ROOT / "outputs" / "prepared"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--domain", default="rotated_0")
    args = parser.parse_args()

    from alignclip import determinism

    determinism.pin_process("cpu")
    import torch

    from alignclip import protocols
    from alignclip.data import images as images_module
    from alignclip.data.images import ManifestImages, collate_readable, eval_transform, train_transform
    from alignclip.data.loader import BalancedLoader, evaluation_loader
    from alignclip.data.prepare import load_prepared
    from alignclip.recipes import get_recipe
    from alignclip.train import IN_MEMORY_BYTES

    determinism.configure_torch("cpu", warn_only=True)
    recipe = get_recipe("demo")
    steps, per_domain = recipe.steps, recipe.batch_size
    manifest, meta = load_prepared(args.prepared)
    rows, space = protocols.training_set(manifest, meta, args.domain, 0, None)
    groups = [g for _, g in rows.groupby(protocols.get_protocol(meta["protocol"]).group_key, sort=True)]
    size, mean, std = 32, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    transform = train_transform(size, mean, std, recipe.hflip)
    views = list(protocols.evaluation_views(manifest, meta, args.domain, "full"))

    def train_data() -> float:
        datasets = []
        for group in groups:
            dataset = ManifestImages(meta, group["path"].tolist(), group["label"].tolist(), space, transform)
            dataset.keep_decoded_bytes = IN_MEMORY_BYTES // len(groups)
            datasets.append(dataset)
        tic = time.process_time()
        for _ in BalancedLoader(datasets, per_domain, 0, steps, 0, "cpu"):
            pass
        return time.process_time() - tic

    def eval_data() -> float:
        tic = time.process_time()
        for view in views:
            dataset = ManifestImages(meta, view.rows["path"].tolist(), view.rows["label"].tolist(), view.label_space,
                                     eval_transform(size, mean, std), skip_unreadable=True)
            for _ in evaluation_loader(dataset, 512, 0, "cpu", collate_fn=collate_readable):
                pass
        return time.process_time() - tic

    figures = {"train_data_own_s": [], "eval_data_own_s": [], "preload_s": [], "train_data_shared_s": [],
               "eval_data_shared_s": []}
    for _ in range(args.rounds):
        images_module.clear_preloaded()
        figures["train_data_own_s"].append(train_data())
        figures["eval_data_own_s"].append(eval_data())
        tic = time.process_time()
        images_module.preload(meta, manifest["path"].tolist(), IN_MEMORY_BYTES)
        figures["preload_s"].append(time.process_time() - tic)
        figures["train_data_shared_s"].append(train_data())
        figures["eval_data_shared_s"].append(eval_data())
    out = {k: round(statistics.median(v), 3) for k, v in figures.items()}
    out.update(steps=steps, images_per_step=per_domain * len(groups), eval_images=sum(len(v.rows) for v in views),
               kernels=torch.backends.cpu.get_cpu_capability())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
