"""The Hessian benchmarks' tiny runs: every arm of bench/bench_hessian.py (the GPU workloads, ResNet and
GPT-2, on tiny sizes on the CPU), bench/bench_crossentropy.py and bench/bench_hvp_reuse.py (whose own
checks compare every product with the dense float64 Hessian). Arms of libraries that are not installed
are skipped by the benches with a note. Slow (a minute or two): run by .ci/run, not by default."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_gpu_arms_run_tiny_on_cpu():
    out = run("bench_hessian.py", "--gpu", "--tiny", "--device", "cpu", "--train-steps", "2")
    for name in ("resnet20", "gpt2"):
        assert f"{name}: " in out
    assert "| top-5 |" in out and "| trace, 99 HVPs |" in out
    row = next(line for line in out.splitlines() if line.startswith("| top-1 |"))
    assert "failed" not in row.split("|")[2]  # batchscope's own cell


@pytest.mark.slow
def test_crossentropy_bench_runs_tiny():
    out = run("bench_crossentropy.py", "--tiny", "--reps", "1", "--model", "gpt2")
    assert "| fused_hessian (reverse_over_reverse) |" in out  # attention: the fallback


@pytest.mark.slow
def test_reuse_prototypes_check_against_dense():
    out = run("bench_hvp_reuse.py", "--tiny", "--reps", "1", "--blocks", "2")
    assert out.count("against the dense float64 Hessian") >= 4
