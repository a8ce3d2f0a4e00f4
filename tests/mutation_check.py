"""Mutation check, run by hand (not collected by pytest): break the production code on purpose, one mutation at a
time, in a temporary copy of the checkout, and show that at least one test fails for each.

    .venv/bin/python tests/mutation_check.py            # every mutation
    .venv/bin/python tests/mutation_check.py --list     # what each one changes
    .venv/bin/python tests/mutation_check.py --only "restore the constant"   # the mutations named so

Each mutation replaces one exact piece of source (it must occur exactly once, so a refactor that moves the code
makes this script say so instead of passing vacuously) and runs only the tests that guard that code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "flip the KL direction of AL (eq. 6: KL(A || G_DV) -> KL(G_DV || A))",
        "alignclip/objective.py",
        'terms["aal_attn"] = losses.kl_divergence(out.cls_attn, g_dv_y).mean()',
        'terms["aal_attn"] = losses.kl_divergence(g_dv_y, out.cls_attn).mean()',
        ("tests/test_objective.py",),
    ),
    Mutation(
        "flip the KL direction of AS (eq. 6: KL(G || G_DV) -> KL(G_DV || G))",
        "alignclip/objective.py",
        "kl = losses.kl_divergence(g, g_dv)",
        "kl = losses.kl_divergence(g_dv, g)",
        ("tests/test_objective.py",),
    ),
    Mutation(
        "flip the KL direction of the released AL (KL(G_DV || A) -> KL(A || G_DV))",
        "alignclip/objective.py",
        'terms["aal_attn"] = losses.kl_batchmean(g_dv_y, out.cls_attn)',
        'terms["aal_attn"] = losses.kl_batchmean(out.cls_attn, g_dv_y)',
        ("tests/test_objective.py",),
    ),
    Mutation(
        "drop a term: L_AAL left out of the total loss",
        "alignclip/objective.py",
        "total = total + method.aal_weight * aal",
        "total = total",
        ("tests/test_objective.py",),
    ),
    Mutation(
        "drop a term: the semantic part of SLS (eq. 9)",
        "alignclip/losses.py",
        "return ((1.0 - eps) * ce + eps * semantic).mean()",
        "return ((1.0 - eps) * ce).mean()",
        ("tests/test_objective.py",),
    ),
    Mutation(
        "change a weight: aal_weight ignored",
        "alignclip/objective.py",
        "total = total + method.aal_weight * aal",
        "total = total + aal",
        ("tests/test_objective.py",),
    ),
    Mutation(
        "change a weight: lambda (sls_weight) ignored",
        "alignclip/objective.py",
        'total = method.sls_weight * cls_loss if method.smoothing in ("sls", "sls_release") else cls_loss',
        "total = cls_loss",
        ("tests/test_objective.py",),
    ),
    Mutation(
        "change a weight: eps default 0.1 -> 0.2",
        "alignclip/methods.py",
        "eps: float = 0.1  # smoothing factor epsilon",
        "eps: float = 0.2  # smoothing factor epsilon",
        ("tests/test_objective.py",),
    ),
    Mutation(
        "restore the constant: the loaded CLIP's tau read as 0.01 whatever its logit_scale",
        "alignclip/clip_factory.py",
        "    tau = pretrained_tau(model)\n",
        "    tau = 0.01\n",
        ("tests/test_objective.py", "tests/test_presets.py::test_tau_is_read_from_the_loaded_weights"),
    ),
    Mutation(
        "restore the constant: eq. 1's tau defaults to 0.01 instead of the model's",
        "alignclip/methods.py",
        '    tau: float | str = "model"',
        "    tau: float | str = 0.01",
        ("tests/test_objective.py",),
    ),
    Mutation(
        "restore the constant: eq. 4's aal_tau defaults to 0.01 instead of the model's",
        "alignclip/methods.py",
        '    aal_tau: float | str | None = "model"',
        "    aal_tau: float | str | None = 0.01",
        ("tests/test_objective.py",),
    ),
    Mutation(
        "restore the constant: the release formulation's margin logits x 100 instead of logit_scale.exp()",
        "alignclip/methods.py",
        '    "aal_tau": None,\n',
        '    "aal_tau": None,\n    "tau": 0.01,\n',
        ("tests/test_objective.py",),
    ),
    Mutation(
        "restore the constant: evaluation scores at tau 0.01 instead of training's",
        "alignclip/evaluate.py",
        "    tau = checkpoint_tau(state, bundle)",
        "    tau = 0.01",
        ("tests/test_evaluate_report.py::test_accuracy_matches_an_independent_open_clip_computation",),
    ),
    Mutation(
        "gradient norms of the alignment terms measured without their weight",
        "alignclip/objective.py",
        "contributions.update({k: method.aal_weight * v for k, v in terms.items()})",
        "contributions.update({k: v for k, v in terms.items()})",
        ("tests/test_objective.py::test_measured_gradient_norms_are_each_terms_gradient_and_leave_the_update_alone",),
    ),
    Mutation(
        "swap the held-out cut: the held-out domain's 20% split -> its 80% split",
        "alignclip/protocols/domainbed.py",
        'target = target[target["split"] == "val"]',
        'target = target[target["split"] == "train"]',
        ("tests/test_prepare.py::test_leave_one_domain_out_views", "tests/test_artifacts.py"),
    ),
    Mutation(
        "swap the held-out cut: train on the held-out domain instead of the others",
        "alignclip/protocols/domainbed.py",
        'return train[train["domain"] != test_domain], list(range(len(meta["classes"])))',
        'return train[train["domain"] == test_domain], list(range(len(meta["classes"])))',
        ("tests/test_prepare.py::test_leave_one_domain_out_views",),
    ),
    Mutation(
        "model selection reads test accuracies instead of source-validation ones",
        "alignclip/selection.py",
        'rows = results[results["view"] == VALIDATION_VIEW]',
        'rows = results[results["view"] == "test"]',
        ("tests/test_stats.py",),
    ),
    Mutation(
        "unpaired bootstrap: the baseline's images resampled independently of the method's",
        "alignclip/stats.py",
        "    samples = 100.0 * bootstrap_means(per_image, key)",
        "    samples = 100.0 * (bootstrap_means(np.atleast_2d(method).mean(0), key)"
        " - bootstrap_means(np.atleast_2d(baseline).mean(0), key + '/baseline'))",
        ("tests/test_stats.py",),
    ),
]


def copy_checkout(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def run_tests(copy: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(copy), HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=copy, env=env, capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutations and exit")
    parser.add_argument("--only", default="", help="only the mutations whose name contains this text")
    args = parser.parse_args()
    mutations = [m for m in MUTATIONS if args.only in m.name]
    if args.list:
        for m in mutations:
            print(f"{m.name}\n    {m.path}: {m.old!r}\n    -> {m.new!r}\n    guarded by {', '.join(m.tests)}")
        return 0
    survived = 0
    with tempfile.TemporaryDirectory(prefix="alignclip-mutation-") as tmp:
        copy = Path(tmp)
        copy_checkout(copy)
        check = subprocess.run([sys.executable, "-c", "import alignclip; print(alignclip.__file__)"], cwd=copy,
                               env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True, check=True)
        if not check.stdout.strip().startswith(str(copy)):
            raise SystemExit(f"the copy's alignclip is not the one imported ({check.stdout.strip()})")
        for m in mutations:
            path = copy / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                raise SystemExit(f"{m.path}: expected exactly one {m.old!r} (found {original.count(m.old)}); update this script")
            path.write_text(original.replace(m.old, m.new))
            tic = time.perf_counter()
            done = run_tests(copy, m.tests)
            path.write_text(original)
            failed = [line.split(" ")[1] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
            verdict = "killed" if done.returncode != 0 else "SURVIVED"
            survived += done.returncode == 0
            print(f"{verdict:8s} {m.name}  ({time.perf_counter() - tic:.0f}s)")
            for name in failed:
                print(f"           failing: {name}")
        # the unmutated copy passes the same tests, so a kill is the mutation's doing
        baseline = run_tests(copy, tuple(sorted({t for m in mutations for t in m.tests})))
        print(f"{'passes' if baseline.returncode == 0 else 'FAILS'}   unmutated copy, same tests")
    print(f"{len(mutations) - survived}/{len(mutations)} mutations killed")
    return 1 if survived or baseline.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
