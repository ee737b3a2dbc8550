"""Benchmark scripts run end to end at toy sizes and report every variant they compare."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attn_precision_benchmark_compares_all_variants(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    args = ["--preset", "tiny", "--batch", "4", "--reps", "2", "--query-reps", "2"]
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "attn_precision.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["attention"], r["precision"]) for r in rows} == {
        ("sdpa", "fp32"),
        ("eager", "fp32"),
        ("sdpa", "bf16"),
        ("eager", "bf16"),
    }
    assert all(r["train_step_s"] > 0 and r["query_ms"] > 0 for r in rows)
    assert rows[0]["train_speedup"] == 1.0  # the baseline row
    assert "| eager | bf16 |" in res.stdout
