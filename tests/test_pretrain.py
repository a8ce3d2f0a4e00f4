"""The tiny preset's pre-trained weights: deterministic, from a source that is not the demo's data, aligned."""

import hashlib
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignclip import pretrain
from alignclip.evaluate import evaluate
from alignclip.train import TrainSettings, train


def test_pretraining_twice_gives_identical_bytes(tmp_path):
    """Two builds (a short schedule of the same code: sources, batches, optimiser, save) write the same file."""
    settings = replace(pretrain.PretrainSettings(), variants=1, val_variants=1, steps=6, batch_size=16, warmup_steps=2)
    first = pretrain.build(tmp_path / "a.pt", settings)
    second = pretrain.build(tmp_path / "b.pt", settings)
    digest = hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((tmp_path / "b.pt").read_bytes()).hexdigest()
    assert first["sha256"] == second["sha256"] == digest
    # and the six steps did train: the weights differ from the seeded random initialisation
    from alignclip.presets import load_clip

    random_init = load_clip("tiny", pretrained="none").model.state_dict()
    trained = torch.load(tmp_path / "a.pt")
    assert not torch.equal(trained["visual.proj"], random_init["visual.proj"])
    assert torch.equal(trained["token_embedding.weight"], random_init["token_embedding.weight"])  # kept frozen


def test_the_default_tiny_weights_are_the_cached_pretrained_file(tiny, tmp_path):
    summary = pretrain.export(tmp_path)
    weights = tmp_path / f"{pretrain.WEIGHTS_NAME}.pt"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == summary["sha256"]
    saved = torch.load(weights)
    for name, value in tiny.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert tiny.pretrained == pretrain.SOURCE
    written = json.loads((tmp_path / f"{pretrain.WEIGHTS_NAME}.json").read_text())
    assert written["settings"] == json.loads(json.dumps(vars(pretrain.PretrainSettings())))


def test_shipped_weights_are_found_before_the_cache_and_nothing_is_built(tiny, tmp_path, monkeypatch):
    """ALIGNCLIP_WEIGHTS_PATH (the image's built-in weights): a file there under the cache name is used, the
    cache is not touched, nothing is built; a folder without it is passed over. Mutation: skipping the search
    builds into the empty cache, and the build is refused here."""
    cached = pretrain.cached_weights()  # built by the session's `tiny`
    shipped, elsewhere, cache = tmp_path / "shipped", tmp_path / "other", tmp_path / "cache"
    shipped.mkdir(), elsewhere.mkdir()
    for suffix in (".pt", ".json"):
        (shipped / cached.with_suffix(suffix).name).write_bytes(cached.with_suffix(suffix).read_bytes())
    monkeypatch.setenv("ALIGNCLIP_WEIGHTS_PATH", f"{elsewhere}:{shipped}")
    monkeypatch.setenv("ALIGNCLIP_CACHE", str(cache))
    monkeypatch.setattr(pretrain, "build", lambda *a, **k: pytest.fail("built weights that were shipped"))
    assert pretrain.cached_weights() == shipped / cached.name
    from alignclip.presets import load_clip

    loaded = load_clip("tiny")
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    assert not cache.exists()


def test_source_images_are_not_the_demo_data():
    """No printed source digit equals one of the 1,797 UCI digits that RotatedDigits is built from."""
    from PIL import ImageFont
    from sklearn.datasets import load_digits

    handwritten = {image.astype(np.int64).tobytes() for image in load_digits().images}
    rng = np.random.RandomState(0)
    fonts = [ImageFont.truetype(str(pretrain._font_dir() / name), 64) for name in pretrain.FONTS]
    printed = [pretrain.printed_digit(font, digit, rng) for font in fonts for digit in range(10)]
    assert all(p.shape == (8, 8) and p.min() >= 0 and p.max() <= 16 for p in printed)
    assert not handwritten & {p.tobytes() for p in printed}


def test_contrastive_loss_matches_a_written_out_formula():
    torch.manual_seed(0)
    images, texts = torch.randn(4, 8), torch.randn(6, 8)
    image_labels, text_labels = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 3])
    scale = 7.0
    got = pretrain.contrastive_loss(images, texts, image_labels, text_labels, scale)
    a, b = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    logits = [[scale * float(a[i] @ b[j]) for j in range(6)] for i in range(4)]
    i2t = 0.0
    for i in range(4):
        positives = [j for j in range(6) if text_labels[j] == image_labels[i]]
        log_norm = math.log(sum(math.exp(v) for v in logits[i]))
        i2t += -sum(logits[i][j] - log_norm for j in positives) / len(positives)
    t2i, columns = 0.0, 0
    for j in range(6):
        positives = [i for i in range(4) if image_labels[i] == text_labels[j]]
        if not positives:  # caption of a class with no image in the batch (class 3)
            continue
        log_norm = math.log(sum(math.exp(logits[i][j]) for i in range(4)))
        t2i += -sum(logits[i][j] - log_norm for i in positives) / len(positives)
        columns += 1
    assert float(got) == pytest.approx(0.5 * (i2t / 4 + t2i / columns), rel=1e-5)


@pytest.mark.parametrize("domain", ["rotated_0", "rotated_15"])
def test_pretrained_tiny_zero_shot_is_well_above_chance(digits_prepared, tmp_path, domain):
    """Zero-shot through the production path (train zeroshot -> evaluate) on the whole held-out domain: well above
    chance, i.e. at least twice chance and five binomial standard errors above it."""
    train(digits_prepared, tmp_path, TrainSettings(method="zeroshot", test_domain=domain, progress=False))
    metrics = evaluate(digits_prepared, tmp_path / "model.pt", tmp_path, test_domain=domain, test_split="full")
    test = metrics["views"]["test"]
    chance = 1.0 / test["classes"]
    standard_error = math.sqrt(chance * (1 - chance) / test["total"])
    assert test["accuracy"] > 100 * max(2 * chance, chance + 5 * standard_error), test
