"""Smoke test of benchmarks/bench_core.py: it runs and reports every row.

No timing is asserted (the machine may be loaded): only that ``--quick
--json`` completes and that each row of the table is there with positive,
finite numbers on both sides.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCALE_OPS = (
    "connect-bookkeeping",
    "disconnect",
    "can_accept_connection",
    "is_user_connected",
    "get_lobby_users",
    "get_stats",
    "update_last_message",
    "record_pong",
)
EXPECTED_ROWS = {
    # realistic rows (issue 10)
    "connect/own-task",
    "disconnect/own-task-exit",
    "connect/one-task",
    "bytes/with-task",
    "bytes/one-task",
    "broadcast/gc-on",
    "broadcast/gc-off",
    "broadcast/wrapped-send",
    # operation rows at two scales
    *(f"{op}/{scale}" for op in SCALE_OPS for scale in ("small", "large")),
    *(
        f"{op}/{tag}"
        for op in ("can_accept_connection", "get_stats")
        for tag in ("few-lobbies", "many-lobbies")
    ),
    *(f"dumps/{m}/{b}" for m in ("chat", "state", "list", "non-ascii") for b in ("json", "orjson")),
    "bytes/bookkeeping-favourable",
}


def test_bench_core_quick_json_has_every_row() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["quick"] is True
    rows = {row["key"]: row for row in doc["rows"]}
    assert len(rows) == len(doc["rows"]), "row keys are unique"
    assert set(rows) == EXPECTED_ROWS
    for key, row in rows.items():
        for field in ("baseline_value", "wsmanager_value", "ratio"):
            value = row[field]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, field, value)
        assert row["unit"] in ("ns", "B"), key
        goal = row["goal"]
        assert goal is None or goal >= 1.0, key
        assert row["met"] is (None if goal is None else row["ratio"] >= goal), key
    # the goals of issue 10 are attached to the rows they concern
    assert rows["broadcast/gc-on"]["goal"] == 2.0
    assert rows["broadcast/wrapped-send"]["goal"] == 2.0
    for key in ("connect/own-task", "connect/one-task", "bytes/with-task", "bytes/one-task"):
        assert rows[key]["goal"] == 1.0, key
    assert rows["bytes/with-task"]["unit"] == "B"
    assert rows["connect-bookkeeping/large"]["favourable"] is True
    assert rows["connect-bookkeeping/large"]["goal"] is None


def test_bench_core_rows_runs_only_the_rows_asked_for() -> None:
    """``--rows`` (key prefixes) measures only those realistic rows, e.g. the
    connect rows of issue 10 without the broadcasts and the operation rows."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_core.py"),
            "--quick",
            "--json",
            "--rows",
            "connect,bytes/one-task",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {row["key"]: row for row in json.loads(proc.stdout)["rows"]}
    assert set(rows) == {"connect/own-task", "connect/one-task", "bytes/one-task"}
    for key, row in rows.items():
        assert row["baseline_value"] > 0 and row["wsmanager_value"] > 0, key
