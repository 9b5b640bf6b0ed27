"""Atomic file writes: nothing a user saves is lost to a crash half-way through a write."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping

STAGE_PREFIX = ".tmp-files-"  # replace_files' staging folder, inside the folder whose files it replaces
_KEPT = "kept-"  # replace_files: the old ``last``, in the staging folder
_PLAN = "plan.json"  # replace_files: the names it swaps, in the staging folder before any moves


def fsync_dir(folder: str) -> None:
    """fsync a directory: its entries (a file created or renamed in it) are on disk, not only the
    files' data. POSIX needs this for a rename to survive a power cut; where a directory cannot be
    opened or synced (some platforms and filesystems) there is nothing more to do."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """fsync every file and directory under ``folder``: on disk before the folder is renamed into
    place (the caller then syncs the folder's parent, ``fsync_dir``)."""
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)


def _umask() -> int:
    """The process umask. Linux shows it in /proc/self/status; elsewhere ``os.umask`` has to set it
    to read it, so for that instant the most restrictive one is set (a file another thread creates
    then is private, never too open)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _mode_for(path: str) -> int:
    """The permissions the file at ``path`` ends with: those of the file it replaces, else what
    ``open`` would give a new file (0o666 less the umask). The temporary file is created 0o600."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def is_temp_name(entry: str, prefix: str) -> bool:
    """Whether ``entry`` is a name ``tempfile.mkdtemp(prefix=prefix)`` makes: the prefix, then only
    mkdtemp's random letters, digits and ``_`` (no ``-``). The prefix alone would also match the
    temporary folders of a sibling whose name continues it (``.tmp-model-`` those of ``model-v2``)."""
    return re.fullmatch(re.escape(prefix) + r"[a-z0-9_]+", entry) is not None


def _name_max(folder: str) -> int:
    """The longest file name (in bytes) ``folder`` takes; 255 (most file systems') where unknown."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255
    return limit if limit > 0 else 255  # (-1: no limit told)


def _name_in_error(e: BaseException, path: str) -> None:
    """Name ``path`` in an error raised while it was written: a full disk's OSError names no file,
    torch.save's and safetensors' errors neither (a note, where Python has them: 3.11+)."""
    if isinstance(e, OSError) and e.errno is not None and e.filename is None:
        e.filename = path
    elif isinstance(e, Exception) and hasattr(e, "add_note"):
        e.add_note(f"(while writing {path})")


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, fsync it, then rename it over
    ``path`` (atomic on POSIX) and fsync the folder: readers see the old file or the new one, never
    a partial one, and after a power cut the new one is there. The file gets the permissions of the
    one it replaces, or those of a new file under the umask. A symlink at ``path`` stays: the file
    it names is the one replaced (the rename would replace the link)."""
    path = os.fspath(path)
    if os.path.islink(path):
        path = os.path.realpath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = "-" + os.path.basename(path)
    if len(".tmp-") + 8 + len(os.fsencode(suffix)) > _name_max(folder):  # (mkstemp adds 8 letters)
        suffix = ""  # the file's own name is as long as the folder takes: the temporary one is shorter
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _name_in_error(e, path)
        raise
    fsync_dir(folder)


def put_back_set_aside(final: str | os.PathLike) -> None:
    """If ``final`` is missing, put back the folder that an :func:`atomic_dir` save of it, killed
    between its two renames, left aside (``.tmp-old-<name>-*/old`` beside it)."""
    final = os.path.abspath(os.fspath(final))
    parent, name = os.path.split(final)
    if os.path.lexists(final) or not os.path.isdir(parent):
        return
    for n in sorted(os.listdir(parent)):
        old = os.path.join(parent, n, "old")
        if is_temp_name(n, f".tmp-old-{name}-") and os.path.isdir(old):
            os.replace(old, final)
            fsync_dir(parent)
            return


def atomic_dir(final: str | os.PathLike, write: Callable[[str], object]) -> None:
    """The folder form of atomic_write: ``write(tmp)`` fills a hidden folder beside ``final``, which
    is fsynced, given the mode a plain os.makedirs would (mkdtemp makes 0o700), and renamed into
    place, then the parent is fsynced. A folder already at ``final`` is moved aside first and deleted
    after; stopped between the two renames, it goes back. Readers see the old folder or the new
    one, whole; leftovers of a save that was killed are removed at the next, and a folder that a
    save killed between the renames left aside (``final`` missing) is first put back. A symlink at
    ``final`` stays: the folder it names is the one replaced (the renames would replace the link)."""
    final = os.path.abspath(os.fspath(final))
    if os.path.islink(final):
        final = os.path.realpath(final)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    put_back_set_aside(final)  # (the new folder then replaces it as usual)
    for n in os.listdir(parent):
        if is_temp_name(n, f".tmp-{name}-") or is_temp_name(n, f".tmp-old-{name}-"):
            shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    aside = None
    try:
        write(tmp)
        fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.exists(final):
            aside = os.path.join(tempfile.mkdtemp(dir=parent, prefix=f".tmp-old-{name}-"), "old")
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(parent)
    except BaseException as e:
        if aside is not None and os.path.isdir(aside) and not os.path.exists(final):
            os.replace(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        _name_in_error(e, final)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(os.path.dirname(aside), ignore_errors=True)


def _drop_stage(stage: str) -> None:
    """Delete a replace_files staging folder, its plan first: a plan beside a partly deleted ``new``
    would let the next call finish the swap with part of the files."""
    try:
        os.unlink(os.path.join(stage, _PLAN))
    except FileNotFoundError:
        pass
    shutil.rmtree(stage, ignore_errors=True)


def _end_stopped_swap(folder: str, stage: str) -> None:
    """A replace_files call killed while it swapped files (its plan in ``stage``, its new ``last``
    not in yet): its old ``last`` goes back if no other file had moved (the old files are whole),
    else the files it had not moved yet go in, ``last`` after them (all were written and synced
    before the plan was)."""
    try:
        with open(os.path.join(stage, _PLAN), encoding="utf-8") as f:
            plan = json.load(f)
        files, remove, last = plan["files"], plan["remove"], plan["last"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no plan: killed before it took anything out
    new = os.path.join(stage, "new")
    if not os.path.lexists(os.path.join(new, last)):
        return  # it had finished
    moved = any(not os.path.lexists(os.path.join(new, n)) for n in files) or any(
        os.path.lexists(os.path.join(stage, "old-" + n)) for n in remove
    )
    if not moved:
        kept = os.path.join(stage, _KEPT + last)
        if os.path.lexists(kept) and not os.path.lexists(os.path.join(folder, last)):
            os.replace(kept, os.path.join(folder, last))
            fsync_dir(folder)
        return
    for n in files:
        if os.path.lexists(os.path.join(new, n)):
            os.replace(os.path.join(new, n), os.path.join(folder, n))
    for n in remove:
        if os.path.lexists(os.path.join(folder, n)):
            os.replace(os.path.join(folder, n), os.path.join(stage, "old-" + n))
    fsync_dir(folder)
    os.replace(os.path.join(new, last), os.path.join(folder, last))
    fsync_dir(folder)


def replace_files(
    folder: str | os.PathLike, writes: Mapping[str, Callable[[str], object] | None], last: str
) -> None:
    """Replace files of ``folder`` that belong together (a checkpoint's weights and the
    ``config.json`` that describes them) so that no crash pairs new files with old ones. Each
    ``writes[name](tmp_path)`` fills a file in a hidden folder inside ``folder``; all are fsynced
    before anything in ``folder`` changes. Then the old ``last`` is taken out, the other files are
    renamed into place (a ``None`` writer removes the file of that name) and the new ``last`` goes
    in after them. Killed at any point, the folder holds the old files, the new ones, or files
    without ``last`` (which then names neither set) until the next call, which first puts the old
    ``last`` back if no other file had moved, else moves the rest of the new files in. An error
    while swapping (before any other file moved) puts the old ``last`` back. Other files in
    ``folder`` are not touched. Each file gets the permissions of the one it replaces, else those
    of a new file under the umask; leftovers of a call that was killed are removed at the next."""
    folder = os.path.abspath(os.fspath(folder))
    for name in writes:
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise ValueError(f"writes must name files inside the folder, got {name!r}")
    if writes.get(last) is None:
        raise ValueError(f"last={last!r} must be one of the files written, got {sorted(writes)}")
    os.makedirs(folder, exist_ok=True)
    for n in sorted(os.listdir(folder)):
        if not n.startswith(STAGE_PREFIX):
            continue
        left = os.path.join(folder, n)
        if os.path.isdir(left):
            _end_stopped_swap(folder, left)  # before this call deletes the only copy of a file
        _drop_stage(left)
    stage = tempfile.mkdtemp(dir=folder, prefix=STAGE_PREFIX)
    final_last, aside, moved = os.path.join(folder, last), None, False
    try:
        new = os.path.join(stage, "new")
        os.mkdir(new)
        for name, write in writes.items():
            if write is not None:
                try:
                    write(os.path.join(new, name))
                except BaseException as e:
                    _name_in_error(e, os.path.join(folder, name))
                    raise
                os.chmod(os.path.join(new, name), _mode_for(os.path.join(folder, name)))
        fsync_tree(new)
        files = [n for n, w in writes.items() if w is not None and n != last]
        remove = [n for n, w in writes.items() if w is None]
        remove = [n for n in remove if os.path.lexists(os.path.join(folder, n))]
        plan = {"files": files, "remove": remove, "last": last}
        atomic_write_text(os.path.join(stage, _PLAN), json.dumps(plan))
        # from here on, until the new one is in, no `last` names the files of either set
        if os.path.lexists(final_last):
            os.replace(final_last, os.path.join(stage, _KEPT + last))
            aside = os.path.join(stage, _KEPT + last)
            fsync_dir(folder)
        for name, write in writes.items():
            path = os.path.join(folder, name)
            if name == last or (write is None and not os.path.lexists(path)):
                continue
            if write is None:
                os.replace(path, os.path.join(stage, "old-" + name))  # deleted with the stage
            else:
                os.replace(os.path.join(new, name), path)
            moved = True
        fsync_dir(folder)
        os.replace(os.path.join(new, last), final_last)
        fsync_dir(folder)
    except BaseException:
        if aside is not None and not moved and not os.path.lexists(final_last):
            os.replace(aside, final_last)
        raise
    finally:
        _drop_stage(stage)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def _w(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, _w)
