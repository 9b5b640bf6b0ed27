"""The hoptune command: dispatch, stubs, and the one-line errors for bad configs."""

import subprocess
import sys

import pytest

from hoptune.cli import main


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "sft CONFIG.yaml" in capsys.readouterr().out
    assert main([]) == 2
    capsys.readouterr()
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("hoptune ")


@pytest.mark.parametrize("cmd", ["dpo", "grpo", "merge", "bench"])
def test_not_implemented_yet(cmd, capsys):
    assert main([cmd, "x.yaml"]) == 2
    assert "not implemented yet" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["sfft"]) == 2
    assert "did you mean 'sft'?" in capsys.readouterr().err


def test_plan_dispatches(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--json"]) == 0
    assert "total" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.learnig_rate=1e-4"], "unknown config key 'train.learnig_rate'; did you mean 'train.lr'?"),
        (["train.lr=fast"], "train.lr: expected float, got 'fast' (str)"),
        (["train.batch_size=two"], "train.batch_size: expected int, got 'two' (str)"),
        (["data.train=/no/such.jsonl"], "data file '/no/such.jsonl' does not exist"),
    ],
)
def test_bad_config_is_one_line(tmp_path, capsys, args, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"# hoptune sft c.yaml\nmodel:\n  device: cpu\noutput:\n  dir: {tmp_path / 'run'}\n")
    assert main(["sft", str(cfg), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hoptune sft: error: ") and message in err
    assert "Traceback" not in err


def test_unknown_key_in_yaml(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  grad_acum: 4\n")
    assert main(["sft", str(cfg)]) == 2
    assert "did you mean 'train.grad_accum'?" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert main(["sft", "no_such_config"]) == 2
    assert "neither a file nor a shipped config (demo_sft.yaml" in capsys.readouterr().err


def test_print_config_of_a_shipped_config(capsys):
    assert main(["sft", "demo_sft", "train.lr=1e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0001" in out and "quantize: nf4" in out


def test_console_script():
    exe = sys.executable.replace("python", "hoptune") if "python" in sys.executable else None
    out = subprocess.run(
        [sys.executable, "-c", "from hoptune.cli import main; raise SystemExit(main(['dpo']))"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "not implemented yet" in out.stderr
    assert exe is None or exe  # the console script itself is declared in pyproject.toml
