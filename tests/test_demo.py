"""``edge-ser demo`` end to end, as a new user runs it (empty HOME): every step, the short summary, and with
--json nothing on stdout but the result object. About 3 minutes on a 2-core machine: the slow tier."""
from __future__ import annotations

import json
import time

import pytest
from test_faults import cli


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from edge_ser.demo import format_demo_summary

    work = tmp_path / "demo"
    t0 = time.monotonic()
    proc = cli("demo", "--workdir", work, "--json", env={"HOME": str(tmp_path / "home")}, timeout=1200)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_lines = proc.stdout.strip().splitlines()
    assert len(out_lines) == 1, proc.stdout[-3000:]           # --json: the object alone on stdout
    d = json.loads(out_lines[-1])
    assert d["ok"] is True and d["workdir"] == str(work)
    # the steps announce themselves (on stderr under --json), the time first
    assert "minutes" in proc.stderr.splitlines()[0]
    for step in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert step in proc.stderr
    assert "Traceback" not in proc.stderr

    assert d["pack"]["method"] == "fixed-init" and d["pack"]["bytes"] > 0
    assert d["train_local"]["golden"]["passed"] is True
    assert {"onnx", "onnx-int8"} <= set(d["train_local"]["files"])
    assert d["evaluate"]["n"] > 0 and 0.0 <= d["evaluate"]["uar"] <= 1.0
    # the listen step strings several held-out utterances together: seconds of audio, many hops
    li = d["listen"]
    assert len(li["segments"]) >= 2 and li["segments"][-1]["end"] > 5.0
    assert li["hops"] >= 6 and 0 <= li["agree"] <= len(li["emotions"]) <= li["hops"]
    # every model file is readable by a device's service user, as the other files are
    assert d["modes"] and set(d["modes"].values()) == {"0o644"}, d["modes"]
    # memory: the demo process stays under 1 GiB, and so does every process of train-local: it trains with torch
    # (measured 374-381 MB) and converts to TFLite in a child that never imports torch (TensorFlow alone: 644-647 MB;
    # with both in one process it was 950-1150 MB). peak_rss_mb is the larger of the two, as the README states
    tl = d["train_local"]
    assert d["peak_rss_mb"] < 1024, f"demo process peaked at {d['peak_rss_mb']} MB"
    assert tl["peak_rss_mb"] < 850, f"train-local peaked at {tl['peak_rss_mb']} MB"
    assert tl["process_peak_rss_mb"] < 550, f"train-local's training process peaked at {tl['process_peak_rss_mb']} MB"
    if tl["files"].get("tflite"):              # (converted only where TensorFlow is installed)
        assert tl["converter_peak_rss_mb"] is not None and tl["peak_rss_mb"] >= tl["converter_peak_rss_mb"]
    assert took < 15 * 60                      # 3 min on a busy 2-core box; a hang or a 40-min default is a failure

    summary = format_demo_summary(d)
    lines = summary.strip().splitlines()
    assert len(lines) <= 15                    # a table, not the whole result
    for row in ("pack", "device training", "golden check", "held-out UAR", "listen", "total"):
        assert any(line.strip().startswith(row) for line in lines), row
    assert "chance" in summary                 # each number says what it means
