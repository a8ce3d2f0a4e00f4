import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")  # the DVC tests' `dvc` processes started an analytics daemon each
os.environ.pop("MLFLOW_TRACKING_URI", None)

# The host's native CPU kernels (alignclip/determinism.py), about 1.2x faster than the portable ones the CLI pins by
# default. Set in the environment before torch loads, so that CLI subprocesses compute with the same kernels (and
# the same thread count) as in-process runs, and the tiny weights cached here are the file their `pretrain` builds.
# Portability itself is proven where it is the property: tests/test_determinism.py runs its builds with
# ALIGNCLIP_CPU_KERNELS=portable. `ALIGNCLIP_CPU_KERNELS=portable make test` runs the whole suite as users' CLI does.
os.environ.setdefault("ALIGNCLIP_CPU_KERNELS", "native")
# one intra-op thread per pytest-xdist worker (the workers share the cores), two without them
THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"))
os.environ.setdefault("MKL_NUM_THREADS", str(THREADS))
from alignclip import determinism  # noqa: E402

determinism.pin_process("cpu")  # nothing in native mode; the CLI's portable environment otherwise

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(determinism.THREADS if determinism.mode() == "portable" else THREADS)


# pytest-xdist hands whole files to its two workers (`--dist loadfile`) in collection order (the Makefile passes
# --no-loadscope-reorder: xdist's default order, by number of tests, started the few-test but slowest file last, and
# one worker idled for four minutes). The costliest files first (longest processing time first), the rest after
# them in their usual order. Seconds of one worker each took in `make test` on the 2-core build machine
# (2026-12-06): image 240 (500 with the image's dependency layer built afresh), services 400, determinism 295,
# tracking resilience 250, storage errors 170, resume 140, MLflow view 75, packaging 60, pipeline 55; the others
# under 50. A stale order costs only time.
COSTLIEST_FIRST = ("test_image.py", "test_services.py", "test_determinism.py", "test_tracking_resilience.py",
                   "test_storage_errors.py", "test_resume.py", "test_mlflow_view.py", "test_packaging.py",
                   "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: index for index, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, the file's order


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    from alignclip.data.digits import build_rotated_digits

    root = tmp_path_factory.mktemp("digits") / "raw"
    build_rotated_digits(root)
    return root


@pytest.fixture(scope="session")
def digits_prepared(digits_root, tmp_path_factory):
    from alignclip.data.prepare import PrepareSettings, prepare, write_prepared

    out = tmp_path_factory.mktemp("prepared")
    manifest, meta = prepare(PrepareSettings("rotated_digits", str(digits_root)))
    write_prepared(manifest, meta, out)
    return out


@pytest.fixture(scope="session")
def tiny():
    from alignclip.presets import load_clip

    torch.manual_seed(0)
    return load_clip("tiny")


@pytest.fixture(autouse=True)
def _tiny_stays_as_loaded(request):
    """The session's tiny CLIP is shared: a test that changes its weights in place would change what later tests
    see (test_pretrain compares it with the cached file). Such a test fails here, by name; copy it instead."""
    if "tiny" not in request.fixturenames:
        yield
        return
    bundle = request.getfixturevalue("tiny")
    before = {name: value.clone() for name, value in bundle.model.state_dict().items()}
    yield
    changed = [name for name, value in bundle.model.state_dict().items() if not torch.equal(value, before[name])]
    assert not changed, f"{request.node.nodeid} changed the shared tiny CLIP in place ({changed[:3]}): deep-copy it"


@pytest.fixture(autouse=True)
def _mlflow_uri_stays_per_test():
    """``mlflow.set_tracking_uri`` is process-global (and exports MLFLOW_TRACKING_URI): a test that sets it would
    redirect every later test's tracking to its store (in CI, tests/test_image.py once sent test_mlflow_view's
    parent run elsewhere). Each test starts and ends with no URI set."""
    import sys

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        if utils._tracking_uri is not None:
            sys.modules["mlflow"].set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None) if before is None else os.environ.update(MLFLOW_TRACKING_URI=before)
