"""Preparation and splitting on small trees with real image files, in each layout, against reference procedures
written out here independently (DomainBed's seed_hash / split_dataset, torchvision's ImageFolder order, Dassl's
few-shot sampling, CoOp's base/new split)."""

import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from alignclip import protocols
from alignclip.data.prepare import DatasetError, PrepareSettings, prepare, validate_images

rng = np.random.RandomState(0)


def write_png(path: Path, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def domainbed_tree(root: Path, domains=("art", "photo", "sketch"), classes=("dog", "Alarm_Clock", "cat", "house-plant"), broken=None):
    n = 0
    for d_index, domain in enumerate(domains):
        for c_index, cls in enumerate(classes):
            for i in range(5 + (3 * d_index + c_index) % 7):
                sub = "nested/" if i == 0 else ""
                write_png(root / domain / cls / f"{sub}img_{i:03d}.png", n)
                n += 1
    (root / "README.txt").write_text("not an image")
    if broken:
        (root / broken).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def seed_hash(*args):  # DomainBed misc.seed_hash, written out
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def reference_split(n, fraction, seed):  # DomainBed misc.split_dataset
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    cut = int(fraction * n)
    return set(keys[:cut]), set(keys[cut:])


def test_domainbed_order_counts_and_splits_match_domainbed(tmp_path):
    root = domainbed_tree(tmp_path / "PACS")
    manifest, meta = prepare(PrepareSettings("pacs", str(root)))
    assert meta["domains"] == ["art", "photo", "sketch"]
    assert meta["class_folders"] == sorted(["dog", "Alarm_Clock", "cat", "house-plant"])
    assert meta["classes"] == ["Alarm Clock", "cat", "dog", "house plant"]
    for env_index, domain in enumerate(meta["domains"]):
        reference = ImageFolder(str(root / domain))  # torchvision's own order and labels
        rows = manifest[manifest["domain"] == domain].sort_values("env_index")
        assert [str(root / p) for p in rows["path"]] == [s[0] for s in reference.samples]
        assert rows["label"].tolist() == [s[1] for s in reference.samples]
        out, inn = reference_split(len(reference), 0.2, seed_hash(0, env_index))
        assert set(rows.loc[rows["split"] == "val", "env_index"]) == out
        assert set(rows.loc[rows["split"] == "train", "env_index"]) == inn
        assert len(out) == int(0.2 * len(reference))
    again, _ = prepare(PrepareSettings("pacs", str(root)))
    assert again.equals(manifest)  # seed-stable
    other, _ = prepare(PrepareSettings("pacs", str(root), trial_seed=1))
    assert not other["split"].equals(manifest["split"])


def test_leave_one_domain_out_views(tmp_path):
    root = domainbed_tree(tmp_path / "d")
    manifest, meta = prepare(PrepareSettings("office_home", str(root)))
    train, space = protocols.training_set(manifest, meta, "photo", seed=0)
    assert set(train["domain"]) == {"art", "sketch"} and set(train["split"]) == {"train"}
    assert space == [0, 1, 2, 3]
    holdout = {v.name: v for v in protocols.evaluation_views(manifest, meta, "photo", "holdout")}
    full = {v.name: v for v in protocols.evaluation_views(manifest, meta, "photo", "full")}
    inner = {v.name: v for v in protocols.evaluation_views(manifest, meta, "photo", "in")}
    photo = manifest[manifest["domain"] == "photo"]
    assert len(holdout["test"].rows) == int(0.2 * len(photo)) and len(full["test"].rows) == len(photo)
    assert len(inner["test"].rows) == len(photo) - int(0.2 * len(photo))
    assert set(inner["test"].rows.index).isdisjoint(holdout["test"].rows.index)
    with pytest.raises(ValueError, match="test domain 'clipart'"):
        protocols.training_set(manifest, meta, "clipart", seed=0)


def test_in_the_wild_protocol_matches_clipood(tmp_path):
    classes = ("a1", "b2", "c3", "d4", "e5")
    root = domainbed_tree(tmp_path / "oh", classes=classes)
    manifest, meta = prepare(PrepareSettings("office_home", str(root), protocol="wild"))
    assert meta["base_classes"] == [0, 1] and meta["new_classes"] == [2, 3, 4]  # int(0.5 * 5) = 2
    for env_index, domain in enumerate(meta["domains"]):
        rows = manifest[manifest["domain"] == domain].sort_values("env_index").reset_index(drop=True)
        for name, mask in (("base", rows["label"] < 2), ("open", rows["label"] >= 2)):
            part = rows[mask].reset_index(drop=True)
            out, _ = reference_split(len(part), 0.2, seed_hash(0, env_index, name))
            assert set(part.index[part["split"] == "val"]) == out
    train, space = protocols.training_set(manifest, meta, "art", seed=0)
    assert space == [0, 1] and set(train["label"]) <= {0, 1} and "art" not in set(train["domain"])
    views = {v.name: v for v in protocols.evaluation_views(manifest, meta, "art")}
    target = manifest[manifest["domain"] == "art"]
    assert views["base"].label_space == [0, 1, 2, 3, 4]  # all classes, base then new
    assert len(views["base"].rows) == int((target["label"] < 2).sum())  # in + out
    assert len(views["new"].rows) == int((target["label"] >= 2).sum())


def test_empty_class_folder_is_named(tmp_path):
    root = domainbed_tree(tmp_path / "d")
    (root / "photo" / "zebra").mkdir()
    (root / "art" / "zebra").mkdir()
    (root / "sketch" / "zebra").mkdir()
    write_png(root / "art" / "zebra" / "z.png", 1)
    write_png(root / "sketch" / "zebra" / "z.png", 2)
    with pytest.raises(DatasetError, match=r"photo: class folder\(s\) \['zebra'\] hold no image files"):
        prepare(PrepareSettings("pacs", str(root)))


def test_domains_with_different_classes_are_named(tmp_path):
    root = domainbed_tree(tmp_path / "d")
    write_png(root / "sketch" / "zebra" / "z.png", 3)
    with pytest.raises(DatasetError, match=r"'art' and 'sketch' have different classes .*only in 'sketch': \['zebra'\]"):
        prepare(PrepareSettings("pacs", str(root)))


def test_unknown_dataset_and_protocol(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        prepare(PrepareSettings("mnist", str(tmp_path)))
    with pytest.raises(DatasetError, match="supports protocol"):
        prepare(PrepareSettings("oxford_pets", str(tmp_path), protocol="wild"))
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        prepare(PrepareSettings("pacs", str(tmp_path / "missing")))


def test_broken_image_is_listed_and_skipped_not_a_crash(tmp_path):
    import torch

    from alignclip.data.images import ManifestImages, eval_transform

    root = domainbed_tree(tmp_path / "d", broken="art/cat/zz_broken.png")
    manifest, meta = prepare(PrepareSettings("pacs", str(root)))
    bad = validate_images(manifest, meta, workers=4)
    assert [Path(p).name for p, _ in bad] == ["zz_broken.png"]
    rows = manifest[manifest["domain"] == "art"]
    data = ManifestImages(meta, rows["path"].tolist(), rows["label"].tolist(), [0, 1, 2, 3], eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    broken_index = [Path(p).name for p in data.paths].index("zz_broken.png")
    image, target, index = data[broken_index]
    assert image.shape == (3, 8, 8) and int(index) != broken_index
    assert [Path(p).name for p in data.skipped] == ["zz_broken.png"]
    assert torch.isfinite(image).all()


# --------------------------------------------------------------------------------------------- CoOp


def coop_tree(root: Path, n_classes=5, per_split=(7, 3, 4)):
    split = {"train": [], "val": [], "test": []}
    n = 0
    for label in range(n_classes):
        name = f"class_{label}"
        for key, count in zip(("train", "val", "test"), per_split):
            for i in range(count):
                rel = f"{name}/{key}_{i}.jpg"
                write_png(root / "images" / rel, n)  # PNG bytes with a .jpg name: decoders sniff the content
                split[key].append([rel, label, name])
                n += 1
    (root / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root, split


def dassl_fewshot(items, num_shots):  # Dassl DatasetBase.generate_fewshot_dataset (uses the global `random`)
    tracker = {}
    for item in items:
        tracker.setdefault(item[1], []).append(item)
    out = []
    for _, group in tracker.items():
        out.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
    return out


def test_coop_base_new_and_fewshot_match_dassl(tmp_path):
    root, split = coop_tree(tmp_path / "oxford_pets")
    manifest, meta = prepare(PrepareSettings("oxford_pets", str(root), shots=4, seeds=[1, 2]))
    assert meta["base_classes"] == [0, 1, 2] and meta["new_classes"] == [3, 4]  # ceil(5 / 2) = 3
    assert meta["template"] == "a photo of a {}, a type of pet."
    assert meta["classes"][0] == "class 0"
    for seed in (1, 2):
        random.seed(seed)
        ref_train = dassl_fewshot(split["train"], 4)
        ref_val = dassl_fewshot(split["val"], min(4, 4))
        chosen = manifest[manifest[f"shots_seed{seed}"]]
        assert sorted(chosen[chosen["split"] == "train"]["path"]) == sorted("images/" + r[0] for r in ref_train)
        assert sorted(chosen[chosen["split"] == "val"]["path"]) == sorted("images/" + r[0] for r in ref_val)
    train, space = protocols.training_set(manifest, meta, None, seed=1)
    assert space == [0, 1, 2] and len(train) == 3 * 4
    views = {v.name: v for v in protocols.evaluation_views(manifest, meta, None)}
    assert views["base"].label_space == [0, 1, 2] and views["new"].label_space == [3, 4]
    assert len(views["new"].rows) == 2 * 4
    with pytest.raises(ValueError, match="seed 7 was not sampled"):
        protocols.training_set(manifest, meta, None, seed=7)


def test_coop_split_naming_missing_files_is_an_error(tmp_path):
    root, split = coop_tree(tmp_path / "oxford_pets")
    (root / "images" / split["test"][0][0]).unlink()
    with pytest.raises(DatasetError, match=r"names 1 image\(s\) missing .*class_0/test_0.jpg"):
        prepare(PrepareSettings("oxford_pets", str(root)))


def test_coop_bad_split_file(tmp_path):
    root, _ = coop_tree(tmp_path / "oxford_pets")
    (root / "split_zhou_OxfordPets.json").write_text("{not json")
    with pytest.raises(DatasetError, match="split_zhou_OxfordPets.json: not valid JSON"):
        prepare(PrepareSettings("oxford_pets", str(root)))
    (root / "split_zhou_OxfordPets.json").unlink()
    with pytest.raises(DatasetError, match="split file not found"):
        prepare(PrepareSettings("oxford_pets", str(root)))


# --------------------------------------------------------------------------------------------- ImageNet


def test_imagenet_and_variants(tmp_path):
    from alignclip.data.prepare import imagenet_classes, imagenet_subset

    wnids, names = imagenet_classes()
    assert len(wnids) == 1000 and wnids == sorted(wnids) and names[1] == "goldfish"
    subset_a, subset_r = imagenet_subset("imagenet_a"), imagenet_subset("imagenet_r")
    assert len(subset_a) == 200 and len(subset_r) == 200 and set(subset_a) <= set(wnids)
    base = tmp_path / "imagenet"
    picked = [wnids[1], subset_a[0], subset_r[5]]
    n = 0
    for wnid in picked:
        for i in range(20):
            write_png(base / "images" / "train" / wnid / f"{i}.JPEG", n); n += 1
        for i in range(3):
            write_png(base / "images" / "val" / wnid / f"{i}.JPEG", n); n += 1
            write_png(tmp_path / "imagenet-sketch" / "images" / wnid / f"{i}.JPEG", n); n += 1
    write_png(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / "1" / "a.jpeg", 1)
    write_png(tmp_path / "imagenet-adversarial" / "imagenet-a" / subset_a[0] / "a.jpg", 2)
    write_png(tmp_path / "imagenet-rendition" / "imagenet-r" / subset_r[5] / "r.jpg", 3)
    manifest, meta = prepare(PrepareSettings("imagenet", str(base), shots=16, seeds=[1]))
    assert meta["domains"] == ["imagenet", "imagenet_a", "imagenet_r", "imagenet_sketch", "imagenet_v2"]
    train, space = protocols.training_set(manifest, meta, None, seed=1)
    assert len(space) == 1000 and len(train) == 3 * 16
    views = {v.name: v for v in protocols.evaluation_views(manifest, meta, None)}
    assert len(views["imagenet_a"].label_space) == 200 and len(views["imagenet_r"].label_space) == 200
    assert views["imagenet_v2"].rows["label"].tolist() == [1]
    assert views["imagenet_sketch"].label_space == list(range(1000))
    assert wnids.index(subset_a[0]) in views["imagenet_a"].label_space
