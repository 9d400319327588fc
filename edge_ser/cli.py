"""``edge-ser``: the command line, a thin layer over the library API.

Every sub-command takes ``--json`` and then prints its result as one JSON object on the last line of
stdout. Errors print one line ``edge-ser: error: ...`` on stderr (and ``{"ok": false, "error": ...}``
with ``--json``) and exit non-zero. Heavy libraries (torch, onnxruntime) are imported only by the
sub-command that needs them, so ``edge-ser --help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Dict

from .files import json_default

EPILOG = """\
the pipeline:
  server:  edge-ser corpus info CORPUS          what is in a corpus (speakers, classes, problems)
           edge-ser pack CORPUS -o demo.pack    distil it into a signed pack of a few log-Mel samples per class
           edge-ser publish demo.pack --broker mqtts://broker:8883 --topic ser/packs --cafile ca.crt
  device:  edge-ser agent --config /etc/edge-ser/device.toml            receive, verify, train
           edge-ser train-local demo.pack -o model/    train from the pack, export ONNX / TFLite
           edge-ser listen model/                      live emotion from the microphone
  demo:    edge-ser demo                               all of the above on the built-in demo corpus
  both:    edge-ser evaluate model/ CORPUS --speakers 19-24     UAR on held-out speakers
           edge-ser doctor                             what runtimes this machine has

CORPUS may be "demo" for the built-in synthetic demo corpus (no download; not for accuracy claims).
Add --json to any command for one machine-readable JSON object on the last line of stdout (progress and
step messages go to stderr; --quiet drops them).
"""


class CliError(Exception):
    """An error the user can fix: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``edge-ser: error: ...`` (plus the JSON object under --json)."""

    #: whether the command line being parsed asked for --json (set by main(); argparse fails before it knows)
    want_json = False

    def error(self, message):
        for hidden in ("'pack-inspect', ", "'pack-audit', "):     # the hidden spellings of `pack inspect/audit`
            message = message.replace(hidden, "")
        _fail(f"{message} (see: {self.prog} --help)", _Parser.want_json)
        sys.exit(2)


def _int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low``, refused at parse time with what the option means."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants a whole number ({what}), got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} ({what}), got {value}")
        return value
    return parse


def _positive_float(what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants a number ({what}), got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be more than 0 ({what}), got {text}")
        return value
    return parse


def emit(result: Dict[str, Any], as_json: bool, human: Callable[[Dict[str, Any]], str] | None = None) -> None:
    """Print ``result``: readable text, or one JSON object on the last line with ``--json``."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=json_default, sort_keys=True) + "\n")
    else:
        text = human(result) if human else _plain(result)
        sys.stdout.write(text.rstrip() + "\n")
    sys.stdout.flush()


def _plain(result: Dict[str, Any], indent: str = "") -> str:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict) and value and len(json.dumps(value, default=json_default)) > 70:
            lines.append(f"{indent}{key}:")
            lines.append(_plain(value, indent + "  "))
        elif isinstance(value, float):
            lines.append(f"{indent}{key}: {value:.4g}")
        else:
            lines.append(f"{indent}{key}: {json.dumps(value, default=json_default) if isinstance(value, (list, dict)) else value}")
    return "\n".join(lines)


# ---------------------------------------------------------------- sub-commands (lazy imports inside)

def cmd_corpus_info(a):
    from .corpora.report import corpus_info, format_report

    return corpus_info(a.path, fmt=a.format), format_report


def cmd_pack(a):
    from .packer import pack

    return pack(a.corpus, a.output, method=a.method, ipc=a.ipc, test_speakers=a.test_speakers, seed=a.seed,
                fmt=a.format, key=a.key, model=a.model, iterations=a.iterations, progress=not a.quiet,
                params=parse_params(a.param), deployment=a.deployment), None


def parse_params(items) -> dict:
    """``["epoch_grid=80,120", "lr_img=0.01"]`` -> ``{"epoch_grid": (80, 120), "lr_img": 0.01}`` (Python literals;
    anything else stays a string)."""
    import ast

    out = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--param wants KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def cmd_pack_inspect(a):
    from .inspection import format_inspect, inspect_pack

    return inspect_pack(a.pack, public_key=a.public_key), format_inspect


def cmd_pack_audit(a):
    from .privacy import AuditConfig, audit, format_audit

    cfg = AuditConfig.from_params(shadows=a.shadows, reid_epochs=a.reid_epochs, seed=a.seed,
                                  audio_examples=a.audio_examples,
                                  **({"shadow_method": a.shadow_method} if a.shadow_method else {}))
    return audit(a.pack, a.corpus, test_speakers=a.test_speakers, out_dir=a.out, config=cfg, fmt=a.format,
                 public_key=a.public_key, progress=not a.quiet, threads=a.threads), format_audit


def cmd_keygen(a):
    from .signing import keygen

    return keygen(a.out_dir, name=a.name, force=a.force), None


def _mqtt_settings(a, command: str) -> dict:
    """Flags over ``--config`` over the environment (EDGE_SER_MQTT_*, read by :mod:`edge_ser.mqtt`); the
    password never from argv in examples: the config's password_file, EDGE_SER_MQTT_PASSWORD(_FILE)."""
    from .runconfig import load, read_password_file

    conf = load(a.config, command) if getattr(a, "config", None) else {}
    out = {}
    for key in ("broker", "topic", "username", "cafile", "timeout", "store", "public_key", "deployment",
                "memory_budget_mb", "threads", "chunk_size", "pack"):
        value = getattr(a, key, None)
        out[key] = value if value is not None else conf.get(key)
    out["insecure"] = bool(getattr(a, "insecure", False) or conf.get("insecure", False))
    out["train"] = bool(getattr(a, "train", False) or conf.get("train", False))
    out["password"] = a.password
    if out["password"] is None and conf.get("password_file"):
        out["password"] = read_password_file(conf["password_file"])
    if a.password is not None:
        sys.stderr.write("edge-ser: WARNING: --password is visible in the process list; use "
                         "EDGE_SER_MQTT_PASSWORD(_FILE) or password_file in --config\n")
    for key in ("broker", "topic"):
        if not out[key]:
            raise CliError(f"--{key} is required (or set {key} in [mqtt] of --config)")
    out["timeout"] = 60.0 if out["timeout"] is None else float(out["timeout"])
    return out


def cmd_publish(a):
    from .chunks import publish

    m = _mqtt_settings(a, "publish")
    pack = a.pack or m["pack"]
    if not pack:
        raise CliError("publish needs a PACK (or pack in [publish] of --config)")
    return publish(pack, m["broker"], m["topic"], username=m["username"], password=m["password"], cafile=m["cafile"],
                   chunk_size=m["chunk_size"] or 60_000, timeout=m["timeout"], insecure=m["insecure"],
                   public_key=m["public_key"]), None


def cmd_agent(a):
    from .agent import run_agent

    m = _mqtt_settings(a, "agent")
    return run_agent(m["broker"], m["topic"], store=m["store"], public_key=m["public_key"], username=m["username"],
                     password=m["password"], cafile=m["cafile"], train=m["train"], once=a.once, timeout=m["timeout"],
                     memory_budget_mb=m["memory_budget_mb"], threads=m["threads"], insecure=m["insecure"],
                     deployment=m["deployment"]), None


def cmd_train_local(a):
    from .local import train_local

    return train_local(a.pack, a.output, memory_budget_mb=a.memory_budget_mb, threads=a.threads,
                       public_key=a.public_key, export=not a.no_export, progress=not a.quiet, lean=a.lean), None


def cmd_evaluate(a):
    from .evaluate import evaluate, format_evaluation

    return evaluate(a.model, a.corpus, speakers=a.speakers, fmt=a.format, runtime=a.runtime,
                    progress=not a.quiet), format_evaluation


def cmd_listen(a):
    from .listen_cli import listen_cli

    return listen_cli(a), None


def cmd_demo(a):
    from .demo import format_demo_summary, run_demo

    return run_demo(a.workdir, ipc=a.ipc, quiet=a.quiet, as_json=a.json), format_demo_summary


def cmd_doctor(a):
    from .doctor import doctor, format_doctor

    return doctor(progress=not a.quiet), format_doctor


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print one JSON object on the last line of stdout (progress goes to stderr)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or step messages on stderr")
    p = _Parser(
        prog="edge-ser", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Speech emotion recognition for edge devices: a server distils a corpus into a small signed "
                    "pack of log-Mel feature samples (no audio), and devices train from the pack, never from the "
                    "corpus.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"edge-ser {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    fmt_help = "corpus layout (default: detected): ravdess, emodb, cremad, tess, iemocap, csv, folders, demo"

    def add(name, help, fn, **kw):
        sp = sub.add_parser(name, help=help, description=help, parents=[common],
                            formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        sp.set_defaults(fn=fn)
        return sp

    corpus = sub.add_parser("corpus", help="inspect a corpus", description="inspect a corpus")
    csub = corpus.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND", parser_class=_Parser)
    ci = csub.add_parser("info", help="speakers, classes, files, hours and problems of a corpus", parents=[common])
    ci.add_argument("path", help="corpus folder, CSV manifest, or 'demo'")
    ci.add_argument("--format", help=fmt_help)
    ci.set_defaults(fn=cmd_corpus_info)

    sp = add("pack", "distil a corpus into a signed pack (server side); 'pack inspect PACK' shows one, "
             "'pack audit PACK CORPUS' measures what it reveals", cmd_pack,
             epilog="example:\n  edge-ser pack ../shared/corpora/ravdess -o ravdess.pack --ipc 10 --test-speakers 19-24\n"
                    "  edge-ser pack inspect ravdess.pack\n"
                    "  edge-ser pack audit ravdess.pack ../shared/corpora/ravdess --test-speakers 19-24")
    sp.add_argument("corpus", help="corpus folder, CSV manifest, or 'demo' (built-in synthetic demo corpus)")
    sp.add_argument("-o", "--output", help="pack file to write")
    sp.add_argument("--method", default=None,
                    help="distillation method: fixed-init (default), mtt, dm, dc, random, herding, kcenter")
    sp.add_argument("--ipc", type=_int_at_least(1, "samples per class"), default=10,
                    help="log-Mel samples per class in the pack (default 10)")
    sp.add_argument("--test-speakers", default=None,
                    help="speakers held out of distillation, e.g. 19-24 or A,B (default: last quarter)")
    sp.add_argument("--seed", type=int, default=0, help="seed for the initialisation and distillation")
    sp.add_argument("--format", help=fmt_help)
    sp.add_argument("--key", help="Ed25519 private key to sign with (default: ~/.config/edge-ser/signing.key)")
    sp.add_argument("--model", default="convnet", help="model architecture: convnet (default) or cnn6")
    sp.add_argument("--iterations", type=_int_at_least(0, "distillation iterations"), default=None,
                    help="distillation iterations (default: method's)")
    sp.add_argument("--deployment", default=None,
                    help="signed deployment id devices check (their topic prefix, e.g. ser/packs)")
    sp.add_argument("--param", action="append", metavar="KEY=VALUE",
                    help="a method setting, repeatable, e.g. --param epoch_grid=80,120 (fixed-init: the device's "
                         "epoch counts to choose from); see the method's docs (edge_ser/distill/)")

    # `pack inspect PACK` is rewritten to this hidden command (main()); it is left out of the command list
    psub_inspect = sub.add_parser("pack-inspect", prog="edge-ser pack inspect", parents=[common],
                                  description="show a pack: members, checksums, configs, schedule, provenance")
    psub_inspect.add_argument("pack")
    psub_inspect.add_argument("--public-key", help="Ed25519 public key to verify the signature with")
    psub_inspect.set_defaults(fn=cmd_pack_inspect)
    sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest != "pack-inspect"]

    # `pack audit PACK CORPUS` likewise
    sp = sub.add_parser("pack-audit", prog="edge-ser pack audit", parents=[common],
                        description="measure what a pack reveals about the corpus it was made from: near-copies of "
                                    "real clips, speaker re-identification, membership inference on the device model, "
                                    "and Griffin-Lim audio of the closest samples",
                        epilog="examples:\n  edge-ser pack audit ravdess.pack ../shared/corpora/ravdess --test-speakers 19-24\n"
                               "  edge-ser pack audit ravdess.pack ../shared/corpora/ravdess --shadows 4   # + LiRA "
                               "(each shadow is one distillation)",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("pack")
    sp.add_argument("corpus", help="the corpus the pack was made from (folder, CSV manifest, or 'demo')")
    sp.add_argument("--test-speakers", default=None,
                    help="speakers held out of the pack (default: the pack's own record, else the last quarter)")
    sp.add_argument("--shadows", type=int, default=0,
                    help="LiRA shadow packs made by the pack's method (0: threshold attack only; >= 2 for LiRA)")
    sp.add_argument("--shadow-method", default=None, help="make shadow packs with this method instead (a proxy)")
    sp.add_argument("--reid-epochs", type=int, default=12,
                    help="speaker-classifier training epochs (default 12, the quick audit; 30 for the full one)")
    sp.add_argument("--audio-examples", type=int, default=3, help="Griffin-Lim WAV pairs to write (default 3)")
    sp.add_argument("--out", default=None, help="folder for report.json and the WAV files (default PACK.audit/)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    sp.add_argument("--format", help=fmt_help)
    sp.add_argument("--public-key", help="verify the pack's signature with this key first")
    sp.set_defaults(fn=cmd_pack_audit)
    sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest != "pack-audit"]

    sp = add("keygen", "make an Ed25519 signing key pair for packs", cmd_keygen,
             epilog="writes signing.key (keep it on the server) and signing.pub (copy it to devices)")
    sp.add_argument("--out-dir", default=None, help="folder for the key pair (default: ~/.config/edge-ser)")
    sp.add_argument("--name", default="signing", help="file name stem (default: signing)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing key pair")

    def mqtt_args(sp):
        sp.add_argument("--config", help="TOML settings ([mqtt] and [agent]/[publish]); flags win over it")
        sp.add_argument("--broker", help="mqtts://HOST:8883 (TLS; default for HOST:PORT), wss://HOST/PATH; plain "
                                         "mqtt:// or ws:// only to this machine, or with --insecure")
        sp.add_argument("--topic", help="topic prefix, e.g. ser/packs")
        sp.add_argument("--username", help="MQTT user (or username in --config, or EDGE_SER_MQTT_USERNAME)")
        sp.add_argument("--password", help="avoid: argv is visible to all; use password_file in --config, "
                                           "EDGE_SER_MQTT_PASSWORD or EDGE_SER_MQTT_PASSWORD_FILE")
        sp.add_argument("--cafile", help="CA certificate for mqtts:// (or cafile in --config, or EDGE_SER_MQTT_CAFILE)")
        sp.add_argument("--insecure", action="store_true",
                        help="allow plain-text MQTT to another machine (trusted networks and tests only)")
        sp.add_argument("--timeout", type=float, default=None, help="seconds to wait (default 60)")

    sp = add("publish", "publish a pack to devices over MQTT (chunked, QoS 1, retained)", cmd_publish)
    sp.add_argument("pack", nargs="?")
    mqtt_args(sp)
    sp.add_argument("--chunk-size", type=int, default=None, help="bytes per chunk (<= 65536, default 60000)")
    sp.add_argument("--public-key", help="key that tells our own retained announcement from junk "
                                         "(default: ~/.config/edge-ser/signing.pub or .key)")

    sp = add("agent", "device agent: receive packs over MQTT, verify, store atomically, optionally train", cmd_agent)
    mqtt_args(sp)
    sp.add_argument("--store", default=None, help="where packs live (default: ~/.local/share/edge-ser)")
    sp.add_argument("--public-key", help="Ed25519 public key that packs must be signed with")
    sp.add_argument("--deployment", default=os.environ.get("EDGE_SER_DEPLOYMENT"),
                    help="the signed deployment id packs must carry (default: the topic prefix; packs without one "
                         "are then accepted with a warning)")
    sp.add_argument("--train", action="store_true", help="run train-local on every new pack")
    sp.add_argument("--once", action="store_true", help="exit after the first pack is stored")
    sp.add_argument("--memory-budget-mb", type=_positive_float("MB"), default=None)
    sp.add_argument("--threads", type=_int_at_least(1, "CPU threads; leave it out for all cores"), default=None)

    sp = add("train-local", "train the compact model from a pack on this device and export it", cmd_train_local,
             epilog="examples:\n  edge-ser train-local demo.pack -o model/ --threads 1\n"
                    "  edge-ser train-local demo.pack -o model/ --memory-budget-mb 400 --no-export   # plans, or refuses\n"
                    "  edge-ser train-local demo.pack -o model/ --lean     # least memory, same result, slower\n\n"
                    "Under --memory-budget-mb training runs on a heap that returns big blocks when freed (Linux, glibc),\n"
                    "then takes the first plan that fits: the pack's schedule as is; the same schedule with activations\n"
                    "recomputed in channel groups (--lean: same weights, slower); micro-batches (BatchNorm sees smaller\n"
                    "batches: the golden check becomes informative); otherwise it refuses before training.")
    sp.add_argument("pack")
    sp.add_argument("-o", "--output", required=True, help="model folder to write")
    sp.add_argument("--memory-budget-mb", type=_positive_float("MB"), default=None,
                    help="peak RSS budget of the whole process, MB: plan to fit it, or refuse before training")
    sp.add_argument("--threads", type=_int_at_least(1, "CPU threads; leave it out for all cores"), default=None,
                    help="CPU threads for training, at least 1 (default: all cores)")
    sp.add_argument("--public-key", help="Ed25519 public key the pack must be signed with")
    sp.add_argument("--no-export", action="store_true", help="train and check only; skip ONNX/TFLite export")
    sp.add_argument("--lean", action="store_true",
                    help="least memory: recompute activations in channel groups (same result, slower); "
                         "also chosen by itself when --memory-budget-mb needs it")

    sp = add("evaluate", "UAR / WA / F1 / confusion of a model on (held-out speakers of) a corpus", cmd_evaluate)
    sp.add_argument("model", help="model folder, or one exported file (.onnx, .tflite, .pt)")
    sp.add_argument("corpus", help="corpus folder, CSV manifest, or 'demo'")
    sp.add_argument("--speakers", default=None, help="only these speakers, e.g. 19-24 (default: the pack's test speakers)")
    sp.add_argument("--format", help=fmt_help)
    sp.add_argument("--runtime", default=None, help="torch, onnx, onnx-int8, tflite (default: from MODEL)")

    sp = add("listen", "live emotion recognition from a microphone (or --file)", cmd_listen,
             epilog="examples:\n  edge-ser listen model/ --list-devices\n  edge-ser listen model/ --file speech.wav")
    sp.add_argument("model", nargs="?", help="model folder or exported file")
    sp.add_argument("--file", help="stream a wav/flac file through the identical path instead of a microphone")
    sp.add_argument("--device", help="input device name or index (see --list-devices)")
    sp.add_argument("--list-devices", action="store_true", help="list audio input devices and exit")
    sp.add_argument("--runtime", default=None, help="onnx-int8 (default), onnx, tflite")
    sp.add_argument("--window", type=float, default=None, help="window seconds (default: the model's clip length)")
    sp.add_argument("--hop", type=float, default=0.5, help="seconds between results (default 0.5)")
    sp.add_argument("--smooth", type=int, default=3, help="average probabilities over this many hops (default 3)")
    sp.add_argument("--vad-db", type=float, default=-55.0,
                    help="skip windows quieter than this level in dBFS (loudest 10%% of 20 ms frames; default -55)")
    sp.add_argument("--samplerate", type=int, default=None, help="capture rate (default: the device's own)")
    sp.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    sp.add_argument("--mqtt-topic", help="also publish each result to this topic (needs --broker)")
    sp.add_argument("--broker", help="mqtts://HOST:PORT (or mqtt:// on this machine) for --mqtt-topic; credentials from "
                    "EDGE_SER_MQTT_USERNAME / EDGE_SER_MQTT_PASSWORD(_FILE)")
    sp.add_argument("--cafile", help="CA certificate for an mqtts:// --broker")
    sp.add_argument("--insecure", action="store_true", help="allow plain mqtt:// to another machine for --mqtt-topic")
    sp.add_argument("--realtime", action="store_true", help="with --file: pace the file at real time")

    add("doctor", "check this machine's runtimes and what is missing", cmd_doctor)

    sp = add("demo", "run the whole pipeline on the built-in demo corpus (offline, 1.5-3 minutes on 2 cores)",
             cmd_demo)
    sp.add_argument("--workdir", help="where to put keys, pack and model (default: a new temp folder)")
    sp.add_argument("--ipc", type=_int_at_least(1, "samples per class"), default=10,
                    help="log-Mel samples per class in the pack (default 10)")
    return p


def _restart_with_lean_heap(argv) -> None:
    """``train-local``/``agent`` with ``--memory-budget-mb`` (or ``--lean``) on Linux (glibc): exec this same command once
    more with :data:`memory.LEAN_HEAP_ENV` set, which glibc reads only at process start (transparent huge
    pages for the big blocks the lean heap maps and unmaps each step: faster, same numbers).
    Only for a real command line (``main()`` from the console script), never inside a caller's process."""
    if not argv or argv[0] not in ("train-local", "agent") or os.environ.get("EDGE_SER_LEAN_HEAP"):
        return
    if not any(a in ("--memory-budget-mb", "--lean") or a.startswith("--memory-budget-mb=") for a in argv):
        return
    from .memory import LEAN_HEAP_ENV, lean_heap_available

    if not sys.platform.startswith("linux") or not lean_heap_available():
        return

    env = dict(os.environ, EDGE_SER_LEAN_HEAP="1")
    for key, value in LEAN_HEAP_ENV.items():
        env[key] = f"{env[key]}:{value}" if env.get(key) else value
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "edge_ser", *argv], env)
    except OSError:
        pass   # carry on in this process (lean training still works, only slower)


class _LogFormat(logging.Formatter):
    """Library log records as the CLI's own lines: ``edge-ser: WARNING: ...`` / ``edge-ser: note: ...``."""

    def format(self, record):
        level = "WARNING" if record.levelno >= logging.WARNING else "note"
        return f"edge-ser: {level}: {record.getMessage()}"


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("edge_ser")
    if not any(getattr(h, "_edge_ser_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LogFormat())
        handler._edge_ser_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def main(argv=None) -> int:
    if argv is None:
        _restart_with_lean_heap(sys.argv[1:])
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "pack" and argv[1] == "inspect":
        argv = ["pack-inspect"] + argv[2:]
    elif len(argv) >= 2 and argv[0] == "pack" and argv[1] == "audit":
        argv = ["pack-audit"] + argv[2:]
    parser = build_parser()
    _Parser.want_json = "--json" in argv
    args = parser.parse_args(argv)
    _setup_logging(bool(getattr(args, "quiet", False)))
    if not getattr(args, "fn", None):
        if argv and argv[0] == "corpus":
            _fail("corpus needs a subcommand: info (see: edge-ser corpus --help)", "--json" in argv)
            return 2
        parser.print_help()
        return 0 if not argv else 2
    as_json = getattr(args, "json", False)
    from .progress import enable

    enable(not getattr(args, "quiet", False))      # long phases say what they do, on stderr
    try:
        result, human = args.fn(args)
    except KeyboardInterrupt:
        _fail("interrupted", as_json)
        return 130
    except (CliError, ValueError, FileNotFoundError, PermissionError, OSError, RuntimeError) as exc:
        _fail(_one_line(exc), as_json)
        return 1
    if result is not None:
        emit(result, as_json, human)
        if isinstance(result, dict) and result.get("ok") is False and result.get("error"):
            sys.stderr.write(f"edge-ser: error: {_one_line(result['error'])}\n")
    return 0 if not (isinstance(result, dict) and result.get("ok") is False) else 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _fail(message: str, as_json: bool) -> None:
    sys.stderr.write(f"edge-ser: error: {message}\n")
    if as_json:
        sys.stdout.write(json.dumps({"ok": False, "error": message}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
