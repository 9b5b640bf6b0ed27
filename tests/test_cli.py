"""The hoptune command: dispatch, stubs, and the one-line errors for bad configs."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import hoptune
from hoptune.cli import main
from hoptune.loading import read_safetensors_header


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "sft CONFIG.yaml" in capsys.readouterr().out
    assert main([]) == 2
    out, err = capsys.readouterr()
    # no command is a usage error: on stderr, where `hoptune 2>/dev/null` or a pipe keeps it apart
    assert not out and "missing command" in err and "sft CONFIG.yaml" in err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hoptune ")


@pytest.mark.parametrize(
    ("cmd", "option"), [("sft", "--print-config"), ("demo", "--out"), ("plan", "--model")]
)
@pytest.mark.parametrize("ask", ["help", "--help", "-h"])
def test_help_of_a_command_shows_its_options(ask, cmd, option, capsys):
    # `hoptune help sft` printed the top-level usage instead of what `hoptune sft --help` prints
    assert main([ask, cmd]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hoptune {cmd} ") and option in out


def test_help_of_a_stub_or_an_unknown_command(capsys):
    assert main(["help", "dpo"]) == 0
    assert "not implemented yet" in capsys.readouterr().out
    assert main(["help", "sfft"]) == 2
    out, err = capsys.readouterr()
    assert not out and "unknown command 'sfft'; did you mean 'sft'?" in err


@pytest.mark.parametrize("cmd", ["dpo", "grpo", "merge", "bench"])
def test_not_implemented_yet(cmd, capsys):
    assert main([cmd, "x.yaml"]) == 2
    assert "not implemented yet" in capsys.readouterr().err
    assert main([cmd, "--help"]) == 0  # (as `hoptune help CMD`: it was exit 2 on stderr)
    assert "not implemented yet" in capsys.readouterr().out


def test_plan_names_the_known_model_a_typo_is_near(capsys):
    assert main(["plan", "--model", "llama3-8b"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("; did you mean 'llama-3-8b'?")


def test_unknown_command(capsys):
    assert main(["sfft"]) == 2
    assert "did you mean 'sft'?" in capsys.readouterr().err


def test_plan_dispatches(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["model"] == "llama-3.1-8b" and "total" in out.lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.learnig_rate=1e-4"], "unknown config key 'train.learnig_rate'; did you mean 'train.lr'?"),
        (["train.lr=fast"], "train.lr: expected float, got 'fast' (str)"),
        (["train.batch_size=two"], "train.batch_size: expected int, got 'two' (str)"),
        (["data.train=/no/such.jsonl"], "data file '/no/such.jsonl' does not exist (data.train)"),
        (
            ["data.train=/", "data.general_data=/no/such.jsonl"],  # (train: exists)
            "data file '/no/such.jsonl' does not exist (data.general_data)",
        ),
    ],
)
def test_bad_config_is_one_line(tmp_path, capsys, args, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"# hoptune sft c.yaml\nmodel:\n  device: cpu\noutput:\n  dir: {tmp_path / 'run'}\n")
    assert main(["sft", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hoptune sft: error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.betas=[0.9,1.5]"], "train.betas must each be in [0, 1), got [0.9, 1.5]"),
        (["train.log_every=0"], "train.log_every must be >= 1, got 0"),
        (["train.eval_batch_size=-1"], "train.eval_batch_size must be >= 0"),
        (["train.epochs=inf", "train.max_steps=0"], "train.epochs must be a finite number, got inf"),
        (
            ["model.chat_template=templates/chatml.jinja"],
            "model.chat_template='templates/chatml.jinja': no such",
        ),
    ],
)
def test_bad_values_are_one_line_even_with_print_config(tmp_path, capsys, args, message):
    for extra in ([], ["--print-config"]):
        assert main(["sft", "demo_sft", f"output.dir={tmp_path}", *args, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hoptune sft: error: ") and message in err and "Traceback" not in err


@pytest.fixture
def run_config(tmp_path, small_model, tokenizer):
    """A config over a small checkpoint folder and 16 chats of the demo task, 1 step on the CPU."""
    from hoptune.data import demo_task
    from hoptune.data.jsonl import write_jsonl

    base = tmp_path / "base"
    small_model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    pairs, _ = demo_task.split_pairs()
    write_jsonl(tmp_path / "train.jsonl", demo_task.sft_records(pairs[:16]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "# hoptune sft c.yaml\n"
        f"model:\n  path: {base}\n  device: cpu\n  quantize: null\n  gradient_checkpointing: false\n"
        f"data:\n  train: {tmp_path / 'train.jsonl'}\n  max_seq_len: 64\n"
        "train:\n  max_steps: 1\n  batch_size: 4\n  grad_accum: 1\n  save_every: 1\n"
        f"output:\n  dir: {tmp_path / 'run'}\n  progress: false\n  plots: false\n  tensorboard: false\n"
    )
    return str(cfg)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.attn_implementation=bogus"], "model.attn_implementation='bogus': "),
        (["lora.target_modules=q_proj"], "target_modules='q_proj' matches no linear layer"),
        (["lora.target_modules=q_proj"], "in a config a list is lora.target_modules=[q_proj, v_proj]"),
        (
            ["lora.r=200"],
            "(rank at most min(in, out) = 64, and at most 256); lower lora.r, or name the layers to adapt",
        ),
        (["data.train=LATIN1"], "line 1: not valid UTF-8 (byte 0xe9 at column 47)"),
        pytest.param(
            ["model.device=cuda"],
            "no CUDA device is visible; use model.device=cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible"),
        ),
    ],
)
def test_setup_errors_are_one_line(tmp_path, capsys, run_config, args, message):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}\n'
    )
    args = [a.replace("LATIN1", str(bad)) for a in args]
    capsys.readouterr()  # the fixture's own output
    assert main(["sft", run_config, *args]) == 2
    err = capsys.readouterr().err  # the model's loading bar may come first
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("hoptune sft: error: ") and message in last and "Traceback" not in err


def test_resume_with_other_lora_settings_is_one_line(capsys, run_config):
    capsys.readouterr()  # the fixture's own output
    # a comma-separated list on the command line is a list of module names
    assert main(["sft", run_config, "lora.target_modules=q_proj,v_proj"]) == 0
    capsys.readouterr()
    assert main(["sft", run_config, "lora.target_modules=q_proj,v_proj", "lora.r=8"]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("hoptune sft: error: cannot resume exactly from ")
    assert "lora.r was 16 and is now 8" in last and "remove_lora" not in err


def test_unknown_key_in_yaml(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  grad_acum: 4\n")
    assert main(["sft", str(cfg)]) == 2
    assert "did you mean 'train.grad_accum'?" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert main(["sft", "no_such_config"]) == 2
    assert "neither a file nor a shipped config (demo_sft.yaml" in capsys.readouterr().err


def test_repository_path_to_a_shipped_config_from_another_folder(tmp_path, monkeypatch, capsys):
    """README's python/hoptune/configs/... path, typed outside the repository: the error names the
    shipped config of that name (it listed every shipped file and left the link to the user)."""
    monkeypatch.chdir(tmp_path)
    for name in ("python/hoptune/configs/sft_qlora_8b.yaml", "configs/demo_sft"):
        assert main(["sft", name, "--print-config"]) == 2
        err = capsys.readouterr().err
        stem = os.path.basename(name).removesuffix(".yaml")
        assert f"ships a config of that name: hoptune sft {stem}" in err and len(err.splitlines()) == 1
        assert main(["sft", stem, "--print-config"]) == 0
        capsys.readouterr()


def test_missing_demo_data_names_the_command_that_writes_it(tmp_path, monkeypatch, capsys):
    """The shipped demo config reads runs/demo/data, which hoptune demo writes: run before the demo
    (or in another folder), its missing-file error says so; other missing files keep their error."""
    monkeypatch.chdir(tmp_path)
    shipped = os.path.join(os.path.dirname(hoptune.__file__), "configs", "demo_sft.yaml")
    for config in ("demo_sft", shipped):
        assert main(["sft", config, "model.device=cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            "hoptune sft: error: data file 'runs/demo/data/train.jsonl' does not exist "
            f"(data.train, relative to the current folder, {tmp_path}); the demo config's data is "
            "written by `hoptune demo`: run it in this folder first"
        )
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert os.listdir(tmp_path) == []  # no runs/demo/sft (and lock file) left behind
    # the demo config with data of one's own, and another config naming the demo's paths: no hint
    assert main(["sft", "demo_sft", "model.device=cpu", "data.train=mine.jsonl"]) == 2
    assert capsys.readouterr().err == (
        "hoptune sft: error: data file 'mine.jsonl' does not exist (data.train, relative to the "
        f"current folder, {tmp_path})\n"
    )
    other = tmp_path / "c.yaml"
    other.write_text(
        "model:\n  device: cpu\ndata:\n  train: runs/demo/data/train.jsonl\n"
        f"output:\n  dir: {tmp_path / 'run'}\n"
    )
    assert main(["sft", str(other)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "hoptune sft: error: data file 'runs/demo/data/train.jsonl' does not exist (data.train, "
        f"relative to the current folder, {tmp_path})\n"
    )
    assert main(["sft", str(other), f"data.train={tmp_path / 'c.yaml'}", "data.eval=e.jsonl"]) == 2
    assert capsys.readouterr().err.endswith(
        f"data file 'e.jsonl' does not exist (data.eval, relative to the current folder, {tmp_path})\n"
    )
    assert os.listdir(tmp_path) == ["c.yaml"]


def test_no_config_names_only_the_config(capsys):
    # the overrides are optional: the usage error must not list them as required
    with pytest.raises(SystemExit) as e:
        main(["sft"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "required: config" in err and "overrides" not in err.split("error:")[-1]
    assert main(["sft", "demo_sft", "--print-config"]) == 0  # and none at all is fine


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  lr: [1\n",
            "line 3, column 1: expected ',' or ']', but got '<stream end>' (while parsing a flow",
        ),
        ("train:\n  lr: 1\n bad: 2\n", "line 3, column 2: expected <block end>"),
        ("train:\n\tlr: 1\n", "line 2, column 1: found character '\\t' that cannot start any token"),
    ],
)
def test_invalid_yaml_is_one_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert main(["sft", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"hoptune sft: error: config file {str(cfg)!r} is not valid YAML: "
    )
    assert message in err


def test_print_config_of_a_shipped_config(capsys):
    assert main(["sft", "demo_sft", "train.lr=1e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0001" in out and "quantize: nf4" in out
    assert main(["sft", "demo_sft", "--print-config", "train.lr=1e-4"]) == 0  # the option first
    assert "lr: 0.0001" in capsys.readouterr().out


def test_console_script():
    """The `hoptune` script that pyproject.toml declares is installed and runs main."""
    from importlib.metadata import entry_points

    assert [e.value for e in entry_points(group="console_scripts", name="hoptune")] == ["hoptune.cli:main"]
    # pip puts the script beside the interpreter it installs for (a virtual environment's bin/)
    exe = shutil.which("hoptune", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    assert exe is not None, "the hoptune console script is not installed"
    out = subprocess.run([exe, "dpo", "x.yaml"], capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "not implemented yet" in out.stderr


def test_checkpoint_folder_without_a_tokenizer_is_one_line(tmp_path, capsys, run_config, small_model):
    """A model folder whose tokenizer files are missing (e.g. weights copied without them)."""
    weights_only = tmp_path / "weights_only"
    small_model.save_pretrained(weights_only)
    capsys.readouterr()
    assert main(["sft", run_config, f"model.path={weights_only}"]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last == (
        f"hoptune sft: error: model.path={str(weights_only)!r}: cannot load its tokenizer; the folder "
        "needs the tokenizer files (tokenizer.json, tokenizer_config.json) saved with the model"
    )  # (without transformers' "(Couldn't instantiate the backend tokenizer from one of: )")
    assert "Traceback" not in err


def test_a_model_path_without_config_json_is_named(tmp_path, capsys, run_config):
    """'<folder> has no config.json' did not name model.path, nor an adapter folder passed as one."""
    from hoptune.train import loop

    capsys.readouterr()
    assert main(["sft", run_config, f"model.path={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        f"hoptune sft: error: model.path={str(tmp_path)!r} has no config.json; it takes a checkpoint "
        "folder as save_pretrained writes it (config.json + safetensors + tokenizer files)\n"
    )
    assert main(["sft", run_config]) == 0  # a finished run: its adapter/ as the model
    capsys.readouterr()
    adapter = loop.saved_output(tmp_path / "run")
    assert main(["sft", run_config, f"model.path={adapter}", f"output.dir={tmp_path / 'run2'}"]) == 2
    assert capsys.readouterr().err == (
        f"hoptune sft: error: model.path={adapter!r} is a LoRA adapter folder (its base: "
        f"{str(tmp_path / 'base')!r}), not a model; model.path takes the base model's folder (config.json "
        "+ safetensors + tokenizer files)\n"
    )


@pytest.mark.parametrize("case", ["truncated", "moe"])
def test_checkpoint_load_model_refuses_is_one_line(
    tmp_path, capsys, run_config, small_model, tokenizer, case
):
    """A checkpoint folder that load_model refuses: a file cut short, or an MoE checkpoint in the
    per-expert layout transformers >= 5 writes (transformers converts it while loading)."""
    import transformers

    folder = tmp_path / case
    if case == "truncated":
        small_model.save_pretrained(folder)
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        message = "is truncated"
    else:
        cfg = transformers.MixtralConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=2,
            num_experts_per_tok=1,
        )
        transformers.MixtralForCausalLM(cfg).save_pretrained(folder)
        keys = read_safetensors_header(str(folder / "model.safetensors"))
        if not any(".experts.0." in k for k in keys):
            pytest.skip("this transformers saves the experts fused: load_model reads them")
        message = "does not support this architecture's checkpoint layout yet"
    tokenizer.save_pretrained(folder)
    capsys.readouterr()
    assert main(["sft", run_config, f"model.path={folder}"]) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith(f"hoptune sft: error: model.path={str(folder)!r}: ") and message in last
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "device", ["gpu", "cuda:7", "0", "null"], ids=["not-a-device-type", "absent-device", "int", "null"]
)
def test_demo_with_a_bad_device_is_one_line(tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("cuda:7 exists here")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hoptune demo: error: --device {device}: ") and "Traceback" not in err


@pytest.fixture
def no_demo_work(monkeypatch):
    """The demo fails the test if it starts work (pretraining the base) before checking its config."""
    from hoptune.models import pretrain

    def no_pretraining(*a, **k):
        raise AssertionError("the demo started work before checking its config")

    monkeypatch.setattr(pretrain, "pretrained_tiny_path", no_pretraining)


def test_demo_checks_its_overrides_before_any_work(tmp_path, capsys, no_demo_work):
    """A mistyped override is refused at once: not after pretraining the base and scoring it."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lrr'; did you mean 'train.lr'?" in err
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "train.log_every=0"]) == 2
    assert "train.log_every must be >= 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "demo" / "data")


def test_demo_takes_overrides_between_its_options(monkeypatch):
    from hoptune.train import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, device, overrides: seen.update(o=overrides, d=device))
    assert main(["demo", "train.max_steps=3", "--device", "cpu", "data.general_fraction=0"]) == 0
    assert seen == {"o": ["train.max_steps=3", "data.general_fraction=0"], "d": "cpu"}


def test_filesystem_errors_are_one_line(tmp_path, capsys):
    # (an output.dir under a file is refused by the config check now: a name too long for the
    # file system fails where the run makes the folder)
    assert main(["sft", "demo_sft", f"output.dir={tmp_path / ('x' * 300) / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hoptune sft: error: ") and "File name too long" in err and "Traceback" not in err


def test_demo_refuses_another_model(tmp_path, capsys, no_demo_work):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "model.path=/ckpt/llama"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hoptune demo: error: model.path='/ckpt/llama': the demo runs on the built-in")


@pytest.mark.parametrize("args", [["--help"], ["plan", "--model", "llama-3.1-8b"]])
def test_output_into_a_closed_pipe_is_no_traceback(args):
    """`hoptune --help | head -1`: the reader gone, the write fails with EPIPE; as other command
    line tools, hoptune stops quietly (exit 141, SIGPIPE's), not with a BrokenPipeError traceback."""
    code = f"import sys; from hoptune.cli import main; sys.exit(main({args!r}))"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # (closed long before the child has imported hoptune and writes)
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == ""


@pytest.mark.parametrize(
    ("args", "hint", "again"),
    [
        ([], "run the same command to continue from the newest checkpoint, ", []),
        (
            ["output.resume=false"],  # (the same command would refuse the folder's checkpoints)
            "run it with output.resume=auto to continue from the newest checkpoint, ",
            ["output.resume=auto"],
        ),
    ],
)
def test_an_interrupted_run_says_how_to_resume(monkeypatch, capsys, run_config, args, hint, again):
    """Ctrl-C after a checkpoint: exit 130 and one line naming the checkpoint and what continues
    from it (it said only 'interrupted'); that command then resumes."""
    from hoptune.train import loop

    save = loop.Checkpointer.save

    def save_then_interrupt(self, *a, **k):
        save(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Checkpointer, "save", save_then_interrupt)
    capsys.readouterr()  # the fixture's own output
    assert main(["sft", run_config, "train.max_steps=3", *args]) == 130
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    ckpt = os.path.join(os.path.dirname(run_config), "run", "checkpoints", "step-00000001")
    assert last == f"hoptune sft: interrupted; {hint}{ckpt}"
    monkeypatch.undo()
    assert main(["sft", run_config, "train.max_steps=3", *args, *again]) == 0
    assert f"resumed from {ckpt} at step 1" in capsys.readouterr().out


def test_an_interrupted_run_without_checkpoints_starts_over(monkeypatch, capsys, run_config):
    import hoptune.adapters

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(hoptune.adapters, "save_adapter", interrupt)  # the run's last save
    capsys.readouterr()
    assert main(["sft", run_config, "train.save_every=0"]) == 130
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert last == (
        "hoptune sft: interrupted; no checkpoint was written (train.save_every=0); the same "
        "command starts the run over"
    )


def test_an_interrupted_final_eval_names_the_saved_adapter(monkeypatch, capsys, run_config):
    """train.save_every=0, Ctrl-C in the final eval: the adapter is saved whole and no checkpoint
    kept, so the same command refuses the folder (the hint said it 'starts the run over')."""
    from hoptune.train import loop

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "evaluate_nll", interrupt)  # (max_steps=1: only the final eval)
    args = ["sft", run_config, "train.save_every=0", "data.eval_fraction=0.25"]
    capsys.readouterr()
    assert main(args) == 130
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    adapter = os.path.join(os.path.dirname(run_config), "run", "adapter")
    assert last == (
        f"hoptune sft: interrupted; training had finished: {adapter} is saved whole; no checkpoint "
        "was kept (train.save_every=0), so the same command refuses that folder: give the run "
        "another output.dir"
    )
    monkeypatch.undo()
    assert main(args) == 2
    assert "holds the adapter/ of an earlier run and no checkpoint" in capsys.readouterr().err


def test_ctrl_c_of_the_command(tmp_path, run_config):
    """The real command, sent SIGINT once it has written a checkpoint: exit 130, the resume line, no
    traceback, and the checkpoint it names is whole."""
    import signal
    import time

    from hoptune.train import loop

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hoptune.cli", "sft", run_config, "train.max_steps=100000"]
    # (SIGINT as a terminal sends it, also where the tests run with it ignored; the fault handler
    # prints every thread's Python stack on the SIGABRT below)
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "latest").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        try:
            err = p.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGABRT)
            stacks = p.communicate(timeout=60)[1]
            pytest.fail(f"the command went on 120 s after SIGINT; its stacks at SIGABRT:\n{stacks}")
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("hoptune sft: interrupted; run the same command to continue from the ")
    latest = loop.Checkpointer(run).latest()
    assert last.endswith(f", {latest}") and loop.Checkpointer.read_state(latest)["step"] >= 1


def test_a_config_that_is_a_folder(tmp_path, capsys):
    """A folder is named as one (it was 'neither a file nor a shipped config'); a run's folder
    points at the config.yaml the run wrote."""
    (tmp_path / "empty").mkdir()
    assert main(["sft", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    empty = str(tmp_path / "empty")
    assert err == f"hoptune sft: error: config {empty!r} is a folder, not a YAML file\n"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  lr: 1.0e-4\n")
    assert main(["sft", str(run), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"hoptune sft: error: config {str(run)!r} is a folder, not a YAML file; the config of the "
        f"run in it is {str(run / 'config.yaml')!r}\n"
    )


def test_a_config_kept_in_its_output_dir_is_not_overwritten(tmp_path, capsys, run_config):
    """exp/config.yaml with output.dir: exp (a common layout) was replaced by the resolved dump, its
    comments gone; the run's resolved config goes beside it now, and a run's own is rewritten."""
    from hoptune.train.sft import RESOLVED_HEADER

    exp = tmp_path / "exp"
    exp.mkdir()
    mine = open(run_config).read().replace(str(tmp_path / "run"), ".") + "# my notes\n"
    (exp / "config.yaml").write_text(mine)
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(exp)  # (output.dir: . is this folder)
    try:
        assert main(["sft", "config.yaml"]) == 0
        assert (exp / "config.yaml").read_text() == mine  # byte for byte
        resolved = (exp / "config.resolved.yaml").read_text()
        assert resolved.startswith(RESOLVED_HEADER) and "max_steps: 1" in resolved
        assert "is a config a run did not write (kept as it is)" in capsys.readouterr().out
        assert main(["sft", "config.yaml"]) == 0  # the finished run started again: still kept
        assert (exp / "config.yaml").read_text() == mine
    finally:
        os.chdir(cwd)
    # a run's own config.yaml, with the header or as an earlier version wrote it (a bare dump), is the
    # one the run rewrites
    run = tmp_path / "run"
    assert main(["sft", run_config]) == 0
    own = (run / "config.yaml").read_text()
    assert own.startswith(RESOLVED_HEADER) and not (run / "config.resolved.yaml").exists()
    (run / "config.yaml").write_text(own.removeprefix(RESOLVED_HEADER))
    assert main(["sft", run_config]) == 0
    assert (run / "config.yaml").read_text() == own and not (run / "config.resolved.yaml").exists()


def test_an_output_dir_that_cannot_be_written_is_named(tmp_path, capsys, run_config, monkeypatch):
    """An errno text ('[Errno 13] Permission denied: .../.lock') did not name output.dir."""
    import contextlib

    from hoptune.train import loop

    real_mkdir = os.mkdir
    capsys.readouterr()
    run = tmp_path / "run"
    if os.geteuid() != 0:  # (root writes into a read-only folder)
        run.mkdir(mode=0o555)
        assert main(["sft", run_config]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"hoptune sft: error: output.dir {str(run)!r} cannot be written: Permission denied "
            f"({run / '.lock'})\n"
        )

    @contextlib.contextmanager
    def refused(folder):  # (as os.open of the lock file in a read-only folder)
        raise PermissionError(13, "Permission denied", os.path.join(folder, loop.LOCK_FILE))
        yield

    # a parent made on the way, then the folder itself refused: the parent goes again too
    def mkdir(path, *a, **k):  # (os.makedirs makes each folder with os.mkdir too)
        if str(path).endswith(os.path.join("deep", "run")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert main(["sft", run_config, f"output.dir={tmp_path / 'made' / 'deep' / 'run'}"]) == 2
    assert "cannot be written: Permission denied" in capsys.readouterr().err
    assert not (tmp_path / "made").exists()
    monkeypatch.undo()

    monkeypatch.setattr(loop, "run_lock", refused)
    run = tmp_path / "new" / "run"  # (the folders made for it go again)
    assert main(["sft", run_config, f"output.dir={run}"]) == 2
    assert not (tmp_path / "new").exists()
    err = capsys.readouterr().err
    assert err == (
        f"hoptune sft: error: output.dir {str(run)!r} cannot be written: Permission denied ({run / '.lock'})\n"
    )


def test_print_config_lists_the_defaults_without_data_train(tmp_path, capsys):
    """--print-config of an empty config (the way to list the keys) was refused for data.train."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["sft", str(empty), "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert "data:\n  train: null\n" in out and "lora:\n" in out
    assert err == "hoptune sft: note: data.train is not set; a run needs it\n"
    assert main(["sft", str(empty), "--print-config", "train.lr=-1"]) == 2  # the other checks still run
    assert capsys.readouterr().err == "hoptune sft: error: train.lr must be a finite number > 0, got -1.0\n"
