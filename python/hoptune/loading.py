"""Load a local transformers checkpoint, quantizing each linear weight to NF4 as it is read.

    model = hoptune.load_model("/ckpt/Llama-3-8B", quantize="nf4", device="cuda")
    hoptune.apply_lora(model, r=16)               # LoRA on the NF4 layers, nothing dequantized

How: the model is built from ``config.json`` with every parameter on the meta device (buffers such
as rotary frequencies are computed for real, on the CPU), then the safetensors files are streamed
in file order. Their bytes are cut into 16 MiB reads that several threads issue in parallel
(``os.preadv``, which releases the GIL) into a ring of pinned host buffers (16 x 16 MiB); each
buffer is copied to the GPU on a side stream as soon as it is full, so the disk or page cache, the
PCIe link and the GPU work at the same time and the host holds the ring, not a shard. A linear
weight is quantized on the GPU as soon as it has arrived and its dense copy is freed, so the peak
GPU memory is the quantized model plus a few dense weights. Nothing in the loop waits for the GPU:
the numbers NF4 needs back on the host (a non-finite flag, the absmax mean of double
quantization) come back through pinned memory and an event, and each weight is finished once
they are there.

Which layers become NF4 (:class:`hoptune.nn.NF4Linear`): every ``nn.Linear`` except the output
head (``lm_head``, kept in ``dtype`` as bitsandbytes and transformers do), layers whose weight is
tied to another's (Zamba2's shared blocks) and ``skip_modules``; subclasses of ``nn.Linear`` stay
as they are, as in transformers + bitsandbytes, which also quantize transformers' ``Conv1D``
(GPT-2's projections; its weight, stored (in, out), transposed).
A checkpoint that is already bitsandbytes-NF4 (``quantization_config`` in ``config.json``, keys
per ``docs/FORMATS.md`` section 1) loads its layers as stored, with no re-quantization: its NF4
layers as NF4 and its dense layers dense.

Only a local folder is read: nothing is downloaded, and a missing path is an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import re
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from hoptune._io import STAGE_PREFIX
from hoptune.nn.nf4_linear import NF4_META_KEY, NF4Linear, mark_quantized, read_nf4_meta
from hoptune.ops import _check
from hoptune.ops import nf4 as nf4_ops
from hoptune.patch import CONV1D_ATTR, _is_conv1d
from hoptune.quant.bnb_format import QS_SUFFIX, from_bnb_state_dict
from hoptune.quant.checkpoint import (
    _check_skips_match,
    _kept_dense,
    _skip_names,
    _skipped,
    _tied_keys,
)
from hoptune.quant.nf4 import BLOCKSIZES, NF4Weight, check_nested_offset
from hoptune.reference.nf4 import dynamic_map

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_CHUNK = 16 * 2**20  # bytes per read (and per pinned host buffer on CUDA)
_SLOTS = 16  # pinned host buffers: 256 MiB
_THREADS = 12  # reader threads at most (fewer on a host with fewer cores)
# how the reader threads read: "pread" (os.preadv) or "mmap" (memmove out of a file map; faster
# reads alone on some hosts, but no faster end to end on an H200 host and slow first loads there)
_METHOD = "pread"
_MAX_GAP = 2**20  # tensors at most this far apart in a file share a read
_MAX_PIECES = 256  # tensors per read at most
_BLOCKSIZE2 = 256  # nested blocksize of double quantization, as quantize_nf4's default

# safetensors dtype names (the format's spec) -> torch
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
# the format's other dtypes, which load_model does not read: bits per element (to check the
# header; a file may hold them in tensors the model does not use, as from_pretrained allows)
_OTHER_DTYPE_BITS = {
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F8_E8M0": 8,
    "C64": 64,
}
# weights in another format: transformers' torch files and the original releases' (a training
# run's optimizer.pt, training_args.bin and the like are no weights)
_OTHER_WEIGHTS = re.compile(r"pytorch_model.*\.bin(\.index\.json)?|consolidated\..*\.pth")
# the tensors stored with a bitsandbytes NF4 weight "<name>.weight" (besides itself)
_BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", QS_SUFFIX)
# an NF4 layer as hoptune's own state dict holds it (NF4Linear's buffers, as transformers'
# save_pretrained and Trainer checkpoints write a model from load_model): the codes, the absmax,
# with double quantization the nested absmax and map, and the metadata entry
_OWN_PARTS = ("weight_packed", "weight_absmax", "weight_absmax2", "weight_code2", NF4_META_KEY)
# the adapter entries of a LoRALinear's state dict
_LORA_PARTS = ("lora_A", "lora_B", "lora_magnitude")


# -- safetensors headers ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    key: str
    file: str
    dtype: torch.dtype | str  # a str: the safetensors name of a dtype load_model does not read
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(
    path: str,
    exact: bool = False,
    any_dtype: bool = False,
) -> dict[str, _Entry]:
    """Parse and check the header of one safetensors file (8-byte little-endian length, JSON).

    A file too short for what its header promises (a truncated download or copy) is an error that
    names the file; no tensor data is read. ``exact``: the tensors must also tile the data section
    in order, without gaps, overlaps or trailing bytes, as the safetensors library itself requires
    (so ``from_pretrained`` refuses anything else: two keys on the same bytes would load one
    tensor's values as another's). ``any_dtype``: a tensor of a safetensors dtype that load_model
    does not read (``F8_E8M0``, ``F4``, ...) is returned with that name as its dtype rather than
    refused."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path} is {size} bytes, too short to be a safetensors file (truncated?)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(
                    f"{path}: header length {n} does not fit in the file ({size} bytes); the file is "
                    "truncated or not a safetensors file"
                )
            raw = f.read(n)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the header is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header must be a JSON object; the file is corrupt")
    base = 8 + n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            name = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad header entry for {key!r}: {info!r} ({e!r})") from e
        dtype = _DTYPES.get(name) if isinstance(name, str) else None
        if dtype is None and not (any_dtype and name in _OTHER_DTYPE_BITS):
            raise ValueError(_unread_dtype(path, key, name))
        if dtype is None:
            bits = math.prod(shape) * _OTHER_DTYPE_BITS[name]
            if bits % 8:  # (refused by safetensors too)
                raise ValueError(
                    f"{path}: {key!r} is {name} {list(shape)}, {bits} bits, which is no whole "
                    "number of bytes: the header is corrupt"
                )
            nbytes, dtype = bits // 8, name
        else:
            nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise ValueError(
                f"{path}: {key!r} spans {end - begin} bytes but {info['dtype']} {list(shape)} needs {nbytes}"
            )
        if base + end > size:
            raise ValueError(
                f"{path} is truncated: it is {size} bytes but tensor {key!r} ends at byte {base + end}"
            )
        out[key] = _Entry(key, path, dtype, shape, base + begin, nbytes)
    if exact:
        pos = 0
        for e in sorted(out.values(), key=lambda e: (e.start, e.nbytes)):
            if e.start - base != pos:
                raise ValueError(
                    f"{path}: tensor {e.key!r} starts at data byte {e.start - base} but the tensors before it "
                    f"end at byte {pos}; safetensors needs each tensor right after the one before (no gaps or "
                    "shared bytes): the header is corrupt"
                )
            pos += e.nbytes
        if base + pos != size:
            raise ValueError(
                f"{path}: the tensors end at data byte {pos} but the data section has {size - base} bytes; "
                "safetensors needs them to cover it exactly: the header is corrupt"
            )
    return out


def _unread_dtype(path: str, key: str, name) -> str:
    return (
        f"{path}: tensor {key!r} has dtype {name!r}, which load_model does not read "
        f"(it reads {', '.join(_DTYPES)})"
    )


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder: the single file, else those of its index in
    the index's order. The single file comes first, as in transformers: a folder saved sharded and
    then as one file keeps the old index (transformers removes the old shards only)."""
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(
                f"{index} is not a valid safetensors index: its 'weight_map' must map tensor names to "
                f"shard file names, got {str(weight_map)[:200]}"
            )
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            # a path below the folder loads, as in transformers (which joins any name to the folder)
            inside = os.path.normpath(name)
            if (
                not name
                or os.path.isabs(name)
                or inside == os.pardir
                or inside.startswith(os.pardir + os.sep)
            ):
                raise ValueError(f"{index}: shard name {name!r} must name a file inside the folder")
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"{index} lists {name}, which is not in {folder}")
        return [os.path.join(folder, name) for name in files]
    others = [f for f in sorted(os.listdir(folder)) if _OTHER_WEIGHTS.fullmatch(f)]
    hint = f" (found {others[0]}: load_model reads safetensors only)" if others else ""
    raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


# -- reading tensors --------------------------------------------------------------------------
@dataclass
class _Chunk:
    """One read: bytes [start, end) of ``file``, holding ``pieces`` (entry index, offset in the
    chunk, offset in the entry, bytes) of one or more tensors."""

    file: str
    start: int
    end: int
    pieces: list[tuple[int, int, int, int]]


def _plan_chunks(
    entries: Sequence[_Entry], chunk: int, max_gap: int = _MAX_GAP, max_pieces: int = _MAX_PIECES
) -> tuple[list[_Chunk], list[int]]:
    """Cut the byte ranges of ``entries`` (in the order given, best sorted by file and offset) into
    reads of at most ``chunk`` bytes. Neighbouring tensors share a read (a layer's norms ride
    along with its weights) when at most ``max_gap`` bytes lie between them; a large tensor spans
    several reads. Returns the chunks and, per entry, the index of the last chunk it needs."""
    chunks: list[_Chunk] = []
    last: list[int] = []
    cur: _Chunk | None = None
    for i, e in enumerate(entries):
        pos, end = e.start, e.start + e.nbytes
        while pos < end:
            if (
                cur is None
                or cur.file != e.file
                or pos < cur.start
                or pos > cur.end + max_gap
                or pos >= cur.start + chunk
                or len(cur.pieces) >= max_pieces
            ):
                cur = _Chunk(e.file, pos, pos, [])
                chunks.append(cur)
            n = min(end, cur.start + chunk) - pos
            cur.pieces.append((i, pos - cur.start, pos - e.start, n))
            cur.end = max(cur.end, pos + n)
            pos += n
        last.append(len(chunks) - 1)
    return chunks, last


def _pread_full(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    """Fill ``views`` (in order) from ``offset`` of the file; ``os.preadv`` releases the GIL, so
    several of these run in parallel threads."""
    views = [v for v in views if len(v)]
    while views:
        got = os.preadv(fd, views, offset)
        if not got:
            raise ValueError(f"{path} ended early at byte {offset}: the file is truncated")
        offset += got
        while got:
            if got >= len(views[0]):
                got -= len(views.pop(0))
            else:
                views[0] = views[0][got:]
                got = 0


def _fill(
    path: str,
    fd: int,
    mm: mmap.mmap | None,
    base: int | None,
    targets: list[tuple[int, memoryview, int, int]],
    ev: torch.cuda.Event | None,
) -> None:
    """A reader thread's work: ``targets`` = [(file offset, buffer, its address, bytes)] filled
    from the file, after ``ev`` (the copy out of a reused pinned buffer) has finished. With a
    file map, a ``memmove`` out of it (ctypes releases the GIL; page-cache pages are mapped, not
    copied twice), then the range unmapped again; else ``os.preadv``."""
    if ev is not None:
        ev.synchronize()
    for offset, view, addr, n in targets:
        if base is None:
            _pread_full(fd, [view], offset, path)
            continue
        lo = offset - offset % mmap.PAGESIZE
        mm.madvise(mmap.MADV_WILLNEED, lo, offset + n - lo)  # a cold file: read ahead at once
        ctypes.memmove(addr, base + offset, n)
        # unmap what was copied (it stays in the page cache), so the process never holds a shard
        mm.madvise(mmap.MADV_DONTNEED, lo, offset + n - lo)


class _Reader:
    """Streams tensors from safetensors files onto a device, in order.

    The tensors' byte ranges are cut into reads of ``chunk`` bytes (:func:`_plan_chunks`), which
    ``threads`` worker threads do in parallel (page-cache copies scale with threads; a disk gets a
    deep queue), with ``os.preadv`` (``method="pread"``, the default) or copying out of a map of
    the file (``"mmap"``); each file's size is checked first. CUDA (``staged``): each read lands
    in one of ``slots`` pinned buffers and is copied to the GPU on a side stream as soon as it is
    complete and all
    reads before it are; the worker that reuses a buffer first waits (off the main thread) for
    the event of the copy out of it. No step waits for the GPU on the main thread. CPU: reads go
    straight into the destination tensors."""

    def __init__(
        self,
        device: torch.device,
        chunk: int = _CHUNK,
        slots: int = _SLOTS,
        staged: bool | None = None,
        threads: int | None = None,
        method: str | None = None,
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.staged = self.cuda if staged is None else staged  # staged on the CPU: to test the ring
        self.method = method or _METHOD
        if self.method not in ("mmap", "pread"):
            raise ValueError(f"method must be 'mmap' or 'pread', got {self.method!r}")
        self.chunk = chunk
        self.threads = max(1, threads if threads is not None else min(_THREADS, os.cpu_count() or 1))
        if self.staged:
            ring = torch.empty(slots * chunk, dtype=torch.uint8, pin_memory=self.cuda)
            self.slots = [ring[i * chunk : (i + 1) * chunk] for i in range(slots)]
            self.views = [memoryview(s.numpy()) for s in self.slots]
        else:
            self.slots, self.views = [], []
        self.ahead = len(self.slots) if self.staged else 2 * self.threads  # reads in flight at most
        self.stream = torch.cuda.Stream(device) if self.cuda else None  # host-to-device copies
        self.events = [torch.cuda.Event() for _ in self.slots] if self.cuda else []
        self.used = [False] * len(self.slots)  # whether a copy out of the slot was ever issued

    def stream_entries(self, entries: Sequence[_Entry]) -> Iterator[tuple[_Entry, torch.Tensor]]:
        """Yield ``(entry, tensor)`` for each of ``entries`` in order: the tensor on the device in
        its stored dtype and shape, usable on the current stream (which waits on the GPU for its
        copies). Read errors (a file cut short since its header was read) raise here."""
        chunks, last = _plan_chunks(entries, self.chunk)
        need: dict[str, int] = {}  # bytes each file must have
        for c in chunks:
            need[c.file] = max(need.get(c.file, 0), c.end)
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        files: dict[str, tuple[int, mmap.mmap | None, np.ndarray | None]] = {}
        outs: dict[int, torch.Tensor] = {}
        pending: deque[Future] = deque()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hoptune-read")
        nxt = 0  # next chunk to submit
        done = 0  # next entry to yield

        def out_for(i: int) -> torch.Tensor:
            t = outs.get(i)
            if t is None:
                t = outs[i] = torch.empty(entries[i].nbytes, dtype=torch.uint8, device=self.device)
            return t

        def open_file(path: str) -> tuple[int, mmap.mmap | None, np.ndarray | None]:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                if size < need[path]:
                    raise ValueError(
                        f"{path} is truncated: it is {size} bytes but its tensors run to byte {need[path]}"
                    )
                if self.method == "pread":
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    return fd, None, None
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                return fd, mm, np.frombuffer(mm, dtype=np.uint8)
            except BaseException:
                os.close(fd)
                raise

        def submit() -> None:
            nonlocal nxt
            c = chunks[nxt]
            if c.file not in files:
                files[c.file] = open_file(c.file)
            fd, mm, arr = files[c.file]
            if self.staged:
                s = nxt % len(self.slots)
                ev = self.events[s] if self.cuda and self.used[s] else None
                n = c.end - c.start
                targets = [(c.start, self.views[s][:n], self.slots[s].data_ptr(), n)]
            else:
                ev, targets = None, []
                for i, off, dst, n in c.pieces:
                    out = out_for(i)
                    targets.append(
                        (c.start + off, memoryview(out.numpy())[dst : dst + n], out.data_ptr() + dst, n)
                    )
            base = None if arr is None else arr.ctypes.data
            pending.append(pool.submit(_fill, c.file, fd, mm, base, targets, ev))
            nxt += 1

        try:
            while nxt < min(self.ahead, len(chunks)):
                submit()
            for j in range(len(chunks) + 1):
                if j < len(chunks):
                    pending.popleft().result()
                    if self.staged:
                        self._copy_out(chunks[j], j % len(self.slots), out_for)
                    if nxt < len(chunks):
                        submit()
                if done < len(entries) and (j == len(chunks) or last[done] <= j):
                    ready = None
                    if self.cuda:
                        ready = torch.cuda.Event()
                        ready.record(self.stream)
                        current.wait_event(ready)
                    while done < len(entries) and (j == len(chunks) or last[done] <= j):
                        e = entries[done]
                        raw = outs.pop(done, None)
                        if raw is None:  # a tensor of no bytes
                            raw = torch.empty(0, dtype=torch.uint8, device=self.device)
                        elif self.cuda:
                            raw.record_stream(current)  # freed only after the current stream's use
                        done += 1
                        yield e, raw.view(e.dtype).view(e.shape)
                        del raw
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)
            while files:
                fd, mm, arr = files.popitem()[1]
                del arr  # the array holds the map's buffer
                if mm is not None:
                    mm.close()
                os.close(fd)

    def _copy_out(self, c: _Chunk, s: int, out_for) -> None:
        slot = self.slots[s]
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            for i, off, dst, n in c.pieces:
                out_for(i)[dst : dst + n].copy_(slot[off : off + n], non_blocking=self.cuda)
            if self.cuda:
                self.events[s].record(self.stream)
                self.used[s] = True

    def finish(self) -> None:
        """Wait until no copy reads from the pinned buffers any more."""
        for ev, used in zip(self.events, self.used):
            if used:
                ev.synchronize()


# -- quantizing without waiting ---------------------------------------------------------------
class _NF4Stream:
    """Quantizes weights to NF4 as :func:`hoptune.quant.quantize_nf4` does (same kernels, same
    bits) without waiting for the GPU per weight.

    ``quantize_nf4`` reads two numbers back per weight (its non-finite flag and, for double
    quantization, the absmax mean that becomes the nested offset), each a device sync. Here the
    first kernel and the mean are launched at once, both numbers go to pinned host memory with an
    asynchronous copy and an event, and the weight is finished (nested quantization, NF4 layer
    installed) once :meth:`poll` sees the event done, or in :meth:`finish`."""

    def __init__(self, device: torch.device, count: int, blocksize: int, double_quant: bool, install) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.blocksize, self.double_quant, self.install = blocksize, double_quant, install
        self.code2 = dynamic_map().to(device) if double_quant else None
        self.host = torch.empty((max(count, 1), 3), dtype=torch.float32, pin_memory=self.cuda)
        self.n = 0
        self.waiting: deque[tuple] = deque()

    def submit(
        self, path: str, key: str, owner: str, w: torch.Tensor, stored: torch.Tensor | None = None
    ) -> None:
        """``stored``: the weight as read, before its cast to ``w.dtype`` (if another dtype)."""
        if w.numel() == 0 or w.numel() % self.blocksize:
            raise ValueError(
                f"{path}: cannot quantize {key}: {w.numel()} weights are not a positive multiple of "
                f"blocksize={self.blocksize} (shape {tuple(w.shape)})"
            )
        packed, absmax, bad = nf4_ops.nf4_quantize(w.detach(), self.blocksize)
        flag = bad.reshape(1).ne(0).to(torch.float32)
        mean = absmax.mean().reshape(1) if self.double_quant else flag.new_zeros(1)
        # the largest magnitude before a cast that can overflow (float32 -> float16: 1e5 is inf), so
        # that a non-finite weight is blamed on the dtype asked for rather than on the checkpoint
        big = flag.new_full((1,), math.inf)
        # (float16 only: bfloat16 holds float32's range but its last 0.4%, no real weight's)
        narrowing = stored is not None and w.dtype == torch.float16 and stored.dtype != w.dtype
        if narrowing and stored.is_floating_point():
            lo, hi = torch.aminmax(stored.detach())
            big = torch.maximum(hi, -lo).to(torch.float32).reshape(1)
        stats = torch.cat([mean, flag, big])
        row = self.host[self.n]
        self.n += 1
        row.copy_(stats, non_blocking=self.cuda)
        ev = None
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record()
        self.waiting.append((ev, row, path, key, owner, packed, absmax, torch.Size(w.shape), w.dtype))

    def poll(self) -> None:
        """Finish the weights whose numbers have arrived (never waits)."""
        while self.waiting and (self.waiting[0][0] is None or self.waiting[0][0].query()):
            self._finish_one()

    def finish(self) -> None:
        while self.waiting:
            ev = self.waiting[0][0]
            if ev is not None:
                ev.synchronize()
            self._finish_one()

    def _finish_one(self) -> None:
        _, row, path, key, owner, packed, absmax, shape, dtype = self.waiting.popleft()
        offset, bad, big = row.tolist()
        if bad and math.isfinite(big):
            wider = "torch.bfloat16 or torch.float32" if dtype == torch.float16 else "torch.float32"
            raise ValueError(
                f"{path}: cannot quantize {key}: {key} holds values up to {big:g} in magnitude, "
                f"beyond the range of dtype={dtype} (+-{torch.finfo(dtype).max:g}), where they "
                f"would be inf; pass dtype={wider}"
            )
        try:
            if bad:
                raise ValueError(
                    "w contains inf or NaN values; NF4 cannot represent them (check the checkpoint)"
                )
            if not self.double_quant:
                q = NF4Weight(packed, absmax, shape, dtype, self.blocksize)
            else:
                check_nested_offset(offset)
                qabsmax, absmax2 = nf4_ops.nf4_quantize_nested(absmax, self.code2, offset, _BLOCKSIZE2)
                q = NF4Weight(
                    packed,
                    qabsmax,
                    shape,
                    dtype,
                    self.blocksize,
                    absmax2,
                    self.code2.clone(),
                    offset,
                    _BLOCKSIZE2,
                )
        except ValueError as err:
            raise ValueError(f"{path}: cannot quantize {key}: {err}") from err
        self.install(owner, q)


# -- building the model -----------------------------------------------------------------------
@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device (no memory, no init cost); buffers stay real, so
    the model's own code computes them (rotary frequencies and the like) exactly as usual. Each
    parameter is marked as initialized, which transformers 5 reads to skip its weight init (on
    the meta device it is pure overhead, about 60 ms for an 8B model)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            p = module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)
        if p is not None:
            p._is_hf_initialized = True

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _bnb_config(config) -> dict | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if (
        method != "bitsandbytes"
        or not qc.get("load_in_4bit")
        or qc.get("bnb_4bit_quant_type", "nf4") != "nf4"
    ):
        raise ValueError(
            f"config.json has quantization_config {dict((k, qc.get(k)) for k in ('quant_method', 'load_in_4bit', 'load_in_8bit', 'bnb_4bit_quant_type'))}; "
            "hoptune reads bitsandbytes 4-bit NF4 checkpoints only (or unquantized ones)"
        )
    return qc


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``key`` (keeping requires_grad)."""
    mod_name, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = nn.Parameter(
            value, requires_grad=old.requires_grad and value.is_floating_point()
        )
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(key)


def _model_keys(entries: dict[str, _Entry], expected: set[str], model: nn.Module) -> dict[str, _Entry]:
    """Key names as the model has them, as transformers' loader makes them. First the plain
    renamings of the model's conversion mapping (transformers >= 5: GPT-NeoX's ``embed_out`` is
    its ``lm_head``); the fusing of per-expert weights is not done here (see
    :func:`_converts_keys_on_load`). Then ``base_model_prefix``: a checkpoint saved from the base
    model (GPT-2's own files: ``h.0.attn.c_attn.weight``; any ``LlamaModel``) lacks it
    (``transformer.``), so it is added to a key the model lacks but has with it, and stripped in
    the opposite case. A bitsandbytes part (``.absmax``, ...) follows its weight."""
    rename = _renamer(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out: dict[str, _Entry] = {}
    stored: dict[str, str] = {}  # model key -> the key in the file
    for key, e in entries.items():
        new = rename(key)
        if new not in expected and key in expected:
            new = key
        if new not in expected and prefix:
            part = next((p for p in _BNB_PARTS if new.endswith(".weight" + p)), "")
            stem = new[: len(new) - len(part)]
            if f"{prefix}.{stem}" in expected:
                new = f"{prefix}.{new}"
            elif new.startswith(prefix + ".") and stem[len(prefix) + 1 :] in expected:
                new = new[len(prefix) + 1 :]
        if new in out:
            raise ValueError(
                f"tensor {new!r} is stored twice: as {stored[new]!r} in {out[new].file} and as {key!r} in "
                f"{e.file} (names that {type(model).__name__} loads as one)"
            )
        out[new] = e if new == key else replace(e, key=new)
        stored[new] = key
    return out


def _renamer(model: nn.Module):
    """``key -> key`` with the renamings transformers applies to ``model``'s checkpoint keys."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # another form of this API:
        # the keys stay as stored, and a checkpoint that needed a renaming is refused by name later
        return lambda key: key
    if not renamings:
        return lambda key: key
    return lambda key: apply_renamings(key, renamings)


def _bnb_owner(key: str, prequant: set[str]) -> str | None:
    """The module whose bitsandbytes NF4 weight ``key`` is part of, if any."""
    for suffix in ("", *_BNB_PARTS):
        tail = ".weight" + suffix
        if key.endswith(tail) and key[: -len(tail)] in prequant:
            return key[: -len(tail)]
    return None


def _own_owner(key: str, own: set[str]) -> str | None:
    """The module whose NF4 weight in hoptune's own state-dict form ``key`` is part of, if any."""
    mod, _, part = key.rpartition(".")
    return mod if part in _OWN_PARTS and mod in own else None


def _own_nf4_weight(parts: dict[str, torch.Tensor], owner: str, shape: tuple, dtype: torch.dtype, file: str):
    """The NF4Weight of ``owner`` from its entries in hoptune's own state-dict form (``parts``: every
    entry of it the checkpoint holds); ``shape``: the one the model needs."""
    key = f"{owner}.{NF4_META_KEY}"
    try:
        offset, bs, bs2, stored = read_nf4_meta(parts[key], len(shape), key)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err
    if stored and stored != tuple(shape):
        raise ValueError(
            f"{file}: the NF4 weight of {owner} has shape {list(stored)} but the model needs "
            f"{list(shape)} (a checkpoint for another configuration?)"
        )
    nested = parts.get(f"{owner}.weight_absmax2")
    try:
        return NF4Weight(
            parts[f"{owner}.weight_packed"].flatten(),
            parts[f"{owner}.weight_absmax"].flatten(),
            torch.Size(shape),
            dtype,
            bs,
            None if nested is None else nested.flatten(),
            parts.get(f"{owner}.weight_code2"),
            offset,
            bs2,
        )
    except (ValueError, TypeError) as err:
        raise type(err)(f"{file}: the NF4 weight of {owner}: {err}") from err


def _check_codes(entries: dict, key: str, want: tuple, model: nn.Module, round_up: bool) -> None:
    """ValueError when the packed NF4 codes ``key`` (two per byte; an odd count rounded up when
    ``round_up``) are not as many as a weight of shape ``want`` holds."""
    packed = entries[key]
    if packed.nbytes != (math.prod(want) + round_up) // 2:
        raise ValueError(
            f"{packed.file}: the NF4 weight {key} holds {packed.nbytes * 2} 4-bit codes but "
            f"{type(model).__name__} needs {list(want)} (a checkpoint for another configuration?)"
        )


def _keep_in_fp32(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """The tensors that stay float32 in a ``dtype`` model, as transformers' ``from_pretrained``
    decides: ``_keep_in_fp32_modules`` for float16 only (it guards bf16 weights from fp16's range),
    ``_keep_in_fp32_modules_strict`` for float16 and bfloat16. Each entry is searched for in a
    tensor's full name as a regular expression, ``*`` standing for any text."""
    names = []
    if dtype == torch.float16:
        names += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        names += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not names:
        return None
    return re.compile("|".join(f"(?:{n.replace('*', '.*')})" for n in names))


def _converts_keys_on_load(model: nn.Module, absent: Sequence[str]) -> bool:
    """Whether transformers converts ``model``'s checkpoint tensors while loading (fuses the
    per-expert weights of an MoE layer into one tensor and the like), which load_model does not
    do: the model's conversion mapping in transformers does more than rename keys (renamings are
    applied here, :func:`_model_keys`), or a tensor the files lack is a fused expert weight
    ``(E, out, in)``."""
    try:
        from transformers import conversion_mapping  # transformers >= 5
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        mapped = False
    else:
        get = getattr(conversion_mapping, "get_checkpoint_conversion_mapping", None)
        names = (type(model).__name__, getattr(model.config, "model_type", None))
        mapped = callable(get) and any(
            n and any(not isinstance(t, WeightRenaming) for t in get(n) or ()) for n in names
        )
    params = dict(model.named_parameters())
    return mapped or any(k in params and params[k].dim() == 3 for k in absent)


def _converted_layout(folder: str, model: nn.Module, have: object, want: object) -> str:
    """The error for a checkpoint in a layout transformers converts while loading."""
    return (
        f"{folder} stores {type(model).__name__} in the layout that transformers converts while "
        f"loading (per-expert weights fused into one tensor and the like): the files have e.g. "
        f"{have} where the model has {want}. load_model does not support this "
        "architecture's checkpoint layout yet; load it with "
        "transformers.AutoModelForCausalLM.from_pretrained(path, dtype=...), then "
        "hoptune.apply_lora(model, quantize='nf4', ...) quantizes the linear layers it wraps"
    )


def _index_lists(folder: str, absent: Sequence[str], prefix: str) -> str:
    """Where the index puts the first of ``absent`` it lists (a shard that does not hold what its
    index says: one of another download or revision), as a clause for the error; else ``""``."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(os.path.join(folder, SINGLE_FILE)) or not os.path.isfile(index):
        return ""
    with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]  # (checked by checkpoint_files)
    for key in absent:
        # as stored: with or without the base model's prefix
        bare = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key
        for name in dict.fromkeys((key, bare, f"{prefix}.{key}" if prefix else key)):
            if name in weight_map:
                return f"; {INDEX_FILE} lists {name} in {weight_map[name]}, which does not hold it"
    return ""


def _output_heads(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def load_model(
    path: str | os.PathLike,
    quantize: str | None = "nf4",
    device: str | int | torch.device = "cuda",
    dtype: torch.dtype | str = torch.bfloat16,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    skip_modules: Sequence[str] = (),
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Load the causal LM in the local folder ``path`` onto ``device`` ("cuda", "cuda:N", an int N
    for that GPU, or "cpu"), quantizing on the way.

    ``path``: a folder with ``config.json`` and ``model.safetensors`` or a sharded
    ``model.safetensors.index.json`` (never a hub name: nothing is fetched).
    ``quantize``: "nf4" makes every linear layer but the output head, layers with tied weights and
    ``skip_modules`` an :class:`~hoptune.nn.NF4Linear` (``blocksize``, ``double_quant`` as in
    bitsandbytes); None keeps them dense. ``skip_modules`` entries are matched as transformers
    matches ``llm_int8_skip_modules``: a regular expression from the start of a module name up to
    a ``.`` or its end (``"model.layers.1"``: that layer, not ``model.layers.11``), or a suffix of
    the name (``"down_proj"``); an entry that matches no linear layer is an error. Unlike
    transformers, which quantizes the output head too once ``llm_int8_skip_modules`` is given, the
    head stays dense here whatever ``skip_modules`` holds. A pre-quantized bitsandbytes NF4
    checkpoint loads as stored either way (its dense layers stay dense, its NF4 layers NF4, with a
    warning for those ``skip_modules`` names), and so does a model from ``load_model`` saved with
    transformers' ``save_pretrained`` (its NF4 layers in hoptune's own state-dict form; LoRA
    factors saved with it are named in a warning and not loaded).
    ``dtype`` (or its name, ``"bfloat16"``): of every other floating-point tensor and of the NF4
    layers' compute, but for those ``from_pretrained`` keeps otherwise (declared in another dtype
    by the model, or named by its ``_keep_in_fp32_modules`` for float16 or
    ``_keep_in_fp32_modules_strict``: float32).
    Keys are matched as ``from_pretrained`` matches them (its plain renamings, such as GPT-NeoX's
    ``embed_out``, and a base model's files without ``base_model_prefix``); checkpoints in a
    layout that transformers converts while loading (MoE models whose per-expert weights it fuses,
    such as Mixtral's) are refused with an error.
    Returns the transformers model in eval mode, as ``from_pretrained`` does.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = os.fspath(path)
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise FileNotFoundError(
            f"path {folder!r} {what}; load_model reads a local checkpoint folder (config.json + safetensors) "
            "and never downloads"
        )
    if not os.path.isfile(os.path.join(folder, "config.json")):
        # a save_pretrained_nf4 stopped while it swapped the files in leaves its hidden staging folder
        stopped = [n for n in os.listdir(folder) if n.startswith(STAGE_PREFIX)]
        hint = (
            f" (a save into it was stopped before it finished, see {stopped[0]}: save again)"
            if stopped
            else ""
        )
        raise FileNotFoundError(f"{folder} has no config.json{hint}")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be 'nf4' or None, got {quantize!r}")
    dtype = _check.float_dtype("dtype", dtype)  # (or its name, as from_pretrained takes it)
    blocksize = _check.blocksize("blocksize", blocksize, BLOCKSIZES)
    _check.boolean("double_quant", double_quant)
    skip_modules = _skip_names(skip_modules)
    device = _check.device("device", device)

    # 1. headers of every file first: a truncated or corrupt file fails before any work
    files = checkpoint_files(folder)
    entries: dict[str, _Entry] = {}
    for f in files:
        for key, e in read_safetensors_header(f, exact=True, any_dtype=True).items():
            if key in entries:
                raise ValueError(f"tensor {key!r} is stored twice: in {entries[key].file} and {f}")
            entries[key] = e
    # the reader's pinned ring is allocated on a side thread while the model is built (tens of ms)
    ex = ThreadPoolExecutor(1, thread_name_prefix="hoptune-ring")
    making_reader = ex.submit(_make_reader, device)
    ex.shutdown(wait=False)  # the thread ends with its one job

    # 2. the model, parameters on meta
    # (transformers raises KeyError, TypeError, AttributeError or huggingface_hub's validation
    # errors for invalid values in config.json, e.g. rope parameters without their factor)
    bad_config: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, TypeError, AttributeError)
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import StrictDataclassError

        bad_config += (StrictDataclassError,)
    try:
        # the dtype asked for, as from_pretrained passes it: it overrides config.json's own (which
        # may be "auto", a value only from_pretrained resolves)
        config = AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code, dtype=dtype
        )
    except bad_config as e:
        raise ValueError(f"cannot read {os.path.join(folder, 'config.json')}: {e}") from e
    bnb = _bnb_config(config)
    if bnb is not None:
        del config.quantization_config  # the loaded model is hoptune NF4, not bitsandbytes
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.eval()
    _check_skips_match(model, skip_modules)

    # 3. what to do with each key
    meta_state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in meta_state.items()}
    dtypes = {k: v.dtype for k, v in meta_state.items()}  # as the model declares them
    to_read = {k for k, v in meta_state.items() if v.is_meta}  # not computed by the model itself
    del meta_state
    expected = set(shapes)
    entries = _model_keys(entries, expected, model)
    heads = _output_heads(model)
    # transformers' Conv1D (GPT-2: y = x @ W + b, W stored (in, out)) is a linear layer to
    # transformers + bitsandbytes, quantized as W.T; its NF4 checkpoints store it that way
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}
    transposed = {n for n, m in linears.items() if not isinstance(m, nn.Linear)}
    prequant = {k[: -len(".weight" + QS_SUFFIX)] for k in entries if k.endswith(".weight" + QS_SUFFIX)}
    bad = sorted(n for n in prequant if n not in linears)
    if bad:
        raise ValueError(
            f"{folder}: the checkpoint has NF4 weights for {bad[:3]}, which are not linear layers of {type(model).__name__}"
        )
    # NF4 layers in hoptune's own state-dict form (a model from load_model saved by transformers'
    # save_pretrained, e.g. in a Trainer checkpoint): loaded as stored too
    own = {k[: -len(".weight_packed")] for k in entries if k.endswith(".weight_packed")}
    bad = sorted(n for n in own if n not in linears or n in prequant)
    if bad:
        raise ValueError(
            f"{folder}: the checkpoint has NF4 weights for {bad[:3]}, which are not linear layers of "
            f"{type(model).__name__} (or are stored twice, in bitsandbytes' form too)"
        )
    for n in sorted(own):
        for part in ("weight_absmax", NF4_META_KEY):
            if f"{n}.{part}" not in entries:
                raise ValueError(f"{folder}: the NF4 weight of {n} lacks its tensor {n}.{part}")
        if (f"{n}.weight_absmax2" in entries) != (f"{n}.weight_code2" in entries):
            raise ValueError(
                f"{folder}: the NF4 weight of {n} has only one of {n}.weight_absmax2 and {n}.weight_code2 "
                "(double quantization needs both)"
            )
        if f"{n}.weight" in entries:
            raise ValueError(
                f"{folder}: {n} is stored both dense ({n}.weight) and in NF4 ({n}.weight_packed)"
            )
    prequant_all = prequant | own
    # a pre-quantized checkpoint loads as stored: its NF4 layers cannot be made dense as they were
    kept_nf4 = sorted(n for n in prequant_all if _skipped(n, skip_modules))
    if kept_nf4:
        warnings.warn(
            f"{folder} stores {len(kept_nf4)} layers of skip_modules={list(skip_modules)} in NF4 (e.g. "
            f"{kept_nf4[:3]}); they load as stored, in NF4 (NF4Linear.to_linear() makes one dense)",
            stacklevel=2,
        )
    tied = _tied_keys(model, config)
    # the head and the layers whose weight is tied to another's stay dense, as transformers +
    # bitsandbytes keep them (get_keys_to_not_convert): tie_weights then shares the one dense
    # tensor (Zamba2's shared blocks)
    dense = heads | {k.removesuffix(".weight") for pair in tied.items() for k in pair}
    to_quantize = set()
    keep_dense = _kept_dense(model)  # (as save_pretrained_nf4 keeps them)
    if quantize == "nf4" and bnb is None and not prequant_all:  # an NF4 checkpoint loads as stored
        for n, m in linears.items():
            # plain nn.Linear only, as transformers + bitsandbytes: a subclass may compute more
            # (Llama 4's router returns scores and logits)
            plain = type(m) is nn.Linear or n in transposed
            if not plain or n in dense or _skipped(n, skip_modules + keep_dense):
                continue
            if m.weight.numel() % blocksize:
                warnings.warn(
                    f"{n} stays dense: its {m.weight.numel()} weights are not a multiple of blocksize={blocksize}",
                    stacklevel=2,
                )
                continue
            to_quantize.add(n)
        # a model of nn.Linear subclasses only (Falcon's FalconLinear) would load all dense, unsaid
        other = transposed | dense
        sub = [m for n, m in linears.items() if type(m) is not nn.Linear and n not in other]
        if not to_quantize and sub:
            kinds = ", ".join(sorted({type(m).__name__ for m in sub}))
            warnings.warn(
                f"quantize='nf4': no layer of {type(model).__name__} became NF4: {len(sub)} of its "
                f"linear layers are {kinds}, subclasses of nn.Linear, which stay dense (as in "
                "transformers 5 + bitsandbytes); hoptune.apply_lora(model, quantize='nf4', ...) "
                "quantizes the layers it wraps",
                stacklevel=2,
            )
    keep_fp32 = _keep_in_fp32(model, dtype)
    plan: dict[str, tuple[str, str]] = {}  # key -> (what to do, module name)
    for key in entries:
        owner = _bnb_owner(key, prequant)
        # a tensor of a dtype not read fails only if the model uses it (else: unused, warned below)
        own_owner = _own_owner(key, own)
        if isinstance(entries[key].dtype, str) and (
            owner is not None or own_owner is not None or key in expected
        ):
            raise ValueError(_unread_dtype(entries[key].file, key, entries[key].dtype))
        if owner is not None:
            plan[key] = ("bnb", owner)
            continue
        if own_owner is not None:
            plan[key] = ("own", own_owner)
            continue
        if key not in expected:
            continue  # unused
        # a tied copy (lm_head = embed_tokens) is read too: tie_weights ties the pair if they are
        # equal, and keeps them apart otherwise, as from_pretrained does
        mod_name = key.rpartition(".")[0]
        if entries[key].shape != shapes[key]:
            if any(key + part in entries for part in _BNB_PARTS):
                # bitsandbytes' other tensors of a weight whose quant state is missing: its packed
                # codes are no dense weight of another configuration
                raise ValueError(f"{folder}: the NF4 weight {key} lacks its tensor {key}{QS_SUFFIX}")
            if _converts_keys_on_load(model, ()):
                # (transformers reshapes such tensors while loading: Inkling's padded vocabulary)
                raise ValueError(
                    _converted_layout(
                        folder, model, f"{key} of shape {list(entries[key].shape)}", f"{list(shapes[key])}"
                    )
                )
            raise ValueError(
                f"{entries[key].file}: {key} has shape {list(entries[key].shape)} but "
                f"{type(model).__name__} needs {list(shapes[key])} (a checkpoint for another configuration?)"
            )
        quant = key.endswith(".weight") and mod_name in to_quantize
        plan[key] = ("quantize" if quant else "tensor", mod_name)
    for n in sorted(prequant):
        for part in ("", ".absmax", ".quant_map", QS_SUFFIX):
            if f"{n}.weight{part}" not in entries:
                raise ValueError(f"{folder}: the NF4 weight {n}.weight lacks its tensor {n}.weight{part}")
        # an odd count takes (n + 1) // 2 bytes in bitsandbytes: refused later, for its partial block
        _check_codes(entries, f"{n}.weight", shapes[f"{n}.weight"], model, round_up=True)
    for n in sorted(own):
        _check_codes(entries, f"{n}.weight_packed", shapes[f"{n}.weight"], model, round_up=False)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = sorted(
        k for k in entries if k not in plan and k not in tied and not any(p.search(k) for p in ignore)
    )
    # what the model needs but the files do not hold (of a tied pair, one is enough)
    planned = set(plan) | {f"{n}.weight" for n in own}
    absent = sorted(
        k for k in to_read - planned if not any(k in pair and planned & set(pair) for pair in tied.items())
    )
    if absent and unexpected and _converts_keys_on_load(model, absent):
        raise ValueError(_converted_layout(folder, model, unexpected[:3], absent[:3]))
    # LoRA factors as a model with hoptune's LoRA layers saves them (save_pretrained, a Trainer
    # checkpoint): load_model makes the base model, which has no place for them
    lora = sorted(
        k for k in unexpected if k.rpartition(".")[2] in _LORA_PARTS and k.rpartition(".")[0] in linears
    )
    if lora:
        warnings.warn(
            f"{folder} holds the LoRA factors of {len({k.rpartition('.')[0] for k in lora})} layers "
            f"(e.g. {lora[:3]}), as save_pretrained writes a model with hoptune's LoRA layers; load_model "
            "loads the base model only. To train on, hoptune.apply_lora(model, ...) with the settings of "
            "that run, then model.load_state_dict(safetensors.torch.load_file(...), strict=False) reads "
            "them in; hoptune.save_adapter(model, dir) writes an adapter that load_adapter and PEFT read",
            stacklevel=2,
        )
        unexpected = [k for k in unexpected if k not in set(lora)]
    if unexpected:
        warnings.warn(
            f"{len(unexpected)} tensors in {folder} are not used by {type(model).__name__}: {unexpected[:5]}",
            stacklevel=2,
        )
    if absent:  # said before the read, which on a large model takes minutes
        raise ValueError(
            f"{folder} lacks {len(absent)} tensors that {type(model).__name__} needs, e.g. "
            f"{absent[:5]} (a checkpoint for another architecture, or an incomplete one?)"
            + _index_lists(folder, absent, getattr(model, "base_model_prefix", "") or "")
        )

    # 4. stream: tensors in file order; weights quantized on the GPU as they arrive, without waiting
    parts_left = {
        n: sum(1 for k, (kind, o) in plan.items() if kind in ("bnb", "own") and o == n) for n in prequant_all
    }
    pending: dict[str, dict[str, torch.Tensor]] = {}
    file_index = {f: i for i, f in enumerate(files)}
    order = sorted(plan, key=lambda k: (file_index[entries[k].file], entries[k].start))
    total = sum(entries[k].nbytes for k in plan)
    reader = making_reader.result()
    nf4 = _NF4Stream(
        device,
        sum(1 for k in plan if plan[k][0] == "quantize"),
        blocksize,
        double_quant,
        lambda owner, q: _to_nf4_layer(model, owner, q),
    )
    bar = None  # made last: the finally below closes it
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"Loading {os.path.basename(os.path.normpath(folder))}",
        )
    # the kernels (quantize) launch on the current CUDA device: make it the target one
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        tensors = reader.stream_entries([entries[k] for k in order])
        try:
            for e, t in tensors:
                key = e.key
                kind, owner = plan[key]
                if kind == "bnb":
                    pending.setdefault(owner, {})[key] = t
                    parts_left[owner] -= 1
                    if parts_left[owner] == 0:
                        wkey = f"{owner}.weight"
                        try:
                            q = from_bnb_state_dict(pending.pop(owner), wkey)
                        except (ValueError, TypeError) as err:
                            raise type(err)(f"{entries[wkey].file}: {err}") from err
                        want = shapes[wkey][::-1] if owner in transposed else shapes[wkey]
                        if tuple(q.shape) != want:
                            raise ValueError(
                                f"{entries[wkey].file}: the NF4 weight {wkey} has shape {list(q.shape)} but "
                                f"{type(model).__name__} needs {list(want)} (a checkpoint for another "
                                "configuration?)"
                            )
                        if q.dtype != dtype:  # the dtype it dequantizes to, as for the layers quantized here
                            q = replace(q, dtype=dtype)
                        _to_nf4_layer(model, owner, q)
                elif kind == "own":
                    pending.setdefault(owner, {})[key] = t
                    parts_left[owner] -= 1
                    if parts_left[owner] == 0:
                        want = shapes[f"{owner}.weight"]
                        want = want[::-1] if owner in transposed else want
                        q = _own_nf4_weight(pending.pop(owner), owner, want, dtype, e.file)
                        _to_nf4_layer(model, owner, q)
                elif kind == "quantize":
                    # a layer the model keeps in float32 (_keep_in_fp32_modules_strict) is quantized
                    # from its float32 weight and computes in float32, as transformers + bitsandbytes
                    strict = keep_fp32 is not None and keep_fp32.search(key)
                    want = torch.float32 if strict else dtype
                    w = t if t.dtype == want else t.to(want)
                    w = w.t().contiguous() if owner in transposed else w
                    nf4.submit(e.file, key, owner, w, t)
                else:
                    want = torch.float32 if keep_fp32 is not None and keep_fp32.search(key) else dtypes[key]
                    # as from_pretrained: to the dtype the model declares, a tensor stored as ints too
                    if t.dtype != want:
                        t = t.to(want)
                    _set_tensor(model, key, t)
                del t
                nf4.poll()
                if bar is not None:
                    bar.update(e.nbytes)
            nf4.finish()
            reader.finish()
        finally:
            tensors.close()
            if bar is not None:
                bar.close()

    # 5. tie, move the buffers built on the CPU, and check nothing is left on meta
    loaded = set(plan) | {f"{n}.weight" for n in prequant_all}
    if tied:
        try:  # ties whichever of the pair was in the checkpoint
            model.tie_weights(missing_keys=expected - loaded, recompute_mapping=False)
        except TypeError:  # a model's own tie_weights() without them (remote code)
            model.tie_weights()
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.device != device and not buf.is_meta:
                mod._buffers[name] = buf.to(device)
    _init_non_persistent_buffers(model)
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(
            f"{folder} lacks {len(left)} tensors that {type(model).__name__} needs, e.g. {left[:5]} "
            "(a checkpoint for another architecture, or an incomplete one?)"
        )
    config.dtype = dtype
    mark_quantized(model)
    _load_generation_config(model, folder)
    return model


def _make_reader(device: torch.device) -> _Reader:
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _Reader(device)


def _to_nf4_layer(model: nn.Module, name: str, q) -> None:
    """Put an NF4Linear with weight ``q`` where the (meta) linear ``name`` is; its bias, if read
    already, moves over, else it is set when its key is read."""
    current = model.get_submodule(name)
    bias = getattr(current, "bias", None)  # nn.Linear's or Conv1D's, (out,) either way
    layer = NF4Linear(q, None)
    if not isinstance(current, nn.Linear):  # a Conv1D: merge_and_unload gives one back
        setattr(layer, CONV1D_ATTR, True)
    if bias is not None:  # real if its key came first, else a meta placeholder filled in later
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    layer.train(current.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def _init_non_persistent_buffers(model: nn.Module) -> None:
    """Recompute the non-persistent buffers as transformers 5's ``from_pretrained`` does after
    loading: the model's ``_init_weights`` runs on the modules that hold one, in the default dtype
    rather than that of the build (GPT-J's sin/cos table, built with bfloat16 frequencies, differs
    otherwise). Every tensor read from the checkpoint is marked initialized first, which its
    guarded init functions skip, and every other module is skipped whole (NF4 layers included)."""
    if not hasattr(model, "initialize_weights"):
        return
    for t in model.state_dict(keep_vars=True).values():
        t._is_hf_initialized = True
    todo = False
    for mod in model.modules():
        # (from_config's own init flagged every module done: that init ran in the build's dtype)
        own = any(b is not None and n in mod._non_persistent_buffers_set for n, b in mod._buffers.items())
        mod._is_hf_initialized = not own
        todo |= own
    if todo:
        model.initialize_weights()


def _load_generation_config(model: nn.Module, folder: str) -> None:
    """As ``from_pretrained``: ``generation_config.json``, else the generation settings an older
    checkpoint keeps in ``config.json`` (sampling defaults, stop tokens), which the model's own
    config dropped when it was built."""
    if not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    path = os.path.join(folder, "generation_config.json")
    kwargs = {}
    if not os.path.isfile(path):
        path = os.path.join(folder, "config.json")
        kwargs = {"config_file_name": "config.json", "_from_model_config": True}
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring the generation settings of {path}: {e}", stacklevel=3)
