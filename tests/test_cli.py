"""The command line a new user meets: a clean --help that claims only what is true, bad arguments refused
in under a second with one line, files left out listed, errors on stderr, memory advice that is accepted."""
from __future__ import annotations

import json
import time

import pytest
from test_faults import cli, one_error_line, small_corpus, wav
from test_stream import linear_model  # noqa: F401 (a fixture: a real ONNX model with classes low/high)


def _usage_error(proc) -> str:
    """The one ``edge-ser: error:`` line of an argument error (exit 2, no usage block, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("edge-ser: error: "), proc.stderr
    return lines[0]


def test_help_lists_only_real_commands_and_makes_no_false_claim():
    proc = cli("--help")
    assert proc.returncode == 0
    out = proc.stdout
    assert "SUPPRESS" not in out and "pack-inspect" not in out
    assert "never leaves the server" not in out
    for command in ("corpus", "pack", "keygen", "publish", "agent", "train-local", "evaluate", "listen", "doctor",
                    "demo"):
        assert f"    {command}" in out, command
    inspect = cli("pack", "inspect", "--help")
    assert inspect.returncode == 0 and "usage: edge-ser pack inspect" in inspect.stdout
    typo = _usage_error(cli("pakc"))
    assert "invalid choice" in typo and "pack-inspect" not in typo
    assert "corpus needs a subcommand" in _usage_error(cli("corpus"))


@pytest.mark.slow
def test_doctor_progress_goes_to_stderr_and_json_stays_alone():
    proc = cli("doctor", "--json", timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "checks" in json.loads(lines[0])
    assert "doctor" in proc.stderr                  # the bar naming the check under way
    quiet = cli("doctor", "--json", "--quiet", timeout=300)
    assert "doctor:" not in quiet.stderr and len(quiet.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["pack", "demo", "-o", "x.pack", "--ipc", "0"], "--ipc: must be at least 1"),
    (["pack", "demo", "-o", "x.pack", "--ipc", "-3"], "--ipc: must be at least 1"),
    (["pack", "demo", "-o", "x.pack", "--ipc", "ten"], "--ipc: wants a whole number"),
    (["train-local", "x.pack", "-o", "m", "--threads", "0"], "--threads: must be at least 1"),
    (["train-local", "x.pack", "-o", "m", "--memory-budget-mb", "-5"], "--memory-budget-mb: must be more than 0"),
])
def test_bad_numbers_are_one_line_at_once(args, words):
    t0 = time.monotonic()
    proc = cli(*args)
    took = time.monotonic() - t0
    line = _usage_error(proc)
    assert words in line and "--help" in line
    assert took < 5        # (a bare interpreter start; the point is: before torch or any work)


def test_usage_error_with_json_still_ends_with_one_object():
    proc = cli("pack", "demo", "-o", "x.pack", "--ipc", "0", "--json")
    assert proc.returncode == 2
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ok"] is False and "--ipc" in out["error"]


@pytest.mark.parametrize("case", ["missing-corpus", "output-is-folder", "output-folder-missing", "output-unwritable"])
def test_pack_refuses_before_any_work(tmp_path, case):
    corpus, out = "demo", tmp_path / "x.pack"
    if case == "missing-corpus":
        corpus, want = tmp_path / "no-such-corpus", "no such corpus folder"
    elif case == "output-is-folder":
        out, want = tmp_path, "is a folder; give a file name"
    elif case == "output-folder-missing":
        out, want = tmp_path / "nope" / "x.pack", "does not exist; create it first"
    else:
        out, want = "/proc/x.pack", "cannot write in /proc"
    t0 = time.monotonic()
    proc = cli("pack", corpus, "-o", out, env={"HOME": str(tmp_path / "home")})
    took = time.monotonic() - t0
    assert want in one_error_line(proc)
    assert took < 5
    assert not (tmp_path / "home" / ".config").exists()     # no key pair made for a command that cannot run


@pytest.mark.slow
def test_pack_lists_each_file_it_leaves_out(tmp_path):
    root = small_corpus(tmp_path / "c", speakers=("anna", "bob", "cleo", "dave"))
    (root / "happy" / "bob_text.wav").write_text("not audio\n" * 30)
    wav(root / "sad" / "anna_short.wav", seconds=0.05)
    proc = cli("pack", root, "-o", tmp_path / "c.pack", "--method", "random", "--ipc", "1", "--json", "--quiet",
               env={"HOME": str(tmp_path / "home")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    left = [line for line in proc.stderr.splitlines() if line.startswith("edge-ser: left out: ")]
    assert len(left) == 2, proc.stderr
    assert any("happy/bob_text.wav" in line and "not a readable audio file" in line for line in left)
    assert any("sad/anna_short.wav" in line and "too short" in line for line in left)
    result = json.loads(proc.stdout.strip().splitlines()[-1])      # stdout: the result object only
    assert len(proc.stdout.strip().splitlines()) == 1
    assert len(result["left_out"]) == 2


def test_pack_inspect_wrong_key_is_an_error_on_stderr(tmp_path):
    from packutil import make_pack

    from edge_ser import signing

    key = signing.keygen(tmp_path / "k")
    other = signing.keygen(tmp_path / "other")
    path = make_pack(tmp_path / "a.pack", private_key=signing.load_private_key(key["private_key"]))["path"]
    proc = cli("pack", "inspect", path, "--public-key", other["public_key"])
    assert "does not verify" in one_error_line(proc)
    assert "does not verify" not in proc.stdout and "ERROR" not in proc.stdout
    assert "signature INVALID" in proc.stdout          # the rest of the inspection is still shown
    good = cli("pack", "inspect", path, "--public-key", key["public_key"])
    assert good.returncode == 0 and "signature valid" in good.stdout and not good.stderr.strip()


def test_memory_advice_is_accepted():
    """The number "give at least N MB" suggests is a budget the planner takes (it once said 380 and refused 380)."""
    import re

    from edge_ser.config import FeatureConfig, default_model_config
    from edge_ser.memory import MemoryBudgetError, plan_training

    mc = default_model_config(8, FeatureConfig())
    with pytest.raises(MemoryBudgetError) as info:
        plan_training(mc, n=80, batch=16, threads=1, budget_mb=10, baseline_mb=300.0)
    advised = int(re.search(r"give at least (\d+) MB", str(info.value)).group(1))
    plan = plan_training(mc, n=80, batch=16, threads=1, budget_mb=advised, baseline_mb=300.0)
    assert plan.estimate_mb <= advised


def test_evaluate_lists_each_file_it_leaves_out(tmp_path, linear_model):
    """evaluate, like pack and corpus info, names every file it could not use, one line each on stderr."""
    root = small_corpus(tmp_path / "c", classes=("low", "high"))
    (root / "low" / "bob_text.wav").write_text("not audio\n" * 30)
    proc = cli("evaluate", linear_model.path, root, "--json", env={"HOME": str(tmp_path / "home")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    left = [line for line in proc.stderr.splitlines() if line.startswith("edge-ser: left out: ")]
    assert len(left) == 1 and "low/bob_text.wav" in left[0] and "not a readable audio file" in left[0]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["left_out"] == [line.replace("edge-ser: left out: ", "error: ") for line in left]
    assert result["n"] == 8
