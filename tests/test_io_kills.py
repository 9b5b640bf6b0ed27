"""replace_files killed at every rename and unlink (one by one inside an rmtree too): once the
next call has run, even one that fails, the folder holds the old files or the new ones, whole."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from hoptune import _io

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX renames")

OLD = {"weights": "old w", "extra": "old x", "config.json": "old c"}
NEW = {"weights": "new w", "config.json": "new c"}


class Killed(BaseException):
    """The process died: no cleanup of its own runs after it."""


def _rmtree_backwards(path, ignore_errors=False, onerror=None):
    """shutil.rmtree in another order (its own is the file system's): subfolders first, then names
    from z to a."""
    try:
        for root, dirs, files in os.walk(path, topdown=False):
            for f in sorted(files, reverse=True):
                os.unlink(os.path.join(root, f))
            for d in sorted(dirs):
                os.rmdir(os.path.join(root, d))
        os.rmdir(path)
    except OSError:
        if not ignore_errors:
            raise


@contextmanager
def killed_at(k, rmtree=shutil.rmtree):
    """The k-th rename or unlink kills the process; every later one fails too (a dead process
    renames nothing). Yields a list that is [True] if it was killed."""
    real = {n: getattr(os, n) for n in ("replace", "rename", "unlink", "remove", "rmdir")}
    real_rmtree, count, dead = shutil.rmtree, [0], []

    def wrap(fn):
        def op(*args, **kwargs):
            count[0] += 1
            if dead or count[0] == k:
                dead.append(True)
                raise Killed(f"killed at operation {k}")
            return fn(*args, **kwargs)

        return op

    for n, fn in real.items():
        setattr(os, n, wrap(fn))
    shutil.rmtree = rmtree
    try:
        yield dead
    except Killed:
        pass
    finally:
        for n, fn in real.items():
            setattr(os, n, fn)
        shutil.rmtree = real_rmtree


def _text(s):
    return lambda p: Path(p).write_text(s)


def _full_disk(p):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _files(folder):
    return {p.name: p.read_text() for p in Path(folder).iterdir()}


def _old(folder):
    _io.replace_files(folder, {n: _text(s) for n, s in OLD.items()}, "config.json")


def _new(folder):
    writes = {"weights": _text("new w"), "extra": None, "config.json": _text("new c")}
    _io.replace_files(folder, writes, "config.json")


def _new_on_a_full_disk(folder):
    """A call whose own write fails: only its clean-up of a killed call's leftovers runs."""
    with pytest.raises(OSError, match="No space"):
        _io.replace_files(folder, {"weights": _full_disk, "config.json": _text("c")}, "config.json")


def test_replace_files_killed_anywhere_keeps_the_old_set_or_the_new_one(tmp_path):
    """Killed after the old config went out, before any other file moved, the next call puts it
    back; killed after a new file went in, the next call moves the rest in, the config last: it
    deleted the only copy of either config with the staging folder."""
    for k in range(1, 100):
        folder = tmp_path / f"k{k}"
        _old(folder)
        with killed_at(k) as dead:
            _new(folder)
        if not dead:
            assert _files(folder) == NEW
            break
        _new_on_a_full_disk(folder)
        assert _files(folder) in (OLD, NEW), f"killed at operation {k}"
    assert k > 5  # (every rename was reached)


@pytest.mark.parametrize("rmtree", [shutil.rmtree, _rmtree_backwards], ids=["rmtree", "backwards"])
def test_replace_files_killed_again_while_it_ends_a_stopped_swap(tmp_path, rmtree):
    """The call after a killed one, killed too while it puts back or finishes that one's swap, or
    deletes its staging folder: the call after it still ends with one set, whole."""
    tried = 0
    for first in range(1, 100):
        for second in range(1, 100):
            folder = tmp_path / f"k{first}-{second}"
            _old(folder)
            with killed_at(first) as dead:
                _new(folder)
            if not dead:
                break
            with killed_at(second, rmtree) as dead_again:
                _new_on_a_full_disk(folder)
            if not dead_again:
                break
            tried += 1
            _new_on_a_full_disk(folder)
            assert _files(folder) in (OLD, NEW), f"killed at operations {first}, then {second}"
        if not dead:
            break
    assert tried > 20
