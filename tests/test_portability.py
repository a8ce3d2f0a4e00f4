"""A prepared dataset works from any working directory; custom DomainBed-layout data has its own name."""

import json
import shutil

import pytest

from alignclip.data.images import ManifestImages
from alignclip.data.prepare import DatasetError, PrepareSettings, image_path, load_prepared, prepare, write_prepared
from alignclip.storage import open_image


def _first_image_opens(prepared):
    manifest, meta = load_prepared(prepared)
    path = image_path(meta, manifest["path"].iloc[0])
    assert open_image(path).size[0] > 0
    return meta


def test_a_relative_root_is_stored_absolute_and_works_from_another_folder(digits_root, tmp_path, monkeypatch):
    monkeypatch.chdir(digits_root.parent)
    manifest, meta = prepare(PrepareSettings("rotated_digits", digits_root.name))
    write_prepared(manifest, meta, tmp_path / "prepared")
    stored = json.loads((tmp_path / "prepared" / "meta.json").read_text())["root"]
    assert stored == str(digits_root.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _first_image_opens(tmp_path / "prepared")


def test_a_dataset_inside_the_prepared_folder_moves_with_it(digits_root, tmp_path, monkeypatch):
    """The pipeline's embedded dataset lives in the prepared artifact: the root is stored relative to it."""
    prepared = tmp_path / "prepared"
    shutil.copytree(digits_root, prepared / "images")
    manifest, meta = prepare(PrepareSettings("rotated_digits", str(prepared / "images")))
    write_prepared(manifest, meta, prepared)
    assert json.loads((prepared / "meta.json").read_text())["root"] == "images"
    moved = tmp_path / "moved"
    prepared.rename(moved)
    monkeypatch.chdir(tmp_path)
    meta = _first_image_opens(moved)
    assert meta["root"] == str((moved / "images").resolve())


def test_a_custom_domainbed_layout_dataset_is_named(digits_root, tmp_path):
    manifest, meta = prepare(PrepareSettings("domainbed", str(digits_root), name="my_digits"))
    assert meta["dataset"] == "my_digits" and meta["protocol"] == "domainbed"
    assert meta["domains"] == sorted(p.name for p in digits_root.iterdir() if p.is_dir())
    reference, _ = prepare(PrepareSettings("rotated_digits", str(digits_root)))
    assert manifest["path"].tolist() == reference["path"].tolist()  # same layout rules, same splits


def test_a_custom_dataset_gets_no_paper_numbers_in_the_report(digits_root, tmp_path):
    import pandas as pd

    from alignclip.report import build_tables

    summary = pd.DataFrame(
        [{"dataset": name, "protocol": "domainbed", "variant": "erm", "method": "erm", "view": "test",
          "test_domain": "art_painting", "mean": 50.0, "std": 0.0, "seeds": 1} for name in ("pacs", "my_pacs")]
    )
    tables = build_tables(summary)
    assert tables["domain_shift_pacs"]["paper"].notna().any()  # the registered dataset has the paper's number
    assert tables["domain_shift_my_pacs"]["paper"].isna().all()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(dataset="domainbed"), "name your dataset with --name"),
        (dict(dataset="domainbed", name="pacs"), "'pacs' is a registered dataset"),
        (dict(dataset="domainbed", name="my data"), "expected letters, digits"),
    ],
)
def test_custom_names_are_checked(digits_root, settings, message):
    with pytest.raises(DatasetError, match=message):
        prepare(PrepareSettings(root=str(digits_root), **settings))


def test_manifest_images_of_a_moved_prepared_folder_decode(digits_root, tmp_path, monkeypatch):
    prepared = tmp_path / "p"
    shutil.copytree(digits_root, prepared / "images")
    manifest, meta = prepare(PrepareSettings("rotated_digits", str(prepared / "images")))
    write_prepared(manifest, meta, prepared)
    prepared.rename(tmp_path / "q")
    manifest, meta = load_prepared(tmp_path / "q")
    data = ManifestImages(meta, manifest["path"].head(3).tolist(), manifest["label"].head(3).tolist(), list(range(10)), lambda x: x)
    assert len([data[i] for i in range(3)]) == 3 and data.skipped == []
