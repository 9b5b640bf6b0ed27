"""Atomic file writes: nothing a user saves is lost to a crash half-way through a write."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping

STAGE_PREFIX = ".tmp-files-"  # replace_files' staging folder, inside the folder whose files it replaces
_KEPT = "kept-"  # replace_files: the old ``last`` in the staging folder, while no other file has moved


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


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, fsync it, then rename it over
    ``path`` (atomic on POSIX) and fsync the folder: readers see the old file or the new one, never
    a partial one, and after a power cut the new one is there. The file gets the permissions of the
    one it replaces, or those of a new file under the umask."""
    path = os.fspath(path)
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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
    except BaseException:
        if aside is not None and os.path.isdir(aside) and not os.path.exists(final):
            os.replace(aside, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(os.path.dirname(aside), ignore_errors=True)


def replace_files(
    folder: str | os.PathLike, writes: Mapping[str, Callable[[str], object] | None], last: str
) -> None:
    """Replace files of ``folder`` that belong together (a checkpoint's weights and the
    ``config.json`` that describes them) so that no crash pairs new files with old ones. Each
    ``writes[name](tmp_path)`` fills a file in a hidden folder inside ``folder``; all are fsynced
    before anything in ``folder`` changes. Then the old ``last`` is taken out, the other files are
    renamed into place (a ``None`` writer removes the file of that name) and the new ``last`` goes
    in after them. Killed at any point, the folder holds the old files, the new ones, or files
    without ``last`` (which then names neither set); an error while swapping (before any other
    file moved) puts the old ``last`` back. Other files in ``folder`` are not touched. Each file
    gets the permissions of the one it replaces, else those of a new file under the umask;
    leftovers of a call that was killed are removed at the next, which first puts back an old
    ``last`` that the kill left out before any other file moved."""
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
        # a call killed after it took its `last` out, before any other file moved: the old files are
        # whole, and their `last` goes back before this call deletes its only copy
        for k in os.listdir(left) if os.path.isdir(left) else []:
            if k.startswith(_KEPT) and not os.path.lexists(os.path.join(folder, k[len(_KEPT) :])):
                os.replace(os.path.join(left, k), os.path.join(folder, k[len(_KEPT) :]))
                fsync_dir(folder)
        shutil.rmtree(left, ignore_errors=True)
    stage = tempfile.mkdtemp(dir=folder, prefix=STAGE_PREFIX)
    final_last, aside, moved = os.path.join(folder, last), None, False
    try:
        new = os.path.join(stage, "new")
        os.mkdir(new)
        for name, write in writes.items():
            if write is not None:
                write(os.path.join(new, name))
                os.chmod(os.path.join(new, name), _mode_for(os.path.join(folder, name)))
        fsync_tree(new)
        # from here on, until the new one is in, no `last` names the files of either set
        if os.path.lexists(final_last):
            os.replace(final_last, os.path.join(stage, _KEPT + last))
            aside = os.path.join(stage, _KEPT + last)
            fsync_dir(folder)
            # renamed before any other file moves: a `kept-` file in a stage a kill left behind
            # means the other old files are all in place, and the next call puts it back
            os.replace(aside, os.path.join(stage, "old-" + last))
            aside = os.path.join(stage, "old-" + last)
            fsync_dir(stage)
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
        shutil.rmtree(stage, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def _w(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, _w)
