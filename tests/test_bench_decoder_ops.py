"""bench/bench_decoder_ops.py on a CPU (--tiny): the checks, times and ratios of the three ops and the
JSON it writes; Liger's columns with stand-ins for its Functions (its Triton kernels need a GPU)."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

BENCH = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "bench"))


def _bench_module():
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module("bench_decoder_ops")
    finally:
        sys.path.remove(BENCH)


@pytest.fixture
def mod(monkeypatch):
    m = _bench_module()
    monkeypatch.setattr(m.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(m, "env_info", lambda: {"command": "python bench/bench_decoder_ops.py --tiny"})
    return m


OP_FIELDS = (
    "shapes",
    "bytes_fwd",
    "bytes_bwd",
    "check",
    "hoptune_fwd_ms",
    "eager_fwd_ms",
    "hoptune_fwd_bwd_ms",
    "eager_fwd_bwd_ms",
    "fwd_hoptune_over_eager",
    "fwd_bwd_hoptune_over_eager",
    "hoptune_fwd_GBps",
    "hoptune_fwd_bwd_GBps",
)


def test_tiny_run_writes_the_three_ops_with_their_checks_times_and_ratios(mod, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert mod.main(["--tiny", "--iters", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["ops"]) == {"rms_norm", "silu_mul", "rope"}
    assert res["device"] == "cpu" and res["shape"] == "tiny" and res["dtype"] == "bfloat16"
    assert res["command"] and res["env"] and res["checks_pass"] is True
    assert res["implementations"]["liger"].startswith("not run")
    for op, e in res["ops"].items():
        assert all(f in e for f in OP_FIELDS), (op, sorted(set(OP_FIELDS) - set(e)))
        assert not any("liger" in k for k in e), op
        c = e["check"]
        assert c["fwd_pass"] is True
        # on the CPU hoptune's ops are the reference itself: every comparison is exact
        for key in ("hoptune_fwd", "hoptune_bwd"):
            assert c[key]["bitwise_equal"] and c[key]["max_abs_diff"] == 0.0
        assert e["hoptune_fwd_ms"] > 0 and e["hoptune_fwd_GBps"] > 0
        assert e["fwd_hoptune_over_eager"] == pytest.approx(e["hoptune_fwd_ms"] / e["eager_fwd_ms"])
    assert res["ops"]["rms_norm"]["check"]["fwd_criterion"].startswith("hoptune forward: max |diff|")
    assert res["ops"]["silu_mul"]["check"]["fwd_criterion"].endswith("bitwise equal to eager")
    # q and k as the attention makes them: a transposed view of the projection, not contiguous
    rope = res["ops"]["rope"]["shapes"]
    _, h, s, d = rope["q"]
    assert rope["q_stride"] == [s * h * d, d, h * d, 1]
    assert "PASS" in capsys.readouterr().out


def test_liger_columns_with_stand_ins_for_its_functions(mod, monkeypatch, tmp_path):
    """The Liger Functions are called as the script calls them on a GPU (rms_norm with offset 0
    and the llama casting mode, rope with q and k together); here they run the reference."""
    ref = mod.ref
    calls = []

    class RmsNorm:
        @staticmethod
        def apply(x, w, eps, offset, casting_mode):
            calls.append(("rms_norm", offset, casting_mode))
            return ref.rms_norm(x, w, eps)

    class SiluMul:
        @staticmethod
        def apply(a, b):
            calls.append(("silu_mul",))
            return ref.silu_mul(a, b)

    class Rope:
        @staticmethod
        def apply(q, k, cos, sin):
            calls.append(("rope", q.shape[1], k.shape[1]))
            return ref.rope(q, cos, sin), ref.rope(k, cos, sin)

    fake = {"rms_norm": RmsNorm, "silu_mul": SiluMul, "rope": Rope}
    monkeypatch.setattr(mod, "_liger", lambda cuda: (fake, "stand-ins"))
    out = tmp_path / "r.json"
    assert mod.main(["--tiny", "--iters", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["implementations"]["liger"] == "stand-ins"
    for op, e in res["ops"].items():
        for k in ("liger_fwd_ms", "liger_fwd_bwd_ms", "fwd_hoptune_over_liger", "fwd_bwd_hoptune_over_liger"):
            assert k in e, (op, k)
        assert e["check"]["liger_fwd"]["bitwise_equal"] and e["check"]["liger_bwd"]["bitwise_equal"]
    assert ("rms_norm", 0.0, "llama") in calls and ("silu_mul",) in calls
    assert ("rope", mod.TINY["heads"], mod.TINY["kv_heads"]) in calls


def test_rms_norm_check_tolerates_a_bf16_ulp_and_fails_beyond(mod):
    torch = mod.torch
    case = mod.rms_norm_case(mod.TINY, torch.bfloat16, torch.device("cpu"), weight_grad=False)
    exact = mod.implementations("rms_norm", None)

    def off_by(scale):
        def call(a):
            y = exact["eager"](a)[0]
            return (y + scale * y.detach().abs().max(),)

        return {"hoptune": call, "eager": exact["eager"]}

    assert mod.checks(case, off_by(0.0))["fwd_pass"]
    assert mod.checks(case, off_by(2.0**-9))["fwd_pass"]
    assert not mod.checks(case, off_by(2.0**-5))["fwd_pass"]


def test_full_run_without_a_gpu_says_so_and_writes_nothing(mod, tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        mod.main(["--out", str(out)])
    assert "bench_decoder_ops.py needs a CUDA device" in str(e.value)
    assert not out.exists()


def test_unknown_op_is_a_usage_error(mod, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mod.main(["--tiny", "--ops", "rms_norm,softmax", "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2 and "--ops: unknown ['softmax']" in capsys.readouterr().err
