"""The same bytes on every x86-64 CPU with AVX2: portable kernels for the CPU runs of pretrain, similarity, train and
evaluate.

Fixed seeds, one thread and ``torch.use_deterministic_algorithms`` make a CPU run repeat itself on one machine,
but not across CPU kinds: three libraries inside torch pick their kernels from the CPU they find, and kernels of
different vector widths add floats in different orders. Measured on this project's pretraining (an AVX-512 Xeon,
each library told to act as on another host; tests/test_determinism.py), each of the three changes the weights:

* **ATen** (torch's own CPU kernels: element-wise ops, reductions, softmax, layer norm, attention) is built
  several times (DEFAULT, AVX2, AVX512) and dispatches on ``cpuinfo`` unless ``ATEN_CPU_CAPABILITY`` names one.
  torch reads the variable once, on the first kernel it dispatches (``at::native::get_cpu_capability()``, a
  static in aten/src/ATen/native/DispatchStub.cpp), so it must be in the environment before torch runs anything:
  here, before torch is imported. ``avx2`` is the build compiled for AVX2 and FMA, the same machine code on every
  CPU that has them; ``default`` the one for the x86-64 baseline, pinned only where a CPU lacks AVX2 (ATen does not
  check the CPU: ``avx2`` on one without it would stop with an illegal instruction).
  ``torch.backends.cpu.get_cpu_capability()`` says which one a process got.
* **oneMKL** is torch's BLAS on this build (``torch.__config__.show()``: ``BLAS_INFO=mkl``): every float32
  matmul of the tiny CLIP (linear layers, attention products, the convolution's GEMM) is an MKL ``SGEMM`` or
  ``SGEMM_BATCH`` (seen with ``MKL_VERBOSE=1``). MKL dispatches on the CPU (and on its vendor) unless conditional
  numerical reproducibility fixes the code branch: ``MKL_CBWR=AVX2`` is the branch Intel documents for the same
  results "on every Intel CPU supporting Intel AVX2 instructions", given a fixed thread count;
  ``MKL_CBWR=COMPATIBLE`` (SSE2 without the approximate rcpps/rsqrtps instructions) the one for Intel and
  Intel-compatible CPUs, used where AVX2 is missing ("Getting Started with Conditional Numerical
  Reproducibility", "Specifying Code Branches", "Reproducibility Conditions", oneMKL Developer Guide for Linux,
  intel.com/content/www/us/en/docs/onemkl/developer-guide-linux/). ``MKL_VERBOSE=1`` prints ``CNR:AVX2``
  on each call when it is in effect. MKL reads it at its first call; we set it with the rest, before torch loads.
  The AVX2 level replaced the baseline one (ATen DEFAULT, MKL COMPATIBLE) as the default: the baseline did not
  give the same bytes across vendors either (README: an Intel Xeon and an AMD EPYC differ), and it made the demo's
  cells about 2x slower (bench/portable_kernels.py).
* **oneDNN** (mkldnn) runs the tiny CLIP's patch-embedding convolution and the GELU of its MLPs
  (``ONEDNN_VERBOSE=1``: ``convolution`` and ``eltwise_gelu_erf`` primitives each step) with kernels it
  JIT-compiles for the CPU's ISA (``jit:avx10_1_512`` here). ``torch.backends.mkldnn.enabled = False`` sends
  them to ATen's own kernels, which the two settings above pin.
* **NNPACK** then takes the convolution (``aten::_nnpack_spatial_convolution`` in the profile, for batches of 16
  or more): its own x86-64 kernels, tiled by the cache sizes cpuinfo reports, which differ between CPU models.
  ``torch.backends.nnpack.set_flags(False)`` leaves it to ATen's im2col + MKL GEMM (``_slow_conv2d``).

And one intra-op thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS=1``,
``MKL_DYNAMIC=FALSE``): how a reduction is split over threads changes its float sum, and core counts differ
between machines; MKL's CNR holds only for a fixed thread count. ``torch.use_deterministic_algorithms(True)``
and float32 matmul precision "highest" (no bf16/TF32 shortcuts) complete it. The arrays MKL sees are laid out
by torch's allocator (64-byte aligned) and the program's shapes, so their alignment is the same on every host.

What is not pinned, and why the bytes still agree: numpy (the source images of pretraining are rendered with
integer arithmetic and PIL; building them with numpy's AVX-512 targets disabled gives the same bytes) and glibc's
libm (``expf`` and friends chosen by glibc's ifunc; every x86-64 server CPU of the last ten years has FMA, so both
an AVX2-only and an AVX-512 host get the same variant, given the same glibc, i.e. the same image).

Only CPU runs: a run on a GPU is left as it is (its numbers come from CUDA kernels; nothing here would make them
portable, and the portable CPU kernels would only slow its data pipeline). ``ALIGNCLIP_CPU_KERNELS=native`` keeps
the host's fastest kernels (same numbers on one machine kind only); bench/portable_kernels.py measures the cost.

Entry points: ``pin_for_command(argv)`` at the CLI's start (cli.main, before torch is imported); ``pin_process()``
for any other process that wants the same (tests/conftest.py); ``configure_torch(device)`` in each stage once torch
is loaded (pretrain.build, train.setup, evaluate, similarity); ``state()`` records what was in effect (the
pretraining cache key, train.json, the weights' summary).
"""

from __future__ import annotations

import os

MODE_VARIABLE = "ALIGNCLIP_CPU_KERNELS"
MODES = ("portable", "native")
# The environment of a portable CPU process; read by torch (ATen) and MKL when they start, hence set before.
# Two kernel levels, the same machine code on every CPU of a level: AVX2 (ATen's AVX2 build, MKL's AVX2 branch;
# every x86-64 CPU with AVX2 and FMA, i.e. Intel since 2013 and AMD since 2015) and the x86-64 baseline for a CPU
# without them (ATen's DEFAULT build, MKL's COMPATIBLE branch: about 2x slower on the demo's cells). ATen takes
# ATEN_CPU_CAPABILITY=avx2 without checking the CPU (an illegal instruction on one without AVX2), hence the level
# is chosen from the CPU's flags. The two levels compute different floats: a run is repeated bit for bit on CPUs
# of its level (and vendor, README), not across levels; train.json and the weights' summary record the level.
PORTABLE_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    # measured: MKL_ENABLE_INSTRUCTIONS=AVX512 in the environment beats MKL_CBWR=AVX2 (other bytes on an AVX-512
    # Xeon; with it unset that Xeon computes what an AVX2 host does), so the AVX2 level pins it too
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_DYNAMIC": "FALSE",
}
BASELINE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}  # (MKL_ENABLE_INSTRUCTIONS left alone)
# what torch.backends.cpu.get_cpu_capability() reports for each ATEN_CPU_CAPABILITY value we set
CAPABILITY_NAMES = {"avx2": "AVX2", "default": "DEFAULT"}
THREADS = 1
# commands that compute with torch on the CPU unless told to use a GPU (`--device`); `grid` runs train and evaluate
# in-process (alignclip/cells.py), so it must be pinned before its imports as they are
COMPUTING_COMMANDS = ("pretrain", "similarity", "train", "evaluate", "grid")
_warned = False


def mode() -> str:
    """``portable`` (the default) or ``native``, from ``ALIGNCLIP_CPU_KERNELS``."""
    value = os.environ.get(MODE_VARIABLE, "portable").strip().lower() or "portable"
    if value not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={value!r}: expected one of {', '.join(MODES)}")
    return value


def _gpu_visible() -> bool:
    """Whether ``--device auto`` will find a GPU, decided without importing torch (which would be too late)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        return any(name[len("nvidia"):].isdigit() for name in os.listdir("/dev") if name.startswith("nvidia"))
    except OSError:
        return False


def runs_on_cpu(device: str) -> bool:
    """Whether a stage given ``--device device`` computes on the CPU."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return not _gpu_visible()
    return device.split(":")[0] == "cpu"


def cpu_flags() -> set[str]:
    """The x86-64 CPU's feature flags (/proc/cpuinfo); empty off x86-64 or where the file cannot be read."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_avx2(flags: set[str] | None = None) -> bool:
    """Whether this CPU runs the AVX2 kernel level: its flags (``cpu_flags()`` if None) hold avx2 and fma."""
    return {"avx2", "fma"} <= (cpu_flags() if flags is None else flags)


def portable_environment(avx2: bool | None = None) -> dict[str, str]:
    """The portable environment for this CPU (``avx2``: whether it has AVX2 and FMA; read from the CPU if None)."""
    avx2 = cpu_has_avx2() if avx2 is None else avx2
    if avx2:
        return dict(PORTABLE_ENVIRONMENT)
    baseline = {**PORTABLE_ENVIRONMENT, **BASELINE_KERNELS}
    del baseline["MKL_ENABLE_INSTRUCTIONS"]  # COMPATIBLE held under every MKL_ENABLE_INSTRUCTIONS (measured)
    return baseline


def pin_process(device: str = "cpu") -> bool:
    """Put the portable kernels' settings into this process's environment, for a run on ``device``.

    Call it before torch is imported (torch and MKL read these once). Returns whether it pinned: not in
    ``native`` mode, not for a GPU run. ``configure_torch`` later checks that it took effect."""
    if mode() != "portable" or not runs_on_cpu(device):
        return False
    os.environ.update(portable_environment())
    return True


def pin_for_command(argv: list[str]) -> bool:
    """``pin_process`` for a CLI invocation (``argv`` without the program name): the computing commands, unless
    their ``--device`` is a GPU. Help and the other commands are left alone."""
    argv = list(argv)
    while argv and argv[0].startswith("-"):  # the app's own options before the command (--log-level X)
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    if not argv or argv[0] not in COMPUTING_COMMANDS or any(a in ("-h", "--help") for a in argv):
        return False
    device = "auto"
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            device = argv[i + 1]
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
    if argv[0] == "pretrain":
        device = "cpu"  # it has no --device: it always builds on the CPU, a GPU machine's too
    return pin_process(device)


def configure_torch(device="cpu", warn_only: bool = False) -> dict:
    """The torch-side settings of a CPU run (nothing for a GPU run); returns ``state()``.

    Portable: oneDNN and NNPACK off, one thread, float32 matmul precision "highest", deterministic algorithms. Native: only
    deterministic algorithms (the same numbers on one machine kind). Warns once if the portable environment did
    not reach torch in time (torch imported and run before ``pin_process``)."""
    import torch

    if torch.device(device).type != "cpu":
        return state()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    if mode() == "portable":
        torch.backends.mkldnn.enabled = False
        torch.backends.nnpack.set_flags(False)
        torch.set_num_threads(THREADS)
        torch.set_float32_matmul_precision("highest")
        global _warned
        if not portable_in_effect() and not _warned:
            _warned = True
            from alignclip.log import get_logger

            get_logger(__name__).warning(
                "this CPU run uses the host's %s kernels (MKL_CBWR=%s): its numbers may differ on another CPU kind; "
                "run it through the `alignclip` CLI, or call alignclip.determinism.pin_process() before importing torch",
                torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR", "unset"))
    return state()


def portable_in_effect() -> bool:
    """Whether this process runs the portable kernels of its CPU's level (ATen's AVX2 build and MKL's AVX2 branch,
    or DEFAULT and COMPATIBLE without AVX2; no oneDNN or NNPACK)."""
    import torch

    expected = portable_environment()
    return (torch.backends.cpu.get_cpu_capability() == CAPABILITY_NAMES[expected["ATEN_CPU_CAPABILITY"]]
            and os.environ.get("MKL_CBWR") == expected["MKL_CBWR"]
            and not torch.backends.mkldnn.enabled and not torch._C._get_nnpack_enabled())


def kernels() -> dict:
    """The kernels a CPU run of this process computes with once ``configure_torch`` has run (the pretraining
    cache key: a build with other kernels is another file)."""
    import torch

    portable = mode() == "portable"
    return {
        "cpu_kernels": mode(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
        "mkldnn": False if portable else bool(torch.backends.mkldnn.enabled),
        "nnpack": False if portable else bool(torch._C._get_nnpack_enabled()),
    }


def state() -> dict:
    """What decides a CPU run's float results besides code, data and seeds, as now in effect (train.json, the
    weights' summary)."""
    import torch

    return {
        **kernels(),
        "mkldnn": bool(torch.backends.mkldnn.enabled),
        "nnpack": bool(torch._C._get_nnpack_enabled()),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def cpu_model() -> str:
    """The CPU's name as the kernel reports it (``model name`` in /proc/cpuinfo), else the platform's word."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
