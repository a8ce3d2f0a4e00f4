import hashlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.datasets import load_digits

from alignclip.data import digits as rd


def tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_counts_per_domain_and_class(digits_root):
    data = load_digits()
    order = np.random.RandomState(0).permutation(len(data.target))
    assert len(list(digits_root.rglob("*.png"))) == 1797
    for shard, angle in enumerate(rd.ANGLES):
        expected = np.bincount(data.target[order[shard::6]], minlength=10)
        for label, name in enumerate(rd.CLASS_NAMES):
            files = list((digits_root / f"rotated_{angle}" / name).glob("*.png"))
            assert len(files) == expected[label], (angle, name)
    # the six shards are disjoint and cover every image once
    ids = [p.stem for p in digits_root.rglob("*.png")]
    assert len(set(ids)) == 1797


def test_images_are_rgb_and_upsampled(digits_root):
    image = Image.open(next(digits_root.glob("rotated_30/*/*.png")))
    assert image.mode == "RGB" and image.size == (32, 32)


@pytest.mark.parametrize("angle", [15, 45, 75])
def test_rotation_really_applied(digits_root, angle):
    """Rotating the unrotated rendering with scipy (an independent rotation) must match the stored file
    much better than the unrotated rendering does."""
    data = load_digits()
    scores_right, scores_none = [], []
    for path in sorted((digits_root / f"rotated_{angle}").glob("*/*.png"))[:40]:
        index = int(path.stem.split("_")[1])
        stored = np.asarray(Image.open(path).convert("L"), dtype=float)
        upright = np.asarray(rd.render_digit(data.images[index], 0).convert("L"), dtype=float)
        rotated = ndimage.rotate(upright, angle, reshape=False, order=1)
        scores_right.append(np.corrcoef(stored.ravel(), rotated.ravel())[0, 1])
        scores_none.append(np.corrcoef(stored.ravel(), upright.ravel())[0, 1])
    assert np.mean(scores_right) > 0.9
    assert np.mean(scores_right) > np.mean(scores_none) + 0.05


def test_byte_identical_rebuild(digits_root, tmp_path):
    again = tmp_path / "again"
    rd.build_rotated_digits(again)
    assert tree_digest(again) == tree_digest(digits_root)


def test_refuses_to_overwrite_a_users_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a RotatedDigits build"):
        rd.build_rotated_digits(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_a_bad_size_or_a_file_leaves_an_earlier_build_as_it_was(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "digits"
    rd.build_rotated_digits(out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for size in ("0", "-3"):
        done = subprocess.run([sys.executable, "-m", "alignclip", "data", "digits", str(out), "--size", size],
                              capture_output=True, text=True)
        assert done.returncode == 2 and f"--size {size}: expected 8 pixels or more" in done.stderr, done.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]  # no half-built folder beside it
    (tmp_path / "afile").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "alignclip", "data", "digits", str(tmp_path / "afile")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "afile is a file" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "afile").read_text() == "mine"
