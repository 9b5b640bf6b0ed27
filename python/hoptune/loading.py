"""Load a local transformers checkpoint, quantizing each linear weight to NF4 as it is read.

    model = hoptune.load_model("/ckpt/Llama-3-8B", quantize="nf4", device="cuda")
    hoptune.apply_lora(model, r=16)               # LoRA on the NF4 layers, nothing dequantized

How: the model is built from ``config.json`` with every parameter on the meta device (buffers such
as rotary frequencies are computed for real, on the CPU), then the safetensors files are streamed
tensor by tensor in file order. Each tensor is read with plain sequential ``readinto`` calls into a
small ring of pinned host buffers and copied to the GPU asynchronously, so the disk, the PCIe link
and the GPU work at the same time. A linear weight is quantized on the GPU as soon as it has
arrived and its dense copy is freed, so the peak GPU memory is the quantized model plus one dense
weight, and the host holds only the ring (4 x 64 MiB by default), not a shard.

Which layers become NF4 (:class:`hoptune.nn.NF4Linear`): every ``nn.Linear`` except the output
head (``lm_head``, kept in ``dtype`` as bitsandbytes and transformers do) and ``skip_modules``.
A checkpoint that is already bitsandbytes-NF4 (``quantization_config`` in ``config.json``, keys
per ``docs/FORMATS.md`` section 1) loads its layers as stored, with no re-quantization.

Only a local folder is read: nothing is downloaded, and a missing path is an error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from hoptune.nn.nf4_linear import NF4Linear
from hoptune.quant.bnb_format import QS_SUFFIX, from_bnb_state_dict
from hoptune.quant.nf4 import BLOCKSIZES, quantize_nf4

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
_CHUNK = 64 * 2**20  # bytes per host staging buffer
_SLOTS = 4

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
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
# the tensors stored with a bitsandbytes NF4 weight "<name>.weight" (besides itself)
_BNB_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", QS_SUFFIX)


# -- safetensors headers ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    key: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: str) -> dict[str, _Entry]:
    """Parse and check the header of one safetensors file (8-byte little-endian length, JSON).

    A file too short for what its header promises (a truncated download or copy) is an error that
    names the file; no tensor data is read."""
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
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad header entry for {key!r}: {info!r} ({e!r})") from e
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
    return out


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder, in the order of its index (or the single file)."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if os.path.basename(name) != name:
                raise ValueError(f"{index}: shard name {name!r} must be a file name inside the folder")
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"{index} lists {name}, which is not in {folder}")
        return [os.path.join(folder, name) for name in files]
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    others = [f for f in sorted(os.listdir(folder)) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = f" (found {others[0]}: load_model reads safetensors only)" if others else ""
    raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


# -- reading tensors --------------------------------------------------------------------------
class _Reader:
    """Reads byte ranges of files straight into device tensors.

    CUDA: sequential ``readinto`` into a ring of pinned buffers, each copied to the GPU with
    ``non_blocking=True`` while the next one is read; an event per buffer says when it may be
    reused. CPU: ``readinto`` straight into the destination tensor. Sequential reads of large
    blocks keep the disk's readahead busy; no memory map, so no page faults per 4 KiB."""

    def __init__(
        self, device: torch.device, chunk: int = _CHUNK, slots: int = _SLOTS, staged: bool | None = None
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.staged = self.cuda if staged is None else staged  # staged on the CPU: to test the ring
        self.chunk = chunk
        self.slots = (
            [torch.empty(chunk, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slots)]
            if self.staged
            else []
        )
        self.events: list[torch.cuda.Event | None] = [None] * len(self.slots)
        self.stream = torch.cuda.Stream(device) if self.cuda else None  # host-to-device copies
        self.next = 0
        self.fh = None
        self.path = None

    def open(self, path: str) -> None:
        self.close()
        self.fh = open(path, "rb", buffering=0)
        self.path = path
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None

    def _fill(self, view: memoryview, offset: int) -> None:
        self.fh.seek(offset)
        done = 0
        while done < len(view):
            got = self.fh.readinto(view[done:])
            if not got:
                raise ValueError(f"{self.path} ended early at byte {offset + done}: the file is truncated")
            done += got

    def read(self, e: _Entry) -> torch.Tensor:
        """The tensor of entry ``e`` on the device (in its stored dtype), usable on the current
        stream (the copies run on a side stream; the current stream waits for them on the GPU)."""
        if not self.staged:
            out = torch.empty(e.nbytes, dtype=torch.uint8, device=self.device)
            if e.nbytes:
                self._fill(memoryview(out.numpy()), e.start)
            return self._view(out, e)
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
            out = torch.empty(e.nbytes, dtype=torch.uint8, device=self.device)
            for pos in range(0, e.nbytes, self.chunk):
                n = min(self.chunk, e.nbytes - pos)
                i = self.next
                self.next = (i + 1) % len(self.slots)
                if self.events[i] is not None:
                    self.events[i].synchronize()  # the copy out of this buffer has finished
                slot = self.slots[i]
                self._fill(memoryview(slot.numpy())[:n], e.start + pos)
                out[pos : pos + n].copy_(slot[:n], non_blocking=self.cuda)
                if self.cuda:
                    self.events[i] = torch.cuda.Event()
                    self.events[i].record(self.stream)
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(self.stream)
            current.wait_event(ready)
            out.record_stream(current)  # freed only after the current stream's use of it
        return self._view(out, e)

    @staticmethod
    def _view(raw: torch.Tensor, e: _Entry) -> torch.Tensor:
        return raw.view(e.dtype).view(e.shape)

    def finish(self) -> None:
        for ev in self.events:
            if ev is not None:
                ev.synchronize()
        self.close()


# -- building the model -----------------------------------------------------------------------
@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device (no memory, no init cost); buffers stay real, so
    the model's own code computes them (rotary frequencies and the like) exactly as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

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


def _matches_any(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)


def _dtype_kwarg() -> str:
    """``dtype`` (transformers >= 4.56) or ``torch_dtype`` (older) for from_config / configs."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _tied_keys(model: nn.Module, config) -> dict[str, str]:
    """``{tied key: source key}`` (lm_head.weight -> model.embed_tokens.weight when tied)."""
    keys = getattr(model, "all_tied_weights_keys", None)  # transformers 5
    if keys is not None:
        return dict(keys)
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    emb = model.get_input_embeddings()
    src = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)
    old = getattr(model, "_tied_weights_keys", None) or []  # transformers 4: a list of tied keys
    return {k: src for k in old if src is not None and k != src}


def _bnb_owner(key: str, prequant: set[str]) -> str | None:
    """The module whose bitsandbytes NF4 weight ``key`` is part of, if any."""
    for suffix in ("", *_BNB_PARTS):
        tail = ".weight" + suffix
        if key.endswith(tail) and key[: -len(tail)] in prequant:
            return key[: -len(tail)]
    return None


def _output_heads(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def load_model(
    path: str | os.PathLike,
    quantize: str | None = "nf4",
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    skip_modules: Sequence[str] = (),
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Load the causal LM in the local folder ``path`` onto ``device``, quantizing on the way.

    ``path``: a folder with ``config.json`` and ``model.safetensors`` or a sharded
    ``model.safetensors.index.json`` (never a hub name: nothing is fetched).
    ``quantize``: "nf4" makes every linear layer but the output head and ``skip_modules`` an
    :class:`~hoptune.nn.NF4Linear` (``blocksize``, ``double_quant`` as in bitsandbytes); None keeps
    them dense. Layers of a pre-quantized bitsandbytes NF4 checkpoint load as NF4 either way.
    ``dtype``: of every other floating-point tensor and of the NF4 layers' compute.
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
        raise FileNotFoundError(f"{folder} has no config.json")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be 'nf4' or None, got {quantize!r}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is visible; pass device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

    # 1. headers of every file first: a truncated or corrupt file fails before any work
    files = checkpoint_files(folder)
    entries: dict[str, _Entry] = {}
    for f in files:
        for key, e in read_safetensors_header(f).items():
            if key in entries:
                raise ValueError(f"tensor {key!r} is stored twice: in {entries[key].file} and {f}")
            entries[key] = e

    # 2. the model, parameters on meta
    try:
        config = AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {os.path.join(folder, 'config.json')}: {e}") from e
    bnb = _bnb_config(config)
    if bnb is not None:
        del config.quantization_config  # the loaded model is hoptune NF4, not bitsandbytes
    kwargs = {_dtype_kwarg(): dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.eval()

    # 3. what to do with each key
    expected = set(model.state_dict().keys())
    heads = _output_heads(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    prequant = {k[: -len(".weight" + QS_SUFFIX)] for k in entries if k.endswith(".weight" + QS_SUFFIX)}
    bad = sorted(n for n in prequant if n not in linears)
    if bad:
        raise ValueError(
            f"{folder}: the checkpoint has NF4 weights for {bad[:3]}, which are not linear layers of {type(model).__name__}"
        )
    to_quantize = set()
    if quantize == "nf4":
        for n, m in linears.items():
            if n in heads or n in prequant or _matches_any(n, skip_modules):
                continue
            if (m.in_features * m.out_features) % blocksize:
                warnings.warn(
                    f"{n} stays dense: its {m.in_features * m.out_features} weights are not a multiple of blocksize={blocksize}",
                    stacklevel=2,
                )
                continue
            to_quantize.add(n)
    tied = _tied_keys(model, config)
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else []
    plan: dict[str, tuple[str, str]] = {}  # key -> (what to do, module name)
    for key in entries:
        owner = _bnb_owner(key, prequant)
        if owner is not None:
            plan[key] = ("bnb", owner)
            continue
        if key not in expected or tied.get(key) in entries:
            continue  # unused, or a tied copy (lm_head = embed_tokens) that tie_weights restores
        mod_name = key.rpartition(".")[0]
        quant = key.endswith(".weight") and mod_name in to_quantize
        plan[key] = ("quantize" if quant else "tensor", mod_name)
    for n in prequant:
        for part in ("", ".absmax", ".quant_map", QS_SUFFIX):
            if f"{n}.weight{part}" not in entries:
                raise ValueError(f"{folder}: the NF4 weight {n}.weight lacks its tensor {n}.weight{part}")
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    unexpected = sorted(
        k for k in entries if k not in plan and k not in tied and not any(p.search(k) for p in ignore)
    )
    if unexpected:
        warnings.warn(
            f"{len(unexpected)} tensors in {folder} are not used by {type(model).__name__}: {unexpected[:5]}",
            stacklevel=2,
        )

    # 4. stream
    parts_left = {n: sum(1 for k, (kind, o) in plan.items() if kind == "bnb" and o == n) for n in prequant}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    total = sum(entries[k].nbytes for k in plan)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"Loading {os.path.basename(os.path.normpath(folder))}",
        )
    reader = _Reader(device)
    deferred: list[tuple[str, str, str, torch.Tensor]] = []  # at most one dense weight to quantize

    def quantize_deferred() -> None:
        # Quantizing weight k after reading weight k+1: the quantizer waits on the GPU (its NaN
        # check and absmax mean are read back), and by now weight k has long arrived, so the wait
        # is the kernels alone while weight k+1's copies continue on the copy stream.
        while deferred:
            path, key, owner, w = deferred.pop()
            w = w if w.dtype == dtype else w.to(dtype)
            try:
                q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
            except ValueError as err:
                raise ValueError(f"{path}: cannot quantize {key}: {err}") from err
            del w
            _to_nf4_layer(model, owner, q)

    try:
        for f in files:
            keys = sorted((k for k in plan if entries[k].file == f), key=lambda k: entries[k].start)
            if not keys:
                continue
            reader.open(f)
            for key in keys:
                e = entries[key]
                kind, owner = plan[key]
                t = reader.read(e)
                quantize_deferred()
                if kind == "bnb":
                    pending.setdefault(owner, {})[key] = t
                    parts_left[owner] -= 1
                    if parts_left[owner] == 0:
                        q = from_bnb_state_dict(pending.pop(owner), f"{owner}.weight")
                        _to_nf4_layer(model, owner, q)
                elif kind == "quantize":
                    deferred.append((f, key, owner, t))
                else:
                    if t.is_floating_point() and t.dtype != dtype and not _matches_any(owner, keep_fp32):
                        t = t.to(dtype)
                    _set_tensor(model, key, t)
                del t
                if bar is not None:
                    bar.update(e.nbytes)
        quantize_deferred()
        reader.finish()
    finally:
        reader.close()
        if bar is not None:
            bar.close()

    # 5. tie, move the buffers built on the CPU, and check nothing is left on meta
    loaded = set(plan) | {f"{n}.weight" for n in prequant}
    if tied:
        try:  # transformers 5: ties whichever of the pair was in the checkpoint
            model.tie_weights(missing_keys=expected - loaded, recompute_mapping=False)
        except TypeError:  # transformers 4
            model.tie_weights()
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and buf.device != device and not buf.is_meta:
                mod._buffers[name] = buf.to(device)
    left = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    left += [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(
            f"{folder} lacks {len(left)} tensors that {type(model).__name__} needs, e.g. {left[:5]} "
            "(a checkpoint for another architecture, or an incomplete one?)"
        )
    setattr(config, "dtype" if _dtype_kwarg() == "dtype" else "torch_dtype", dtype)
    _load_generation_config(model, folder)
    return model


def _to_nf4_layer(model: nn.Module, name: str, q) -> None:
    """Put an NF4Linear with weight ``q`` where the (meta) linear ``name`` is; its bias, if read
    already, moves over, else it is set when its key is read."""
    current = model.get_submodule(name)
    bias = current.bias if isinstance(current, nn.Linear) else None
    layer = NF4Linear(q, None)
    if bias is not None:  # real if its key came first, else a meta placeholder filled in later
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    layer.train(current.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def _load_generation_config(model: nn.Module, folder: str) -> None:
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path) or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring {path}: {e}", stacklevel=3)
