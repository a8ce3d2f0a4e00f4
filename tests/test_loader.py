"""The training/evaluation loader: worker sizing, settings, exactly-once reading per pass, reproducibility, resume."""

import collections

import pytest
import torch

from alignclip import storage
from alignclip.data.images import ManifestImages, train_transform
from alignclip.data.loader import (
    BalancedBatchSampler,
    BalancedLoader,
    available_cpus,
    cgroup_cpu_limit,
    evaluation_loader,
    loader_options,
    resolve_workers,
    seed_worker,
)
from alignclip.data.prepare import load_prepared

SIZES = (12, 20)  # two training domains of different sizes
PER_DOMAIN = 4


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(v2) == 2.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "v1") == 3.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path / "v1") is None
    assert cgroup_cpu_limit(tmp_path / "nothing") is None


def test_available_cpus_follow_affinity_and_quota(monkeypatch):
    import alignclip.data.loader as loader

    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(loader, "cgroup_cpu_limit", lambda: 2.5)
    assert available_cpus() == 3  # quota 2.5 CPUs -> 3 processes can run
    assert resolve_workers("auto") == 2  # one CPU stays with the main process
    monkeypatch.setattr(loader, "cgroup_cpu_limit", lambda: None)
    assert available_cpus() == 8 and resolve_workers("auto") == 7
    monkeypatch.setattr(loader.os, "sched_getaffinity", lambda pid: {0, 1})
    assert resolve_workers("auto") == 0  # two CPUs: reading in the main process is faster than one worker


def test_worker_count_setting():
    assert resolve_workers(3) == 3 and resolve_workers("5") == 5 and resolve_workers("0") == 0
    for bad in (-1, "many", "1.5"):
        with pytest.raises(ValueError, match="num_workers: expected a count >= 0 or 'auto'"):
            resolve_workers(bad)


def test_loader_options_on_cuda_and_cpu():
    cuda = loader_options(4, "cuda")
    assert cuda["pin_memory"] is True and cuda["persistent_workers"] is True
    assert cuda["prefetch_factor"] == 4 and cuda["worker_init_fn"] is seed_worker and cuda["num_workers"] == 4
    assert loader_options(0, "cpu") == {"num_workers": 0, "pin_memory": False}


def test_every_pass_holds_each_image_of_a_domain_once():
    sampler = BalancedBatchSampler(SIZES, PER_DOMAIN, seed=3, total_steps=30)
    batches = [sampler.indices(s) for s in range(30)]
    for domain, (offset, size) in enumerate(zip((0, SIZES[0]), SIZES)):
        stream = [i for b in batches for i in b[domain * PER_DOMAIN : (domain + 1) * PER_DOMAIN]]
        assert all(offset <= i < offset + size for i in stream)
        passes = [stream[k : k + size] for k in range(0, len(stream) - size + 1, size)]
        assert len(passes) == 30 * PER_DOMAIN // size
        for order in passes:
            assert sorted(order) == list(range(offset, offset + size))
        assert passes[0] != passes[1]  # reshuffled each pass
    assert BalancedBatchSampler(SIZES, PER_DOMAIN, seed=4, total_steps=1).indices(0) != batches[0]


def domains(prepared, transform):
    manifest, meta = load_prepared(prepared)
    groups = [g for _, g in manifest.groupby("domain", sort=True)][: len(SIZES)]
    label_space = sorted(manifest["label"].unique().tolist())
    return [
        ManifestImages(meta, g["path"].tolist()[:n], g["label"].tolist()[:n], label_space, transform)
        for g, n in zip(groups, SIZES)
    ]


@pytest.fixture()
def read_log(monkeypatch, tmp_path):
    """Every image decode, in any process (workers are forked and inherit the patch), appended to a file."""
    log = tmp_path / "reads.txt"
    open_image = storage.open_image

    def logged(path):
        with open(log, "a") as handle:
            handle.write(path + "\n")
        return open_image(path)

    monkeypatch.setattr(storage, "open_image", logged)
    return log


def test_with_workers_every_image_is_read_exactly_once_per_pass(digits_prepared, read_log):
    data = domains(digits_prepared, train_transform(32, (0.5,) * 3, (0.5,) * 3))
    steps = 15  # 60 reads per domain: 5 passes of the first (12 images), 3 of the second (20 images)
    loader = BalancedLoader(data, PER_DOMAIN, seed=0, total_steps=steps, num_workers=2)
    batches = list(loader)
    assert len(batches) == steps and loader.step == steps
    assert all(images.shape == (len(SIZES) * PER_DOMAIN, 3, 32, 32) for images, _ in batches)
    reads = collections.Counter(read_log.read_text().split())
    for dataset, size in zip(data, SIZES):
        assert {reads[p] for p in dataset.paths} == {steps * PER_DOMAIN // size}
    assert sum(reads.values()) == steps * PER_DOMAIN * len(SIZES)  # workers read nothing beyond the last step


def test_batches_are_the_same_for_any_worker_count_and_after_resume(digits_prepared):
    data = domains(digits_prepared, train_transform(32, (0.5,) * 3, (0.5,) * 3))
    runs = {w: list(BalancedLoader(data, PER_DOMAIN, seed=1, total_steps=6, num_workers=w)) for w in (0, 2)}
    for (a, ya), (b, yb) in zip(runs[0], runs[2]):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(runs[0][0][0], runs[0][1][0])
    # stop after 4 batches, save, restore into a new loader: the last 2 batches are the ones the full run had
    first = BalancedLoader(data, PER_DOMAIN, seed=1, total_steps=6, num_workers=2)
    for _ in zip(range(4), first):
        pass
    state = first.state_dict()
    assert state["step"] == 4 and state["seed"] == 1
    resumed = BalancedLoader(data, PER_DOMAIN, seed=99, total_steps=6, num_workers=1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 2
    for (a, _), (b, _) in zip(rest, runs[0][4:]):
        assert torch.equal(a, b)
    other = BalancedLoader(data[:1], PER_DOMAIN, seed=1, total_steps=6)
    with pytest.raises(ValueError, match="domain_sizes"):
        other.load_state_dict(state)


def test_evaluation_loader_keeps_the_order(digits_prepared):
    from alignclip.data.images import eval_transform

    data = domains(digits_prepared, eval_transform(32, (0.5,) * 3, (0.5,) * 3))[1]
    loader = evaluation_loader(data, batch_size=8, num_workers=2, device="cpu")
    indices = torch.cat([index for _, _, index in loader])
    assert indices.tolist() == list(range(len(data)))


@pytest.fixture()
def shared_images():
    from alignclip.data import images

    images.clear_preloaded()
    yield images
    images.clear_preloaded()


def test_preloaded_images_give_the_same_batches_and_are_decoded_once_for_every_dataset(digits_prepared, read_log,
                                                                                       shared_images):
    """`alignclip grid` decodes the dataset once before forking its cells (images.preload): every dataset, training
    (in this process or in workers) and evaluation, then reads the shared copies, and its batches are the same."""
    from alignclip.data.images import collate_readable, eval_transform

    transform = train_transform(32, (0.5,) * 3, (0.5,) * 3)
    plain = list(BalancedLoader(domains(digits_prepared, transform), PER_DOMAIN, seed=2, total_steps=8))
    manifest, meta = load_prepared(digits_prepared)
    read_log.unlink()
    assert shared_images.preload(meta, manifest["path"].tolist(), 2**30) == len(manifest)
    assert len(read_log.read_text().split()) == len(manifest)  # one decode per image of the manifest
    read_log.unlink()
    for workers in (0, 2):
        shared = list(BalancedLoader(domains(digits_prepared, transform), PER_DOMAIN, seed=2, total_steps=8,
                                     num_workers=workers))
        assert len(shared) == len(plain)
        for (a, ya), (b, yb) in zip(plain, shared):
            assert torch.equal(a, b) and torch.equal(ya, yb)
    evaluation = domains(digits_prepared, eval_transform(32, (0.5,) * 3, (0.5,) * 3))[1]
    evaluation.skip_unreadable = True
    assert sum(len(t) for _, t, _ in evaluation_loader(evaluation, 8, 0, "cpu", collate_fn=collate_readable)) == SIZES[1]
    assert not read_log.exists()  # nothing was decoded again
    # the budget: decoded bytes held, and the images past it are read from their files as before
    shared_images.clear_preloaded()
    one = 32 * 32 * 3
    assert shared_images.preload(meta, manifest["path"].tolist(), 5 * one) == 5


def test_a_preloaded_image_is_still_checked_against_the_reading_datasets_roots(digits_prepared, shared_images):
    manifest, meta = load_prepared(digits_prepared)
    shared_images.preload(meta, manifest["path"].tolist(), 2**30)
    dataset = domains(digits_prepared, train_transform(32, (0.5,) * 3, (0.5,) * 3))[0]
    assert dataset.paths[0] in shared_images._SHARED
    dataset.roots = ["/nonexistent-root"]  # a dataset whose roots do not hold these files
    dataset.skip_unreadable = True
    assert dataset[0] is None and dataset.skipped == [dataset.paths[0]]
