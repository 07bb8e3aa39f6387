"""The GPU script runs end to end (at CPU smoke sizes) and writes what it promises."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_writes_its_results_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "TINY": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    kd = json.loads((out / "kd_loss.json").read_text())
    arms = {row["arm"] for row in kd["rows"]}
    assert {"naive", "chunked fp32", "chunked bf16"} <= arms
    for row in kd["rows"]:  # every arm computed the same loss, and its error was measured
        assert abs(row["loss"] - kd["rows"][0]["loss"]) <= 1e-2 * abs(kd["rows"][0]["loss"])
        assert 0 <= row["err_loss"] < 1e-2 and row["ms"] > 0
    step = json.loads((out / "step_throughput.json").read_text())
    assert step["step_overhead"] > 0 and set(step["seconds"]) >= {
        "student train", "student distill", "teacher forward"
    }  # fmt: skip
    assert (out / "device.txt").read_text().strip()
