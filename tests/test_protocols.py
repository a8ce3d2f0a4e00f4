"""The protocol registry: each benchmark's headline metric and table from known values, unknown names refused,
and a new protocol plugged in by registration alone."""

import json

import pandas as pd
import pytest

from alignclip import protocols
from alignclip.protocols import Protocol, View, get_protocol
from alignclip.protocols.base import table_row
from alignclip.report import build_tables, collect, summarise


def write_metrics(root, name, **summary):
    path = root / name
    path.mkdir(parents=True)
    summary.setdefault("variant", summary["method"])
    summary["views"] = {k: {"accuracy": v, "total": 10} for k, v in summary["views"].items()}
    (path / "metrics.json").write_text(json.dumps(summary))
    return path / "metrics.json"


def test_unknown_protocol_is_named_with_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown protocol 'coop': expected one of domainbed, wild, base2new, imagenet"):
        get_protocol("coop")
    path = write_metrics(tmp_path, "run", dataset="pacs", protocol="nonsense", method="erm", views={"test": 50.0})
    with pytest.raises(ValueError, match=rf"{path}: unknown protocol 'nonsense'"):
        collect(tmp_path)


def test_headline_metric_of_each_protocol():
    assert get_protocol("domainbed").headline({"views": {"test": {"accuracy": 71.5}, "source_val": {"accuracy": 90.0}}}) == ("test_acc", 71.5)
    assert get_protocol("wild").headline({"views": {"base": {"accuracy": 80.0}, "new": {"accuracy": 60.0}, "all": {"accuracy": 70.0}}}) == ("all_acc", 70.0)
    b2n = get_protocol("base2new")
    views = {"base": {"accuracy": 80.0}, "new": {"accuracy": 60.0}}
    derived = b2n.derived_metrics(views)
    assert derived == {"H": pytest.approx(2 * 80 * 60 / 140)}
    assert b2n.headline({"views": views, **derived}) == ("H", pytest.approx(68.5714, abs=1e-4))
    assert b2n.headline({"views": {"base": {"accuracy": 80.0}}}) is None  # no new-class images: no H
    assert get_protocol("imagenet").headline({"views": {"imagenet": {"accuracy": 72.0}, "imagenet_a": {"accuracy": 50.0}}}) == ("imagenet_acc", 72.0)


def test_imagenet_and_wild_tables_from_known_values(tmp_path):
    for variant, acc in (("imagenet", 70.0), ("imagenet_v2", 64.0), ("imagenet_sketch", 48.0), ("imagenet_a", 50.0), ("imagenet_r", 76.0)):
        write_metrics(tmp_path / "in", variant, dataset="imagenet", protocol="imagenet", method="alignclip", seed=1, views={variant: acc})
    write_metrics(tmp_path / "wild", "art", dataset="office_home", protocol="wild", method="clipood", test_domain="Art", seed=0,
                  views={"base": 90.0, "new": 70.0, "all": 80.0})
    tables = build_tables(summarise(pd.concat([collect(tmp_path / "in"), collect(tmp_path / "wild")])))
    imagenet = tables["imagenet_imagenet"].set_index("split")
    assert imagenet.loc["ood_avg"]["ours_mean"] == pytest.approx((64 + 48 + 50 + 76) / 4)
    assert imagenet.loc["ood_avg"]["paper"] == pytest.approx(60.3)  # table 2, AlignCLIP
    assert imagenet.loc["imagenet_r"]["diff"] == pytest.approx(76.0 - 77.3)
    wild = tables["wild_office_home"].set_index("split")
    assert list(wild.index) == ["Art (all)", "Art (base)", "Art (new)"]
    assert wild.loc["Art (all)"]["paper"] == pytest.approx(82.5)  # table 4, CLIPood on Art
    assert pd.isna(wild.loc["Art (base)"]["paper"])  # the paper reports all classes only


class EveryImageOnce(Protocol):
    """A made-up protocol: train on the 'train' split, score on the rest."""

    name = "every_image_once"
    headline_metric = "rest_acc"
    table_prefix = "once"
    layouts = ("domainbed",)

    def training_set(self, manifest, meta, test_domain, seed, shots=None):
        return manifest[manifest["split"] == "train"], list(range(len(meta["classes"])))

    def evaluation_views(self, manifest, meta, test_domain, test_split):
        return [View("rest", manifest[manifest["split"] != "train"], list(range(len(meta["classes"]))))]

    def table_rows(self, dataset, part):
        return [table_row(r["label"], r["view"], r["mean"], r["std"], None, r["seeds"]) for _, r in part.iterrows()]


def test_a_new_protocol_needs_only_its_class_and_registration(monkeypatch, tmp_path, digits_root):
    from alignclip.data.prepare import PrepareSettings, prepare

    monkeypatch.setitem(protocols.PROTOCOLS, EveryImageOnce.name, EveryImageOnce())
    prepared, prepared_meta = prepare(PrepareSettings("rotated_digits", str(digits_root), protocol="every_image_once"))
    assert prepared_meta["protocol"] == "every_image_once"
    rows, _ = protocols.training_set(prepared, prepared_meta, None, seed=0)
    assert len(rows) == (prepared["split"] == "train").sum() > 0
    manifest = pd.DataFrame({"path": ["a", "b", "c"], "label": [0, 1, 0], "split": ["train", "val", "val"], "domain": ["d"] * 3})
    meta = {"protocol": "every_image_once", "classes": ["x", "y"], "dataset": "toy"}
    rows, space = protocols.training_set(manifest, meta, None, seed=0)
    assert rows["path"].tolist() == ["a"] and space == [0, 1]
    assert [v.rows["path"].tolist() for v in protocols.evaluation_views(manifest, meta, None)] == [["b", "c"]]
    write_metrics(tmp_path, "run", dataset="toy", protocol="every_image_once", method="erm", seed=0, views={"rest": 42.0})
    table = build_tables(summarise(collect(tmp_path)))["once_toy"]
    assert table[["method", "split", "ours_mean"]].values.tolist() == [["erm", "rest", 42.0]]


def test_each_dataset_defaults_to_its_papers_protocol_in_every_runner():
    """Section 4: the five DomainBed datasets (and the embedded digits) leave one domain out, the eleven CoOp datasets
    are base-to-new, ImageNet has its few-shot protocol. The config (CLI/DVC/KFP) and `prepare` share one answer."""
    from alignclip import config
    from alignclip.data import prepare, registry

    expected = {name: "domainbed" for name in ("rotated_digits", "pacs", "vlcs", "office_home", "terra_incognita", "domain_net")}
    expected |= {name: "base2new" for name in ("caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101",
                                               "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")}
    expected["imagenet"] = "imagenet"
    assert set(expected) == set(registry.DATASETS)
    for name, protocol in expected.items():
        assert config.default_protocol(name) == prepare.default_protocol(name) == protocol, name
