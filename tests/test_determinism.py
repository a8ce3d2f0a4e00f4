"""The same bytes on any x86-64 CPU (alignclip/determinism.py): builds of the tiny weights, and a short `alignclip
train` + `alignclip evaluate`, under two hosts' kernel choices; the CLI's decision which runs to pin; and the
README's sha256 against what `alignclip pretrain` builds.
The rest of the suite runs the native kernels (tests/conftest.py); the runs here name their mode explicitly."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alignclip import determinism

ROOT = Path(__file__).resolve().parents[1]

# A shortened build through the code `alignclip pretrain` runs: the CLI's pinning decision for `pretrain`, then
# pretrain.build (sources, model, batches, optimiser, save) on a short schedule.
BUILD = """
import json, sys
from dataclasses import replace
from alignclip import determinism
determinism.pin_for_command(["pretrain", sys.argv[1]])
from alignclip import pretrain
settings = replace(pretrain.PretrainSettings(), variants=1, val_variants=1, steps=4, batch_size=16, warmup_steps=2)
summary = pretrain.build(sys.argv[1], settings)
print(json.dumps({"sha256": summary["sha256"], "cpu": summary["cpu"]}))
"""


def _hosts() -> dict[str, dict]:
    """Two CPU kinds, emulated on this one: what ATen, MKL, oneDNN and numpy would choose on each (their own
    variables cap the ISA they dispatch to). An AVX-512 machine plays an AVX2-only host and an AVX-512 host; an
    AVX2 machine plays an AVX-only host and itself."""
    flags = determinism.cpu_flags()
    if "avx2" not in flags:
        pytest.skip("this CPU has no AVX2: there is no second kernel choice to emulate")
    avx2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}
    if "avx512f" in flags:
        return {"avx2": avx2, "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                                         "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}}
    return {"avx": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX", "ONEDNN_MAX_CPU_ISA": "AVX",
                    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"}, "avx2": avx2}


def _build_on_hosts(tmp_path, kernels: str) -> dict[str, dict]:
    """The short build once per emulated host, all at once (separate processes: the kernels are chosen when
    torch loads), in ``kernels`` mode."""
    processes = {}
    for host, variables in _hosts().items():
        env = {k: v for k, v in os.environ.items() if k not in determinism.PORTABLE_ENVIRONMENT}  # a fresh shell's
        env.update(variables, ALIGNCLIP_CPU_KERNELS=kernels, OMP_NUM_THREADS="1")
        out = tmp_path / f"{kernels}-{host}.pt"
        processes[host] = (out, subprocess.Popen([sys.executable, "-c", BUILD, str(out)], env=env, cwd=tmp_path,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for host, (out, process) in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
        results[host] = result
    return results


@pytest.mark.slow
def test_builds_for_two_cpu_kinds_are_byte_identical_with_the_portable_kernels_and_differ_without(tmp_path):
    portable = _build_on_hosts(tmp_path, "portable")
    native = _build_on_hosts(tmp_path, "native")
    hosts = list(portable)
    # Without pinning, the emulated hosts really compute with different kernels, and the bytes differ: this is
    # what the test would see if the pinning stopped working.
    assert native[hosts[0]]["cpu"]["aten_cpu_capability"] != native[hosts[1]]["cpu"]["aten_cpu_capability"]
    assert native[hosts[0]]["sha256"] != native[hosts[1]]["sha256"], native
    # With it, they write the same bytes...
    assert portable[hosts[0]]["sha256"] == portable[hosts[1]]["sha256"], portable
    # ... having run ATen's AVX2 build, MKL's AVX2 branch, no oneDNN or NNPACK, one thread.
    for result in portable.values():
        cpu = result["cpu"]
        assert (cpu["aten_cpu_capability"], cpu["mkl_cbwr"], cpu["mkldnn"], cpu["nnpack"], cpu["threads"]) == \
            ("AVX2", "AVX2", False, False, 1), cpu
        assert cpu["deterministic"] and cpu["cpu_kernels"] == "portable"


@pytest.fixture
def environment(monkeypatch):
    """A private copy of the environment for pin_process to write into."""
    env = {k: v for k, v in os.environ.items() if k not in determinism.PORTABLE_ENVIRONMENT and k != determinism.MODE_VARIABLE}
    monkeypatch.setattr(os, "environ", env)
    return env


@pytest.mark.parametrize("argv, pinned", [
    (["pretrain", "out"], True),
    (["similarity", "prepared", "out"], True),
    (["grid", "prepared", "runs", "--part", "trained"], True),  # its cells train and evaluate in this process
    (["train", "prepared", "out", "--device", "cpu"], True),
    (["--log-level", "DEBUG", "evaluate", "prepared", "model.pt", "out", "--device=cpu"], True),
    (["train", "prepared", "out", "--device", "cuda"], False),  # a GPU run is left as it is
    (["evaluate", "prepared", "model.pt", "out", "--device=cuda:1"], False),
    (["train", "--help"], False),
    (["report", "runs", "out"], False),
    (["pipeline", "compile", "demo"], False),
    ([], False),
])
def test_the_cli_pins_its_cpu_runs_and_only_those(environment, argv, pinned):
    assert determinism.pin_for_command(argv) is pinned
    assert all((environment.get(k) == v) is pinned for k, v in determinism.portable_environment().items()), environment


def test_pretrain_is_pinned_on_a_machine_with_a_gpu(environment, monkeypatch):
    """`pretrain` has no --device: it builds on the CPU wherever it runs, so a visible GPU does not unpin it (the
    weights it caches are named after the portable kernels). Mutation: deciding by `--device auto` fails this."""
    monkeypatch.setattr(determinism, "_gpu_visible", lambda: True)
    assert determinism.pin_for_command(["pretrain", "out"])
    assert environment["ATEN_CPU_CAPABILITY"] == determinism.portable_environment()["ATEN_CPU_CAPABILITY"]
    for name in determinism.PORTABLE_ENVIRONMENT:
        environment.pop(name, None)  # the baseline level sets no MKL_ENABLE_INSTRUCTIONS
    assert not determinism.pin_for_command(["train", "prepared", "out"])  # a GPU run is left as it is
    assert not set(determinism.PORTABLE_ENVIRONMENT) & set(environment)


def test_device_auto_is_pinned_when_no_gpu_is_visible_and_native_mode_pins_nothing(environment):
    environment["CUDA_VISIBLE_DEVICES"] = ""
    assert determinism.pin_for_command(["train", "prepared", "out"])
    expected = ("avx2", "AVX2") if determinism.cpu_has_avx2() else ("default", "COMPATIBLE")
    assert (environment["ATEN_CPU_CAPABILITY"], environment["MKL_CBWR"]) == expected
    for name in determinism.PORTABLE_ENVIRONMENT:
        environment.pop(name, None)  # the baseline level sets no MKL_ENABLE_INSTRUCTIONS
    environment[determinism.MODE_VARIABLE] = "native"
    assert not determinism.pin_for_command(["pretrain", "out"])
    assert not set(determinism.PORTABLE_ENVIRONMENT) & set(environment)
    environment[determinism.MODE_VARIABLE] = "fast"
    with pytest.raises(ValueError, match="ALIGNCLIP_CPU_KERNELS='fast': expected one of portable, native"):
        determinism.pin_for_command(["pretrain", "out"])


def test_the_kernel_level_follows_the_cpus_flags():
    """AVX2 and FMA: ATen's AVX2 build and MKL's AVX2 branch; without either (or off x86-64): the baseline (ATen
    DEFAULT, MKL COMPATIBLE), since ATen would run AVX2 code on a CPU that lacks it. Mutation: pinning avx2
    unconditionally fails the second half."""
    assert determinism.cpu_has_avx2({"sse2", "avx", "avx2", "fma", "avx512f"})
    assert not determinism.cpu_has_avx2({"sse2", "avx", "fma"}) and not determinism.cpu_has_avx2({"avx2"})
    avx2, baseline = determinism.portable_environment(True), determinism.portable_environment(False)
    assert (avx2["ATEN_CPU_CAPABILITY"], avx2["MKL_CBWR"], avx2["MKL_ENABLE_INSTRUCTIONS"]) == ("avx2", "AVX2", "AVX2")
    assert (baseline["ATEN_CPU_CAPABILITY"], baseline["MKL_CBWR"]) == ("default", "COMPATIBLE")
    assert "MKL_ENABLE_INSTRUCTIONS" not in baseline
    assert {k: v for k, v in avx2.items() if k not in determinism.BASELINE_KERNELS and k != "MKL_ENABLE_INSTRUCTIONS"} == \
        {k: v for k, v in baseline.items() if k not in determinism.BASELINE_KERNELS} == {
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}


@pytest.mark.slow
def test_the_readme_states_the_sha256_that_alignclip_pretrain_builds(tmp_path):
    """The sha256 the README gives for the tiny weights on this CPU's vendor ("on an Intel ...: sha256 `hex…`",
    "on an AMD ...: sha256 `hex…`": the portable kernels were measured to differ between vendors) is (a prefix of)
    what the CLI builds, here, with the portable kernels, into an empty cache, when an unpinned process (a GPU task's)
    asks for the weights. Mutation: building in the asking process (its host kernels, cached under the portable
    name) fails the kernels check; a README value that is not this build fails the last."""
    vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("vendor_id")), "")
    name = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(vendor)
    if name is None:
        pytest.skip(f"the README states no sha256 for CPU vendor {vendor!r}")
    readme = (ROOT / "README.md").read_text()
    stated = re.findall(rf"on an? {name}[^:`]*: sha256 `([0-9a-f]{{12,64}})(?:…|\.\.\.)?`", readme)
    if not stated and re.search(rf"not measured on an? {name}", readme):
        pytest.skip(f"the README says the current weights were not measured on an {name} CPU")
    assert stated, f"README.md states no sha256 of the tiny weights for {name} (on an {name} ...: sha256 `<hex>…`)"
    # The weights as a GPU task asks for them: a process in the default (portable) mode that is not pinned, so its
    # own kernels are the host's; it must not build them itself but have the CLI's `alignclip pretrain` build them,
    # pinned, under the portable name (alignclip.pretrain.cached_weights). Neither the portable environment nor the
    # suite's ALIGNCLIP_CPU_KERNELS=native (conftest.py) is passed on; a cache of its own.
    env = {k: v for k, v in os.environ.items() if k not in determinism.PORTABLE_ENVIRONMENT and k != determinism.MODE_VARIABLE}
    env["ALIGNCLIP_CACHE"] = str(tmp_path / "cache")
    env.pop("ALIGNCLIP_WEIGHTS_PATH", None)  # no shipped weights: they must be built
    script = ("import json; from alignclip import determinism, presets, pretrain; import torch; "
              "print(json.dumps([determinism.kernels() != pretrain.build_kernels(), presets.resolve_weights('alignclip:digits'), "
              "pretrain.build_kernels()]))")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    unpinned, path, kernels = json.loads(done.stdout.strip().splitlines()[-1])
    assert unpinned and Path(path).parent == tmp_path / "cache" / "pretrained"
    weights = Path(path)
    built = hashlib.sha256(weights.read_bytes()).hexdigest()
    summary = json.loads(weights.with_suffix(".json").read_text())
    assert summary["sha256"] == built
    level = "AVX2" if determinism.cpu_has_avx2() else "DEFAULT"
    assert summary["cpu"]["cpu_kernels"] == "portable" and summary["cpu"]["aten_cpu_capability"] == level
    assert {k: summary["cpu"][k] for k in kernels} == kernels  # the name's kernels are what the build ran
    stale = [s for s in stated if not built.startswith(s)]
    assert not stale, f"README.md states sha256 {stale}; `alignclip pretrain` builds {built}"


# `alignclip train` and then `alignclip evaluate` of its model.pt, in one process per host (each process start
# costs seconds of CPU), through the CLI's own entry point (cli.main: its pinning, its commands), recording on the
# way every logits tensor the evaluation computes (alignclip.evaluate.predict's cosine_logits), in full float32:
# predictions.parquet keeps only the argmax and four-decimal probabilities, too coarse to show a last-bit
# difference.
TRAIN_THEN_EVALUATE = """
import json, sys
from alignclip import determinism
train_argv, evaluate_argv, logits_out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
assert determinism.pin_for_command(train_argv) == determinism.pin_for_command(evaluate_argv)  # before torch loads
import torch
from alignclip import evaluate, cli

def run(argv):
    sys.argv = ["alignclip", *argv]
    try:
        cli.main()
    except SystemExit as exit:
        return exit.code or 0
    return 0

code = run(train_argv)
if code:
    sys.exit(code)
recorded, original = [], evaluate.cosine_logits
def recording(*args, **kwargs):
    logits = original(*args, **kwargs)
    recorded.append(logits.detach().clone())
    return logits
evaluate.cosine_logits = recording
code = run(evaluate_argv)
if code == 0:
    assert recorded, "evaluate computed no logits through alignclip.evaluate.cosine_logits"
    torch.save(recorded, logits_out)
sys.exit(code)
"""


def _run_on_hosts(commands: dict[str, list[str]], kernels: str, tmp_path) -> None:
    """One command per emulated host, all at once (the kernels are chosen when torch loads), in ``kernels`` mode,
    each with its own MLflow store and cache; each must succeed."""
    processes = {}
    for host, variables in _hosts().items():
        env = {k: v for k, v in os.environ.items() if k not in determinism.PORTABLE_ENVIRONMENT}  # a fresh shell's
        for name in ("ALIGNCLIP_CHECKPOINT_ROOT", "ALIGNCLIP_CHECKPOINT_DIR"):
            env.pop(name, None)
        home = tmp_path / f"{kernels}-{host}"
        env.update(variables, ALIGNCLIP_CPU_KERNELS=kernels, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_TRACKING_URI=f"file:{home}/mlruns",
                   ALIGNCLIP_CACHE=str(home / "cache"))
        processes[host] = subprocess.Popen(commands[host], env=env, cwd=home, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
    for host, process in processes.items():
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, f"{host}: {stderr[-3000:]}"


def _train_and_evaluate_on_hosts(tmp_path, prepared, start, kernels: str) -> dict[str, dict]:
    """A short AlignCLIP `alignclip train` (attention alignment, semantic label smoothing, BMA: every kernel of the
    objective) from the same starting weights, then `alignclip evaluate` of its model.pt, under each emulated
    host in ``kernels`` mode; per host: model.pt's and predictions.parquet's bytes, the logits, train.json."""
    hosts = list(_hosts())
    for host in hosts:
        (tmp_path / f"{kernels}-{host}").mkdir()
    out = {host: tmp_path / f"{kernels}-{host}" for host in hosts}
    train = ["train", str(prepared), "{out}/train", "--method", "alignclip", "--test-domain", "rotated_30", "--pretrained",
             str(start), "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--seed", "0", "--num-workers", "0",
             "--no-progress", "--device", "cpu"]
    evaluate = ["evaluate", str(prepared), "{out}/train/model.pt", "{out}/eval", "--batch-size", "64", "--num-workers", "0",
                "--device", "cpu"]
    _run_on_hosts({host: [sys.executable, "-c", TRAIN_THEN_EVALUATE, json.dumps([a.format(out=out[host]) for a in train]),
                          json.dumps([a.format(out=out[host]) for a in evaluate]), str(out[host] / "logits.pt")]
                   for host in hosts}, kernels, tmp_path)
    import torch

    results = {}
    for host in hosts:
        logits = torch.load(out[host] / "logits.pt")
        results[host] = {
            "model": (out[host] / "train" / "model.pt").read_bytes(),
            "predictions": (out[host] / "eval" / "predictions.parquet").read_bytes(),
            "logits": torch.cat(logits),
            "train": json.loads((out[host] / "train" / "train.json").read_text()),
        }
    return results


@pytest.mark.slow
def test_training_and_evaluation_for_two_cpu_kinds_are_byte_identical_with_the_portable_kernels(tmp_path, digits_prepared):
    """`alignclip train` (AlignCLIP: AAL + SLS + BMA, 3 steps of 5 domains x 4 images) and `alignclip evaluate`
    under two emulated CPU kinds: with the portable kernels, model.pt and predictions.parquet are the same bytes
    and every logit the evaluation computed is the same float. With the native kernels the same two runs differ,
    so the identity is the pinning's doing: measured on an AMD EPYC with AVX-512 (playing an AVX2 and an AVX-512
    host), model.pt's bytes differ and the logits by up to 8.3e-6, while predictions.parquet happened to agree (the
    same argmax and four-decimal probabilities), so only the first two are required to differ. Mutation: leaving
    oneDNN on in configure_torch (with this test's state check skipped) gives two different model.pt files."""
    import torch

    from alignclip.presets import load_clip

    start = tmp_path / "start.pt"  # both hosts start from the same bytes: only their kernels differ
    torch.manual_seed(0)
    torch.save(load_clip("tiny", "none").model.state_dict(), start)
    portable = _train_and_evaluate_on_hosts(tmp_path, digits_prepared, start, "portable")
    native = _train_and_evaluate_on_hosts(tmp_path, digits_prepared, start, "native")
    a, b = list(portable)

    for result in portable.values():
        cpu = result["train"]["cpu"]
        assert (cpu["aten_cpu_capability"], cpu["mkl_cbwr"], cpu["mkldnn"], cpu["nnpack"], cpu["threads"]) == \
            ("AVX2", "AVX2", False, False, 1), cpu
        method = result["train"]["method"]
        assert method["aal"] and method["smoothing"] == "sls" and method["bma"], method
    assert native[a]["train"]["cpu"]["aten_cpu_capability"] != native[b]["train"]["cpu"]["aten_cpu_capability"]

    native_logit_spread = (native[a]["logits"] - native[b]["logits"]).abs().max().item()
    differs = {name: native[a][name] != native[b][name] for name in ("model", "predictions")}
    differs["logits"] = not torch.equal(native[a]["logits"], native[b]["logits"])
    assert differs["model"] and differs["logits"], (differs, native_logit_spread)

    assert hashlib.sha256(portable[a]["model"]).hexdigest() == hashlib.sha256(portable[b]["model"]).hexdigest()
    assert portable[a]["predictions"] == portable[b]["predictions"]
    assert portable[a]["logits"].shape == portable[b]["logits"].shape and portable[a]["logits"].numel() > 0
    assert torch.equal(portable[a]["logits"], portable[b]["logits"]), \
        (portable[a]["logits"] - portable[b]["logits"]).abs().max().item()
