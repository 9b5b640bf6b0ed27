"""The tiny model's base pretraining, cached: a short deterministic full-parameter run on the demo
task's general corpus (equations and subtraction chats), so the demo has a base model that
knows something to fine-tune from. About 250 steps of 32 x 128 tokens: about a minute on
two CPU cores, seconds on a GPU; afterwards it loads from the cache.

Cache folder: ``$HOPTUNE_CACHE`` or ``~/.cache/hoptune``, one sub-folder per recipe version
(``tiny-llama-<hash>``), written to a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from hoptune._io import _umask, fsync_dir, fsync_tree
from hoptune.models.tiny import TINY_CONFIG, build_model, build_tokenizer

# bump when the corpus or the recipe changes: a new cache folder is made
RECIPE = {
    "version": 1,
    "steps": 250,
    "batch": 32,
    "seq_len": 128,
    "lr": 3e-3,
    "warmup": 20,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "betas": [0.9, 0.95],
    "seed": 0,
}


def cache_root() -> str:
    return os.environ.get("HOPTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hoptune")


def tiny_cache_dir() -> str:
    key = hashlib.sha256(json.dumps([TINY_CONFIG, RECIPE], sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_root(), f"tiny-llama-{key}")


def pretrain(
    steps: int | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[Any, Any, list[float]]:
    """Full-parameter pretraining of a fresh tiny model; returns (model, tokenizer, losses)."""
    from hoptune.data.demo_task import pretraining_batch
    from hoptune.losses.sft import sft_loss
    from hoptune.train import loop

    r = RECIPE
    steps = r["steps"] if steps is None else steps
    device = torch.device(device)
    tokenizer = build_tokenizer()
    # the caller's RNGs stay as they were: the CPU generator is seeded inside fork_rng, and nothing
    # reseeds python's, numpy's or a GPU's (the model and the batches have their own seeds)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(r["seed"])
        model = build_model(seed=r["seed"]).to(device)
        model.train()
        named = loop.trainable_parameters(model)
        opt = loop.build_optimizer(named, r["lr"], r["weight_decay"], tuple(r["betas"]))
        sched = loop.build_scheduler(opt, steps, r["warmup"], "cosine", r["min_lr_ratio"])
        rng = random.Random(r["seed"])
        params = [p for _, p in named]
        bar = loop.Progress(steps, enabled=progress, desc="pretrain tiny")
        losses = []
        timer = loop.Timer()
        try:
            for _ in range(steps):
                ids = pretraining_batch(tokenizer, rng, r["batch"], r["seq_len"]).to(device)
                batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
                lp, _ = loop.batch_logprobs(model, batch)
                loss = sft_loss(lp)
                loss.backward()
                lr = opt.param_groups[0]["lr"]
                loop.optimizer_step(opt, sched, params, 1.0)
                losses.append(float(loss.detach()))
                bar.update(losses[-1], lr, ids.numel() / timer.lap(), loop.gpu_memory_gib())
        finally:
            bar.close()
    model.eval()
    return model, tokenizer, losses


def pretrained_tiny_path(log: Callable[[str], None] = print, progress: bool = True) -> str:
    """The cached pretrained tiny model's folder, pretraining it first if it is not there."""
    final = tiny_cache_dir()
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"pretraining the built-in tiny model on {device} ({RECIPE['steps']} steps; cached at {final}) ...")
    t0 = time.time()
    model, tokenizer, losses = pretrain(device=device, log=log, progress=progress)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=".tmp-tiny-")
    try:
        model.to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "pretrain.json"), "w", encoding="utf-8") as f:
            json.dump({"recipe": RECIPE, "losses": losses, "seconds": time.time() - t0}, f)
        fsync_tree(tmp)  # on disk before the rename: a power cut must not leave empty files in place
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0o700 would keep the other users of a shared cache out
        try:
            os.replace(tmp, final)
            fsync_dir(os.path.dirname(final))
        except OSError:  # another process finished first (a non-empty folder is not replaced)
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"pretrained in {time.time() - t0:.0f}s (final loss {losses[-1]:.3f})")
    return final
