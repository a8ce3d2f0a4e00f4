import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from alignclip.evaluate import evaluate
from alignclip.protocols import harmonic_mean, paper_results
from alignclip.report import build_report, build_tables, collect, summarise
from alignclip.train import TrainSettings, train


@pytest.fixture(scope="module")
def zeroshot_run(digits_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("zs")
    train(digits_prepared, out, TrainSettings(method="zeroshot", test_domain="rotated_30", progress=False))
    evaluate(digits_prepared, out / "model.pt", out, test_domain="rotated_30")
    return out


def test_accuracy_matches_an_independent_open_clip_computation(zeroshot_run, digits_prepared):
    """Recompute every prediction with open_clip's encode_image / encode_text directly and count by hand."""
    from PIL import Image

    from alignclip.data.images import eval_transform
    from alignclip.data.prepare import load_prepared
    from alignclip.presets import load_clip

    manifest, meta = load_prepared(digits_prepared)
    torch.manual_seed(0)
    bundle = load_clip("tiny")
    rows = manifest[(manifest["domain"] == "rotated_30") & (manifest["split"] == "val")]
    prompts = [meta["template"].format(c) for c in meta["classes"]]
    with torch.no_grad():
        text = F.normalize(bundle.model.encode_text(bundle.tokenizer(prompts)), dim=-1)
        transform = eval_transform(bundle.image_size, bundle.mean, bundle.std)
        images = torch.stack([transform(Image.open(f"{meta['root']}/{p}").convert("RGB")) for p in rows["path"]])
        pred = (F.normalize(bundle.model.encode_image(images), dim=-1) @ text.T).argmax(-1).numpy()
    correct = int((pred == rows["label"].to_numpy()).sum())
    metrics = json.loads((zeroshot_run / "metrics.json").read_text())
    assert metrics["views"]["test"]["total"] == len(rows)
    assert metrics["views"]["test"]["correct"] == correct
    assert metrics["views"]["test"]["accuracy"] == pytest.approx(100.0 * correct / len(rows))
    # DVC's metrics file beside it: the same accuracy, in percent, under a name that says so
    assert json.loads((zeroshot_run / "scores.json").read_text())["test_acc_pct"] == pytest.approx(100.0 * correct / len(rows))
    predictions = pd.read_parquet(zeroshot_run / "predictions.parquet")
    test = predictions[predictions["view"] == "test"]
    assert (test["pred"] == test["label"]).sum() == correct
    # top-5 probabilities: softmax(cos / tau) of the same computation at the model's own temperature,
    # tau = 1 / exp(logit_scale) (about 0.073 for the tiny CLIP: training's, recorded in metrics.json), decreasing
    with torch.no_grad():
        tau = 1.0 / bundle.model.logit_scale.exp().item()
        probs = (F.normalize(bundle.model.encode_image(images), dim=-1) @ text.T / tau).softmax(-1)
    assert metrics["tau"] == pytest.approx(tau, rel=1e-6) and abs(tau - 0.01) > 0.05
    first = [float(x) for x in test["top5_prob"].iloc[0].split(",")]  # the loader keeps the rows' order
    assert first == sorted(first, reverse=True)
    assert first[0] == pytest.approx(probs[0].max().item(), abs=1e-4)


def test_evaluation_with_workers_and_small_batches_gives_the_same_predictions(zeroshot_run, digits_prepared, tmp_path):
    summary = evaluate(digits_prepared, zeroshot_run / "model.pt", tmp_path, test_domain="rotated_30", batch_size=7,
                       num_workers=2)
    assert summary["num_workers"] == 2 and summary["images_per_s"] > 0
    reference = pd.read_parquet(zeroshot_run / "predictions.parquet")
    mine = pd.read_parquet(tmp_path / "predictions.parquet")
    # same rows in the same order, same predictions; probabilities equal up to the batch size's float rounding
    pd.testing.assert_frame_equal(mine.drop(columns="top5_prob"), reference.drop(columns="top5_prob"))
    probabilities = [np.array([[float(p) for p in row.split(",")] for row in f["top5_prob"]]) for f in (mine, reference)]
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=2e-4)


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


def fake_metrics(root, dataset, protocol, method, domain, seed, views, test_split="holdout", variant=None):
    path = root / f"{variant or method}-{domain}-{seed}"
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({
        "dataset": dataset, "protocol": protocol, "method": method, "variant": variant or method, "formulation": "paper", "test_domain": domain,
        "test_split": test_split, "seed": seed, "views": {k: {"accuracy": v, "total": 10} for k, v in views.items()},
    }))


def test_tables_put_the_papers_numbers_beside_ours(tmp_path):
    for seed, acc in ((0, 97.0), (1, 99.0), (2, 98.0)):
        fake_metrics(tmp_path, "pacs", "domainbed", "alignclip", "art_painting", seed, {"test": acc, "source_val": 90.0})
    fake_metrics(tmp_path, "pacs", "domainbed", "zeroshot", "art_painting", 0, {"test": 96.0, "source_val": 90.0})
    fake_metrics(tmp_path, "oxford_pets", "base2new", "clipood", "", 0, {"base": 95.0, "new": 96.0})
    tables = build_tables(summarise(collect(tmp_path)))
    pacs = tables["domain_shift_pacs"].set_index(["method", "split"])
    row = pacs.loc[("alignclip", "art_painting")]
    assert row["ours_mean"] == pytest.approx(98.0) and row["ours_std"] == pytest.approx(1.0)
    published = paper_results()["domainbed"]["pacs"]["domains"]["art_painting"]["alignclip"]
    assert row["paper"] == pytest.approx(published) and row["diff"] == pytest.approx(98.0 - published)
    assert pacs.loc[("alignclip", "Avg")]["paper"] == pytest.approx(97.3)  # table 1
    pets = tables["base2new_oxford_pets"].set_index("split")
    assert pets.loc["H"]["ours_mean"] == pytest.approx(round(2 * 95 * 96 / 191, 2))
    assert pets.loc["H"]["paper"] == pytest.approx(96.3)  # table 5 (d), CLIPood


def test_ablation_variants_get_their_own_rows_and_the_papers_ablation_numbers(tmp_path):
    fake_metrics(tmp_path, "vlcs", "domainbed", "erm", "SUN09", 0, {"test": 80.0, "source_val": 1.0})
    fake_metrics(tmp_path, "vlcs", "domainbed", "erm", "SUN09", 0, {"test": 77.0, "source_val": 1.0}, variant="erm[pooling=avg]")
    fake_metrics(tmp_path, "vlcs", "domainbed", "alignclip", "SUN09", 0, {"test": 79.0, "source_val": 1.0}, variant="alignclip[eps=0.3]")
    table = build_tables(summarise(collect(tmp_path)))["domain_shift_vlcs"].set_index(["method", "split"])
    assert table.loc[("erm", "SUN09")]["ours_mean"] == 80.0
    assert table.loc[("erm[pooling=avg]", "SUN09")]["ours_mean"] == 77.0
    assert table.loc[("erm[pooling=avg]", "SUN09")]["paper"] == pytest.approx(77.3)  # table 9, CLIP-AP
    assert pd.isna(table.loc[("alignclip[eps=0.3]", "SUN09")]["paper"])  # not reported by the paper


def test_overview_shows_source_validation_and_temperatures_per_variant(tmp_path):
    """The page's per-method section: source_val beside the held-out accuracy, the no-AAL ablation on its own row,
    and the temperatures each variant ran with (from metrics.json)."""
    from alignclip.report import method_overview

    runs = {"erm": (60.0, 80.0), "alignclip": (40.0, 50.0), "alignclip[aal=False]": (62.0, 84.0)}
    for variant, (test, source_val) in runs.items():
        for domain in ("rotated_0", "rotated_75"):
            fake_metrics(tmp_path, "rotated_digits", "domainbed", variant.split("[")[0], domain, 0,
                         {"test": test + (2.0 if domain == "rotated_0" else 0.0), "source_val": source_val}, variant=variant)
    for path in tmp_path.rglob("metrics.json"):
        metrics = json.loads(path.read_text())
        path.write_text(json.dumps({**metrics, "tau": 0.0725768, "aal_tau": None if "aal=False" in str(path) else 0.0725768}))
    rows = {row[0]: row for row in method_overview(collect(tmp_path))["domain_shift_rotated_digits"]}
    assert rows["alignclip"][1:] == ["50.0", "41.0", "2", "0.07258", "0.07258"]
    assert rows["alignclip[aal=False]"][1:4] == ["84.0", "63.0", "2"] and rows["alignclip[aal=False]"][5] == "none"
    assert list(rows) == ["erm", "alignclip", "alignclip[aal=False]"]
    build_report(tmp_path, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Source validation and held-out accuracy per method" in page and "alignclip[aal=False]" in page


def test_variant_labels(digits_prepared, tmp_path):
    from alignclip.methods import get_method, variant_label

    assert variant_label(get_method("erm", pooling="avg")) == "erm[pooling=avg]"
    assert variant_label(get_method("alignclip", aal=False)) == "alignclip[aal=False]"
    assert variant_label(get_method("alignclip", tau="0.01")) == "alignclip[tau=0.01]"
    assert variant_label(get_method("alignclip", tau="model")) == "alignclip"
    assert variant_label(get_method("alignclip", "release"), "release") == "alignclip+release"
    assert variant_label(get_method("clipood", margin_alpha=0.1, bma_beta=0.1), recipe="wild/office_home") == "clipood"
    assert variant_label(get_method("erm", pooling="avg"), hparams={"pooling": "avg"}) == "erm"  # a grid's, no ablation


def test_report_renders_on_a_digits_run(zeroshot_run, digits_prepared, tmp_path):
    page = build_report(zeroshot_run, tmp_path / "report", digits_prepared)
    assert page.exists() and "<table" in page.read_text()
    # the paper's shape: methods x held-out domains and Avg (the long table stays as CSV)
    assert "| method | rotated_30 | Avg | seeds |\n|---|---|---|---|\n| zeroshot |" in (tmp_path / "report" / "domain_shift_rotated_digits.md").read_text()
    # the table's number is the evaluation's, and the average over the one held-out domain is the same number
    accuracy = json.loads((zeroshot_run / "metrics.json").read_text())["views"]["test"]["accuracy"]
    table = pd.read_csv(tmp_path / "report" / "domain_shift_rotated_digits.csv").set_index(["method", "split"])
    assert table.loc[("zeroshot", "rotated_30"), "ours_mean"] == pytest.approx(round(accuracy, 2))
    assert table.loc[("zeroshot", "Avg"), "ours_mean"] == pytest.approx(round(accuracy, 2))
    figures = json.loads((tmp_path / "report" / "report.json").read_text())["figures"]
    assert "attention_maps.png" in figures
    from PIL import Image

    # 5 images of 5 classes x (image, A_c, G and G_DV of the one model): 1.9-inch panels, plus a 1.2-inch strip for
    # the colour bars, at 110 dpi
    image = Image.open(tmp_path / "report" / "attention_maps.png")
    assert image.size == (round(4 * 1.9 * 110), round((5 * 1.9 + 1.2) * 110))
    assert len(set(image.convert("L").getdata())) > 50  # drawn maps, not a blank canvas


def test_top5_figure_draws_probabilities(zeroshot_run, digits_prepared, tmp_path):
    from PIL import Image

    from alignclip.data.prepare import load_prepared
    from alignclip.report import top5_figure

    _, meta = load_prepared(digits_prepared)
    predictions = pd.read_parquet(zeroshot_run / "predictions.parquet")
    assert top5_figure(predictions, predictions, meta["classes"], tmp_path / "top5.png")
    # four images of four classes, one row each (2 inches, plus 0.6 for the legend), two panels (without / with SLS)
    # on 10 inches, at 110 dpi
    assert Image.open(tmp_path / "top5.png").size == (10 * 110, round((4 * 2.0 + 0.6) * 110))
    # the bars are the stored probabilities: each image's top-5 sums to at most 1 and is sorted
    for row in predictions["top5_prob"].head(4):
        probs = [float(p) for p in row.split(",")]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-3


def test_report_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        build_report(tmp_path, tmp_path / "out")


@pytest.fixture(scope="module")
def grid_runs(digits_prepared, tmp_path_factory):
    """A results folder laid out as `dvc repro` writes it, with both formulations of AlignCLIP: sorted by path,
    ``alignclip+release-...`` comes before ``alignclip-...`` ('+' < '-')."""
    root = tmp_path_factory.mktemp("grid") / "runs"
    for method in ("zeroshot", "erm", "alignclip+release", "alignclip"):
        out = root / f"{method}-rotated_30-s0"
        settings = TrainSettings(method=method, test_domain="rotated_30", steps=2, batch_size=4, hflip=False, progress=False)
        train(digits_prepared, out, settings)
        evaluate(digits_prepared, out / "model.pt", out, test_domain="rotated_30")
    return root


def test_figures_name_their_runs_and_use_the_right_ones(grid_runs, digits_prepared, tmp_path):
    from alignclip.report import figure_provenance

    build_report(grid_runs, tmp_path / "report", digits_prepared)
    attention = figure_provenance(tmp_path / "report" / "attention_maps.png")
    runs = {r["variant"]: r for r in attention["runs"]}
    assert list(runs) == ["zeroshot", "erm", "alignclip", "alignclip+release"]
    assert runs["alignclip"]["run"] == "alignclip-rotated_30-s0" and runs["alignclip"]["formulation"] == "paper"
    assert runs["alignclip+release"]["run"] == "alignclip+release-rotated_30-s0"
    assert all(r["test_domain"] == "rotated_30" and r["seed"] == 0 for r in attention["runs"])
    # attention settings read from each checkpoint: the paper's 4 layers / eq. 3, the released 5 layers / renormalised
    assert runs["alignclip"]["attention"]["aligned_layers"] == 4
    assert runs["alignclip"]["attention"]["cls_attn_norm"] == "visual_softmax"
    assert runs["alignclip+release"]["attention"]["aligned_layers"] == 5
    assert runs["alignclip+release"]["attention"]["cls_attn_norm"] == "drop_renorm"
    assert runs["alignclip+release"]["attention"]["aal_tau"] is None
    assert runs["erm"]["attention"]["from"] == "AlignCLIP run beside it"
    # several classes, one image each, in the dataset's order (zero..nine, not alphabetical)
    assert len(attention["classes"]) == len(set(attention["classes"])) >= 4
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert attention["classes"] == sorted(attention["classes"], key=digits.index)
    top5 = figure_provenance(tmp_path / "report" / "top5.png")
    assert top5["runs"]["with_sls"]["run"] == "alignclip-rotated_30-s0"
    assert top5["runs"]["without_sls"]["run"] == "erm-rotated_30-s0"
    assert len(set(top5["classes"])) == len(top5["classes"]) >= 4
    curves = figure_provenance(tmp_path / "report" / "training_curves.png")
    assert {r["run"] for r in curves["runs"]} == {"erm-rotated_30-s0", "alignclip-rotated_30-s0", "alignclip+release-rotated_30-s0"}
    # the page names the runs each figure was drawn from
    page = (tmp_path / "report" / "index.html").read_text()
    assert "alignclip-rotated_30-s0" in page and "alignclip+release-rotated_30-s0" in page


def test_page_states_test_sets_seeds_and_split_and_prints_no_none(grid_runs, digits_prepared, tmp_path):
    build_report(grid_runs, tmp_path / "report", digits_prepared)
    page = (tmp_path / "report" / "index.html").read_text()
    markdown = (tmp_path / "report" / "index.md").read_text()
    total = json.loads((grid_runs / "erm-rotated_30-s0" / "metrics.json").read_text())["views"]["test"]["total"]
    for text in (page, markdown):
        assert "None" not in text and "nan" not in text.lower()
        assert f"rotated_30: {total}" in text
        assert "Seeds: 0" in text
        assert "held-out domain's 20% split" in text
        assert "Runs: 4" in text
    # one caption per table
    tables = json.loads((tmp_path / "report" / "report.json").read_text())["tables"]
    assert page.count("Test images:") == len(tables)


def test_similarity_heatmap_orders_classes_meaningfully(tmp_path):
    from alignclip.figures import figure_provenance, plot_similarity

    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    alphabetical = sorted(digits)
    meta = {"dataset": "rotated_digits", "protocol": "domainbed", "classes": alphabetical}
    plot_similarity(np.eye(10), alphabetical, tmp_path / "digits.png", meta=meta)
    assert figure_provenance(tmp_path / "digits.png")["classes"] == digits
    # a DomainBed folder dataset: classes clustered by their text cosine, so the two groups sit side by side
    names = ["apple", "car", "pear", "truck"]
    cosine = np.array([[1, 0, 0.9, 0.1], [0, 1, 0.1, 0.8], [0.9, 0.1, 1, 0], [0.1, 0.8, 0, 1]], dtype=float)
    plot_similarity(cosine, names, tmp_path / "clustered.png", meta={"dataset": "pacs", "protocol": "domainbed", "classes": names},
                    cosine=cosine)
    order = figure_provenance(tmp_path / "clustered.png")["classes"]
    assert abs(order.index("apple") - order.index("pear")) == 1 and abs(order.index("car") - order.index("truck")) == 1


def test_differences_come_from_the_predictions_evaluate_wrote(grid_runs, tmp_path):
    """The paired differences on real evaluate outputs: on the same test images, the point estimate is the difference
    of the two accuracies in metrics.json (one seed each), and the interval brackets it."""
    build_report(grid_runs, tmp_path / "report")
    diffs = pd.read_csv(tmp_path / "report" / "domain_shift_rotated_digits_differences.csv")
    accuracy = {m: json.loads((grid_runs / f"{m}-rotated_30-s0" / "metrics.json").read_text())["views"]["test"]
                for m in ("zeroshot", "erm", "alignclip", "alignclip+release")}
    for method in ("alignclip", "alignclip+release", "erm"):
        for baseline in ("erm", "zeroshot"):
            if method == baseline:
                continue
            row = diffs[(diffs["method"] == method) & (diffs["baseline"] == baseline) & (diffs["column"] == "rotated_30")].iloc[0]
            assert row["diff"] == pytest.approx(accuracy[method]["accuracy"] - accuracy[baseline]["accuracy"])
            assert row["low"] <= row["diff"] <= row["high"] and row["images"] == accuracy[method]["total"]
            # a single domain: its Avg is that domain's difference, with the same resamples
            avg = diffs[(diffs["method"] == method) & (diffs["baseline"] == baseline) & (diffs["column"] == "Avg")].iloc[0]
            assert (avg["diff"], avg["low"], avg["high"]) == pytest.approx((row["diff"], row["low"], row["high"]))
    scores = json.loads((tmp_path / "report" / "scores.json").read_text())["domain_shift_rotated_digits"]
    assert scores["alignclip"]["rotated_30"]["acc_mean"] == pytest.approx(round(accuracy["alignclip"]["accuracy"], 2))
