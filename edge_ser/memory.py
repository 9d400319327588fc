"""Peak-RSS measurement and memory-budget planning for on-device training (train-local).

The estimate is a calibrated linear model: RSS now (torch + pack loaded) + a margin times (a fixed
autograd/oneDNN cost + bytes per training sample from the model's activation size). Under a budget,
training runs on the *lean heap* (glibc gives every block of 1 MiB or more its own mapping and returns it
when freed, so the peak follows live memory instead of the heap's high-water mark) and the planner takes
the first that fits: (1) the pack's schedule as is; (2) the same schedule, chunked:
``ConvNet.forward_chunked`` (channel groups recomputed in backward, the same results up to float rounding), slower;
(3) micro-batches with accumulated gradients (BatchNorm statistics per micro-batch: not exact); or it
refuses before training starts, with the numbers. Without a budget: the schedule as is, default heap.

>>> plan = plan_training(ModelConfig(num_classes=8), n=80, batch=80, threads=1, budget_mb=600)  # doctest: +SKIP
>>> plan.micro_batch, round(plan.estimate_mb)                                                   # doctest: +SKIP
(16, 540)
"""
from __future__ import annotations

import functools
import math
import os
import resource
from dataclasses import dataclass
from typing import Optional

from .config import ModelConfig, _JsonMixin

# Calibrated on this machine (x86-64, torch 2.13 CPU, glibc) by measuring the peak RSS of train-local runs
# for the default ConvNet (see tests/test_local.py and benchmarks/RESULTS.md section 4):
#: default heap: fixed cost of training (autograd graph, oneDNN scratch, allocator slack), MB
FIXED_TRAIN_MB = 150.0
#: default heap: training bytes per sample = this factor x the forward activations of one sample (fp32);
#: glibc's heap keeps its high-water mark, which grows over the first steps
ACTIVATION_FACTOR = 1.8
#: lean heap: the same two numbers. RAVDESS IPC 10 pack (80 samples, 1.87 MB of activations each), one
#: thread: 50 / 87 / 137 MB above the baseline with 16 / 40 / 80 samples per step (train-local under a
#: 400 MB budget: 377-383 MB, estimate 395 MB)
HEAP_FIXED_MB = 30.0
HEAP_ACTIVATION_FACTOR = 0.8
#: extra MB per intra-op thread beyond the first
PER_THREAD_MB = 8.0
#: ONNX export + onnxruntime import + static int8 quantisation (calibration streamed, export.CALIB_STRIDE
#: windows at a time), MB above the baseline, what training left behind included (measured with the RAVDESS
#: IPC 10 pack on the lean heap: export alone peaks 112 MB over a 243 MB baseline; after training, ~30 MB more)
EXPORT_MB = 140.0
#: TFLite conversion: the converter process (TensorFlow without torch, beside this one, which waits), MB; it
#: measured 645-647 MB (demo pack; TensorFlow's import alone is ~600 MB). Skipped when this process's RSS plus
#: this exceeds the budget
TFLITE_EXPORT_MB = 700.0
#: safety margin applied to the whole estimate
MARGIN = 1.05
#: chunked training (``ConvNet.forward_chunked``: channel groups under activation checkpointing, on the
#: lean heap): largest full-resolution activation group, MB, and the fixed cost above the baseline, MB.
#: Calibrated with the RAVDESS IPC 10 pack (80 samples, 1 thread, default model): 348-350 MB over a 237 MB
#: baseline (benchmarks/results/device_lean.json); smaller groups cost time and no memory, 12 MB groups
#: ~20 MB more and ~25 % less time
LEAN_CHUNK_MB = 6.0
LEAN_FIXED_MB = 62.0
#: allocations from this size up get their own mmap (returned to the kernel when freed) under the lean heap
LEAN_MMAP_THRESHOLD = 1 << 20
#: environment that makes glibc back those mmaps with transparent huge pages (read at process start: the
#: CLI restarts itself once with it under --memory-budget-mb; ~2x faster lean training, same numbers)
LEAN_HEAP_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


class MemoryBudgetError(RuntimeError):
    """The memory budget cannot be met; raised before any training starts."""


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children) so far, in MB.

    On Linux this process's own high-water mark (``VmHWM``): ``ru_maxrss`` survives exec, so a process
    started by a big parent (pytest, a daemon) would report the parent's peak as its own."""
    if not children:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            pass
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    scale = 1024.0 * 1024.0 if os.uname().sysname == "Darwin" else 1024.0  # bytes on macOS, KB on Linux
    return usage.ru_maxrss / scale


def current_rss_mb() -> float:
    """Resident set size of this process now, in MB (``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


@functools.lru_cache(maxsize=32)
def _output_floats(model_config: ModelConfig, pooled_only: bool = False) -> int:
    """Floats of the module outputs of one forward pass of one sample: every leaf module's (the activations
    autograd keeps), or only the pooling layers' (what lean training keeps between blocks)."""
    import torch

    from .models import build_model

    model = build_model(model_config).eval()
    total = [0]

    def hook(_module, _inp, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    pools = (torch.nn.AvgPool2d, torch.nn.MaxPool2d)
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if (isinstance(m, pools) if pooled_only else not list(m.children()))]
    with torch.no_grad():
        model(torch.zeros(1, model_config.n_mels, model_config.num_frames))
    for h in handles:
        h.remove()
    return total[0]


def activation_floats(model_config: ModelConfig) -> int:
    """Floats of every module output in one forward pass of one sample (the activations autograd keeps)."""
    return _output_floats(model_config) + model_config.n_mels * model_config.num_frames


def pooled_floats(model_config: ModelConfig) -> int:
    """Floats of the pooled block outputs of one sample: what lean training keeps between blocks."""
    return _output_floats(model_config, pooled_only=True)


def lean_estimate_mb(baseline_mb: float, model_config: ModelConfig, batch: int, threads: int) -> float:
    """Estimated peak RSS of chunked training on the lean heap (full batches, exact schedule)."""
    pooled = 2 * pooled_floats(model_config) * 4 * batch / (1024.0 * 1024.0)     # outputs + their gradients
    return baseline_mb + MARGIN * (LEAN_FIXED_MB + pooled + 4 * LEAN_CHUNK_MB + PER_THREAD_MB * max(0, threads - 1))


def lean_heap_available() -> bool:
    """Whether :func:`use_lean_heap` can work here (glibc's ``mallopt``); checked without changing anything."""
    import ctypes
    import platform

    try:
        return platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallopt")
    except OSError:
        return False


def use_lean_heap() -> str:
    """Make glibc give every allocation of 1 MiB or more its own mmap, returned when freed, so the peak
    RSS of training follows what is live instead of the heap's high-water mark (each step's tensors are
    then fresh pages: slower, unless :data:`LEAN_HEAP_ENV` was set at process start). It holds for the rest
    of the process (an agent that trained lean keeps it; its inference allocations are small). Returns the
    heap now in use: "lean+huge-pages", "lean", or "default" where it cannot be set (not glibc)."""
    import ctypes

    try:
        if not ctypes.CDLL(None).mallopt(-3, LEAN_MMAP_THRESHOLD):       # M_MMAP_THRESHOLD
            return "default"
    except (OSError, AttributeError):
        return "default"
    huge = all(value in os.environ.get(key, "").split(":") for key, value in LEAN_HEAP_ENV.items())
    return "lean+huge-pages" if huge else "lean"


@dataclass(frozen=True)
class MemoryPlan(_JsonMixin):
    budget_mb: Optional[float]
    baseline_mb: float          # RSS when training starts (torch imported, pack loaded)
    per_sample_mb: float        # estimated training MB per sample in a micro-batch
    micro_batch: int            # samples per forward/backward (gradients accumulate up to the schedule batch)
    batch: int                  # the schedule's batch (optimiser step size in samples)
    threads: int
    train_estimate_mb: float
    export_estimate_mb: float
    exact: bool                 # micro_batch == batch: BatchNorm sees the schedule's batches exactly
    lean: bool = False          # full batches through ConvNet.forward_chunked on the lean heap (exact too)
    lean_heap: bool = False     # train on the lean heap (every plan under a budget, where glibc allows)

    @property
    def estimate_mb(self) -> float:
        return max(self.train_estimate_mb, self.export_estimate_mb)


def estimate_mb(baseline_mb: float, per_sample_mb: float, micro_batch: int, threads: int,
                fixed_mb: float = FIXED_TRAIN_MB) -> float:
    """Estimated peak RSS: the baseline plus a margin on what training adds (``fixed_mb``: default heap's)."""
    return baseline_mb + MARGIN * (fixed_mb + per_sample_mb * micro_batch + PER_THREAD_MB * max(0, threads - 1))


def per_sample_mb(model_config: ModelConfig, lean_heap: bool = False) -> float:
    """Estimated training MB per sample of a (micro-)batch on the default or the lean heap."""
    factor = HEAP_ACTIVATION_FACTOR if lean_heap else ACTIVATION_FACTOR
    return factor * activation_floats(model_config) * 4 / (1024.0 * 1024.0)


def plan_training(model_config: ModelConfig, n: int, batch: int, threads: Optional[int], budget_mb: Optional[float],
                  baseline_mb: Optional[float] = None, export: bool = True, lean: bool = False,
                  lean_heap: Optional[bool] = None) -> MemoryPlan:
    """Choose how to train so the estimated peak RSS fits ``budget_mb`` (None: no limit: the full schedule
    batch, ``threads`` as given, default heap; ``lean=True``: chunked training even when the plain one would
    fit). Under a budget training runs on the lean heap where glibc allows (``lean_heap`` overrides that).
    Raises :class:`MemoryBudgetError` with the numbers when even one sample per step with one thread does
    not fit."""
    batch = n if batch in (0, None) or batch >= n else int(batch)
    threads = int(threads) if threads else (os.cpu_count() or 1)
    baseline = current_rss_mb() if baseline_mb is None else float(baseline_mb)
    if lean_heap is None:
        lean_heap = (budget_mb is not None or lean) and lean_heap_available()
    per_sample = per_sample_mb(model_config, lean_heap)
    fixed = HEAP_FIXED_MB if lean_heap else FIXED_TRAIN_MB
    export_est = baseline + MARGIN * EXPORT_MB if export else 0.0

    from .models import trains_chunked

    can_chunk = trains_chunked(model_config)

    def make(mb, th, chunked=False):
        est = lean_estimate_mb(baseline, model_config, batch, th) if chunked else \
            estimate_mb(baseline, per_sample, mb, th, fixed)
        return MemoryPlan(budget_mb, round(baseline, 1), round(per_sample, 2), mb, batch, th,
                          round(est, 1), round(export_est, 1), mb >= batch, chunked, bool(lean_heap or chunked))

    if budget_mb is None:
        return make(batch, threads, chunked=lean and can_chunk)
    budget = float(budget_mb)
    # the least budget any plan fits, rounded up, +2 MB for the next run's baseline jitter: the advice "give at
    # least N MB" must then be accepted (it said 380 where 380.4 was needed)
    smallest = math.ceil(max(estimate_mb(baseline, per_sample, 1, 1, fixed), export_est)) + 2
    if baseline >= budget:
        raise MemoryBudgetError(
            f"memory budget {budget:.0f} MB is below the process baseline: torch and the pack already take "
            f"{baseline:.0f} MB RSS; give at least {smallest} MB")
    if export and export_est > budget:
        raise MemoryBudgetError(
            f"memory budget {budget:.0f} MB cannot fit the export step (~{export_est:.0f} MB: "
            f"{baseline:.0f} MB baseline + ~{EXPORT_MB:.0f} MB for onnxruntime quantisation); "
            f"give at least {math.ceil(export_est) + 2} MB or use --no-export")
    candidates = sorted({threads, 1}, reverse=True)
    for th in candidates:        # 1. the schedule as is
        if estimate_mb(baseline, per_sample, batch, th, fixed) <= budget and not (lean and can_chunk):
            return make(batch, th)
    if can_chunk:
        for th in candidates:    # 2. the same numbers, chunked: channel groups, recomputed in backward
            if lean_estimate_mb(baseline, model_config, batch, th) <= budget:
                return make(batch, th, chunked=True)
    for th in candidates:        # 3. micro-batches: BatchNorm statistics per micro-batch (not exact)
        room = (budget - baseline) / MARGIN - fixed - PER_THREAD_MB * max(0, th - 1)
        mb = min(batch, int(room // per_sample)) if room > 0 else 0
        if mb >= 1 and (th == 1 or mb >= min(batch, 8)):  # drop threads before going below 8 samples
            return make(mb, th)
    raise MemoryBudgetError(
        f"memory budget {budget:.0f} MB is too small to train: {baseline:.0f} MB baseline (torch + pack) + "
        f"~{fixed:.0f} MB autograd + {per_sample:.1f} MB per sample needs at least {smallest} MB")
