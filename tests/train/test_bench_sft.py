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


@pytest.mark.parametrize("flag", ["--steps", "--batch", "--seq", "--accum", "--layers"])
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


def test_bench_sft_8b_runs_the_anchor_script_and_records_the_ratios(tmp_path):
    """--anchor-script runs the Hugging Face stack's anchor after ours (a process of its own, OUT
    set) and records its end-to-end step and ours over it; a failing anchor stops the run."""
    bench_sft_8b = _bench_sft()
    fake = tmp_path / "anchors.py"
    fake.write_text(
        "import json, os\n"
        "res = {'env': {'gpu': 'test'}, 'e2e_llama8b': {'bnb_qlora_tok_per_s': 500.0, "
        "'bnb_qlora_peak_GiB': 2.0, 'bnb_qlora_step_ms': 3.0}}\n"
        "json.dump(res, open(os.path.join(os.environ['OUT'], 'anchors.json'), 'w'))\n"
    )
    out = tmp_path / "sft.json"
    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--out", str(out)]
    data = bench_sft_8b.main([*argv, "--anchor-script", str(fake)])
    assert data["anchor"]["e2e_llama8b"]["bnb_qlora_step_ms"] == 3.0 and data["anchor"]["env"] == {
        "gpu": "test"
    }
    v = data["vs_anchor"]
    assert v["anchor_tokens_per_s"] == 500.0 and v["tokens_per_s_ratio"] == pytest.approx(
        data["tokens_per_s"] / 500
    )
    assert v["train_peak_ratio"] is None  # (no GPU peak on a CPU)
    assert json.loads(out.read_text())["vs_anchor"] == v
    fake.write_text("raise SystemExit('no bitsandbytes')\n")
    with pytest.raises(SystemExit, match=r"(?s)anchor script .* failed \(status 1\).*no bitsandbytes"):
        bench_sft_8b.main([*argv, "--anchor-script", str(fake)])


def test_bench_sft_8b_anchor_needs_the_anchor_s_run(tmp_path, capsys):
    bench_sft_8b = _bench_sft()
    fake = tmp_path / "anchors.py"
    fake.write_text("")
    with pytest.raises(SystemExit) as e:
        bench_sft_8b.main(["--seq", "1024", "--anchor-script", str(fake), "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "measures 2 x 2048 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        bench_sft_8b.main(["--layers", "4", "--anchor-script", str(fake), "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "32 decoder layers" in capsys.readouterr().err


def test_bench_sft_tiny_takes_a_layer_count(tmp_path):
    bench_sft_8b = _bench_sft()
    out = tmp_path / "x.json"
    argv = ["--tiny", "--device", "cpu", "--layers", "3", "--steps", "1", "--warmup", "0", "--out", str(out)]
    data = bench_sft_8b.main(argv)
    assert data["shape"]["num_hidden_layers"] == 3 and bench_sft_8b.TINY["num_hidden_layers"] == 2
    assert data["trainable_params"] == 3 * 32768  # (r = 16 on the seven projections of each layer)


def test_bench_sft_8b_profile_without_a_gpu_says_it_is_skipped(tmp_path, capsys):
    bench_sft_8b = _bench_sft()
    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--profile"]
    data = bench_sft_8b.main([*argv, "--out", str(tmp_path / "x.json")])
    assert "profile" not in data and "--profile: no CUDA device" in capsys.readouterr().out


def test_bench_sft_8b_alternates_the_fused_and_unfused_step_in_one_process(tmp_path, capsys, monkeypatch):
    """--alternate-fuse N: after the timed steps, N more of each kind one step apart (after one
    untimed step of each), the decoder ops unfused and fused again between them; the JSON records
    both series and the ratio of their medians; with --no-fuse it is refused."""
    import hoptune

    bench_sft_8b = _bench_sft()
    calls = []
    for name in ("fuse_decoder_ops", "unfuse_decoder_ops"):
        real = getattr(hoptune, name)
        monkeypatch.setattr(hoptune, name, lambda m, _real=real, _name=name: calls.append(_name) or _real(m))
    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    data = bench_sft_8b.main([*argv, "--alternate-fuse", "2", "--out", str(tmp_path / "x.json")])
    alt = data["alternate_fuse"]
    assert alt["steps_each"] == 2
    _assert_alternated(alt, "unfused", "fused", 2)
    assert json.loads((tmp_path / "x.json").read_text())["alternate_fuse"]["steps_each"] == 2
    # fused for the timed steps, then unfused / fused three times each (one untimed pair first)
    assert calls == ["fuse_decoder_ops"] + ["unfuse_decoder_ops", "fuse_decoder_ops"] * 3
    assert "alternated, 2 steps each" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_sft_8b.main([*argv, "--alternate-fuse", "1", "--no-fuse", "--out", str(tmp_path / "y.json")])
    assert "leave out --no-fuse" in capsys.readouterr().err


def _assert_alternated(alt: dict, first: str, second: str, n: int) -> None:
    """An alternation's record: n timed steps of each kind, and the ratio of their medians."""
    assert len(alt["step_s"][first]) == len(alt["step_s"][second]) == n
    med = alt["median_step_s"]
    assert alt[f"{first}_over_{second}"] == pytest.approx(med[first] / med[second])


def _alternated_with_spy(bench_sft_8b, spy, argv, tmp_path) -> dict:
    """bench_sft_8b.main(argv) with ``spy(*args, **kwargs)`` called before each of its sft_step calls."""
    real = bench_sft_8b.sft_step

    def step(*a, **k):
        spy(*a, **k)
        return real(*a, **k)

    try:
        bench_sft_8b.sft_step = step
        return bench_sft_8b.main([*argv, "--out", str(tmp_path / "x.json")])
    finally:
        bench_sft_8b.sft_step = real


def test_bench_sft_8b_alternates_the_op_s_order_under_checkpointing(tmp_path, capsys):
    """--alternate-saves-first N: the NF4 op's switch set for each step (the default given back
    after), both series and their ratio recorded; refused where it changes nothing."""
    import gc

    from hoptune.ops import nf4_lora as nf4_lora_ops

    bench_sft_8b = _bench_sft()
    seen, collector_off = [], []

    def spy(*a, **k):
        seen.append(nf4_lora_ops.SAVES_FIRST)
        collector_off.append(not gc.isenabled())  # (--gc loop, the alternated steps too)

    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    data = _alternated_with_spy(bench_sft_8b, spy, [*argv, "--alternate-saves-first", "2"], tmp_path)
    alt = data["alternate_saves_first"]
    _assert_alternated(alt, "launch_first", "saves_first", 2)
    assert seen == [True] + [False, True] * 3 and nf4_lora_ops.SAVES_FIRST is True
    assert all(collector_off) and gc.isenabled() and gc.get_freeze_count() == 0
    for extra in (["--compile"], ["--no-grad-ckpt"]):
        with pytest.raises(SystemExit):
            bench_sft_8b.main(
                [*argv, "--alternate-saves-first", "1", *extra, "--out", str(tmp_path / "y.json")]
            )
        assert "leave out --compile and --no-grad-ckpt" in capsys.readouterr().err


def test_bench_sft_8b_alternates_the_step_s_end(tmp_path, capsys):
    """--alternate-step-end N: loop.SKIP_ON_DEVICE set for each step (the loss left on the device
    for optimizer_step to read after its launches, or read by sft_step first), the default given
    back after, both series and their ratio recorded."""
    from hoptune.train import loop

    bench_sft_8b = _bench_sft()
    seen = []

    def spy(*a, read=True, **k):
        seen.append((loop.SKIP_ON_DEVICE, read))

    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0"]
    data = _alternated_with_spy(bench_sft_8b, spy, [*argv, "--alternate-step-end", "2"], tmp_path)
    alt = data["alternate_step_end"]
    _assert_alternated(alt, "read_first", "device_skip", 2)
    assert seen == [(True, False)] + [(False, True), (True, False)] * 3 and loop.SKIP_ON_DEVICE is True
    assert all(isinstance(x, float) for x in data["losses"])
    with pytest.raises(SystemExit):
        bench_sft_8b.main([*argv, "--alternate-step-end", "-1", "--out", str(tmp_path / "y.json")])
    assert "--alternate-step-end must be at least 0" in capsys.readouterr().err


def test_bench_sft_8b_alternates_uncheckpointed_layers(tmp_path, capsys):
    """--uncheckpointed N --alternate-uncheckpointed STEPS: the last N decoder layers without
    checkpointing for the timed steps, then every layer checkpointed and the N layers not, in turn
    (the setting given back after); both series recorded; refused with nothing to alternate."""
    from hoptune.train import loop

    bench_sft_8b = _bench_sft()
    seen = []

    def spy(model, *a, **k):
        seen.append(tuple(layer.gradient_checkpointing for layer in loop.decoder_layers(model)))

    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--uncheckpointed", "1"]
    data = _alternated_with_spy(bench_sft_8b, spy, [*argv, "--alternate-uncheckpointed", "2"], tmp_path)
    alt = data["alternate_uncheckpointed"]
    assert data["config"]["uncheckpointed_layers"] == 1
    _assert_alternated(alt, "all_checkpointed", "last_1_uncheckpointed", 2)
    assert alt["peak_gib"] is None  # (a CPU run: no GPU memory to read)
    assert seen == [(True, False)] + [(True, True), (True, False)] * 3
    for extra, msg in (
        (["--alternate-uncheckpointed", "1", "--uncheckpointed", "0"], "give N"),
        (["--no-grad-ckpt"], "leave out --no-grad-ckpt"),
        (["--uncheckpointed", "-1"], "--uncheckpointed must be at least 0"),
    ):
        with pytest.raises(SystemExit):
            bench_sft_8b.main([*argv, *extra, "--out", str(tmp_path / "y.json")])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (the tiny model has 2 decoder layers)
        bench_sft_8b.main([*argv[:-1], "3", "--out", str(tmp_path / "y.json")])
    assert "the model has 2 decoder layers" in capsys.readouterr().err


def test_bench_sft_8b_uncheckpointed_auto(tmp_path, capsys):
    """--uncheckpointed auto: the layers chosen as the trainer's auto chooses them (on a CPU: none),
    the choice and its reason recorded; --reserve-gib has no GPU memory to hold on a CPU."""
    bench_sft_8b = _bench_sft()
    argv = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--uncheckpointed", "auto"]
    data = bench_sft_8b.main([*argv, "--reserve-gib", "1", "--out", str(tmp_path / "x.json")])
    assert data["config"]["uncheckpointed_layers"] == 0 and data["config"]["reserved_gib"] == 0.0
    assert data["config"]["uncheckpointed_auto"].startswith("on cpu every layer stays checkpointed")
    out = capsys.readouterr().out
    assert "--uncheckpointed auto: on cpu" in out and "--reserve-gib: no CUDA device" in out
    with pytest.raises(SystemExit):
        bench_sft_8b.main([*argv, "--alternate-uncheckpointed", "1", "--out", str(tmp_path / "y.json")])
    assert "auto chose no layer" in capsys.readouterr().err
    for bad, msg in (
        (["--uncheckpointed", "all"], "expected an integer or auto"),
        (["--reserve-gib", "-1"], "at least 0"),
    ):
        with pytest.raises(SystemExit):
            bench_sft_8b.main([*argv[:-2], *bad, "--out", str(tmp_path / "y.json")])
        assert msg in capsys.readouterr().err


def test_bench_sft_tiny_compiled_matches_eager_and_records_gc(tmp_path):
    """--compile: each decoder layer under torch.compile, the same losses as the eager run (fp32 on
    the CPU), the graphs and graph breaks counted; both runs record the collector's pauses per
    step."""
    import torch

    bench_sft_8b = _bench_sft()
    runs = {}
    for name, extra in (("eager", ["--no-gc-freeze"]), ("compiled", ["--compile"])):
        out = tmp_path / f"{name}.json"
        bench_sft_8b.main(
            ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--out", str(out), *extra]
        )
        runs[name] = json.loads(out.read_text())
    torch._dynamo.reset()
    eager, compiled = runs["eager"], runs["compiled"]
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    assert compiled["config"]["compiled_layers"] == 2 and eager["config"]["compiled_layers"] is None
    # (counted, not required to be 0: with the `kernels` package installed, transformers' hub
    # layers break the graph themselves; the ops' own checks trace whole: tests/test_import.py)
    record = compiled["compile"]
    assert record["graph_breaks"] == sum(record["graph_break_reasons"].values())
    assert isinstance(record["unique_graphs"], int)
    assert "compile" not in eager
    assert eager["gc"]["frozen"] is False and compiled["gc"]["frozen"] is True
    assert eager["gc"]["policy"] == "python" and compiled["gc"]["policy"] == "loop"
    # (--gc loop: the trainer's collection between steps, timed within each step)
    assert all(ms > 0 for ms in compiled["gc"]["pause_ms_per_step"])
    for run in (eager, compiled):
        assert len(run["gc"]["pause_ms_per_step"]) == len(run["step_s"]) == 2


def test_bench_sft_gc_frozen_keeps_the_automatic_collections_and_gives_back(tmp_path):
    import gc

    bench_sft_8b = _bench_sft()
    out = tmp_path / "frozen.json"
    bench_sft_8b.main(
        ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--gc", "frozen", "--out", str(out)]
    )
    record = json.loads(out.read_text())["gc"]
    assert record["policy"] == "frozen" and record["frozen"] is True
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_bench_sft_8b_refuses_compile_with_alternate_fuse(tmp_path, capsys):
    bench_sft_8b = _bench_sft()
    with pytest.raises(SystemExit) as e:
        bench_sft_8b.main(
            [
                "--tiny",
                "--device",
                "cpu",
                "--compile",
                "--alternate-fuse",
                "2",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
    assert e.value.code == 2 and "--compile" in capsys.readouterr().err


def test_layer_graphs_probe_dry_run_on_the_cpu(tmp_path):
    """bench/probes/layer_graphs.py's logic on the tiny model (the layers wrapped as the probe wraps
    them for capture, no capture on a CPU): the wrapped layers give the eager loss and gradients,
    both kinds alternate, and the JSON records it; without a GPU and without the flag it refuses."""
    sys.path.insert(0, os.path.abspath(BENCH))
    sys.path.insert(0, os.path.join(os.path.abspath(BENCH), "probes"))
    try:
        import layer_graphs
    finally:
        sys.path.pop(0)
        sys.path.pop(0)
    out = tmp_path / "lg.json"
    data = layer_graphs.main(["--dry-run-cpu", "--steps", "1", "--out", str(out)])
    check = data["check"]
    assert check["graphs_loss"] == check["eager_loss"] and check["grad_rel_err_max"] == 0.0
    assert len(data["alternated"]["step_s"]["graphs"]) == len(data["alternated"]["step_s"]["eager"]) == 1
    assert json.loads(out.read_text())["steps"] == 1
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            layer_graphs.main(["--steps", "1"])
