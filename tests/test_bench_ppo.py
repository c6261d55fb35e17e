"""scripts/bench_ppo.py's figures from the driver's metric rows, without running the benchmark."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_ppo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ppo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(batch: int, seconds: list[float], response_length: float) -> list[dict]:
    """Metric rows as the driver writes them for iterations of `batch` samples."""
    return [{"seconds": s, "samples_per_s": batch / s, "tokens_per_s": batch * response_length / s} for s in seconds]


@pytest.mark.parametrize("batch", [16, 64, 256])
def test_throughput_counts_what_each_run_generated(bench, batch):
    """A batch overridden with --set or --ab ppo_batch_size=N generates N samples an iteration: samples/s and
    tokens/s count them (they were the default 16 prompts / seconds, and 16 x the response length)."""
    run = {**bench.generated(_rows(batch, [2.0, 4.0, 3.0], 50.0)), "peak_memory_mb": {"policy-0": 100.0}}
    assert run["samples"] == [batch] * 3
    out = bench.summarize(f"batch {batch}", [run, run])
    assert out["s_per_iteration"] == 3.0
    assert out["samples_per_s"] == pytest.approx(batch / 3.0)
    assert out["tokens_per_s"] == pytest.approx(batch * 50.0 / 3.0)
