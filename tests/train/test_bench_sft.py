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


def _bench_sft():
    sys.path.insert(0, os.path.abspath(BENCH))
    try:
        import bench_sft_8b
    finally:
        sys.path.pop(0)
    return bench_sft_8b


def test_bench_sft_8b_without_a_gpu_fails_and_says_why(tmp_path, capsys, monkeypatch):
    """The 8B model on a CPU: the run stops with a non-zero status (bench/run_gpu.sh logs the
    status), writes no JSON, and the message says why: no GPU visible, or --device cpu asked for."""
    bench_sft_8b = _bench_sft()
    out = tmp_path / "sft.json"
    with pytest.raises(SystemExit) as e:
        bench_sft_8b.main(["--device", "cpu", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--device cpu was asked for" in err and "--tiny" in err and "no CUDA device" not in err
    monkeypatch.setattr(bench_sft_8b.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench_sft_8b.main(["--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--seq", "--accum"])
def test_bench_sft_8b_refuses_a_count_below_one(tmp_path, capsys, flag):
    bench_sft_8b = _bench_sft()
    out = tmp_path / "sft.json"
    with pytest.raises(SystemExit) as e:
        bench_sft_8b.main(["--tiny", "--device", "cpu", flag, "0", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


def test_bench_sft_8b_tiny_keeps_the_seq_asked_for_and_records_its_own_command(tmp_path):
    """--tiny --seq N trains on N tokens per sequence (64 only when --seq is not given), and the
    JSON's command is the benchmark's arguments, not the caller's (here pytest's)."""
    bench_sft_8b = _bench_sft()
    out = tmp_path / "sft.json"
    argv = ["--tiny", "--device", "cpu", "--seq", "96", "--steps", "1", "--warmup", "0", "--out", str(out)]
    data = bench_sft_8b.main(argv)
    assert data["config"]["seq"] == 96 and data["config"]["tokens_per_step"] == 2 * 96
    python = os.path.basename(sys.executable)
    assert data["command"] == " ".join([python, os.path.join("bench", "bench_sft_8b.py"), *argv])
