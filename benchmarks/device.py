"""Benchmark `device`: the cost of on-device training (``edge_ser.local.train_local``) per thread count
and memory budget: wall and CPU seconds, whole-process peak RSS, golden check, export time and sizes.

    PYTHONPATH=. python -m benchmarks.device --quick                   # demo pack, 1 thread, no export: < 90 s
    PYTHONPATH=. python -m benchmarks.device --corpus ../shared/corpora/ravdess --threads 1,2 --repeats 3
    PYTHONPATH=. python -m benchmarks.device --pack my.pack --public-key signing.pub --budgets none,600,800

Without --pack it first makes a signed pack (``edge_ser.packer.pack``, product default method, IPC 10;
test speakers 19-24 on RAVDESS) with a fresh key pair. Every train_local run is a spawned child
(``benchmarks._common.run_in_child``): peak RSS is the whole child process (torch, onnxruntime and the
TensorFlow converter included; VmHWM, see ``benchmarks._common.child_peak_rss_mb``); CPU seconds are the child's
user + system time over the train_local call. Medians over --repeats per (budget, threads). Finally
a budget that cannot be met (--refusal-budget, 150 MB) must be refused with
``edge_ser.memory.MemoryBudgetError`` before training, not by an OOM kill.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from edge_ser.memory import LEAN_HEAP_ENV

from ._common import print_machine_info, run_in_child, write_json
from .pack import HERE, default_corpus, make_keys, pack_job, test_speakers_for


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_job(pack: str, output: str, budget_mb: Optional[float], threads: int, public_key: Optional[str],
              export: bool, lean: bool = False) -> Dict:
    """Child-process body: train_local's result plus CPU seconds and, with export, per-format export info."""
    from edge_ser.local import train_local

    cpu0 = _cpu_seconds()
    result = train_local(pack, output, memory_budget_mb=budget_mb, threads=threads, public_key=public_key,
                         export=export, progress=False, lean=lean)
    result["cpu_seconds"] = round(_cpu_seconds() - cpu0, 3)
    result["process_cpu_seconds"] = round(_cpu_seconds(), 3)  # imports included
    if export:
        files = json.loads((Path(output) / "model.json").read_text())["files"]
        result["export"] = {name: {k: f.get(k) for k in ("bytes", "seconds", "error")}
                            for name, f in files.items() if isinstance(f, dict)}
    return result


def refusal_job(pack: str, output: str, budget_mb: float, public_key: Optional[str], export: bool) -> Dict:
    """Child-process body: train_local under a budget too small to meet; how (and how fast) it refused."""
    from edge_ser.local import train_local
    from edge_ser.memory import MemoryBudgetError

    t0 = time.perf_counter()
    try:
        result = train_local(pack, output, memory_budget_mb=budget_mb, threads=1, public_key=public_key,
                             export=export, progress=False)
    except MemoryBudgetError as exc:
        return {"refused": True, "error": type(exc).__name__, "message": str(exc),
                "seconds": round(time.perf_counter() - t0, 3), "model_written": Path(output).exists()}
    return {"refused": False, "error": None, "message": "train_local did not refuse", "result": result}


def parse_budget(text: str):
    """A budget in MB; None for 'none'; 'lean' = no budget, lean training (what ``train-local --lean`` does)."""
    text = text.strip().lower()
    if text == "lean":
        return "lean"
    return None if text in ("none", "0", "") else float(text)


def median(values: List) -> Optional[float]:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarise(runs: List[Dict]) -> Dict:
    """Medians over the repeats of one (budget, threads) setting."""
    res = [r["result"] for r in runs]
    out = {"repeats": len(runs), "budget_mb": runs[0]["budget_mb"], "threads": runs[0]["threads"],
           "wall_seconds": median([r["child_seconds"] for r in runs]),
           "cpu_seconds": median([x["cpu_seconds"] for x in res]),
           "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
           "train_seconds": median([x["train_seconds"] for x in res]),
           "export_seconds": median([x["export_seconds"] for x in res]),
           "train_local_wall_seconds": median([x["wall_seconds"] for x in res]),
           "train_local_peak_rss_mb": median([x["peak_rss_mb"] for x in res]),
           "estimate_mb": res[-1]["estimate_mb"], "threads_used": res[-1]["threads"],
           "micro_batch": res[-1]["micro_batch"], "batch": res[-1]["batch"],
           "exact_schedule": res[-1]["exact_schedule"], "lean": res[-1].get("lean", False),
           "heap": res[-1].get("heap"),
           "golden_passed": all(x["golden"]["passed"] for x in res),
           "golden_max_abs_deviation": max(x["golden"].get("max_abs_deviation", float("nan")) for x in res),
           "sizes": res[-1]["sizes"], "int8_agreement": res[-1]["int8_agreement"],
           "warnings": sorted({w for x in res for w in x["warnings"]})}
    out["cpu_per_wall"] = round(out["cpu_seconds"] / out["train_local_wall_seconds"], 2) \
        if out["cpu_seconds"] and out["train_local_wall_seconds"] else None
    if res[-1].get("export"):
        out["export"] = {name: {"bytes": f["bytes"], "error": f["error"],
                                "seconds": median([x["export"].get(name, {}).get("seconds") for x in res])}
                         for name, f in res[-1]["export"].items()}
    return out


def golden_word(passed: bool, exact: bool) -> str:
    """'pass', 'FAIL', or 'inexact' when a budget forced micro-batches (the check is informative only)."""
    return "pass" if passed else ("FAIL" if exact else "inexact")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", default=None, help="an existing pack (default: make one)")
    ap.add_argument("--public-key", default=None, help="verifies --pack (default: the installed signing.pub)")
    ap.add_argument("--corpus", default=None, help="for the pack made here (default: RAVDESS if present, else demo)")
    ap.add_argument("--test-speakers", default=None)
    ap.add_argument("--method", default=None, help="method of the pack made here (default: the product default)")
    ap.add_argument("--ipc", type=int, default=None, help="samples per class of the pack made here (default 10)")
    ap.add_argument("--threads", default=None, help="comma list of train_local thread counts (default 1,2)")
    ap.add_argument("--budgets", default="none", help="comma list of memory budgets in MB, 'none' = no budget")
    ap.add_argument("--repeats", type=int, default=None, help="runs per setting; medians reported (default 3)")
    ap.add_argument("--export", action=argparse.BooleanOptionalAction, default=None,
                    help="export ONNX / int8 / TFLite after training (default on; off with --quick)")
    ap.add_argument("--refusal-budget", type=float, default=150.0, help="a budget that must be refused (0: skip)")
    ap.add_argument("--quick", action="store_true", help="demo corpus, random IPC 2, 1 thread, 1 repeat, no export")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/device[.quick].json)")
    a = ap.parse_args(argv)

    threads = [int(t) for t in (a.threads or ("1" if a.quick else "1,2")).split(",")]
    budgets = [parse_budget(b) for b in a.budgets.split(",")]
    repeats = a.repeats or (1 if a.quick else 3)
    export = a.export if a.export is not None else not a.quick
    out = a.out or str(HERE / "results" / ("device.quick.json" if a.quick else "device.json"))
    info = print_machine_info()
    report: Dict = {"benchmark": "device", "machine": info, "quick": a.quick, "argv": sys.argv, "export": export,
                    "repeats": repeats}

    with tempfile.TemporaryDirectory(prefix="edge-ser-bench-device-") as tmp:
        tmp = Path(tmp)
        public_key = a.public_key
        if a.pack:
            pack_path = a.pack
            report["pack_source"] = {"given": pack_path}
        else:
            corpus = a.corpus or ("demo" if a.quick else default_corpus())
            method = a.method or ("random" if a.quick else None)
            ipc = a.ipc or (2 if a.quick else 10)
            keys = make_keys(tmp / "keys")
            public_key, pack_path = keys["public_key"], str(tmp / "bench.pack")
            held = test_speakers_for(corpus, a.test_speakers)
            made, rss, secs = run_in_child(pack_job, corpus, pack_path, method, ipc, held, keys["private_key"],
                                       max(threads))
            report["pack_source"] = {"corpus": corpus, "method": made["method"], "ipc": made["ipc"],
                                     "seconds": round(secs, 1), "peak_rss_mb": round(rss, 1)}
            print(f"made a {made['method']} IPC {made['ipc']} pack from {corpus} in {secs:.1f} s")
        from edge_ser.inspection import inspect_pack

        pinfo = inspect_pack(pack_path, public_key=public_key)
        report["pack"] = {"path": a.pack, "bytes": pinfo["bytes"], "samples": pinfo["synthetic"]["samples"],
                          "classes": len(pinfo["classes"]), "method": pinfo["provenance"].get("method"),
                          "ipc": pinfo["provenance"].get("ipc"), "schedule": pinfo["schedule"],
                          "signature": pinfo["signature"]}
        print(f"pack: {pinfo['bytes'] / 1024:.0f} KB, {pinfo['synthetic']['samples']} synthetic samples, "
              f"schedule {pinfo['schedule']}")

        runs: List[Dict] = []
        summary: List[Dict] = []
        report.update(runs=runs, summary=summary)
        for budget in budgets:
            for t in threads:
                setting = []
                lean = budget == "lean"
                saved_env = {k: os.environ.get(k) for k in LEAN_HEAP_ENV}
                if lean or budget is not None:   # as the CLI does under --lean or --memory-budget-mb: glibc
                    os.environ.update(LEAN_HEAP_ENV)  # reads its tunables at process start (the spawned child)
                for rep in range(repeats):
                    try:
                        res, rss, secs = run_in_child(train_job, pack_path, str(tmp / "model"),
                                                      None if lean else budget, t, public_key, export, lean)
                    except RuntimeError as exc:     # a budget the planner refuses is a result, not a crash
                        if "MemoryBudgetError" not in str(exc):
                            raise
                        line = next((ln for ln in str(exc).splitlines() if "MemoryBudgetError" in ln), str(exc))
                        report.setdefault("refused_budgets", []).append({"budget_mb": budget, "threads": t,
                                                                         "message": line.strip()})
                        print(f"budget {budget} MB, {t} thread(s): refused up front: {line.strip()}", flush=True)
                        break
                    setting.append({"budget_mb": budget, "threads": t, "repeat": rep, "child_seconds": round(secs, 3),
                                    "peak_rss_mb": round(rss, 1), "result": res})
                    golden = golden_word(res["golden"]["passed"], res["exact_schedule"])
                    if res.get("lean"):
                        golden += f" (lean, {res.get('heap')} heap)"
                    print(f"budget {budget or 'none'} MB, {t} thread(s), run {rep + 1}/{repeats}: {secs:.1f} s, "
                          f"peak RSS {rss:.0f} MB, golden {golden}", flush=True)
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                if setting:
                    runs += setting
                    summary.append(summarise(setting))
                write_json(out, report)

        if a.refusal_budget > 0:
            try:
                refusal, rss, _ = run_in_child(refusal_job, pack_path, str(tmp / "refused"), a.refusal_budget,
                                           public_key, export)
            except RuntimeError as exc:  # another exception in the child: recorded, not a refusal
                refusal, rss = {"refused": False, "error": str(exc).splitlines()[0], "message": str(exc)}, None
            refusal.update(budget_mb=a.refusal_budget, peak_rss_mb=None if rss is None else round(rss, 1))
            report["refusal"] = refusal
            print(f"budget {a.refusal_budget:.0f} MB: {'refused' if refusal['refused'] else 'NOT refused'} "
                  f"({refusal['error']}): {refusal['message'].splitlines()[0]}")

    print(f"\n{'budget MB':>10}{'threads':>8}{'wall s':>8}{'CPU s':>8}{'train s':>9}{'export s':>9}{'peak RSS MB':>13}"
          f"{'micro':>7}{'golden':>8}")
    for s in summary:
        print(f"{s['budget_mb'] or 'none':>10}{s['threads_used']:>8}{s['wall_seconds']:>8.1f}{s['cpu_seconds']:>8.1f}"
              f"{s['train_seconds']:>9.1f}{s['export_seconds']:>9.1f}{s['peak_rss_mb']:>13.0f}"
              f"{s['micro_batch']:>7}{golden_word(s['golden_passed'], s['exact_schedule']):>8}")
    if summary and summary[-1].get("export"):
        print("export: " + ", ".join(f"{k} {v['bytes'] / 1024:.0f} KB in {v['seconds'] or 0:.1f} s"
                                     for k, v in summary[-1]["export"].items() if v["bytes"]))
    print(f"medians of {repeats} run(s); wall and CPU s cover the whole train_local call (torch import included)")
    print(f"wrote {write_json(out, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
