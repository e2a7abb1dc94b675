"""The torture run (`scripts/torture.py`) for about a minute: it must print PASS.

TORTURE_SECONDS changes how long the faults go on (TORTURE_SEED fixes the seed). It needs
`redis-server` on PATH and PostgreSQL at DATABASE_URL (it creates and drops two databases).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_DATABASE_URL, _postgres_answers, unavailable

ROOT = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("TORTURE_SECONDS", "60"))


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 660)  # the run's own limit below, and then some
def test_a_torture_run_ends_with_every_table_equal_to_the_model() -> None:
    base = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    if shutil.which("redis-server") is None:
        unavailable("the redis-server binary")
    if not _postgres_answers(base):
        unavailable(f"PostgreSQL at {base}")
    args = ["--seconds", str(SECONDS), "--database-url", base]
    if os.environ.get("TORTURE_SEED"):
        args += ["--seed", os.environ["TORTURE_SEED"]]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "torture.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS + 600,
    )
    print(done.stdout[-30_000:])
    print(done.stderr[-10_000:], file=sys.stderr)
    assert done.returncode == 0, "the torture run failed: see its output above"
    assert done.stdout.rstrip().splitlines()[-1] == "PASS"
