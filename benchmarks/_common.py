"""Helpers shared by the benchmark scripts: machine info, JSON output, and running a function in a
child process to measure its whole-process peak RSS (torch and everything it imports included).

>>> info = machine_info()                                            # doctest: +SKIP
>>> result, rss_mb, seconds = run_in_child(sum, [1, 2, 3])           # doctest: +SKIP
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

from edge_ser.files import atomic_write, json_default


def machine_info() -> Dict[str, Any]:
    """Where and when a result was measured: CPU, cores, memory, Python / torch versions, UTC time."""
    info: Dict[str, Any] = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gb"] = round(int(line.split()[1]) / 1024 ** 2, 1)
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    info["load_avg"] = os.getloadavg()
    return info


def print_machine_info(info: Dict[str, Any] | None = None) -> Dict[str, Any]:
    info = info or machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    return info


def portable(obj):
    """``obj`` with this checkout's and the home folder's absolute paths made relative (``benchmarks/x.py``,
    ``~/...``), so committed results name no machine's folders."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    if isinstance(obj, str):
        repo, home = str(Path(__file__).resolve().parents[1]), str(Path.home())
        return obj.replace(repo + os.sep, "").replace(home + os.sep, "~" + os.sep)
    return obj


def write_json(path, obj) -> Path:
    """Write ``obj`` as indented JSON (creating folders), atomically via a temp file; paths made portable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(portable(obj), indent=2, sort_keys=True, default=json_default).encode())


def child_peak_rss_mb() -> float:
    """This process's own peak RSS in MiB (``VmHWM`` on Linux: ``ru_maxrss`` survives exec, so a spawned
    child would report its parent's peak); see :func:`edge_ser.memory.peak_rss_mb`."""
    from edge_ser.memory import peak_rss_mb

    return peak_rss_mb()


def _child(conn, fn, args, kwargs):
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
        ok = True
    except BaseException as exc:  # report it to the parent, one line plus the traceback
        result, ok = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", False
    seconds = time.perf_counter() - t0
    rss_mb = child_peak_rss_mb()
    conn.send((ok, result, rss_mb, seconds))
    conn.close()


def run_in_child(fn: Callable, *args, **kwargs) -> Tuple[Any, float, float]:
    """Run ``fn(*args, **kwargs)`` in a fresh (spawned) Python process; return (result, peak RSS MiB of
    that whole process, seconds inside ``fn``). ``fn`` must be importable and its result picklable.
    An exception in the child is raised here as RuntimeError with the child's message."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    try:
        ok, result, rss_mb, seconds = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"benchmark child process died (exit code {proc.exitcode})") from None
    proc.join()
    if not ok:
        raise RuntimeError(result)
    return result, rss_mb, seconds
