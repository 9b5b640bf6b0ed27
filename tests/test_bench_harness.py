"""bench/harness.py and bench/sanitize_kernels.py on a CPU: what a benchmark's JSON records, how it
is written, and what the sanitizer script does where the kernels cannot run."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest

BENCH = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "bench"))


def _bench_module(name: str):
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


def test_env_info_records_whether_the_kernels_ran_and_the_hoptune_settings(monkeypatch):
    """A run with HOPTUNE_DISABLE_KERNELS / HOPTUNE_GEMM_TUNING=0 set, or without the extension,
    times other code under the same names: the JSON says which code ran and with which settings."""
    from hoptune import _lib

    harness = _bench_module("harness")
    monkeypatch.setattr(harness, "_version", lambda mod: "1.0")  # (importing the anchors is slow)
    for key in [k for k in os.environ if k.startswith("HOPTUNE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOPTUNE_GEMM_TUNING", "0")
    monkeypatch.setenv("HOPTUNE_DISABLE_KERNELS", "1")
    monkeypatch.setenv("NOT_HOPTUNE_SETTING", "x")
    info = harness.env_info()
    assert info["environment"] == {"HOPTUNE_DISABLE_KERNELS": "1", "HOPTUNE_GEMM_TUNING": "0"}
    assert info["kernels"] == f"PyTorch reference: {_lib.unavailable_reason()}"
    monkeypatch.setattr(_lib, "unavailable_reason", lambda: None)
    assert harness.env_info()["kernels"] == "hoptune._C (sm_90 kernels)"
    json.dumps(info)


def test_write_json_keeps_the_earlier_file_when_a_write_fails(tmp_path):
    """Benchmarks write their JSON after each section: a later write that fails (a value JSON
    cannot hold, an interrupt) must leave the sections already written, not a truncated file."""
    harness = _bench_module("harness")
    out = tmp_path / "res.json"
    harness.write_json(str(out), {"env": {"gpu": "H200"}, "rows": [1, 2]})
    with pytest.raises(TypeError):
        harness.write_json(str(out), {"env": {"gpu": "H200"}, "rows": [1, 2], "more": object()})
    assert json.loads(out.read_text()) == {"env": {"gpu": "H200"}, "rows": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["res.json"]
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~harness._UMASK


def test_sanitize_kernels_refuses_an_unknown_case(monkeypatch, capsys):
    sanitize = _bench_module("sanitize_kernels")
    ran = []
    monkeypatch.setattr(sanitize, "CASES", {"nf4": lambda: ran.append("nf4")})
    monkeypatch.setattr(sys, "argv", ["sanitize_kernels.py", "nf5"])
    with pytest.raises(SystemExit) as e:
        sanitize.main()
    assert e.value.code == 2 and not ran
    assert "nf5" in capsys.readouterr().err


def test_sanitize_kernels_refuses_to_run_without_the_kernels(monkeypatch, capsys):
    """Without the kernels every op runs its PyTorch reference: compute-sanitizer would then report
    no error for kernels that never ran. The script stops and says why instead."""
    from hoptune import _lib

    sanitize = _bench_module("sanitize_kernels")
    ran = []
    monkeypatch.setattr(sanitize, "CASES", {"nf4": lambda: ran.append("nf4")})
    monkeypatch.setattr(sys, "argv", ["sanitize_kernels.py", "nf4"])
    monkeypatch.setattr(_lib, "unavailable_reason", lambda: "the CUDA extension hoptune._C is not built")
    with pytest.raises(SystemExit) as e:
        sanitize.main()
    assert e.value.code == 2 and not ran
    assert "hoptune._C is not built" in capsys.readouterr().err
    # the probe of PyTorch's own GEMM (bench/run_gpu.sh's last sanitizer run) needs no kernels
    monkeypatch.setitem(sanitize.CASES, "probe_cublas", lambda: ran.append("probe"))
    monkeypatch.setattr(sanitize.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(sys, "argv", ["sanitize_kernels.py", "probe_cublas"])
    sanitize.main()
    assert ran == ["probe"]


def test_profile_host_help_prints_usage_and_runs_nothing(monkeypatch, capsys):
    profile_host = _bench_module("profile_host")
    ran = []
    monkeypatch.setattr(profile_host, "qlora_layer", lambda dense: ran.append("qlora"))
    monkeypatch.setattr(profile_host, "gaps", lambda **kw: ran.append("gaps"))
    monkeypatch.setattr(sys, "argv", ["profile_host.py", "--help"])
    with pytest.raises(SystemExit) as e:
        profile_host.main()
    assert e.value.code == 0 and not ran
    assert "usage: profile_host.py" in capsys.readouterr().out


def test_profile_host_without_a_gpu_says_so(monkeypatch, capsys):
    profile_host = _bench_module("profile_host")
    monkeypatch.setattr(profile_host.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["profile_host.py"])
    with pytest.raises(SystemExit) as e:
        profile_host.main()
    assert e.value.code == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--splits", "0,auto"], "--splits and --tiles apply to --sweep only"),
        (["--tiles", "64,128"], "--splits and --tiles apply to --sweep only"),
        (["--sweep", "64", "--tiles", "64,128"], "--tiles needs --splits"),
        (["--shapes", "4096"], "--shapes: expected comma-separated KxN pairs"),
        (["--shapes", "4096x4096,8192xN"], "got '8192xN'"),
        (["--sweep", "64,1k"], "--sweep: expected comma-separated integers, got '1k'"),
        (["--sweep", "64", "--splits", "2,x"], "--splits: expected comma-separated integers or auto"),
    ],
)
def test_bench_nf4_gemm_refuses_arguments_it_would_ignore_or_cannot_read(monkeypatch, capsys, argv, message):
    """Options that only the sweep reads, and lists that do not parse, stop the run before any
    timing with a message naming the option (not a bare ValueError, nor a run without them)."""
    gemm = _bench_module("bench_nf4_gemm")
    ran = []
    monkeypatch.setattr(gemm, "sweep", lambda *a: ran.append("sweep"))

    def timed_run(*args, **kwargs):
        ran.append("main")
        raise RuntimeError("the benchmark started")

    monkeypatch.setattr(gemm.torch, "randn", timed_run)
    monkeypatch.setattr(sys, "argv", ["bench_nf4_gemm.py", *argv])
    with pytest.raises(SystemExit) as e:
        gemm.main()
    assert e.value.code == 2 and not ran
    assert message in capsys.readouterr().err


def test_bench_nf4_gemm_sweep_reads_its_lists(monkeypatch):
    gemm = _bench_module("bench_nf4_gemm")
    calls = []
    monkeypatch.setattr(gemm, "sweep", lambda *a: calls.append(a))
    argv = "--sweep 32,64 --splits 0,auto --tiles auto,64 --shapes 8192x28672 --out o".split()
    monkeypatch.setattr(sys, "argv", ["bench_nf4_gemm.py", *argv])
    gemm.main()
    assert calls == [([32, 64], 16, "o", [(8192, 28672)], [0, None], [0, 64])]


_GPU_BENCHES = [
    "bench_gemm_algo",
    "bench_gemm_extension",
    "bench_logprob",
    "bench_lora_passes",
    "bench_nf4_dequant",
    "bench_nf4_gemm",
    "bench_nf4_lora",
]


@pytest.mark.parametrize("name", _GPU_BENCHES)
def test_gpu_benchmarks_without_a_cuda_device_say_so(name, monkeypatch, tmp_path):
    """A benchmark of CUDA code started where torch sees no CUDA device exits with a message
    saying so (was torch's 'Torch not compiled with CUDA enabled' AssertionError from the middle
    of the run), and writes no result."""
    import torch

    mod = _bench_module(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        mod.main()
    assert f"{name}.py needs a CUDA device" in str(e.value)
    assert not out.exists()
