"""bench/bench_sft_8b.py's logic on a CPU (--tiny): it trains and writes its JSON."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def test_bench_sft_tiny(tmp_path, capsys):
    sys.path.insert(0, os.path.abspath(BENCH))
    try:
        import bench_sft_8b
    finally:
        sys.path.pop(0)
    out = tmp_path / "sft.json"
    res = bench_sft_8b.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["model"] == "tiny" and data["tokens_per_s"] > 0 and len(data["step_s"]) == 2
    assert data["config"]["quantize"] == "nf4" and data["config"]["grad_ckpt"] is True
    assert data["trainable_params"] > 0 and data["command"] and data["date"]
    assert res["losses"] == pytest.approx(data["losses"])
    assert "tokens/s" in capsys.readouterr().out
