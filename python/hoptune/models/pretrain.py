"""The tiny model's base pretraining, cached: a short deterministic full-parameter run on the demo
task's general corpus (equations and subtraction chats), so the demo has a base model that
knows something to fine-tune from. About 250 steps of 32 x 128 tokens: about a minute on
two CPU cores, seconds on a GPU; afterwards it loads from the cache.

Cache folder: ``$HOPTUNE_CACHE`` or ``~/.cache/hoptune``, one sub-folder per recipe version
(``tiny-llama-<hash>``), written to a temporary name and renamed into place when complete. Its
``pretrain.json`` holds the SHA-256 of every other file: a folder whose files no longer match (a
truncated copy, a disk error) is set aside and the model pretrained again. Two processes that
need it at once do not both pretrain: the second waits on a lock file next to the folder
(``tiny-llama-<hash>.lock``) and then loads what the first wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from hoptune._io import _umask, fsync_dir, fsync_tree, is_temp_name
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
    return os.path.expanduser(os.environ.get("HOPTUNE_CACHE") or os.path.join("~", ".cache", "hoptune"))


def tiny_cache_dir() -> str:
    key = hashlib.sha256(json.dumps([TINY_CONFIG, RECIPE], sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_root(), f"tiny-llama-{key}")


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """PyTorch's deterministic algorithms while the block runs on a GPU (put back as they were
    after): without them two runs of the same pretraining on one GPU (an H200) ended with
    different weights. cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for it; it is set for
    the block where unset. On a CPU nothing changes (its kernels already give the same bits)."""
    if device.type != "cuda":
        yield
        return
    was, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if env is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    # warn_only: an op without a deterministic kernel (in another torch) warns instead of failing
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


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
    with torch.random.fork_rng(devices=[]), deterministic(device):
        torch.default_generator.manual_seed(r["seed"])
        model = build_model(seed=r["seed"]).to(device)
        model.train()
        named = loop.trainable_parameters(model)
        opt = loop.build_optimizer(named, r["lr"], r["weight_decay"], tuple(r["betas"]))
        # the warmup the recipe was made with, (s + 1) / (w + 1): the cache folder is named after the
        # recipe, so its model must not change with the SFT schedule's (which follows transformers')
        sched = loop.build_scheduler(
            opt, steps, r["warmup"], "cosine", r["min_lr_ratio"], warmup_from_zero=False
        )
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


@contextlib.contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """transformers' progress bars off for the block (a 39-tensor model needs no bar to load or
    save), back as they were after."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digests(folder: str) -> dict[str, str]:
    return {n: _sha256(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if n != "pretrain.json"}


def cache_problem(folder: str) -> str | None:
    """Why the cached model in ``folder`` cannot be used, or None when it can: every file listed in
    its ``pretrain.json`` is there with the digest written (a cache written before the digests were
    recorded: its weights must load)."""
    try:
        with open(os.path.join(folder, "pretrain.json"), encoding="utf-8") as f:
            files = json.load(f).get("files")
        if files is None:
            from safetensors.torch import load_file

            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                json.load(f)
            load_file(os.path.join(folder, "model.safetensors"))
            return None
        for name, digest in files.items():
            if _sha256(os.path.join(folder, name)) != digest:
                return f"{name} is not the file that was written"
    except Exception as e:  # a missing or unreadable file, invalid JSON, a truncated safetensors file
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


BAD_PREFIX = ".bad-tiny-"  # the folders damaged copies are set aside in, to be deleted


def _set_aside(folder: str) -> None:
    """Move a broken cache folder out of the way (a rename first: another process may read it) and
    delete it. A cache that cannot be written (a read-only mount) is an error naming the cache."""
    root = os.path.dirname(folder)
    for _ in range(3):
        try:
            bad = tempfile.mkdtemp(dir=root, prefix=BAD_PREFIX)
        except OSError as e:
            raise _unwritable(root, e) from e
        try:
            os.replace(folder, os.path.join(bad, "old"))
        except FileNotFoundError:
            shutil.rmtree(bad, ignore_errors=True)
            if os.path.lexists(folder):  # another process removed `bad` as a leftover: again
                continue
            # else another process set it aside first
        except OSError as e:
            shutil.rmtree(bad, ignore_errors=True)
            raise _unwritable(root, e) from e
        shutil.rmtree(bad, ignore_errors=True)
        return


def _usable(final: str, log: Callable[[str], None]) -> bool:
    """Whether the cached model at ``final`` is there and whole; a damaged one is set aside."""
    if not os.path.exists(final):
        return False
    problem = cache_problem(final)
    if problem is None:
        return True
    log(f"the cached tiny model at {final} is damaged ({problem}); pretraining it again")
    _set_aside(final)
    return False


@contextlib.contextmanager
def _pretraining_lock(final: str, log: Callable[[str], None]) -> Iterator[bool]:
    """Hold ``<final>.lock`` for the block: a second process waits here (saying so) instead of
    pretraining the same model at the same time. Where there are no locks (not POSIX, a file
    system without them, a lock file this user cannot open) the block runs unguarded: both
    processes pretrain and the rename keeps one copy. Yields whether the lock is held."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    try:
        fd = os.open(final + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file in a shared cache: flock needs no write access
        try:
            fd = os.open(final + ".lock", os.O_RDONLY)
        except OSError:
            fd = None
    except OSError:
        fd = None
    if fd is None:
        yield False
        return
    try:
        held = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is pretraining the tiny model into {final} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system (some network mounts)
            held = False
        yield held
    finally:
        os.close(fd)  # releases the lock


def _unwritable(root: str, e: OSError) -> OSError:
    why = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e)
    return OSError(
        e.errno,
        f"cannot write the tiny model's cache in {root} ({why}); set HOPTUNE_CACHE to a writable folder",
    )


def pretrained_tiny_path(
    log: Callable[[str], None] = print, progress: bool = True, device: str | torch.device | None = None
) -> str:
    """The cached pretrained tiny model's folder, pretraining it first (on ``device``; None: the GPU
    when there is one) if it is not there or if the cached copy is damaged."""
    final = tiny_cache_dir()
    if _usable(final, log):
        return final
    root = os.path.dirname(final)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise _unwritable(root, e) from e
    with _pretraining_lock(final, log) as held:
        if _usable(final, log):  # another process pretrained it while this one waited
            return final
        if held:
            _remove_leftovers(final)
            _remove_set_aside(os.path.dirname(final))
        return _pretrain_into(final, log, progress, device)


def _tmp_prefix(final: str) -> str:
    return f".tmp-{os.path.basename(final)}-"


def _remove_leftovers(final: str) -> None:
    """Delete the temporary folders of this model's earlier pretraining runs that were killed
    before they could clean up (only the lock's holder writes one, so under the lock none is in
    use)."""
    root = os.path.dirname(final)
    prefix = _tmp_prefix(final)
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _remove_set_aside(root: str) -> None:
    """Delete the damaged copies that a process killed while it deleted them left set aside
    (``.bad-tiny-*``). One that another process is setting aside now may go too: it then sets the
    copy aside again (see :func:`_set_aside`)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if is_temp_name(name, BAD_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _pretrain_into(
    final: str, log: Callable[[str], None], progress: bool, device: str | torch.device | None
) -> str:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # the temporary folder first: a cache that cannot be written fails now, not after pretraining
    try:
        tmp = tempfile.mkdtemp(dir=os.path.dirname(final), prefix=_tmp_prefix(final))
    except OSError as e:
        raise _unwritable(os.path.dirname(final), e) from e
    try:
        log(
            f"pretraining the built-in tiny model on {device} ({RECIPE['steps']} steps; cached at {final}) ..."
        )
        t0 = time.time()
        model, tokenizer, losses = pretrain(device=device, log=log, progress=progress)
        with no_hf_progress_bars():
            model.to("cpu").save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        info = {"recipe": RECIPE, "losses": losses, "seconds": time.time() - t0, "files": _digests(tmp)}
        with open(os.path.join(tmp, "pretrain.json"), "w", encoding="utf-8") as f:
            json.dump(info, f)
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
