import json

import pandas as pd
import pytest
import torch
from scipy import stats

from alignclip.methods import get_method
from alignclip.train import TrainSettings, train

STEPS = 24


def settings(method, **kw):
    base = dict(method=method, test_domain="rotated_0", seed=0, steps=STEPS, batch_size=8, lr=1e-3, hflip=False, progress=False)
    base.update(kw)
    return TrainSettings(**base)


@pytest.mark.parametrize("method", ["erm", "clipood", "alignclip"])
def test_every_method_trains_and_its_loss_goes_down(digits_prepared, tmp_path, method):
    summary = train(digits_prepared, tmp_path, settings(method))
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert len(log) == STEPS and summary["steps"] == STEPS
    first, last = log["loss"].iloc[:6].mean(), log["loss"].iloc[-6:].mean()
    assert last < first, (method, first, last)
    assert log["cls_loss"].iloc[-6:].mean() < log["cls_loss"].iloc[:6].mean()
    if method == "alignclip":
        assert {"aal_attn", "aal_sim", "aal"} <= set(log.columns)
        assert (log["aal"] > 0).all()
    state = torch.load(tmp_path / "model.pt", weights_only=False)
    assert state["visual"] is not None and state["method"]["name"] == method


def test_zeroshot_writes_a_pretrained_marker(digits_prepared, tmp_path):
    train(digits_prepared, tmp_path, settings("zeroshot"))
    state = torch.load(tmp_path / "model.pt", weights_only=False)
    assert state["visual"] is None
    assert json.loads((tmp_path / "train.json").read_text())["steps"] == 0


def test_release_formulation_trains(digits_prepared, tmp_path):
    train(digits_prepared, tmp_path, settings("alignclip", formulation="release", steps=6))
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert len(log) == 6 and log["loss"].notna().all()
    state = torch.load(tmp_path / "model.pt", weights_only=False)
    assert state["method"]["kl_direction"] == "reverse" and state["method"]["aligned_layers"] == 5


def test_bma_result_is_the_beta_weighted_average_of_the_iterates(digits_prepared, tmp_path):
    from alignclip.presets import load_clip

    steps, beta = 8, 0.5
    torch.manual_seed(0)
    snapshots = [{k: v.clone() for k, v in load_clip("tiny").model.visual.state_dict().items()}]
    last = {}

    def keep(step, visual, parts):
        snapshots.append({k: v.detach().clone() for k, v in visual.visual.state_dict().items()})
        last.update(snapshots[-1])

    train(digits_prepared, tmp_path, settings("clipood", steps=steps), callbacks=[keep])
    saved = torch.load(tmp_path / "model.pt", weights_only=False)["visual"]
    weights = [stats.beta(beta, beta).pdf((k + 0.5) / (steps + 1)) for k in range(steps + 1)]
    name = "transformer.resblocks.0.attn.in_proj_weight"
    expected = sum(w * s[name] for w, s in zip(weights, snapshots)) / sum(weights)
    assert torch.allclose(saved[name], expected, atol=1e-6)
    assert not torch.allclose(saved[name], last[name])  # the result is the average, not the last weights


def test_bit_for_bit_reproducible_on_cpu(digits_prepared, tmp_path):
    runs = []
    for name in ("a", "b"):
        train(digits_prepared, tmp_path / name, settings("alignclip", steps=8))
        runs.append(torch.load(tmp_path / name / "model.pt", weights_only=False)["visual"])
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    logs = [pd.read_csv(tmp_path / n / "train_log.csv").drop(columns=["images_per_s", "data_wait_s"]) for n in ("a", "b")]
    pd.testing.assert_frame_equal(logs[0], logs[1])


def test_method_registry_rejects_unknown_switches():
    with pytest.raises(ValueError, match="unknown method switch"):
        get_method("alignclip", nonsense=1)
    with pytest.raises(ValueError, match="smoothing="):
        get_method("alignclip", smoothing="fancy")
    assert get_method("alignclip", aal=False).aal is False


def test_unknown_test_domain_is_named(digits_prepared, tmp_path):
    with pytest.raises(ValueError, match="rotated_99"):
        train(digits_prepared, tmp_path, settings("erm", test_domain="rotated_99"))


def test_workers_give_the_same_run_and_values_are_logged_per_step(digits_prepared, tmp_path):
    """A run with 2 DataLoader workers trains on exactly the batches of a run without workers; the log has a row
    per step although its values are read from the device once per window of log_every steps."""
    summaries, states = {}, {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        summaries[workers] = train(digits_prepared, out, settings("erm", steps=6, num_workers=workers, log_every=4))
        states[workers] = torch.load(out / "model.pt", weights_only=False)["visual"]
    for key in states[0]:
        assert torch.equal(states[0][key], states[2][key]), key
    assert summaries[2]["num_workers"] == 2 and summaries[0]["num_workers"] == 0
    log = pd.read_csv(tmp_path / "w2" / "train_log.csv")
    assert log["step"].tolist() == [1, 2, 3, 4, 5, 6]
    # throughput is a figure per window (steps 1-4, then 5-6), end to end, with the wait for data beside it
    assert log["images_per_s"].iloc[:4].nunique() == 1 and log["images_per_s"].iloc[4:].nunique() == 1
    assert (log["images_per_s"] > 0).all() and (log["data_wait_s"] >= 0).all()
    assert summaries[2]["images_per_s"] > 0 and summaries[2]["data_wait_s"] >= 0
    with pytest.raises(ValueError, match="num_workers: expected a count >= 0 or 'auto', got 'lots'"):
        train(digits_prepared, tmp_path / "bad", settings("erm", num_workers="lots"))


def test_runs_record_the_loaded_models_temperature(digits_prepared, tmp_path, tiny):
    """tau of eq. 1 and eq. 4 is the loaded CLIP's 1 / exp(logit_scale), recorded in train.json, the checkpoint
    and metrics.json: about 0.073 for the tiny preset, 0.01 for OpenAI-layout weights with logit scale ln 100,
    the fixed value for `--set tau=...`; evaluation scores with the checkpoint's."""
    import math

    from alignclip.evaluate import evaluate
    from tests.test_presets import save_openai_layout

    openai = tmp_path / "openai-layout.pt"
    save_openai_layout(tiny.model, openai, math.log(100.0))
    expected_tiny = 1.0 / math.exp(float(tiny.model.logit_scale.detach()))
    cases = {
        "tiny": (settings("zeroshot"), expected_tiny, expected_tiny),
        "openai": (settings("zeroshot", pretrained=str(openai)), 0.01, 0.01),
        "align": (settings("alignclip", steps=2, batch_size=4), expected_tiny, expected_tiny),
        "fixed": (settings("alignclip", steps=2, batch_size=4, overrides={"tau": 0.02, "aal_tau": None}), 0.02, None),
    }
    for name, (run, tau, aal_tau) in cases.items():
        out = tmp_path / name
        summary = train(digits_prepared, out, run)
        recorded = json.loads((out / "train.json").read_text())
        checkpoint = torch.load(out / "model.pt", weights_only=False)
        for method in (recorded["method"], checkpoint["method"]):
            assert method["tau"] == pytest.approx(tau, rel=1e-6), name
            assert (method["aal_tau"] is None) if aal_tau is None else method["aal_tau"] == pytest.approx(aal_tau, rel=1e-6), name
        assert recorded["model_tau"] == pytest.approx(0.01 if name == "openai" else expected_tiny, rel=1e-6)
        assert summary["variant"] == checkpoint["variant"] == {"tiny": "zeroshot", "openai": "zeroshot", "align": "alignclip",
                                                               "fixed": "alignclip[aal_tau=None,tau=0.02]"}[name]
        if name in ("openai", "fixed"):
            metrics = evaluate(digits_prepared, out / "model.pt", out, batch_size=64, num_workers=0)
            assert metrics["tau"] == pytest.approx(tau, rel=1e-6)
            assert metrics["aal_tau"] is None if aal_tau is None else metrics["aal_tau"] == pytest.approx(aal_tau, rel=1e-6)


def test_gradient_norms_are_logged_on_log_steps(digits_prepared, tmp_path):
    """Each loss term's gradient norm on step 1 and every log_every-th step (and the last), empty cells elsewhere,
    and the same weights as a run that measures less often (the measurement does not touch the update)."""
    for every in (2, 100):
        train(digits_prepared, tmp_path / str(every), settings("alignclip", steps=5, batch_size=4, log_every=every))
    log = pd.read_csv(tmp_path / "2" / "train_log.csv")
    columns = ["grad_norm_cls_loss", "grad_norm_aal_attn", "grad_norm_aal_sim", "grad_norm_loss"]
    assert set(columns) <= set(log.columns)
    measured = log.dropna(subset=columns)["step"].tolist()
    assert measured == [1, 2, 4, 5] and log[log["step"] == 3][columns].isna().all(axis=None)
    assert (log.dropna(subset=columns)[columns] > 0).all(axis=None)
    sparse = pd.read_csv(tmp_path / "100" / "train_log.csv")
    assert sparse.dropna(subset=columns)["step"].tolist() == [1, 5]
    a, b = (torch.load(tmp_path / n / "model.pt", weights_only=False)["visual"] for n in ("2", "100"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(log.drop(columns=columns + ["images_per_s", "data_wait_s"]),
                                  sparse.drop(columns=columns + ["images_per_s", "data_wait_s"]))
