"""`alignclip grid`: the cells of a configuration's grid (``config.grid``), each trained and evaluated by the same
`alignclip train` and `alignclip evaluate` commands a KFP task runs (``commands.train_args``/``evaluate_args``), called
in this process rather than in a new one per stage.

Why in-process: for the tiny demo model a new process costs more than a cell's work (imports and model load,
8-20 s against a few seconds of training), so the demo's DVC stages run a group of cells each, one worker process
per core (forked after the imports, so each pays them once). Each cell writes its own folder
(``config.cell_dir``: the cell's name with its varied settings, held-out domain and seed) under the output folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alignclip.config import ConfigError, cell_dir, effective_train, grid, is_zeroshot
from alignclip.log import get_logger

log = get_logger(__name__)
PARTS = ("all", "zeroshot", "trained")


def select_cells(values: dict, domains: list[str] | None = None, seeds: list[int] | None = None, part: str = "all") -> list[dict]:
    """The grid's cells of some held-out domains / seeds; ``part``: zero-shot cells only, trained ones only, or all.
    A domain or seed that is not in the grid is refused (a typo would otherwise select nothing)."""
    if part not in PARTS:
        raise ConfigError(f"--part {part!r}: expected one of {', '.join(PARTS)}")
    cells = grid(values)
    if part == "zeroshot" and not any(is_zeroshot(c["method"]) for c in cells):
        # the zero-shot baseline of each held-out domain, whatever train.methods lists (DVC's zero-shot stages)
        cells = [{"method": "zeroshot", "test_domain": d, "hparams": {}, "name": "zeroshot"}
                 for d in values["train_test_domains"] or [""]]
    for flag, chosen, known in (("--test-domain", domains, values["train_test_domains"]), ("--seed", seeds, values["train_seeds"])):
        unknown = [c for c in chosen or [] if c not in known]
        if unknown:
            raise ConfigError(f"{flag} {unknown[0]!r}: not in the grid's {known}")
    return [c for c in cells
            if (not domains or c["test_domain"] in domains)
            and (not seeds or c.get("seed") is None or c["seed"] in seeds)
            and (part == "all" or (part == "zeroshot") == is_zeroshot(c["method"]))]


def cell_commands(values: dict, prepared: str, out: str, cell: dict, similarity: str | None) -> tuple[list[str], list[str]]:
    """The `alignclip train` and `alignclip evaluate` arguments of one cell: the KFP tasks' own (commands.py), with
    every training setting explicit (the effective values of the resolved configuration)."""
    from alignclip.commands import evaluate_args, train_args

    train = effective_train(values)
    cmd = train_args(prepared, out, cell, values["train_formulation"], values["train_recipe"], int(train["steps"] or 0),
                     int(train["epochs"] or 0), int(train["batch_size"]), float(train["lr"]), bool(train["hflip"]),
                     values["model_name"], values["model_pretrained"], similarity or "")
    if not similarity or is_zeroshot(cell["method"]):  # zero-shot has no loss to smooth: it reads no similarity
        at = cmd.index("--similarity")
        del cmd[at:at + 2]
    if not is_zeroshot(cell["method"]):  # the schema's settings that the KFP task's arguments do not carry (yet)
        cmd += ["--weight-decay", repr(float(values["train_weight_decay"]))]
    from alignclip import artifacts

    evaluate = evaluate_args(prepared, str(Path(out) / artifacts.MODEL), out, values["data_test_split"])
    return cmd, evaluate + ["--batch-size", str(int(values["evaluate_batch_size"]))]


# The command runner: the CLI's own `app` (parsing and checks included), given by the CLI itself (``run_cells``'s
# ``run_command``), so this module needs nothing of the CLI above it. Set before the worker pool forks: every worker
# inherits it.
_run_command = None


def _run_cell(job: tuple) -> tuple[str, dict]:
    from alignclip.resume import Preempted

    name, train_cmd, evaluate_cmd = job
    try:
        _run_command(train_cmd)
        _run_command(evaluate_cmd)
    except Preempted:
        raise
    except Exception as err:  # the one line the user sees names the cell; its own command reproduces it
        raise RuntimeError(f"grid cell {name}: {err}") from None
    from alignclip import artifacts

    scores = Path(evaluate_cmd[3]) / artifacts.SCORES
    return name, json.loads(scores.read_text())


def preload_images(prepared: str | Path) -> int:
    """Decode the prepared dataset's images once, before the workers fork: every cell's training and evaluation
    datasets then read the shared copies (``images.preload``) instead of decoding the same files again, up to the
    memory that training keeps decoded images in (``train.IN_MEMORY_BYTES``; the embedded digits: 1,797 images,
    5.5 MB). The images and their order are the same: only the decoding is shared."""
    from alignclip.data import images
    from alignclip.data.prepare import load_prepared
    from alignclip.train import IN_MEMORY_BYTES

    manifest, meta = load_prepared(prepared)
    held = images.preload(meta, manifest["path"].tolist(), IN_MEMORY_BYTES)
    log.info("%d of %d image(s) decoded once for the cells (shared in memory)", held, len(manifest))
    return held


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: the tiny model gains nothing from a second intra-op thread


def resolve_jobs(jobs: str, cells: int) -> int:
    from alignclip.data.loader import available_cpus

    if str(jobs).lower() == "auto":
        return max(1, min(available_cpus(), cells))
    try:
        count = int(jobs)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"--jobs {jobs!r}: expected a count >= 1 or 'auto'")
    return min(count, max(1, cells))


def run_cells(values: dict, prepared: str, out: str | Path, cells: list[dict], run_command, similarity: str | None = None,
              jobs: str = "auto", scores_path: str | Path | None = None) -> dict:
    """Train and evaluate ``cells`` into ``out/<cell_dir>``, ``jobs`` at a time; {cell_dir: scores}. Each cell's
    `alignclip train` and `alignclip evaluate` arguments are run by ``run_command(argv)`` (the CLI's, in this
    process; errors propagate). With ``scores_path`` the scores are also written there (a DVC metrics file). A
    failed cell stops the run and names the cell; finished cells keep their outputs."""
    global _run_command
    if not cells:
        raise ConfigError("no grid cell selected: check train.methods, --test-domain, --seed and --part")
    out = Path(out)
    jobs_n = resolve_jobs(jobs, len(cells))
    work = []
    for cell in cells:
        folder = cell_dir(cell)
        train_cmd, evaluate_cmd = cell_commands(values, str(prepared), str(out / folder), cell, similarity)
        work.append((folder, train_cmd, evaluate_cmd))
    log.info("%d grid cell(s) -> %s, %d at a time", len(work), out, jobs_n)
    _run_command = run_command
    # the heavy imports before the fork: every worker then starts with them done
    import alignclip.evaluate  # noqa: F401
    import alignclip.train  # noqa: F401

    if len(work) > 1:
        preload_images(prepared)

    scores = {}
    if jobs_n == 1:
        for job in work:
            name, result = _run_cell(job)
            scores[name] = result
    else:
        import multiprocessing

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with multiprocessing.get_context("fork").Pool(jobs_n, initializer=_one_thread) as pool:
            for name, result in pool.imap(_run_cell, work):
                scores[name] = result
    if scores_path is not None:
        from alignclip.publish import atomic_write_text

        atomic_write_text(scores_path, json.dumps(scores, indent=2, sort_keys=True) + "\n")
    return scores
