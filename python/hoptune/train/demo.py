"""``hoptune demo``: the whole pipeline on the built-in tiny model, on a CPU in a few minutes.

1. the tiny Llama is pretrained once on equations and subtraction chats (cached);
2. the demo task is written as JSONL: 70 ``What is a+b?`` chats to train on, 30 held out,
   and pretraining-style replay data;
3. QLoRA SFT (NF4 base, LoRA r=16 on every linear layer but the head) runs through
   ``hoptune sft`` with ``configs/demo_sft.yaml``;
4. the saved adapter is loaded back onto a fresh NF4 base and both are asked every question:
   a before/after table of exact-match accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib import resources

import torch

CONFIG = "demo_sft.yaml"


def config_path(name: str = CONFIG) -> str:
    return str(resources.files("hoptune.configs").joinpath(name))


def _tiny_model(cfg, device: torch.device, dtype: torch.dtype, trained: str | None = None):
    """The pretrained tiny model as ``cfg`` trains it (NF4 base with model.quantize=nf4): as SFT
    starts from it (``cfg``'s fresh adapters, B = 0, so it computes exactly the base, over the same
    NF4 layers), or what the run saved at ``trained`` (its adapter, or the whole model with
    lora.enabled=false). Its tokenizer renders the questions with model.chat_template when set: the
    format the chats were trained in."""
    from hoptune.adapters import load_adapter
    from hoptune.config import ConfigError
    from hoptune.data.formatting import resolve_chat_template
    from hoptune.models import load_tiny
    from hoptune.train.sft import prepare_model

    model, tok = load_tiny(device=device, dtype=dtype, log=lambda s: None)
    if cfg.model.chat_template is not None:
        try:
            tok.chat_template = resolve_chat_template(cfg.model.chat_template, tok)
        except (OSError, ValueError) as e:
            raise ConfigError(str(e)) from None
    quant = dict(quantize=cfg.model.quantize, double_quant=cfg.model.double_quant)
    if trained is None:
        model = prepare_model(model, cfg)
    elif cfg.lora.enabled:
        load_adapter(model, trained, **quant)
    else:
        model = type(model).from_pretrained(trained, dtype=dtype).to(device)
    model.eval()
    return model, tok


def _demo_run(folder: str, train_paths: set[str]) -> bool:
    """Whether ``folder`` holds nothing or an SFT run of the demo (its config.yaml trains the tiny
    model on one of ``train_paths``), which the demo may delete to start fresh."""
    import yaml

    from hoptune.train.loop import LOCK_FILE
    from hoptune.train.sft import TINY

    try:
        if not set(os.listdir(folder)) - {LOCK_FILE}:
            return True
        with open(os.path.join(folder, "config.yaml"), encoding="utf-8") as f:
            saved = yaml.safe_load(f)
        train = saved["data"]["train"]
        return saved["model"]["path"] in TINY and (
            train in train_paths or os.path.abspath(train) in train_paths
        )
    except FileNotFoundError:
        return not os.path.lexists(folder)
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False


def _holds_records(path: str, rows: list[dict]) -> bool:
    """Whether the JSONL file ``path`` holds exactly ``rows`` (an earlier demo run's data)."""
    try:
        with open(path, encoding="utf-8") as f:
            n = 0
            for line in f:  # (stops at the first line that differs: a user's file may be large)
                if n == len(rows) or json.loads(line) != rows[n]:
                    return False
                n += 1
        return n == len(rows)
    except (OSError, ValueError):
        return False


def run_demo(out_dir: str = "runs/demo", device: str = "auto", overrides: list[str] | None = None) -> dict:
    """Run the demo; returns the accuracies and paths (also printed). An interrupt (Ctrl-C) is
    raised again with what the same command does next as its message."""
    from hoptune.config import ConfigError, check_sft_config, load_config
    from hoptune.data import demo_task as task
    from hoptune.data.jsonl import write_jsonl
    from hoptune.models.pretrain import pretrained_tiny_path
    from hoptune.train import loop, sft

    t0 = time.time()
    # as the config reads output.dir: an empty path (an unset shell variable) would be the current
    # folder, and the shell leaves the ~ of --out=~/demo as it is
    if not os.fspath(out_dir).strip():
        raise ConfigError("--out is an empty string: give a folder's path (default runs/demo)")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir} is a file; the demo writes a folder there: give a folder's path")
    data_dir = os.path.join(out_dir, "data")
    sft_dir = os.path.join(out_dir, "sft")
    # the config first: a mistyped override stops the demo before any work. The paths are quoted (a
    # folder named "exp #2" or "a: b" is not YAML's to read)
    cfg = load_config(
        config_path(),
        [
            f"data.train={json.dumps(os.path.join(data_dir, 'train.jsonl'))}",
            f"data.eval={json.dumps(os.path.join(data_dir, 'eval.jsonl'))}",
            f"data.general_data={json.dumps(os.path.join(data_dir, 'general.jsonl'))}",
            f"output.dir={json.dumps(sft_dir)}",
            f"model.device={json.dumps(str(device))}",  # (as text: --device 0 is no YAML int)
            *(overrides or []),
        ],
    )
    # the device: --device, or an override model.device=... (which the whole demo then uses, as SFT does)
    try:
        dev = loop.resolve_device(cfg.model.device)
    except (ValueError, RuntimeError, TypeError) as e:
        if cfg.model.device != str(device):
            raise ConfigError(f"model.device={cfg.model.device}: {e}") from e
        raise ConfigError(f"--device {device}: {str(e).replace('model.device=cpu', '--device cpu')}") from e
    loop.use_device(dev)
    cfg.model.device = str(dev)
    check_sft_config(cfg)
    if cfg.model.path not in sft.TINY:
        raise ConfigError(
            f"model.path={cfg.model.path!r}: the demo runs on the built-in tiny model (its task and scoring are "
            "made for it); train another model with hoptune sft"
        )
    # the LoRA settings against the model's layers (a mistyped lora.target_modules, a rank too large)
    # on a fresh tiny model, which has the pretrained one's layers: an error now, not after pretraining
    from hoptune.models import build_model

    with torch.random.fork_rng(devices=[]):  # (apply_lora draws lora_A from the global generator)
        sft.prepare_model(build_model(), cfg)
    # the demo starts fresh in its own folder: not where an override asks it to resume from, nor
    # (an earlier run's adapter) when the output goes to another folder, nor over another run
    fresh = cfg.output.resume is False and os.path.abspath(cfg.output.dir) == sft_dir
    if fresh and not _demo_run(sft_dir, {os.path.join(data_dir, "train.jsonl"), cfg.data.train}):
        raise ConfigError(
            f"--out {out_dir}: {sft_dir} holds files that are not the demo's (another run?); the demo "
            "writes its SFT run there: use another --out, or remove that folder first"
        )
    # its data files too: --out may be a project folder with a data/train.jsonl of its own
    train_pairs, held_pairs = task.split_pairs()
    data = {
        "train.jsonl": task.sft_records(train_pairs),
        "eval.jsonl": task.sft_records(held_pairs),
        "general.jsonl": task.general_records(200),
    }
    for name, rows in data.items():
        path = os.path.join(data_dir, name)
        if os.path.lexists(path) and not _holds_records(path, rows):
            raise ConfigError(
                f"--out {out_dir}: {path} is not the demo's data; the demo writes its data "
                "there: use another --out, or remove that file first"
            )
    dtype = loop.resolve_dtype(cfg.model.dtype, dev)
    print(
        f"hoptune demo: tiny Llama + QLoRA SFT on {dev} ({torch.get_num_threads()} CPU threads); output in {out_dir}"
    )

    try:
        # 1. base model (pretrained on the demo's device: --device cpu keeps the GPU out of it)
        pretrained_tiny_path(device=dev)

        # 2. data
        for name, rows in data.items():
            write_jsonl(os.path.join(data_dir, name), rows)
        print(
            f"data: {len(train_pairs)} training chats, {len(held_pairs)} held out, "
            f"200 replay records in {data_dir}"
        )

        held, seen, minus = task.plus_qa(held_pairs), task.plus_qa(train_pairs), task.minus_qa()

        def scores(model, tok) -> dict[str, float]:
            return {
                "held": task.accuracy(model, tok, held, dev),
                "train": task.accuracy(model, tok, seen, dev),
                "minus": task.accuracy(model, tok, minus, dev),
            }

        # 3. before
        base, tok = _tiny_model(cfg, dev, dtype)
        before = scores(base, tok)
        del base

        # 4. SFT through the recipe, with the demo's paths
        if fresh:
            shutil.rmtree(sft_dir, ignore_errors=True)
        t_sft = time.time()
        res = sft.train(cfg)
        t_sft = time.time() - t_sft

        # 5. after: the adapter as saved, on a fresh base (or the saved model of a full fine-tuning)
        tuned, tok = _tiny_model(cfg, dev, dtype, trained=res.output_dir)
        after = scores(tuned, tok)

        rows = [
            (f"held-out addition questions ({len(held)})", "held"),
            (f"trained addition questions ({len(seen)})", "train"),
            (f"subtraction, the base skill ({len(minus)})", "minus"),
        ]
        w = max(len(r[0]) for r in rows)
        print()
        base_label = "base (NF4)" if cfg.model.quantize else "base"
        print(f"{'exact-match accuracy':<{w}}  {base_label:>10}  {'after SFT':>9}")
        for label, key in rows:
            print(f"{label:<{w}}  {before[key]:>10.1%}  {after[key]:>9.1%}")
        print()
        if res.eval:
            print(f"held-out SFT loss: {res.eval['loss']:.4f}")
        what = "adapter (PEFT format)" if cfg.lora.enabled else "model"
        print(f"{what}: {res.output_dir}")
        plots = os.path.dirname(res.plots[0]) if res.plots else f"none ({'; '.join(res.notes)})"
        print(f"plots: {plots}")
        print(f"metrics: {os.path.join(res.run_dir, 'metrics.jsonl')}")
        total = time.time() - t0
        print(f"SFT {t_sft:.0f}s, demo total {total:.0f}s")
    except KeyboardInterrupt as e:  # (`hoptune demo` prints what the same command does next)
        raise KeyboardInterrupt(loop.interrupted_hint(cfg, "demo", fresh)) from e
    return {
        "before": before,
        "after": after,
        "adapter": res.output_dir,
        "plots": res.plots,
        "seconds": total,
        "sft_seconds": t_sft,
    }
