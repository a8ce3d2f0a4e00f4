"""Listing and splitting speed on a DomainNet-shaped tree: 6 domains x 345 classes, ~100k small files.

Preparation must not decode images; this prints how long `prepare` takes (listing + DomainBed splits +
manifest), and the optional parallel validation pass on a sample.

    python bench/listing.py [--files 100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cfc0000003010100c9fe92ef0000000049454e44ae426082"
)


DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def make_tree(root: Path, files: int, classes: int = 345) -> int:
    per_class = max(1, files // (len(DOMAINS) * classes))
    count = 0
    for domain in DOMAINS:
        for c in range(classes):
            folder = root / domain / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i:05d}.png").write_bytes(PNG)
                count += 1
    return count


def main() -> None:
    from alignclip.data.prepare import PrepareSettings, prepare, validate_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, default=None, help="build the tree here and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="alignclip-listing-"))
    try:
        tic = time.perf_counter()
        count = make_tree(root, args.files)
        built = time.perf_counter() - tic
        tic = time.perf_counter()
        manifest, meta = prepare(PrepareSettings("domain_net", str(root)))
        prepared = time.perf_counter() - tic
        sample = manifest.sample(2000, random_state=0)
        tic = time.perf_counter()
        bad = validate_images(sample, meta, workers=8)
        validated = time.perf_counter() - tic
        print(f"tree: {count} files in {len(meta['domains'])} domains x {len(meta['classes'])} classes (built in {built:.1f}s)")
        print(f"prepare (list + split + manifest, no decoding): {prepared:.2f}s  ({count / prepared:,.0f} files/s)")
        print(f"validate (decode, 8 threads) on 2,000 files: {validated:.2f}s, {len(bad)} unreadable")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
