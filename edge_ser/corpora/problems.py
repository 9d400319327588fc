"""What the CLI tells a user about a corpus before and while it works on it: a missing corpus path refused
before any heavy import, and each file left out listed one line on stderr (as ``corpus info`` lists them)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


def check_corpus_path(corpus, fmt: Optional[str] = None) -> None:
    """Refuse a corpus path that does not exist before any heavy import (the demo corpus is built in)."""
    from .detect import is_demo

    if is_demo(corpus, fmt):
        return
    if not corpus or not Path(str(corpus)).expanduser().exists():
        raise FileNotFoundError(f"{corpus}: no such corpus folder or CSV manifest "
                                "(or use 'demo' for the built-in demo corpus)")


def report_problems(problems, what: str = "left out", stream=None) -> list:
    """Print each file left out (error-severity problem) on stderr, one line each, as ``corpus info`` lists
    them, and return the lines; notes (files used) stay quiet here."""
    lines = [p.line() for p in problems if getattr(p, "severity", "error") == "error"]
    stream = sys.stderr if stream is None else stream
    for line in lines:
        stream.write(f"edge-ser: {what}: {line.split(': ', 1)[-1]}\n")
    if lines:
        stream.write(f"edge-ser: {len(lines)} file(s) {what} (the rest is used; `edge-ser corpus info` lists them)\n")
        stream.flush()
    return lines
