"""Every benchmark script still starts: its imports resolve (as `python bench/X.py` runs
them, with bench/ first on the path) and its options parse. The measurements themselves
are for people, not for CI (see bench/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_the_benchmarks_are_found() -> None:
    assert {p.name for p in SCRIPTS} >= {"pipeline.py", "producer.py", "callbacks.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_starts(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
