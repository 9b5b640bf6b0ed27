"""metrics.jsonl is strict JSON: a NaN / inf value (a stopped step's loss, a skipped fp16 step's
gradient norm) is null in the file, named in a "nonfinite" field, and read back as the float."""

import json
import math
import random

from hoptune.train import loop


def _strict(line: str) -> dict:
    """As jq or JSON.parse read a line: NaN, Infinity and -Infinity are errors."""

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def test_nonfinite_values_are_strict_json_and_read_back(tmp_path):
    rng = random.Random(7)
    path = tmp_path / "m.jsonl"
    m = loop.MetricsLog(path, tensorboard=False)
    lr = rng.uniform(1e-5, 1e-3)
    m.log(1, "train", {"loss": rng.uniform(0.5, 2.0), "lr": lr, "grad_norm": rng.uniform(0.1, 5)})
    m.log(2, "train", {"loss": rng.uniform(0.5, 2.0), "lr": lr, "grad_norm": float("inf")})
    m.log(3, "train", {"loss": float("nan"), "lr": lr, "loss_tokens": 17, "tokens": 40})
    m.log(4, "train", {"loss": 1.5, "lr": lr, "grad_norm": float("-inf"), "gpu_mem_gib": None})
    m.close()
    lines = [_strict(s) for s in path.read_text().splitlines()]
    assert "nonfinite" not in lines[0]
    assert lines[1]["grad_norm"] is None and lines[1]["nonfinite"] == {"grad_norm": "inf"}
    assert lines[2]["loss"] is None and lines[2]["nonfinite"] == {"loss": "nan"}
    assert lines[3]["nonfinite"] == {"grad_norm": "-inf"} and lines[3]["gpu_mem_gib"] is None
    recs = loop.read_metrics(path)
    assert all("nonfinite" not in r for r in recs)
    assert recs[1]["grad_norm"] == math.inf and math.isnan(recs[2]["loss"])
    assert recs[3]["grad_norm"] == -math.inf and recs[3]["gpu_mem_gib"] is None
    assert recs[0] == lines[0] and recs[2]["tokens"] == 40.0
    # a resume rewrites the lines it keeps: strict JSON still, the values the same
    loop.MetricsLog(path, tensorboard=False, resume_step=3).close()
    kept = [_strict(s) for s in path.read_text().splitlines()]
    assert kept == lines[:3]


def test_older_files_with_nan_literals_still_read(tmp_path):
    """Files written before (json.dumps' NaN / Infinity) read as they did."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": NaN, "grad_norm": Infinity}\n')
    (r,) = loop.read_metrics(path)
    assert math.isnan(r["loss"]) and r["grad_norm"] == math.inf


def test_a_metrics_line_cut_by_a_crash_is_passed_over(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "split": "train", "loss": 2.5}\n{"step": 2, "split": "tr')
    assert loop.read_metrics(p) == [{"step": 1, "split": "train", "loss": 2.5}]
