"""The ``hoptune`` command.

    hoptune sft CONFIG.yaml [section.key=value ...]   supervised fine-tuning (LoRA / QLoRA / full)
    hoptune demo [--out DIR] [--device D]             the built-in demo (tiny model, CPU or GPU)
    hoptune plan --model M [...]                      GPU memory audit of a training step
    hoptune dpo | grpo | merge | bench                not implemented yet

CONFIG may also name a config shipped with hoptune (``hoptune sft demo_sft``). Bad configs and
bad data end with a one-line error and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import hoptune

NOT_YET = {
    "dpo": "preference tuning (DPO)",
    "grpo": "GRPO",
    "merge": "model / adapter merging",
    "bench": "the end-to-end benchmark",
}


def _config_file(name: str) -> str:
    if os.path.isfile(name):
        return name
    from importlib import resources

    root = resources.files("hoptune.configs")
    for candidate in (name, name + ".yaml"):
        p = root.joinpath(candidate)
        if p.is_file():
            return str(p)
    shipped = sorted(p.name for p in root.iterdir() if p.name.endswith(".yaml"))
    base = os.path.basename(name)
    if base in shipped or base + ".yaml" in shipped:
        # the repository's path to a shipped config (README's examples), run from another folder
        stem = base.removesuffix(".yaml")
        raise FileNotFoundError(
            f"config {name!r} does not exist (relative to {os.getcwd()}); hoptune ships a config of that "
            f"name: hoptune sft {stem}"
        )
    if os.path.isdir(name):
        # (a run's output folder, say: the config it ran with is its config.yaml)
        inside = os.path.join(name, "config.yaml")
        hint = f"; the config of the run in it is {inside!r}" if os.path.isfile(inside) else ""
        raise IsADirectoryError(f"config {name!r} is a folder, not a YAML file{hint}")
    raise FileNotFoundError(f"config {name!r} is neither a file nor a shipped config ({', '.join(shipped)})")


def _sft(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hoptune sft",
        description="Supervised fine-tuning from a YAML config; section.key=value overrides any key.",
    )
    p.add_argument("config", help="YAML config (or the name of a shipped one, e.g. demo_sft)")
    # (default=[]: argparse would otherwise list the optional overrides as required when CONFIG is missing)
    p.add_argument(
        "overrides", nargs="*", default=[], help="section.key=value, e.g. train.lr=1e-4 data.packing=true"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_intermixed_args(argv)  # options before, between or after the overrides
    from hoptune.config import check_sft_config, dump_config, load_config

    config_file = _config_file(args.config)
    cfg = load_config(config_file, args.overrides)
    if args.print_config:
        import dataclasses

        # (without data.train the keys and defaults are listed all the same: a run needs it)
        unset = cfg.data.train is None
        check_sft_config(
            dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train="-")) if unset else cfg
        )
        print(dump_config(cfg), end="")
        if unset:
            print("hoptune sft: note: data.train is not set; a run needs it", file=sys.stderr)
        return 0
    from hoptune.data.jsonl import DataError
    from hoptune.train import loop, sft

    try:
        return sft.main(cfg)
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(loop.interrupted_hint(cfg)) from e
    except DataError as e:
        hint = _demo_data_hint(config_file, cfg, e)
        if hint is None:
            raise
        raise DataError(f"{e}; {hint}") from e


DEMO_CONFIG = "demo_sft.yaml"
DEMO_DATA_KEYS = ("train", "eval", "general_data")


def _demo_data_hint(config_file: str, cfg, error: Exception) -> str | None:
    """The step that writes the shipped demo config's data, when ``error`` is one of those files
    missing (``hoptune demo`` writes them under runs/demo/data of the folder it runs in); None for
    any other config, any other file, or any other data error."""
    from importlib import resources

    from hoptune.config import load_config

    shipped = str(resources.files("hoptune.configs").joinpath(DEMO_CONFIG))
    try:
        if not os.path.samefile(config_file, shipped):
            return None
    except OSError:
        return None
    defaults = load_config(shipped, []).data
    for key in DEMO_DATA_KEYS:
        path = getattr(defaults, key)
        if (
            path
            and getattr(cfg.data, key) == path
            and not os.path.exists(path)
            and str(error).startswith(f"data file {path!r} does not exist (data.{key}")
        ):
            return (
                "the demo config's data is written by `hoptune demo`: run it in this folder first "
                "(it writes runs/demo/data, then trains on it), then this command again"
            )
    return None


def _demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="hoptune demo",
        description="Pretrain (once, cached) the built-in tiny Llama, QLoRA-SFT it on a small arithmetic "
        "task, and print held-out accuracy before and after.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("overrides", nargs="*", help="overrides of configs/demo_sft.yaml (section.key=value)")
    args = p.parse_intermixed_args(argv)  # options before, between or after the overrides
    from hoptune.train.demo import run_demo

    run_demo(args.out, args.device, args.overrides)
    return 0


def _plan(argv: list[str]) -> int:
    import importlib

    # the module, not the lazy attribute hoptune.plan (which is the plan() function)
    return importlib.import_module("hoptune.plan").main(argv)


COMMANDS = {"sft": _sft, "demo": _demo, "plan": _plan}


def _usage() -> str:
    lines = [
        "usage: hoptune {sft,demo,plan,dpo,grpo,merge,bench} ...",
        "",
        "  sft CONFIG.yaml [k=v ...]   supervised fine-tuning (LoRA / QLoRA / full)",
        "  demo                        built-in demo: tiny model, QLoRA SFT, before/after accuracy",
        "  plan --model M ...          GPU memory audit of a training step",
        "  dpo | grpo | merge | bench  not implemented yet",
        "",
        "hoptune COMMAND -h shows the options of a command.",
    ]
    return "\n".join(lines)


def _help(cmd: str) -> int:
    """``hoptune help CMD``: the options of CMD, as ``hoptune CMD --help`` prints them."""
    if cmd in NOT_YET:
        print(f"hoptune {cmd}: {NOT_YET[cmd]} is not implemented yet in hoptune {hoptune.__version__}")
        return 0
    if cmd not in COMMANDS:
        return main([cmd])  # the unknown command's error, with its closest name
    try:
        return COMMANDS[cmd](["--help"])
    except SystemExit as e:  # argparse's exit after printing the help
        return e.code if isinstance(e.code, int) else 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # (inside the try: a closed pipe fails here for short output)
        return code
    except BrokenPipeError:
        # the reader of stdout has gone (`hoptune --help | head -1`): stop quietly, as other tools,
        # with nothing left for the interpreter to flush into the closed pipe at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a usage error, reported as argparse and an unknown command report theirs: on stderr
        print(f"hoptune: missing command\n\n{_usage()}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        if len(argv) == 1:
            print(_usage())
            return 0
        return _help(argv[1])
    if argv[0] in ("-V", "--version"):
        print(f"hoptune {hoptune.__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in NOT_YET:
        if rest and rest[0] in ("-h", "--help"):  # (as `hoptune help CMD`)
            return _help(cmd)
        print(
            f"hoptune {cmd}: {NOT_YET[cmd]} is not implemented yet in hoptune {hoptune.__version__}",
            file=sys.stderr,
        )
        return 2
    if cmd not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(cmd, [*COMMANDS, *NOT_YET], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"hoptune: unknown command {cmd!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    from hoptune.config import ConfigError
    from hoptune.data.jsonl import DataError

    try:
        return COMMANDS[cmd](rest)
    except BrokenPipeError:
        raise
    except (ConfigError, DataError, OSError) as e:  # OSError: a missing file, a folder that is a file...
        print(f"hoptune {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        hint = f"; {e}" if str(e) else ""  # (what `hoptune sft` can tell about resuming)
        print(f"\nhoptune {cmd}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
