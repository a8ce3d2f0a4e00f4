"""Data that is hostile rather than broken: S3 keys, manifest rows, meta.json roots and symlinks that point outside
their root, and rows that name FIFOs or huge files. Each is refused or counted unreadable without being opened or
written (docs/security.md)."""

import json
import os
import threading
from pathlib import Path

import pandas as pd
import pytest

from alignclip import artifacts, storage
from alignclip.data.images import ManifestImages, eval_transform
from alignclip.data.prepare import PrepareSettings, load_prepared, prepare, write_prepared
from alignclip.paths import PathOutsideRoot, confined
from tests.servers import s3_bucket
from tests.test_prepare import domainbed_tree, write_png

TRANSFORM = eval_transform(8, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture()
def s3(monkeypatch, tmp_path):
    with s3_bucket(monkeypatch, tmp_path / "cache", "hostile") as client:  # a bucket name of this module's own
        yield client
        for listed in client.list_objects_v2(Bucket="hostile").get("Contents", []):
            client.delete_object(Bucket="hostile", Key=listed["Key"])


# ------------------------------------------------------------------------------------------------- S3 keys


def test_a_bucket_whose_keys_climb_out_writes_nothing_outside_the_cache(s3, tmp_path):
    """Keys with `../` segments and a leading `/`: prepare refuses the listing naming the key; staging and the
    --pretrained cache refuse the key before any GET; no file appears outside the cache."""
    from alignclip.storage import fetch_object

    root = domainbed_tree(tmp_path / "pacs")
    for path in root.rglob("*.png"):
        s3.upload_file(str(path), "hostile", f"datasets/pacs/{path.relative_to(root).as_posix()}")
    climbing = "datasets/pacs/art/dog/" + "../" * 7 + "escape.png"  # from cache/s3/hostile/datasets/pacs/art/dog to tmp_path
    absolute = str(tmp_path / "absolute-escape.png")  # a key beginning with "/"
    for key in (climbing, absolute, "models/../../../../escape.pt"):
        s3.put_object(Bucket="hostile", Key=key, Body=(root / "art" / "dog" / "img_001.png").read_bytes())
    with pytest.raises(PathOutsideRoot, match=r"S3 key 'datasets/pacs/art/dog/\.\./.*refused: .*'\.\.' segment"):
        prepare(PrepareSettings("pacs", "s3://hostile/datasets/pacs"))

    uris = [f"s3://hostile/{climbing}", f"s3://hostile/{absolute}", "s3://hostile/datasets/pacs/art/dog/img_001.png"]
    for uri, reason in ((uris[0], "has a '..' segment"), (uris[1], "absolute")):
        with pytest.raises(PathOutsideRoot, match=f"S3 key of {uri}.*refused: {reason}"):
            storage.stage([uri, uris[2]])
    with pytest.raises(PathOutsideRoot, match="refused: has a '..' segment"):
        fetch_object("s3://hostile/models/../../../../escape.pt")
    assert not (tmp_path / "escape.png").exists() and not Path(absolute).exists()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.png"))  # refused before any GET


def test_a_cache_entry_behind_a_symlink_that_leaves_the_cache_is_refused(tmp_path):
    cache = tmp_path / "cache" / "s3" / "hostile"
    cache.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (cache / "data").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PathOutsideRoot, match="'data/x.png' refused: it resolves to .*elsewhere/x.png, outside"):
        storage.cache_path("s3://hostile/data/x.png", tmp_path / "cache")
    assert confined(cache, "ok/x.png", "cache entry") == cache / "ok" / "x.png"


# ------------------------------------------------------------------------------------- manifests and roots


@pytest.fixture()
def prepared(tmp_path):
    root = domainbed_tree(tmp_path / "pacs")
    out = tmp_path / "prepared"
    write_prepared(*prepare(PrepareSettings("pacs", str(root))), out)
    return out


def rewrite_rows(prepared: Path, paths: dict[int, str]) -> None:
    manifest = pd.read_parquet(prepared / artifacts.MANIFEST)
    for index, path in paths.items():
        manifest.loc[index, "path"] = path
    manifest.to_parquet(prepared / artifacts.MANIFEST, index=False)


@pytest.mark.parametrize("row", ["../../../../../../../../etc/passwd", "art/../../outside.png", "/etc/passwd"])
def test_manifest_rows_outside_the_dataset_root_are_refused_before_any_image_is_opened(prepared, row):
    rewrite_rows(prepared, {3: row})
    with pytest.raises(PathOutsideRoot, match=rf"manifest.parquet: row 3 path '{row}' refused: it leaves the dataset root"):
        load_prepared(prepared)


def test_the_image_reader_refuses_rows_outside_the_root_too(prepared):
    """A manifest that never went through load_prepared (a caller's own rows): ManifestImages confines them."""
    _, meta = load_prepared(prepared)
    for row in ("../../outside.png", "/etc/passwd"):
        with pytest.raises(PathOutsideRoot, match="manifest row .* refused"):
            ManifestImages(meta, [row], [0], [0], TRANSFORM)


@pytest.mark.parametrize("root", ["../../../../etc", "images/../.."])
def test_a_relative_meta_root_must_stay_inside_the_prepared_folder(prepared, root):
    meta = json.loads((prepared / artifacts.META).read_text())
    (prepared / artifacts.META).write_text(json.dumps({**meta, "root": root}))
    with pytest.raises(PathOutsideRoot, match=rf"meta.json: root '{root}' refused: a relative root must stay inside"):
        load_prepared(prepared)


def test_an_absolute_meta_root_is_the_users_choice_but_rows_stay_under_it(prepared, tmp_path):
    _, meta = load_prepared(prepared)
    assert meta["root"] == str((tmp_path / "pacs").resolve())


def test_a_symlink_in_the_dataset_that_leaves_it_is_unreadable_and_never_decoded(prepared, tmp_path):
    """The outside file is a valid image: it would decode if the link were followed."""
    manifest, meta = load_prepared(prepared)
    write_png(tmp_path / "secret" / "inside-another-tree.png", 7)
    link = Path(meta["root"]) / "art" / "dog" / "link.png"
    link.symlink_to(tmp_path / "secret" / "inside-another-tree.png")
    data = ManifestImages(meta, ["art/dog/link.png", manifest["path"][0]], [0, 0], [0], TRANSFORM, skip_unreadable=True)
    assert data[0] is None and data.skipped == [str(link)]
    assert data[1] is not None
    with pytest.raises(PathOutsideRoot, match="file of .*: 'art/dog/link.png' refused: it resolves to .*secret"):
        prepare(PrepareSettings("pacs", meta["root"]))


# --------------------------------------------------------------------------------- FIFOs and huge files


def test_a_fifo_row_is_unreadable_with_its_reason_and_does_not_block(prepared):
    manifest, meta = load_prepared(prepared)
    fifo = Path(meta["root"]) / "art" / "dog" / "pipe.png"
    os.mkfifo(fifo)
    data = ManifestImages(meta, ["art/dog/pipe.png"], [0], [0], TRANSFORM, skip_unreadable=True)
    result = {}
    reader = threading.Thread(target=lambda: result.setdefault("item", data[0]), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # blocked in open(): release it by opening the write end, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=5)
        pytest.fail("reading a FIFO row blocked")
    assert result["item"] is None and data.skipped == [str(fifo)]
    with pytest.raises(storage.UnreadableImage, match="pipe.png: a FIFO, not a regular file: not opened"):
        storage.open_image(str(fifo))


def test_an_image_larger_than_the_cap_is_unreadable_and_read_no_further(prepared, monkeypatch):
    manifest, meta = load_prepared(prepared)
    path = storage.join(meta["root"], manifest["path"][0])
    monkeypatch.setattr(storage, "MAX_IMAGE_BYTES", os.path.getsize(path) - 1)
    with pytest.raises(storage.UnreadableImage, match=rf"{os.path.getsize(path)} bytes, more than the {os.path.getsize(path) - 1}-byte cap"):
        storage.open_image(path)
    monkeypatch.setattr(storage, "MAX_IMAGE_BYTES", os.path.getsize(path))
    assert storage.open_image(path).size == (8, 8)
