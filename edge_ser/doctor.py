"""``edge-ser doctor``: which runtimes this device has, proven by use (imports, a tiny ONNX inference, a tiny
training step in a subprocess), and the install command for anything missing.

>>> d = doctor()                  # doctest: +SKIP
>>> d["ok"], d["checks"]["onnxruntime"]["ok"]   # doctest: +SKIP
(True, True)
"""
from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Tuple

#: name -> (module to import, what it is for, install command, required for the core device path)
PACKAGES: Dict[str, Tuple[str, str, str, bool]] = {
    "numpy": ("numpy", "arrays", "pip install numpy", True),
    "soundfile": ("soundfile", "audio files", "pip install soundfile  (Debian: apt-get install libsndfile1)", True),
    "onnxruntime": ("onnxruntime", "ONNX inference (default runtime)", "pip install onnxruntime", True),
    "torch": ("torch", "train-local", "pip install torch --index-url https://download.pytorch.org/whl/cpu", True),
    "onnx": ("onnx", "ONNX export", "pip install onnx onnxscript", True),
    "cryptography": ("cryptography", "pack signatures", "pip install cryptography", True),
    "paho-mqtt": ("paho.mqtt.client", "agent / publish", "pip install paho-mqtt", False),
    "tflite": ("", "TFLite inference", "pip install ai-edge-litert  (Raspberry Pi: pip install tflite-runtime)", False),
    "sounddevice": ("sounddevice", "microphone (listen)",
                    "pip install sounddevice  (Debian: apt-get install libportaudio2)", False),
}

_TRAIN_STEP = r"""
import resource, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from edge_ser.config import ModelConfig
from edge_ser.models import build_model
m = build_model(ModelConfig(num_classes=4, n_mels=32, num_frames=48, channels=(8, 16)))
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x = torch.randn(4, 32, 48); y = torch.tensor([0, 1, 2, 3])
t = time.perf_counter()
loss = torch.nn.functional.cross_entropy(m(x), y); loss.backward(); opt.step()
assert torch.isfinite(loss)
print(f"{time.perf_counter() - t:.4f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
"""


def _check(fn: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    try:
        out = fn()
        out.setdefault("ok", True)
        return out
    except Exception as exc:  # a doctor reports, it does not crash
        return {"ok": False, "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}


def _import(module: str) -> Dict[str, Any]:
    mod = importlib.import_module(module)
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as v

            dist = {"paho": "paho-mqtt"}.get(module.split(".")[0], module.split(".")[0].replace("_", "-"))
            version = v(dist)
        except Exception:
            version = "?"
    return {"version": str(version)}


def _tflite() -> Dict[str, Any]:
    for module, dist in (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime")):
        try:
            importlib.import_module(module)
            from importlib.metadata import version

            return {"version": f"{dist} {version(dist)}"}
        except ImportError:
            continue
    raise ImportError("neither ai_edge_litert nor tflite_runtime is importable")


def _sounddevice() -> Dict[str, Any]:
    import sounddevice as sd  # raises OSError when PortAudio is missing

    devices = sd.query_devices()
    inputs = [d["name"] for d in devices if d.get("max_input_channels", 0) > 0]
    return {"version": sd.__version__, "portaudio": sd.get_portaudio_version()[1], "input_devices": len(inputs),
            "note": "" if inputs else "PortAudio works but there is no input device"}


def _onnx_inference() -> Dict[str, Any]:
    """Build a 1-conv ONNX graph with the onnx helper and run it: proves ORT executes here."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32) / 9, "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "doctor",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    y = sess.run(None, {"x": np.ones((1, 1, 8, 8), np.float32)})[0]
    if not abs(float(y[0, 0, 4, 4]) - 1.0) < 1e-5:
        raise RuntimeError(f"ONNX Runtime computed a wrong result ({y[0, 0, 4, 4]})")
    return {"seconds": round(time.perf_counter() - t, 5), "providers": ort.get_available_providers()}


def _training_step() -> Dict[str, Any]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _TRAIN_STEP], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"training step failed in a subprocess (exit {proc.returncode}): {tail}")
    seconds, rss = proc.stdout.split()[-2:]
    return {"seconds": float(seconds), "peak_rss_mb": float(rss)}


def doctor(progress: bool = False) -> Dict[str, Any]:
    """Check imports, a tiny ONNX inference and a tiny training step; ``ok`` is False when a required
    runtime is missing. Each check says what to install when it fails. ``progress``: a bar on stderr naming
    the check under way (importing torch and the training step take seconds each)."""
    checks: Dict[str, Dict[str, Any]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(PACKAGES) + 2, desc="doctor", unit="check", leave=False)

    def step(name: str) -> None:          # the bar counts the checks finished and names the one under way
        if bar is not None:
            bar.n = len(checks)
            bar.set_postfix_str(name)

    for name, (module, purpose, install, required) in PACKAGES.items():
        step(name)
        if name == "tflite":
            res = _check(_tflite)
        elif name == "sounddevice":
            res = _check(_sounddevice)
        else:
            res = _check(lambda m=module: _import(m))
        res.update({"purpose": purpose, "required": required})
        if not res["ok"]:
            res["install"] = install
        checks[name] = res
    step("onnx-inference")
    checks["onnx-inference"] = _check(_onnx_inference) if checks["onnxruntime"]["ok"] else \
        {"ok": False, "error": "onnxruntime missing"}
    checks["onnx-inference"].update({"purpose": "run an ONNX graph", "required": True})
    step("training-step (a subprocess)")
    checks["training-step"] = _check(_training_step) if checks["torch"]["ok"] else {"ok": False, "error": "torch missing"}
    checks["training-step"].update({"purpose": "train-local (subprocess)", "required": True})
    if bar is not None:
        bar.n = len(checks)
        bar.close()
    missing = [n for n, c in checks.items() if not c["ok"]]
    required_missing = [n for n in missing if checks[n]["required"]]
    return {"ok": not required_missing, "checks": checks, "missing": missing, "required_missing": required_missing,
            "python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count()}


def format_doctor(d: Dict[str, Any]) -> str:
    lines = [f"edge-ser doctor  python {d['python']}  {d['platform']}  {d['cpus']} CPUs"]
    for name, c in d["checks"].items():
        mark = "ok " if c["ok"] else ("MISSING" if c["required"] else "missing")
        detail = c.get("version") or (f"{c['seconds']:.4f} s" if "seconds" in c else "") or ""
        if "peak_rss_mb" in c:
            detail += f", peak RSS {c['peak_rss_mb']:.0f} MB"
        if c.get("note"):
            detail += f" ({c['note']})"
        if not c["ok"]:
            detail = c.get("error", "")
        lines.append(f"  [{mark:^7}] {name:<15} {c['purpose']:<30} {detail}")
        if not c["ok"] and c.get("install"):
            lines.append(f"            install: {c['install']}")
    lines.append("ready: " + ("yes" if d["ok"] else "no, missing " + ", ".join(d["required_missing"])))
    return "\n".join(lines)
