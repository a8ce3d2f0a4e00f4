"""s3:// for real: a checkpoint and a dataset prefix served by a local S3 API (moto) on 127.0.0.1."""

import pandas as pd
import pytest
import torch

from tests.servers import s3_bucket
from tests.test_prepare import domainbed_tree


@pytest.fixture()
def s3(monkeypatch, tmp_path):
    with s3_bucket(monkeypatch, tmp_path / "cache", "bucket") as client:
        yield client


def test_checkpoint_from_s3(s3, tiny, tmp_path):
    from alignclip.presets import load_clip

    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    s3.upload_file(str(path), "bucket", "models/tiny.pt")
    loaded = load_clip("tiny", pretrained="s3://bucket/models/tiny.pt")
    assert torch.equal(loaded.model.visual.proj, tiny.model.visual.proj)
    assert (tmp_path / "cache" / "s3" / "bucket" / "models" / "tiny.pt").is_file()
    with pytest.raises(FileNotFoundError, match="cannot fetch s3://bucket/models/missing.pt"):
        load_clip("tiny", pretrained="s3://bucket/models/missing.pt")


def test_dataset_prefix_on_s3_matches_the_local_folder(s3, tmp_path):
    from alignclip.data.images import ManifestImages, eval_transform
    from alignclip.data.prepare import PrepareSettings, prepare

    root = domainbed_tree(tmp_path / "pacs")
    for path in root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "bucket", f"datasets/pacs/{path.relative_to(root).as_posix()}")
    local, _ = prepare(PrepareSettings("pacs", str(root)))
    remote, meta = prepare(PrepareSettings("pacs", "s3://bucket/datasets/pacs"))
    pd.testing.assert_frame_equal(remote, local)  # every column: paths, labels, domains, splits, subsets
    assert len(remote) == len(list(root.rglob("*.png")))  # every image, and README.txt left out
    rows = remote.head(3)
    data = ManifestImages(meta, rows["path"].tolist(), rows["label"].tolist(), [0, 1, 2, 3], eval_transform(8, (0.5,) * 3, (0.5,) * 3))
    assert data[0][0].shape == (3, 8, 8) and data.paths[0].startswith("s3://bucket/datasets/pacs/")
    uris, read_from_s3 = list(data.paths), data[0][0]
    data.stage()  # parallel GETs into the local cache (ALIGNCLIP_CACHE); training then reads local files
    assert data.paths == [str(tmp_path / "cache" / "s3" / "bucket" / uri[len("s3://bucket/"):]) for uri in uris]
    assert torch.equal(data[0][0], read_from_s3)
    with pytest.raises(FileNotFoundError, match="s3://bucket/nothing"):
        prepare(PrepareSettings("pacs", "s3://bucket/nothing"))
