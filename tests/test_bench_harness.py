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


class _FakeRun:
    """subprocess.run for git and nvidia-smi: ``outputs`` maps a command's words after the program
    (and git's ``-C DIR``) to (returncode, stdout); a program in ``missing`` is not installed."""

    def __init__(self, outputs, missing=()):
        self.outputs, self.missing, self.calls = outputs, set(missing), []

    def __call__(self, argv, **kwargs):
        import subprocess

        self.calls.append(argv)
        if argv[0] in self.missing:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        words = argv[3:] if argv[0] == "git" else argv[1:]
        rc, out = self.outputs[" ".join(words)]
        return subprocess.CompletedProcess(argv, rc, out, "")


_SHA = "3f9c2e1d4b5a69788796a5b4c3d2e1f0a9b8c7d6"


def _git(status="", tracked=0):
    return {
        "ls-files --error-unmatch __init__.py": (tracked, "__init__.py\n" if tracked == 0 else ""),
        "rev-parse HEAD": (0, _SHA + "\n"),
        "status --porcelain --untracked-files=no": (0, status),
    }


def test_env_info_records_the_commit_of_the_hoptune_code_that_ran(monkeypatch):
    """Every revision has the version 0.1.0: the record names the commit of the checkout hoptune
    was imported from, marked -dirty when tracked files differ from it, or says why it has none."""
    import hoptune

    harness = _bench_module("harness")
    monkeypatch.setattr(harness, "_version", lambda mod: "1.0")
    fake = _FakeRun(_git())
    monkeypatch.setattr(harness.subprocess, "run", fake)
    info = harness.env_info()
    assert info["hoptune_commit"] == _SHA
    assert fake.calls[0][:3] == ["git", "-C", os.path.dirname(os.path.abspath(hoptune.__file__))]
    dirty = _FakeRun(_git(status=" M python/hoptune/ops/nf4.py\n"))
    monkeypatch.setattr(harness.subprocess, "run", dirty)
    assert harness.env_info()["hoptune_commit"] == _SHA + "-dirty"
    # an installed copy (not a tracked file of a checkout), or no git at all: said, not left out
    monkeypatch.setattr(harness.subprocess, "run", _FakeRun(_git(tracked=1)))
    assert harness.env_info()["hoptune_commit"].startswith("unavailable: ")
    assert "not a tracked file of a git checkout" in harness.env_info()["hoptune_commit"]
    monkeypatch.setattr(harness.subprocess, "run", _FakeRun(_git(), missing=["git"]))
    assert harness.env_info()["hoptune_commit"] == "unavailable: git: FileNotFoundError"
    json.dumps(harness.env_info())
    # a copied tree (no .git, or a stale one): the commit given by the one who copied it wins
    monkeypatch.setenv("HOPTUNE_COMMIT", "abc1234")
    monkeypatch.setattr(harness.subprocess, "run", _FakeRun(_git(status=" M x.py\n")))
    assert harness.env_info()["hoptune_commit"] == "abc1234"


def test_env_info_records_the_gpu_driver(monkeypatch, tmp_path):
    """The driver's version, from nvidia-smi or else the kernel module's /proc file; no device, no
    driver entry to find (None, as the GPU's name)."""
    harness = _bench_module("harness")
    smi = {"--query-gpu=driver_version --format=csv,noheader": (0, "580.65.06\n580.65.06\n")}
    monkeypatch.setattr(harness.subprocess, "run", _FakeRun(smi))
    assert harness._driver() == "580.65.06"
    proc = tmp_path / "version"
    proc.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build"
        "  (dvs-builder)\n"
        "GCC version:  gcc version 12.3.0\n"
    )
    monkeypatch.setattr(harness, "_PROC_DRIVER", str(proc))
    monkeypatch.setattr(harness.subprocess, "run", _FakeRun({}, missing=["nvidia-smi"]))
    assert harness._driver() == "570.124.06"
    monkeypatch.setattr(harness, "_PROC_DRIVER", str(tmp_path / "absent"))
    assert harness._driver().startswith("unavailable: nvidia-smi: FileNotFoundError")
    monkeypatch.setattr(harness, "_version", lambda mod: "1.0")
    monkeypatch.setattr(harness.subprocess, "run", _FakeRun(_git()))
    monkeypatch.setattr(harness.torch.cuda, "is_available", lambda: False)
    info = harness.env_info()
    assert info["gpu"] is None and info["driver"] is None


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


def test_ratio_interleaved_is_the_median_over_rounds_of_ours_over_the_anchor(monkeypatch):
    """Round i times fn_a then fn_b (fake timings here): the ratio is fn_a / fn_b, the median over
    the rounds, each call queued behind the 3 ms sleep only when covered."""
    harness = _bench_module("harness")
    ours = iter([2.0, 9.0, 3.0, 4.0, 5.0])
    anchor = iter([1.0, 3.0, 1.0, 8.0, 2.0])
    times = {"ours": ours, "anchor": anchor}
    calls = []

    def fake_bench(fn, warmup, rep, lead_ms):
        calls.append((fn(), warmup, rep, lead_ms))
        return next(times[calls[-1][0]])

    monkeypatch.setattr(harness, "bench", fake_bench)
    r = harness.ratio_interleaved(lambda: "ours", lambda: "anchor", rounds=5, rep=4)
    assert r == 2.5  # rounds: 2, 3, 3, 0.5, 2.5
    assert [c[0] for c in calls] == ["ours", "anchor"] * 5
    assert {c[1:] for c in calls} == {(1, 4, 0.0)}
    calls.clear()
    times.update(ours=iter([3.0]), anchor=iter([2.0]))
    r = harness.ratio_interleaved(lambda: "ours", lambda: "anchor", rounds=1, covered=True)
    assert r == 1.5
    assert calls[0][3] == 3.0 and calls[1][3] == 3.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--layer-shapes", "4096"], "--layer-shapes: expected comma-separated KxN pairs"),
        (["--layer-shapes", "4096x4096,2048x0"], "got '2048x0'"),
        (["--layer-shapes", "4096x4096,"], "got ''"),
    ],
)
def test_bench_nf4_lora_refuses_layer_shapes_it_cannot_read(monkeypatch, capsys, argv, message):
    """--layer-shapes that do not parse stop the run before any timing with a usage error naming
    the option."""
    lora = _bench_module("bench_nf4_lora")
    ran = []
    monkeypatch.setattr(lora, "require_cuda", lambda script: ran.append("cuda"))
    monkeypatch.setattr(sys, "argv", ["bench_nf4_lora.py", *argv])
    with pytest.raises(SystemExit) as e:
        lora.main()
    assert e.value.code == 2 and not ran
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--chunks", "256,512"], "--chunks: must include 0"),
        (["--chunks", "0,2k"], "--chunks: expected comma-separated integers, got '2k'"),
        (["--gemm-sweep", "--gemm-settings", "32768x2048"], "--gemm-settings: expected COLS:ROWS"),
        (["--vchunk-sweep", "--vchunk-settings", "8192:0,16384"], "got '16384'"),
    ],
)
def test_bench_logprob_refuses_arguments_before_timing(monkeypatch, capsys, argv, message):
    """--chunks without 0 had the run stop on a KeyError ('ours_ms') after timing a whole
    vocabulary, and settings that do not parse on a bare ValueError after the main tables: now a
    usage error naming the option, before anything runs."""
    logprob = _bench_module("bench_logprob")
    ran = []
    monkeypatch.setattr(logprob, "require_cuda", lambda script: ran.append("cuda"))
    monkeypatch.setattr(logprob, "run_vocab", lambda *a: ran.append("run") or {})
    monkeypatch.setattr(sys, "argv", ["bench_logprob.py", *argv])
    with pytest.raises(SystemExit) as e:
        logprob.main()
    assert e.value.code == 2 and not ran
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "category"),
    [
        (
            "void hoptune::(anonymous namespace)::nf4_dequantize_lora_kernel<2, 16>(Args)",
            "hoptune NF4 dequantize",
        ),
        (
            "void hoptune::(anonymous namespace)::lora_dy_pass_kernel<__nv_bfloat16>(...)",
            "hoptune LoRA passes",
        ),
        ("void hoptune::(anonymous namespace)::token_logprobs_fwd_kernel(...)", "hoptune log-probs"),
        ("void hoptune::(anonymous namespace)::label_stats_kernel(...)", "hoptune other"),
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopB_TNT", "GEMM (cuBLAS / CUTLASS)"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128", "attention"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
            "elementwise / reductions (PyTorch)",
        ),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
            "optimizer",
        ),
        ("Memset (Device)", "memset / copy"),
        ("some_kernel_nobody_knows", "other"),
    ],
)
def test_kernel_categories_of_a_profiled_step(name, category):
    assert _bench_module("harness").kernel_category(name) == category


def test_idle_gaps_charges_each_gap_to_the_launch_of_the_kernel_after_it():
    """The profile's idle-time breakdown on hand-made events: gaps under the threshold and
    overlapping kernels are not idle; a gap is summed under the ops that launched the next kernel;
    the host's syncs are counted by their callers."""
    from types import SimpleNamespace as NS

    harness = _bench_module("harness")
    cpu = NS(name="CPU")

    def op(i, name, parent=None):
        return NS(device_type=cpu, id=i, name=name, cpu_parent=parent)

    step = op(1, "Optimizer.step")
    bwd = op(2, "CheckpointFunctionBackward")
    mm = op(3, "aten::mm", bwd)
    launch = op(4, "cudaLaunchKernel", mm)
    item = op(5, "aten::item", step)
    sync = op(6, "cudaStreamSynchronize", op(7, "aten::_local_scalar_dense", item))
    add = op(8, "aten::add_", step)

    events = [step, bwd, mm, launch, item, sync, add]
    kernels = [
        (0, 10, "k0", 3),
        (12, 30, "k1", 3),  # 2 us after k0: under the 5 us threshold
        (25, 40, "k2", 3),  # overlaps k1
        (100, 150, "gemm", 4),  # 60 us idle, launched from aten::mm (via the runtime call)
        (170, 180, "adam", 8),  # 20 us idle, launched by aten::add_
    ]
    idle = harness.idle_gaps(kernels[::-1], events)
    assert idle["gaps"] == 2 and idle["total_ms"] == pytest.approx(0.080)
    assert idle["by_launch_path"] == [
        {"path": "CheckpointFunctionBackward > aten::mm", "ms": pytest.approx(0.060), "gaps": 1},
        {"path": "Optimizer.step > aten::add_", "ms": pytest.approx(0.020), "gaps": 1},
    ]
    assert idle["largest"][0] == {
        "us": 60,
        "after": "k2",
        "before": "gemm",
        "launch_path": "CheckpointFunctionBackward > aten::mm",
    }
    assert idle["host_syncs"] == [
        {"path": "Optimizer.step > aten::item > aten::_local_scalar_dense", "count": 1}
    ]
    assert harness.idle_gaps([], events)["total_ms"] == 0.0


def test_print_breakdown_prints_the_categories_the_idle_paths_and_the_syncs(capsys):
    harness = _bench_module("harness")
    prof = {
        "wall_ms": 12.5,
        "device_busy_ms": 10.3,
        "by_category_ms": {"GEMM (cuBLAS / CUTLASS)": 8.0, "attention": 2.3},
        "idle": {
            "total_ms": 1.5,
            "gaps": 3,
            "by_launch_path": [{"ms": 1.0, "gaps": 2, "path": "a > b"}, {"ms": 0.5, "gaps": 1, "path": "c"}],
            "host_syncs": [{"count": 2, "path": "aten::item"}],
        },
    }
    harness.print_breakdown(prof, "profiled eager step", top=1)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "profiled eager step: 12.5 ms wall, 10.3 ms of kernels"
    assert "GEMM (cuBLAS / CUTLASS)" in out[1] and "8.0 ms" in out[1] and "2.3 ms" in out[2]
    assert out[3] == "device idle between kernels: 1.5 ms in 3 gaps; by launch:"
    assert "a > b" in out[4] and not any(line.endswith("  c") for line in out)
    assert out[5] == "  sync x2: aten::item"


def test_dx_sm_target_probe_tells_the_device_sleep_apart():
    """The SM-target probe's timelines leave out the device sleep queued before each call: its
    kernel is torch's spin_kernel (a filter on "sleep" alone kept it, and every timeline came back
    empty), or any event longer than 1 ms; the GEMM, the kernel and its rounding kernel stay."""
    sys.path.insert(0, os.path.join(BENCH, "probes"))
    sys.path.insert(0, BENCH)
    try:
        probe = importlib.import_module("dx_sm_target")
    finally:
        sys.path.remove(BENCH)
        sys.path.remove(os.path.join(BENCH, "probes"))

    class Range:
        def __init__(self, start, end):
            self.start, self.end = start, end

    class Event:
        def __init__(self, name, dur):
            self.name, self.time_range = name, Range(100.0, 100.0 + dur)

    assert probe._lead(Event("void at::cuda::(anonymous namespace)::spin_kernel(long)", 3000.0))
    assert probe._lead(Event("spin_kernel", 10.0))  # (by its name, whatever its length)
    assert probe._lead(Event("some_other_kernel", 1500.0))  # (by its length)
    for name, dur in (
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_ssched_bz_coopA_NNT", 345.0),
        ("void hoptune::(anonymous namespace)::lora_grads_kernel<__nv_bfloat16>(...)", 91.0),
        ("void hoptune::(anonymous namespace)::lora_grads_finish<__nv_bfloat16>(...)", 2.0),
    ):
        assert not probe._lead(Event(name, dur)), name
