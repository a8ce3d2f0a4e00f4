"""Input pipeline throughput: decode + training augmentation (RandomResizedCrop 224 bicubic, flip, CLIP
normalisation) through the real training loader (alignclip.data.loader.BalancedLoader, 3 domains), for 0, 1, 2, ...
workers; local files vs S3 (a local S3 API, moto) read per image vs S3 staged into the local cache first; and the
CPU cores needed to feed an H200 (3,700 images/s: ViT-B/16 at 40% MFU, see README).

Images: JPEGs of 300-640 px (long side) cut from scikit-learn's bundled sample photos, 3 domains.

    python bench/input_pipeline.py [--images 480] [--max-workers N] [--no-s3]
    python bench/input_pipeline.py --make-dataset DIR [--images N]   # only write the JPEG tree (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H200_IMAGES_PER_S = 3700  # 989 TFLOP/s dense BF16 x 40% / 105.9 GFLOP per ViT-B/16 training image
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")  # PACS's, so `alignclip prepare pacs` accepts the tree
CLASSES = ("dog", "elephant", "giraffe")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_dataset(root: Path, images_per_domain: int, domains=DOMAINS, seed: int = 0) -> dict[str, list[str]]:
    """Write a DomainBed-layout tree of JPEGs (long side 300-640 px, quality 90); return paths per domain."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 2 photos, 427 x 640
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {}
    for domain in domains:
        out[domain] = []
        for i in range(images_per_domain):
            photo = photos[i % len(photos)]
            w, h = rng.integers(200, photo.width), rng.integers(200, photo.height)
            x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
            crop = photo.crop((int(x), int(y), int(x + w), int(y + h)))
            long_side = int(rng.integers(300, 641))
            scale = long_side / max(crop.size)
            crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BICUBIC)
            path = root / domain / CLASSES[i % len(CLASSES)] / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            crop.save(path, quality=90)
            out[domain].append(str(path))
    return out


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (joined) children: the loader's workers once it is done."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def loader_rate(paths_per_domain: list[list[str]], workers: int, images: int, per_domain: int = 12) -> tuple[float, float]:
    """(images/s, images per CPU-second) of the training loader (decode + augment + collate).

    Wall time is taken after the first batch (worker start-up); CPU time covers the loader's whole life, main
    process and workers, so it is the cost of an image whatever else shares the machine's cores.
    """
    from alignclip.data.images import ManifestImages, train_transform
    from alignclip.data.loader import BalancedLoader

    transform = train_transform(224, CLIP_MEAN, CLIP_STD)
    datasets = [ManifestImages({"root": "/"}, p, [0] * len(p), [0], transform) for p in paths_per_domain]
    batch = per_domain * len(datasets)
    steps = max(2, images // batch) + 1
    cpu = cpu_seconds()
    loader = BalancedLoader(datasets, per_domain, seed=0, total_steps=steps, num_workers=workers)
    batches = iter(loader)
    next(batches)
    tic = time.perf_counter()
    count = sum(len(x) for x, _ in batches)
    wall = time.perf_counter() - tic
    del batches, loader  # joins the workers, so their CPU time is counted
    gc.collect()
    return count / wall, (count + batch) / (cpu_seconds() - cpu)


def new_client_per_image_rate(uris: list[str]) -> float:
    """The previous S3 read path: a new boto3 client and one GET per image, decoded, in one process."""
    import io

    from PIL import Image

    import boto3

    tic = time.perf_counter()
    for uri in uris:
        bucket, key = uri[len("s3://") :].split("/", 1)
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        Image.open(io.BytesIO(data)).convert("RGB")
    return len(uris) / (time.perf_counter() - tic)


def s3_figures(local: dict[str, list[str]], root: Path, workers: int, images: int) -> dict[str, float]:
    from moto.server import ThreadedMotoServer

    from alignclip import storage
    from tests.servers import free_port

    port = free_port()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}", ALIGNCLIP_CACHE=str(root / "cache"))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = storage.client()
        client.create_bucket(Bucket="bench")
        remote = {}
        for domain, paths in local.items():
            remote[domain] = []
            for path in paths:
                key = Path(path).relative_to(root / "images").as_posix()
                client.upload_file(path, "bench", key)
                remote[domain].append(f"s3://bench/{key}")
        domains = list(remote.values())
        figures = {"new_client": new_client_per_image_rate([p for d in domains for p in d][:60])}
        figures["per_image"] = loader_rate(domains, workers, images)[0]
        tic = time.perf_counter()
        staged = [storage.stage(d) for d in domains]
        figures["stage"] = sum(map(len, staged)) / (time.perf_counter() - tic)
        assert all(not storage.is_s3(p) for d in staged for p in d), "some images were not staged"
        figures["staged"] = loader_rate(staged, workers, images)[0]
        return figures
    finally:
        server.stop()


def main() -> None:
    from alignclip.data.loader import available_cpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=480, help="images per measurement")
    parser.add_argument("--max-workers", type=int, default=None, help="default: the CPUs this process may use")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 figures")
    parser.add_argument("--make-dataset", type=Path, help="only write the JPEG tree (4 PACS domains) here")
    args = parser.parse_args()
    if args.make_dataset:
        made = make_dataset(args.make_dataset, args.images)
        print(f"{sum(map(len, made.values()))} JPEGs in {len(made)} domains -> {args.make_dataset}")
        return
    torch.set_num_threads(1)  # the main process only collates here; workers use one thread each anyway
    cpus = available_cpus()
    max_workers = args.max_workers if args.max_workers is not None else cpus
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = make_dataset(root / "images", max(64, args.images // 3), DOMAINS[:3])
        domains = list(local.values())
        measured = {w: loader_rate(domains, w, args.images) for w in range(0, max_workers + 1)}
        rates = {w: wall for w, (wall, _) in measured.items()}
        per_core = max(rates[0], rates.get(1, 0.0))
        per_cpu_s = measured[0][1]
        print(f"available CPUs: {cpus} (affinity and cgroup quota); load average {os.getloadavg()[0]:.1f}; "
              f"torch {torch.__version__}")
        print(f"{'workers':>7s} {'images/s':>9s} {'per worker':>10s} {'vs linear':>9s} {'images/CPU-s':>12s}")
        for w, (rate, per_cpu) in measured.items():
            linear = f"{rate / (w * per_core):9.2f}" if w else f"{'-':>9s}"
            print(f"{w:7d} {rate:9.0f} {rate / max(w, 1):10.0f} {linear} {per_cpu:12.0f}")
        print("'vs linear': images/s / (workers x the best one-process rate); target >= 0.8 up to the available CPUs")
        print(f"cores needed for {H200_IMAGES_PER_S} images/s: {H200_IMAGES_PER_S / per_core:.1f} at the measured "
              f"{per_core:.0f} images/s per core, {H200_IMAGES_PER_S / per_cpu_s:.1f} at {per_cpu_s:.0f} images per "
              "CPU-second (independent of other load on the machine)")
        try:
            import moto.server  # noqa: F401  (a dev dependency: the local S3 API)
        except ImportError:
            if not args.no_s3:
                print("\nS3 figures skipped: moto (requirements-dev) is not installed")
            args.no_s3 = True
        if not args.no_s3:
            workers = max(1, min(max_workers, cpus))
            s3 = s3_figures(local, root, workers, args.images)
            local_rate = rates.get(workers) or loader_rate(domains, workers, args.images)[0]
            print(f"\nS3 (local moto server), loader with {workers} worker(s); local files: {local_rate:.0f} images/s")
            print(f"{'read path':44s} {'images/s':>9s} {'vs local':>9s}")
            print(f"{'new client + GET per image (previous, 1 proc)':44s} {s3['new_client']:9.0f} {s3['new_client'] / rates[0]:9.2f}")
            print(f"{'one client per worker, GET per image':44s} {s3['per_image']:9.0f} {s3['per_image'] / local_rate:9.2f}")
            print(f"{'staged to local cache, then local reads':44s} {s3['staged']:9.0f} {s3['staged'] / local_rate:9.2f}")
            print(f"{'staging itself (64 threads, once per pod)':44s} {s3['stage']:9.0f} {'':>9s}")
            print("'vs local' of the previous path compares with 0 workers (one process); targets: >= 0.8")


if __name__ == "__main__":
    main()
