"""atomic_write and the checkpoint folders: the permissions a plain write would give, and durable renames."""

from __future__ import annotations

import errno
import os
import stat
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from hoptune import _io
from hoptune._io import atomic_write_text

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")


@contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(
    "mask, want", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)], ids=["022", "027", "077"]
)
def test_a_new_file_gets_the_umask_mode(tmp_path, mask, want):
    with umask(mask):
        atomic_write_text(tmp_path / "config.json", "{}")
        assert mode(tmp_path / "config.json") == want
        assert _io._umask() == mask
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left


def test_umask_without_proc(monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(_io, "open", no_proc, raising=False)
    with umask(0o027):
        assert _io._umask() == 0o027
        assert os.umask(0o027) == 0o027  # read and put back as it was


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    with umask(0o022):
        atomic_write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640


def test_saved_adapter_is_readable_by_others(tmp_path):
    import transformers

    import hoptune

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4
    )
    model = transformers.LlamaForCausalLM(cfg)
    hoptune.apply_lora(model, r=4)
    with umask(0o022):
        hoptune.save_adapter(model, tmp_path / "adapter")
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert all(mode(tmp_path / "adapter" / f) == 0o644 for f in files)


def test_checkpoint_folders_get_the_umask_mode(tmp_path, small_model):
    """A checkpoint folder is made by mkdtemp (0o700) and renamed into place: it ends with the mode
    a plain os.makedirs gives, as the final adapter's folder does, or other users cannot read it."""
    from hoptune.patch import apply_lora
    from hoptune.train import loop

    model = apply_lora(small_model, r=2, alpha=4)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)
    with umask(0o022):
        folder = loop.Checkpointer(tmp_path, keep=1).save(1, model, opt, None, {"step": 1})
    assert mode(folder) == 0o755
    assert mode(os.path.join(folder, loop.STATE_FILE)) == 0o644


def test_pretrained_tiny_cache_gets_the_umask_mode(tmp_path, monkeypatch):
    """The tiny model's cache folder (mkdtemp, renamed into place) is readable by the other users
    of a shared HOPTUNE_CACHE."""
    from hoptune.models import pretrain

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 2)
    with umask(0o022):
        final = pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)
    assert mode(final) == 0o755


@pytest.fixture
def synced(monkeypatch):
    """The paths os.fsync is called on (Linux: through /proc/self/fd)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the synced descriptors")
    paths, real = [], os.fsync

    def fsync(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path, synced):
    """A rename is durable only once its directory is synced: without it a power cut can leave the
    old file (or none) although the write returned."""
    atomic_write_text(tmp_path / "config.json", "{}")
    assert synced[-1] == str(tmp_path)
    assert str(tmp_path / "config.json") not in synced[:-1]  # (the data was synced as the temp file)


def test_checkpoint_syncs_its_folders(tmp_path, small_model, synced):
    """A checkpoint's folder (its entries) and the checkpoints folder (the rename into place) are
    synced, not only the files in them."""
    from hoptune.patch import apply_lora
    from hoptune.train import loop

    model = apply_lora(small_model, r=2, alpha=4)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)
    folder = loop.Checkpointer(tmp_path / "ckpt", keep=1).save(1, model, opt, None, {"step": 1})
    tmp_dirs = [p for p in synced if os.path.basename(p).startswith(".tmp-step-00000001")]
    assert tmp_dirs, synced  # the checkpoint's own folder, before it was renamed
    after = synced[synced.index(tmp_dirs[-1]) + 1 :]
    parent = os.path.dirname(folder)
    pointer = next(i for i, p in enumerate(after) if p.endswith("-" + loop.LATEST))
    assert parent in after[:pointer]  # the rename on disk before the latest pointer names it


def test_replaced_files_keep_their_mode_and_new_ones_get_the_umask_mode(tmp_path):
    (tmp_path / "config.json").write_text("old")
    os.chmod(tmp_path / "config.json", 0o640)
    (tmp_path / "stale.json").write_text("old")

    def text(s):
        return lambda p: Path(p).write_text(s)

    with umask(0o022):
        _io.replace_files(
            tmp_path, {"weights": text("w"), "stale.json": None, "config.json": text("c")}, last="config.json"
        )
    assert sorted(os.listdir(tmp_path)) == ["config.json", "weights"]  # nothing else left behind
    assert (tmp_path / "config.json").read_text() == "c" and mode(tmp_path / "config.json") == 0o640
    assert (tmp_path / "weights").read_text() == "w" and mode(tmp_path / "weights") == 0o644


def test_atomic_dir_puts_back_a_folder_a_kill_left_aside(tmp_path, monkeypatch):
    """Killed between the two renames (the old folder moved aside, the new one not yet in place),
    the next call first puts the old folder back: if that call fails too, the old one is there."""
    final = tmp_path / "model"

    def fill(text):
        def write(d):
            Path(d, "w.txt").write_text(text)

        return write

    _io.atomic_dir(final, fill("old"))
    real_replace = os.replace

    def killed(src, dst):
        if os.fspath(dst) == os.fspath(final):
            raise SystemExit("killed")  # (no cleanup runs after a real kill: undo what except did)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(_io.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        _io.atomic_dir(final, fill("new"))
    monkeypatch.undo()
    assert not final.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-old-model-")]
    assert len(aside) == 1 and (aside[0] / "old" / "w.txt").read_text() == "old"

    def fails(d):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.atomic_dir(final, fails)
    assert (final / "w.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    _io.atomic_dir(final, fill("new"))
    assert (final / "w.txt").read_text() == "new"


def test_atomic_dir_puts_the_old_folder_back_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    """The second rename failing (an error, not a kill) leaves the folder that was there, whole, and
    no leftovers: the old folder was set aside, and it must not be deleted with the aside folder."""
    final = tmp_path / "model"
    _io.atomic_dir(final, _fill("old"))
    real_replace = os.replace

    def refused(src, dst):
        if os.fspath(dst) == os.fspath(final) and ".tmp-old-" not in os.fspath(src):
            raise OSError("rename refused")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError, match="rename refused"):
        _io.atomic_dir(final, _fill("new"))
    monkeypatch.undo()
    assert (final / "w.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _fill(text):
    def write(d):
        Path(d, "w.txt").write_text(text)

    return write


def _kill_between_the_renames(final, write, monkeypatch):
    """atomic_dir(final) killed after the folder there went aside, before the new one went in."""
    real_replace = os.replace

    def killed(src, dst):
        if os.fspath(dst) == os.fspath(final):
            raise SystemExit("killed")
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        m.setattr(_io.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(SystemExit):
            _io.atomic_dir(final, write)
    assert not os.path.exists(final)


def test_atomic_dir_leaves_the_leftovers_of_a_sibling_with_a_longer_name(tmp_path, monkeypatch):
    """Saving ``model`` neither deletes the staging folders of ``model-v2`` (a save of it under way)
    nor takes the folder a killed save of ``model-v2`` left aside for its own: that one goes back
    to ``model-v2`` at its next save."""
    v2 = tmp_path / "model-v2"
    _io.atomic_dir(v2, _fill("v2"))
    _kill_between_the_renames(v2, _fill("v2 new"), monkeypatch)
    busy = tmp_path / ".tmp-model-v2-abcd1234"  # (the staging folder of a save of model-v2 under way)
    busy.mkdir()
    _io.atomic_dir(tmp_path / "model", _fill("m"))
    assert (tmp_path / "model" / "w.txt").read_text() == "m"
    assert busy.is_dir()
    busy.rmdir()

    def fails(d):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.atomic_dir(v2, fails)
    assert (v2 / "w.txt").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-v2"]


def _text(s):
    return lambda p: Path(p).write_text(s)


def _replace_killed_after(folder, moved, monkeypatch):
    """replace_files killed right after it renamed the file at ``moved`` (no cleanup runs)."""
    real_replace, real_unlink, dead = os.replace, os.unlink, []

    def killed(src, dst):
        if dead:  # (a killed process renames nothing more: the except branch's put-back fails too)
            raise SystemExit("killed")
        real_replace(src, dst)
        if os.fspath(src) == os.fspath(moved) or os.fspath(dst) == os.fspath(moved):
            dead.append(True)
            raise SystemExit("killed")

    def unlink(path, *args, **kwargs):
        if dead:
            raise SystemExit("killed")
        real_unlink(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        m.setattr(os, "unlink", unlink)
        m.setattr(_io.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(SystemExit):
            _io.replace_files(
                folder, {"weights": _text("new w"), "config.json": _text("new c")}, "config.json"
            )


def test_replace_files_puts_back_the_old_last_a_kill_took_out_before_anything_moved(tmp_path, monkeypatch):
    """Killed right after the old config went out (nothing else moved: the old weights are whole),
    the next call puts it back first: if that call fails too (a full disk), the old pair is there."""
    _io.replace_files(tmp_path, {"weights": _text("old w"), "config.json": _text("old c")}, "config.json")
    _replace_killed_after(tmp_path, tmp_path / "config.json", monkeypatch)
    assert not (tmp_path / "config.json").exists()

    def full_disk(p):
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        _io.replace_files(tmp_path, {"weights": full_disk, "config.json": _text("c")}, "config.json")
    assert (tmp_path / "config.json").read_text() == "old c" and (tmp_path / "weights").read_text() == "old w"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "weights"]


def test_replace_files_puts_the_old_last_back_when_the_first_rename_fails(tmp_path, monkeypatch):
    """An error renaming the first new file in (the old config already out, nothing else moved):
    the old config goes back, so the old pair is whole and named, and the error is raised."""
    _io.replace_files(tmp_path, {"weights": _text("old w"), "config.json": _text("old c")}, "config.json")
    real = os.replace

    def refuse(src, dst):
        if os.fspath(dst) == os.fspath(tmp_path / "weights"):
            raise PermissionError(13, "Permission denied", dst)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        _io.replace_files(tmp_path, {"weights": _text("w"), "config.json": _text("c")}, "config.json")
    assert (tmp_path / "config.json").read_text() == "old c" and (tmp_path / "weights").read_text() == "old w"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "weights"]


@pytest.mark.parametrize(
    "writes, last, match",
    [
        (
            {"sub/w": _text("w"), "c": _text("c")},
            "c",
            r"writes must name files inside the folder, got 'sub/w'",
        ),
        ({"..": _text("w"), "c": _text("c")}, "c", r"writes must name files inside the folder, got '\.\.'"),
        ({"": _text("w"), "c": _text("c")}, "c", r"writes must name files inside the folder, got ''"),
        ({"w": _text("w"), "c": None}, "c", r"last='c' must be one of the files written"),
        ({"w": _text("w")}, "c", r"last='c' must be one of the files written, got \['w'\]"),
    ],
)
def test_replace_files_refuses_names_outside_the_folder_and_a_last_not_written(tmp_path, writes, last, match):
    (tmp_path / "c").write_text("old c")
    with pytest.raises(ValueError, match=match):
        _io.replace_files(tmp_path / "ckpt", writes, last)
    assert sorted(os.listdir(tmp_path)) == ["c"]


def test_replace_files_never_puts_the_old_last_beside_new_files(tmp_path, monkeypatch):
    """Killed once a new file is in, the old config would describe the new weights: it stays out,
    and the next call puts the new one in (its only copy is in the staging folder it deletes)."""
    _io.replace_files(tmp_path, {"weights": _text("old w"), "config.json": _text("old c")}, "config.json")
    _replace_killed_after(tmp_path, tmp_path / "weights", monkeypatch)
    assert (tmp_path / "weights").read_text() == "new w"

    def full_disk(p):
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        _io.replace_files(tmp_path, {"weights": full_disk, "config.json": _text("c")}, "config.json")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "weights"]
    assert (tmp_path / "config.json").read_text() == "new c"
    assert (tmp_path / "weights").read_text() == "new w"


def test_atomic_dir_saves_into_the_folder_a_symlink_names(tmp_path):
    """A save to a symlink to a folder (a run's model folder linked to a larger disk) lands in the
    folder it names, as a plain save through the link would: not in a new folder put in place of
    the link, which left the linked folder holding the old files."""
    target = tmp_path / "disk" / "model"
    _io.atomic_dir(target, _fill("old"))
    link = tmp_path / "run" / "model"
    link.parent.mkdir()
    link.symlink_to(target, target_is_directory=True)
    _io.atomic_dir(link, _fill("new"))
    assert link.is_symlink() and (target / "w.txt").read_text() == "new"
    assert sorted(p.name for p in link.parent.iterdir()) == ["model"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


@pytest.mark.parametrize("length", [241, 242, 255])
def test_atomic_write_takes_any_file_name_the_folder_does(tmp_path, length):
    """A file name up to the folder's limit (255 bytes) is written: the temporary file's name must
    not be the one too long for it."""
    name = "a" * (length - 5) + ".json"
    atomic_write_text(tmp_path / name, "{}")
    atomic_write_text(tmp_path / name, "{1}")  # (replacing it too)
    assert (tmp_path / name).read_text() == "{1}"
    assert os.listdir(tmp_path) == [name]  # no temporary file left


def test_atomic_write_saves_into_the_file_a_symlink_names(tmp_path):
    """A write to a symlink (a run's file linked to another disk) lands in the file it names, as a
    plain write through the link would: not in a new file put in place of the link, which left the
    linked file holding the old text."""
    target = tmp_path / "disk" / "config.yaml"
    target.parent.mkdir()
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "run" / "config.yaml"
    link.parent.mkdir()
    link.symlink_to(target)
    with umask(0o022):
        atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new" and mode(target) == 0o640
    assert os.listdir(link.parent) == os.listdir(target.parent) == ["config.yaml"]


def _disk_full(path):
    """A write that fills the disk: Python's OSError then names no file."""
    path = os.path.join(path, "w.txt") if os.path.isdir(path) else path
    with open(path, "w") as f:
        f.write("part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_three_ways(tmp_path, write):
    """atomic_write, atomic_dir and replace_files over earlier saves; returns the paths named."""
    atomic_write_text(tmp_path / "c.json", "old")
    _io.atomic_dir(tmp_path / "model", _fill("old"))
    adapter = tmp_path / "adapter"
    _io.replace_files(adapter, {"w": _text("old w"), "c": _text("old c")}, "c")
    calls = [
        (tmp_path / "c.json", lambda: _io.atomic_write(tmp_path / "c.json", write)),
        (tmp_path / "model", lambda: _io.atomic_dir(tmp_path / "model", write)),
        (adapter / "w", lambda: _io.replace_files(adapter, {"w": write, "c": _text("c")}, "c")),
    ]
    errors = []
    for path, call in calls:
        with pytest.raises(Exception) as e:
            call()
        errors.append((str(path), e.value))
    assert (tmp_path / "c.json").read_text() == "old"
    assert (tmp_path / "model" / "w.txt").read_text() == "old"
    assert _files(adapter) == {"w": "old w", "c": "old c"}
    assert sorted(os.listdir(tmp_path)) == ["adapter", "c.json", "model"]  # no temporary file left
    return errors


def _files(folder):
    return {p.name: p.read_text() for p in Path(folder).iterdir()}


def test_a_full_disk_error_names_the_file_it_was_writing(tmp_path):
    """``[Errno 28] No space left on device`` alone does not say which save filled the disk."""
    for path, e in _save_three_ways(tmp_path, _disk_full):
        assert isinstance(e, OSError) and e.errno == errno.ENOSPC
        assert str(e) == f"[Errno 28] No space left on device: {path!r}"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes")
def test_a_writer_error_without_a_path_gets_one_in_a_note(tmp_path):
    """torch.save on a full disk says only ``unexpected pos 704 vs 598``: a note names the file."""

    def torch_save_full(path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    for path, e in _save_three_ways(tmp_path, torch_save_full):
        assert isinstance(e, RuntimeError) and e.__notes__ == [f"(while writing {path})"]
