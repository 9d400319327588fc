"""Reliability table (issue 8): run every fault-injection test and write RELIABILITY.md (fault, expected
behaviour, tests, result of this very run).

    PYTHONPATH=. python benchmarks/reliability.py            # all tests marked faults + the named ones
    PYTHONPATH=. python benchmarks/reliability.py --no-slow  # skip the soak tests (a quick look)

Two pytest runs, each with --junitxml: (1) ``-m faults`` over tests/ (everything marked faults,
whatever file it lives in); (2) the tests named in :data:`FAULTS` that are not marked faults, listed
explicitly. Results are read from the JUnit XML, never assumed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]

#: (area, fault, expected behaviour, tests "file.py::function" (all parametrisations count))
FAULTS: List[Tuple[str, str, str, List[str]]] = [
    ("audio", "corrupt header", "AudioError: one line naming the file ('not a readable audio file')",
     ["test_audio.py::test_corrupt_header"]),
    ("audio", "truncated WAV / FLAC", "AudioError 'truncated' (header vs data), file left out",
     ["test_audio.py::test_truncated_wav_is_an_error", "test_audio.py::test_truncated_flac_is_an_error"]),
    ("audio", "0-length file / WAV with no samples", "AudioError 'empty file' / 'zero-length'",
     ["test_audio.py::test_zero_length_file", "test_audio.py::test_wav_with_no_samples"]),
    ("audio", "NaN / +inf / -inf samples", "AudioError 'contains NaN or infinite samples'",
     ["test_audio.py::test_nan_samples", "test_faults.py::test_non_finite_samples_refused"]),
    ("audio", "10-hour file", "refused from the header ('too long ... split it first'), < 1 MB of it read",
     ["test_faults.py::test_ten_hour_file_refused_without_reading_it",
      "test_audio.py::test_too_long_is_refused_before_reading"]),
    ("audio", "wrong extension (WAV named .mp3, FLAC named .wav, text named .wav/.flac)",
     "decoded by content with a note 'content is X although the name ends in .y'; non-audio: one error line",
     ["test_faults.py::test_wrong_extension_is_decoded_by_content_and_noted",
      "test_audio.py::test_non_audio_bytes_with_wav_extension"]),
    ("audio", "unsupported codec (WMA/MPEG in WAV, M4A container)", "AudioError 'not a readable audio file (...)'",
     ["test_faults.py::test_unsupported_codec_is_one_clear_line"]),
    ("audio", "clipping", "file used, note 'clipping in N% of samples' (judged before DC removal)",
     ["test_audio.py::test_clipping_noted", "test_audio.py::test_clipping_with_dc_offset_still_noted"]),
    ("audio", "DC offset", "offset removed, note 'DC offset +x removed'",
     ["test_audio.py::test_dc_offset_removed_and_noted"]),
    ("audio", "silent / too short", "AudioError 'silent' / 'too short'",
     ["test_audio.py::test_silence", "test_audio.py::test_too_short"]),
    ("audio", "FIFO or folder named *.wav", "AudioError 'not a regular file', never blocks",
     ["test_faults.py::test_fifo_and_folder_named_like_audio_do_not_block"]),
    ("corpora", "every bad entry at once, via `edge-ser corpus info`",
     "exit 0, exactly one problem line per bad file, notes for clipping/DC/extension/duplicates, rest usable",
     ["test_faults.py::test_corpus_with_every_bad_entry_cli_report",
      "test_corpora.py::test_bad_files_give_one_line_each_and_the_rest_loads"]),
    ("corpora", "empty class folder", "problem line 'class folder holds no audio files: class left out'; "
     "< 2 classes left: CorpusError naming the empty folder",
     ["test_faults.py::test_empty_class_folder_is_left_out_with_a_problem_line",
      "test_corpora.py::test_empty_class_and_single_class_are_clear_errors"]),
    ("corpora", "single speaker", "note at scan; `edge-ser pack` exits 1 with one line 'needs at least 2 "
     "speakers' before distilling, no pack written",
     ["test_faults.py::test_single_speaker_refused_at_split"]),
    ("corpora", "unknown labels (EmoDB letter, CREMA-D code, RAVDESS code 09)", "one problem line each, rest loads",
     ["test_faults.py::test_unknown_labels_are_one_line_each",
      "test_corpora.py::test_bad_files_give_one_line_each_and_the_rest_loads"]),
    ("corpora", "duplicate files (copy, symlink under another label, CSV row twice)",
     "note 'byte-identical to ...' (both kept); CSV: second row ignored with a problem line",
     ["test_faults.py::test_duplicate_files_are_noted_and_kept", "test_corpora.py::test_csv_manifest"]),
    ("corpora", "unreadable entries (dangling symlink, FIFO, chmod 000)",
     "one problem line each ('cannot read the file (...)'), no hang, rest loads; chmod case skipped as root",
     ["test_faults.py::test_unreadable_entries_are_problems_and_the_rest_loads",
      "test_faults.py::test_permission_denied_file_is_a_problem_line"]),
    ("packs", "every byte flipped in turn (small pack)", "PackError or identical content; never a wrong pack",
     ["test_pack.py::test_every_byte_flipped_tiny_pack"]),
    ("packs", "tampered member / manifest", "PackError: SHA-256 mismatch / bad signature",
     ["test_pack.py::test_tampered_member_byte", "test_pack.py::test_tampered_manifest_fails_signature"]),
    ("packs", "truncation at every boundary", "PackError naming the file",
     ["test_pack.py::test_truncated_everywhere"]),
    ("packs", "wrong signature / unsigned / no public key", "refused with one line",
     ["test_pack.py::test_wrong_key_refused", "test_pack.py::test_unsigned_refused_unless_opted_in",
      "test_pack.py::test_no_public_key_refused"]),
    ("packs", "unknown major format version", "refused: 'unknown major version'",
     ["test_pack.py::test_unknown_major_version"]),
    ("packs", "oversized declared lengths", "refused before allocating",
     ["test_pack.py::test_oversized_declared_length", "test_pack.py::test_manifest_length_mismatch"]),
    ("packs", "path traversal / unknown member names", "refused, nothing extracted",
     ["test_pack.py::test_path_traversal_and_unknown_members"]),
    ("packs", "decompression bomb", "refused from the compression ratio / declared size",
     ["test_pack.py::test_zip_bomb"]),
    ("packs", "pickled or malformed arrays; signed but inconsistent", "refused, no code executed",
     ["test_pack.py::test_pickled_and_malformed_arrays_refused",
      "test_pack.py::test_validly_signed_but_inconsistent_contents"]),
    ("packs", "property-based: arbitrary bytes, random mutations (hypothesis)", "PackError or unchanged pack",
     ["test_pack.py::test_property_arbitrary_bytes_give_pack_error",
      "test_pack.py::test_property_mutated_pack_refused_or_unchanged"]),
    ("mqtt", "broker down at start", "publish/agent: one line 'cannot reach MQTT broker', exit 1; agent "
     "retries within --timeout and receives once the broker is up",
     ["test_transport.py::test_wrong_credentials_wrong_ca_broker_down",
      "test_faults.py::test_agent_cli_broker_down_wrong_password_wrong_ca",
      "test_faults.py::test_agent_started_before_the_broker_retries_then_receives"]),
    ("mqtt", "wrong credentials", "one line 'refused the connection ... (check --username/--password)', exit 1",
     ["test_transport.py::test_wrong_credentials_wrong_ca_broker_down",
      "test_faults.py::test_agent_cli_broker_down_wrong_password_wrong_ca"]),
    ("mqtt", "TLS with the wrong CA", "one line 'TLS certificate ... not trusted (wrong --cafile?)', exit 1",
     ["test_transport.py::test_wrong_credentials_wrong_ca_broker_down",
      "test_faults.py::test_agent_cli_broker_down_wrong_password_wrong_ca"]),
    ("mqtt", "broker restart mid-transfer", "transfer resumes from retained chunks, pack stored",
     ["test_transport.py::test_broker_restart_mid_transfer"]),
    ("mqtt", "duplicate, reordered and bad chunks", "exact reassembly, bad chunks rejected",
     ["test_transport.py::test_duplicate_reordered_and_bad_chunks", "test_transport.py::test_property_reassembler"]),
    ("mqtt", "replayed older version / tampered pack in transit", "refused ('not newer' / SHA-256), newer pack kept",
     ["test_transport.py::test_replayed_older_version_and_tampered_pack_refused",
      "test_transport.py::test_parse_announcement_rejects_junk"]),
    ("mqtt", "flood of junk on the topic", "good pack still stored; agent process stays up; memory bounded "
     "(peak RSS growth < 100 MB under ~280 MB of junk; queue bounded in bytes)",
     ["test_transport.py::test_junk_flood_does_not_stop_delivery",
      "test_faults.py::test_junk_flood_during_delivery_agent_stores_pack_with_bounded_memory",
      "test_faults.py::test_agent_queue_is_bounded_in_bytes_while_the_main_thread_is_busy"]),
    ("device", "power loss (SIGKILL) during the atomic pack swap", "store names the old or the new pack, both "
     "complete and verifiable; restarted agent ends on the newest",
     ["test_transport.py::test_sigkill_mid_commit_keeps_a_good_pack",
      "test_transport.py::test_agent_sigkilled_mid_transfer_then_recovers"]),
    ("device", "power loss (SIGKILL) during the model-folder swap", "after recovery the model folder is complete",
     ["test_faults.py::test_power_loss_during_model_swap_keeps_a_complete_model"]),
    ("device", "disk full (ENOSPC while copying / writing state; RLIMIT_FSIZE in the agent process)",
     "error names the cause, previous pack current and verifiable, no partial file left",
     ["test_faults.py::test_disk_full_while_copying_a_pack_into_the_store",
      "test_faults.py::test_disk_full_while_writing_the_store_state",
      "test_faults.py::test_disk_full_in_the_agent_keeps_the_previous_pack",
      "test_local.py::test_failure_mid_export_keeps_previous_model"]),
    ("device", "memory budget too small", "`train-local --memory-budget-mb 50`: exit 1, one line naming the "
     "budget, before training (no OOM kill), previous model untouched",
     ["test_faults.py::test_memory_budget_too_small_cli_refuses_and_keeps_model",
      "test_local.py::test_budget_too_small_is_a_clear_refusal"]),
    ("device", "θ0 tampered / golden vectors disagree", "refused, model not installed",
     ["test_local.py::test_theta0_hash_mismatch_refused", "test_local.py::test_golden_check_fails_for_tampered_logits"]),
    ("device", "rollback and sequence floor", "rollback to previous; an old sequence never replaces a newer one",
     ["test_transport.py::test_store_rollback_and_sequence_floor"]),
    ("soak", "200 pack versions with random broker restarts", "ends on the newest, verified; store holds only "
     "current + previous; no leaked files or descriptors",
     ["test_soak.py::test_agent_process_soaks_200_versions_with_broker_restarts",
      "test_transport_soak.py::test_soak_200_versions_with_broker_restarts"]),
    # issue 18: what an attacker with write access to the pack topics (or a crash) could do
    ('attacks', 'deeply nested JSON announcement, retained (crash-looped the agent, killed `edge-ser publish`)',
     'junk: counted, one log line; agent stays up on the previous pack; `publish` replaces it with a note; the next good pack is stored within seconds (param nested-json)',
     ['test_transport_attacks.py::test_wire_attack_agent_survives_and_takes_the_next_pack', 'test_transport_attacks.py::test_publisher_survives_and_replaces_a_junk_retained_announcement',
      'test_transport_attacks.py::test_handler_survives_each_nasty_payload', 'test_transport_attacks.py::test_property_handler_never_raises']),
    ('attacks', 'chunk index that `str.isdigit()` accepts but `int()` does not (`²`, `٣`), or with 1000 / 5000 digits',
     'only ASCII indices of at most 9 digits; anything else is counted junk; agent stays up; next good pack stored (params non-ascii-digit-chunk-index, thousand-digit-chunk-index)',
     ['test_transport_attacks.py::test_wire_attack_agent_survives_and_takes_the_next_pack']),
    ('attacks', 'unsigned announcement with an enormous sequence, retained (pinned the agent; `publish` refused every new pack); thousand-digit numbers',
     'an announcement without a valid signed manifest starts no transfer; numbers bounded (sequence < 2^63); `publish` obeys a retained announcement only when it is signed by our key for this topic (params huge-sequence-unsigned-retained, huge-numbers)',
     ['test_transport_attacks.py::test_wire_attack_agent_survives_and_takes_the_next_pack', 'test_transport_attacks.py::test_publisher_survives_and_replaces_a_junk_retained_announcement']),
    ('attacks', "the next pack's id (and its genuine signed manifest) announced first with junk content (got the real pack refused until restart)",
     "refusals keyed by the transfer's unsigned fields / the whole-file hash, expiring; the real pack is stored (param next-pack-id-with-junk-content)",
     ['test_transport_attacks.py::test_wire_attack_agent_survives_and_takes_the_next_pack']),
    ('attacks', 'a transfer that can never finish (genuine signed manifest, junk file hashes, no chunks; retained)',
     'a transfer without progress for 2 s (5 s once part-way) yields to waiting announcements of the same pack, is re-subscribed after 5 s and given up after 30 s; a newer signed announcement pre-empts it (param next-pack-id-stalled-transfer-retained)',
     ['test_transport_attacks.py::test_wire_attack_agent_survives_and_takes_the_next_pack']),
    ('attacks', 'replayed older signed pack; oversized, binary and path-traversal payloads (held before: regression guard)',
     "refused before any download ('not newer', once on status) / counted junk (params replayed-older-signed-pack, oversized-binary-traversal)",
     ['test_transport_attacks.py::test_wire_attack_agent_survives_and_takes_the_next_pack']),
    ('attacks', 'soak: >= 200 messages interleaving good packs with every junk class above',
     'ends on the newest good pack; every good pack stored within seconds; agent never dies; peak RSS bounded (< 200 MB asserted)',
     ['test_transport_soak.py::test_soak_good_packs_interleaved_with_every_junk_class']),
    ('attacks', 'forged pack of many just-under-cap members (~0.8 GB decompressed before the signature check)',
     "the manifest's signature is verified before any other member is read: refused with < 8 MB allocated, < 1 s",
     ['test_transport_attacks.py::test_forged_pack_is_refused_before_any_member_is_decompressed']),
    ('attacks', 'validly signed pack whose derived sizes need gigabytes (epochs = 10^9; stem expansion)',
     'capped from the signed manifest before allocating (<= 10^5 epochs, <= 10^6 steps, <= 256 MB per derived array)',
     ['test_transport_attacks.py::test_signed_pack_with_huge_derived_sizes_is_refused_before_allocating']),
    ('attacks', 'validly signed pack of another deployment (was accepted and raised the rollback floor)',
     'signed deployment identity (id, classes, model) checked against --deployment (default: the topic) before download; refused on status; floor unchanged; next good pack stored; `publish` refuses a pack for another topic',
     ['test_transport_attacks.py::test_pack_of_another_deployment_is_refused_and_the_floor_stays', 'test_transport_attacks.py::test_deployment_check_rules']),
    ('attacks', "agent killed while training (after restart 'up-to-date' with no model)",
     'the store records which pack the model was built from and training attempts; a restarted agent resumes training (at most 3 attempts per pack); status carries model_pack_id',
     ['test_transport_attacks.py::test_agent_killed_while_training_resumes_and_builds_the_model']),
    ('attacks', 'int8 export that disagrees with fp32 (was installed with a warning and used by `listen`)',
     "an int8 model whose top-1 agreement with fp32 on the pack's vectors is below 80 % is removed, model.json says refused, `listen` runs fp32 with a note",
     ['test_transport_attacks.py::test_int8_that_disagrees_with_fp32_is_refused_and_listen_uses_fp32']),
    ('attacks', 'plain-text MQTT to another machine (the shipped device default); password on argv; no CA in the unit',
     'refused in one line unless --insecure (loopback allowed; HOST:PORT means mqtts); --config TOML with cafile and password_file, EDGE_SER_MQTT_* variables; shipped units and configs TLS, no --password',
     ['test_transport_attacks.py::test_plain_mqtt_to_another_machine_needs_insecure', 'test_transport_attacks.py::test_shipped_units_and_configs_are_tls_and_keep_passwords_off_argv', 'test_transport_attacks.py::test_agent_and_publish_read_a_config_file_and_password_file']),
    ('attacks', "a device connects with another device's client id (kicked it off the broker)",
     'shipped config: use_username_as_clientid on every listener; the victim stays connected',
     ['test_transport_attacks.py::test_a_device_cannot_take_over_another_devices_session']),
    ('attacks', 'EDGE_SER_ALLOW_UNSIGNED set while a public key is configured (the key was ignored)',
     'the variable only applies where no key is configured; an unsigned pack is refused',
     ['test_transport_attacks.py::test_unsigned_override_cannot_weaken_a_configured_key', 'test_pack.py::test_unsigned_refused_unless_opted_in']),
    ('attacks', 'damaged state.json (stopped the agent)',
     'recovered from state.backup.json, else from the pack files; the rollback floor is never lowered',
     ['test_transport_attacks.py::test_damaged_state_json_is_recovered_without_lowering_the_floor']),
    ('attacks', '`keygen --force` with planted symlinks at the key paths',
     'key files written via O_EXCL|O_NOFOLLOW temp files renamed into place; the symlink targets are untouched; folder 0700',
     ['test_transport_attacks.py::test_keygen_force_does_not_follow_planted_symlinks']),
]


#: Known bugs a failing test stands for (test -> what is wrong and the proposed fix), shown under the table.
BUGS = {
    "test_faults.py::test_disk_full_while_copying_a_pack_into_the_store":
        "edge_ser/store.py PackStore.commit: when the copy/fsync into `packs/.<name>.tmp` fails (ENOSPC), the "
        "partial temp file stays on the full disk until the next cleanup(). Fix: wrap the copy/replace in "
        "`try: ... except BaseException: tmp.unlink(missing_ok=True); raise`.",
    "test_faults.py::test_agent_queue_is_bounded_in_bytes_while_the_main_thread_is_busy":
        "edge_ser/transport.py Agent._on_message/queue_put: the queue is bounded by count (QUEUE_MAX=512) but "
        "accepts payloads up to MAX_ANNOUNCE_BYTES (1 MB), so a junk flood while the main thread is busy "
        "(verify, commit, --train) can pin ~512 MB. Fix: track queued bytes (add in queue_put, subtract after "
        "queue.get in run) and drop above a byte cap (e.g. 16 MB); also drop chunk-topic payloads > MAX_CHUNK.",
}


def run_pytest(args: List[str], xml: Path) -> Tuple[int, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=REPO, env=env)
    return rc, time.monotonic() - t0


def read_junit(xml: Path) -> Dict[str, List[Tuple[str, str]]]:
    """``file.py::function`` -> [(full test name, "pass" | "fail" | "skip" | "error")]."""
    out: Dict[str, List[Tuple[str, str]]] = defaultdict(list)
    if not xml.exists():
        return out
    for case in ET.parse(xml).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        name = case.get("name", "")
        kids = {child.tag for child in case}
        result = "fail" if "failure" in kids else "error" if "error" in kids else "skip" if "skipped" in kids else "pass"
        out[f"{module}.py::{name.split('[')[0]}"].append((name, result))
    return out


def summarise(results: List[Tuple[str, str]]) -> str:
    if not results:
        return "not run"
    counts = defaultdict(int)
    for _, r in results:
        counts[r] += 1
    word = "FAIL" if counts["fail"] or counts["error"] else "skip" if counts["skip"] == len(results) else "pass"
    detail = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()) if v)
    return word if len(results) == 1 else f"{word} ({detail})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-slow", action="store_true", help="skip tests marked slow (the soak tests)")
    ap.add_argument("--out", default=str(REPO / "RELIABILITY.md"))
    a = ap.parse_args(argv)
    marker = "faults and not slow" if a.no_slow else "faults"
    with tempfile.TemporaryDirectory() as tmp:
        x1, x2 = Path(tmp) / "faults.xml", Path(tmp) / "named.xml"
        rc1, t1 = run_pytest(["-m", marker, "tests"], x1)
        marked = read_junit(x1)
        named = sorted({t for *_, tests in FAULTS for t in tests if t not in marked})
        extra = ["-m", "not slow"] if a.no_slow else []
        rc2, t2 = run_pytest(extra + [f"tests/{t}" for t in named], x2) if named else (0, 0.0)
        results = dict(marked)
        results.update(read_junit(x2))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Reliability: faults, expected behaviour, tests, results", "",
             f"Generated by `PYTHONPATH=. python benchmarks/reliability.py{' --no-slow' if a.no_slow else ''}` on "
             f"{stamp} (2-core CPU, shared and loaded; pytest {t1 + t2:.0f} s). Results come from the JUnit XML of "
             f"this run: `pytest -m \"{marker}\" tests` plus the named tests of other files below "
             "(`pytest tests/FILE::TEST ...`).", "",
             "| area | fault | expected behaviour | test | result |", "|---|---|---|---|---|"]
    shown = set()
    for area, fault, expected, tests in FAULTS:
        for i, t in enumerate(tests):
            shown.add(t)
            lines.append(f"| {area if i == 0 else ''} | {fault if i == 0 else ''} | {expected if i == 0 else ''} "
                         f"| `{t}` | {summarise(results.get(t, []))} |")
    others = sorted(t for t in results if t not in shown)
    if others:
        lines += ["", "Other tests marked `faults` (run, not in the table above):", "",
                  "| test | result |", "|---|---|"]
        lines += [f"| `{t}` | {summarise(results[t])} |" for t in others]
    total = [r for rs in results.values() for _, r in rs]
    failed = sorted({t for t, rs in results.items() for _, r in rs if r in ("fail", "error")})
    lines += ["", f"Totals: {sum(r == 'pass' for r in total)} passed, "
                  f"{sum(r in ('fail', 'error') for r in total)} failed, {sum(r == 'skip' for r in total)} skipped."]
    if failed:
        lines += ["", "Failing tests:", ""]
        lines += [f"- `{t}`: {BUGS.get(t, 'unexpected failure: see the pytest output of this run')}" for t in failed]
    lines += ["", "Not in pytest: a time-boxed coverage-guided fuzz run of the pack parser, "
                  "`tests/fuzz_pack.py` (atheris; see its docstring for the command)."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}: {len(total)} test results, {len(failed)} failing test(s)")
    return 0 if rc1 in (0, 5) and rc2 in (0, 5) else 1


if __name__ == "__main__":
    sys.exit(main())
