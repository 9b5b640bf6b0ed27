"""Quantize-on-load of an 8B-shaped checkpoint: time against reading its files, peak GPU and host
memory; and a bitsandbytes-quantized save of a tiny model, loaded and compared.

    python bench/bench_loading.py --out bench/results/loading.json          # H200: ~1 minute
    python bench/bench_loading.py --tiny --out /tmp/loading_tiny.json       # CPU: the logic only

Steps: (1) write a Llama-3-8B-shaped checkpoint with random bf16 weights, sharded (~5 GB shards,
with model.safetensors.index.json), generated on the GPU and written with safetensors;
(2) time reading its files: plain sequential reads of every byte into host memory (64 MiB
blocks), warm (from the page cache) and cold (dropped from it first), and safetensors' own read
of every tensor into host memory; then load_model's reader alone, every tensor streamed onto the
device with nothing done to it; (3) time
``hoptune.load_model(dir, quantize="nf4", device="cuda")`` with its peak GPU memory
(torch.cuda.max_memory_allocated) and peak host RSS (sampled every 5 ms); check a few layers
against quantize_nf4 of the stored weights; (4) save a tiny model through transformers +
bitsandbytes (NF4, double quant), load it with hoptune and compare weights and logits;
(5) print a table, write JSON, delete the checkpoint.

Targets (docs/TARGETS.md, issue 4): peak GPU <= 6.5 GiB; load time <= 1.5x the file read time
(the faster of the two reads). By default the files are read warm (from the page cache, right
after writing; the strictest comparison: no disk time to hide behind); ``--cold`` drops them from
the page cache (fsync + posix_fadvise DONTNEED) before each timed pass. Either way one plain read
is also timed in the other state, so the table shows warm and cold read times side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hoptune
from harness import LLAMA_8B, env_info, table, write_json
from hoptune.loading import _Reader, checkpoint_files, read_safetensors_header

GiB = 2**30
TARGET_PEAK_GIB = 6.5
TARGET_RATIO = 1.5
ROUNDS = 5  # warm read + load rounds for the ratio (median)

TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


# -- (1) the checkpoint -----------------------------------------------------------------------
def write_checkpoint(folder: str, shape: dict, shard_bytes: int, device: str) -> dict:
    """Random bf16 weights (std 0.02, norms 1), generated on ``device``, in shards of about
    ``shard_bytes``; config.json and the index as transformers writes them."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, dtype="bfloat16")
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    names = [(k, tuple(v.shape)) for k, v in meta.state_dict().items()]
    total = sum(2 * torch.Size(s).numel() for _, s in names)
    need = int(total * 1.1) + GiB // 8
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(folder)) or ".").free
    if free < need:
        raise SystemExit(f"{folder}: needs {need / GiB:.1f} GiB of disk, {free / GiB:.1f} GiB free")
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, s in names:
        nbytes = 2 * torch.Size(s).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += nbytes
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, s in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(s, dtype=torch.bfloat16, device=device)
            else:
                t = torch.randn(s, generator=gen, dtype=torch.bfloat16, device=device).mul_(0.02)
            tensors[name] = t.cpu()
            weight_map[name] = fname
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return {"bytes": total, "shards": len(shards), "write_s": time.perf_counter() - t0}


def drop_page_cache(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- (2) reading the files --------------------------------------------------------------------
def read_raw(files: list[str], block: int = 64 << 20) -> float:
    """Every byte of every file into host memory, sequential 64 MiB reads (one reused buffer)."""
    buf = bytearray(block)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t0


def read_safetensors(files: list[str]) -> float:
    """Every tensor into its own host memory through safetensors (its file map, then a copy)."""
    from safetensors import safe_open

    t0 = time.perf_counter()
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).clone()
                del t
    return time.perf_counter() - t0


def stream_only(files: list[str], device: str) -> float:
    """load_model's reader alone: every tensor of every file onto ``device``, dropped at once."""
    entries = [e for f in files for e in sorted(read_safetensors_header(f).values(), key=lambda e: e.start)]
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reader = _Reader(torch.device(device))
    for _, t in reader.stream_entries(entries):
        del t
    reader.finish()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


class RssSampler:
    """Peak resident set size of this process while running, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.start = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


# -- (3) load_model ---------------------------------------------------------------------------
def time_load(folder: str, device: str) -> tuple[dict, torch.nn.Module]:
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # no pinned memory cached by a pass before
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with RssSampler() as rss:
        t0 = time.perf_counter()
        model = hoptune.load_model(folder, quantize="nf4", device=device, progress=False)
        if cuda:
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
    r = {
        "load_s": load_s,
        "host_rss_start_GiB": rss.start / GiB,
        "host_rss_peak_GiB": rss.peak / GiB,
        "host_rss_peak_extra_GiB": (rss.peak - rss.start) / GiB,
    }
    if cuda:
        r["gpu_peak_GiB"] = (torch.cuda.max_memory_allocated() - base) / GiB
        r["gpu_model_GiB"] = (torch.cuda.memory_allocated() - base) / GiB
    return r, model


def check_layers(model: torch.nn.Module, folder: str, names: list[str]) -> dict:
    """The loaded NF4 bytes of a few layers equal quantize_nf4 of the stored bf16 weights."""
    from safetensors import safe_open

    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)["weight_map"]
    ok = True
    for name in names:
        key = f"{name}.weight"
        with safe_open(os.path.join(folder, index[key]), framework="pt") as f:
            w = f.get_tensor(key)
        layer = model.get_submodule(name)
        q = hoptune.quantize_nf4(w.to(layer.weight_packed.device).contiguous())
        ok &= torch.equal(q.packed, layer.weight_packed) and torch.equal(q.absmax, layer.weight_absmax)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(torch.arange(8, device=device)[None]).logits
    return {"layers_match_quantize_nf4": bool(ok), "logits_finite": bool(torch.isfinite(out).all())}


# -- (4) a bitsandbytes-quantized save ---------------------------------------------------------
def bnb_roundtrip(folder: str, device: str) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from hoptune.nn import NF4Linear

    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        return {"bnb_error": f"bitsandbytes unavailable: {e}"}
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY, "hidden_size": 128, "intermediate_size": 320, "vocab_size": 384})
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(os.path.join(folder, "bf16"))
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    theirs = AutoModelForCausalLM.from_pretrained(
        os.path.join(folder, "bf16"), quantization_config=qcfg, device_map=device
    ).eval()
    theirs.save_pretrained(os.path.join(folder, "nf4"))
    ours = hoptune.load_model(os.path.join(folder, "nf4"), device=device, progress=False)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    bitwise = device == "cuda"  # bitsandbytes' CPU path repacks what it loads
    same_weights = True
    for name, layer in layers.items():
        lin = theirs.get_submodule(name)
        if bitwise:
            w_theirs = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
            same_weights &= torch.equal(w_theirs.view(torch.int16), layer.dequantize().view(torch.int16))
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        a, b = theirs(ids).logits.float(), ours(ids).logits.float()
    rel = float((a - b).abs().max() / a.abs().max())
    return {
        "bnb_layers": len(layers),
        "bnb_weights_bitwise_equal": bool(same_weights) if bitwise else None,
        "bnb_logits_max_rel_diff": rel,
        "bnb_logits_match": rel < 2e-2,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/loading.json")
    p.add_argument(
        "--dir", default=None, help="folder in which a temporary checkpoint folder is made (default /tmp)"
    )
    p.add_argument("--tiny", action="store_true", help="a tiny model, CPU if no GPU: checks the logic")
    p.add_argument("--cold", action="store_true", help="drop the files from the page cache before each read")
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size (GB; --tiny: 1 MB)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("the full benchmark needs a GPU; pass --tiny to check the logic on the CPU")
    shape = TINY if args.tiny else LLAMA_8B
    shard_bytes = 2**20 if args.tiny else int(args.shard_gb * 1e9)
    # only what this script creates is deleted at the end: a fresh folder under --dir (or /tmp)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="hoptune-bench-loading-", dir=args.dir)
    folder = os.path.join(root, "llama8b-random")
    res: dict = {"env": env_info(), "shape": "tiny" if args.tiny else "llama-3-8b", "device": device}
    from hoptune import _lib

    res["kernels"] = _lib.unavailable_reason() or "hoptune._C (sm_90 kernels)"
    if device == "cuda" and _lib.unavailable_reason():
        print(f"warning: quantizing with the PyTorch reference: {_lib.unavailable_reason()}", flush=True)
    res["cache"] = "cold" if args.cold else "warm"
    t_all = time.perf_counter()
    try:
        res.update(write_checkpoint(folder, shape, shard_bytes, device))
        files = checkpoint_files(folder)
        print(
            f"wrote {res['bytes'] / 1e9:.2f} GB in {res['shards']} shards in {res['write_s']:.1f} s",
            flush=True,
        )
        # the plain read in the other cache state first, for the warm / cold rows of the table
        if args.cold:
            read_raw(files)  # every page cached
            res["read_raw_warm_s"] = read_raw(files)
            drop_page_cache(files)
            res["read_raw_cold_s"] = res["read_raw_s"] = read_raw(files)
            drop_page_cache(files)
        else:
            drop_page_cache(files)
            res["read_raw_cold_s"] = read_raw(files)  # and every page is cached again
            res["read_raw_warm_s"] = res["read_raw_s"] = read_raw(files)
        res["read_safetensors_s"] = read_safetensors(files)
        res["read_s"] = min(res["read_raw_s"], res["read_safetensors_s"])
        print(
            f"read: raw warm {res['read_raw_warm_s']:.2f} s, raw cold {res['read_raw_cold_s']:.2f} s, "
            f"safetensors ({res['cache']}) {res['read_safetensors_s']:.2f} s",
            flush=True,
        )
        if args.cold:
            drop_page_cache(files)
        res["stream_s"] = stream_only(files, device)
        print(f"reader alone, onto {device}: {res['stream_s']:.2f} s", flush=True)
        if args.cold:
            drop_page_cache(files)
        r, model = time_load(folder, device)
        res.update(r)
        res["load_over_read"] = res["load_s"] / res["read_s"]
        res["load_GBps"] = res["bytes"] / res["load_s"] / 1e9
        res["read_GBps"] = res["bytes"] / res["read_s"] / 1e9
        print(f"load_model: {res['load_s']:.2f} s ({res['load_over_read']:.2f}x the read)", flush=True)
        res.update(
            check_layers(model, folder, ["model.layers.0.self_attn.q_proj", "model.layers.31.mlp.down_proj"]
                         if not args.tiny else ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
        )  # fmt: skip
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        if not args.cold and not args.tiny:
            # both times wander by tens of percent on a shared machine: more rounds of the warm
            # read and the load, back to back; the ratio is the median load over the fastest read
            reads, loads = [res["read_s"]], [res["load_s"]]
            for _ in range(ROUNDS - 1):
                reads.append(min(read_safetensors(files), res["read_raw_s"]))
                r, model = time_load(folder, device)
                del model
                if device == "cuda":
                    torch.cuda.empty_cache()
                loads.append(r["load_s"])
            res["read_s_rounds"], res["load_s_rounds"] = reads, loads
            res["load_over_read"] = statistics.median(loads) / min(reads)
            print(f"reads {reads}, loads {loads}", flush=True)
        res.update(bnb_roundtrip(os.path.join(root, "bnb"), device))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    res["total_s"] = time.perf_counter() - t_all
    res["target_peak_GiB"] = TARGET_PEAK_GIB
    res["target_load_over_read"] = TARGET_RATIO
    # --tiny checks the logic only: its times are all overhead, so no target applies
    timed = not args.tiny
    res["pass_peak"] = (
        res.get("gpu_peak_GiB", float("nan")) <= TARGET_PEAK_GIB if device == "cuda" and timed else None
    )
    res["pass_time"] = res["load_over_read"] <= TARGET_RATIO if timed else None
    rows = [
        {"what": "checkpoint", "value": f"{res['bytes'] / 1e9:.2f} GB, {res['shards']} shards", "target": ""},
        {"what": "write", "value": f"{res['write_s']:.2f} s", "target": ""},
        {"what": "read files, plain (warm)", "value": f"{res['read_raw_warm_s']:.2f} s ({res['bytes'] / res['read_raw_warm_s'] / 1e9:.1f} GB/s)", "target": ""},
        {"what": "read files, plain (cold)", "value": f"{res['read_raw_cold_s']:.2f} s ({res['bytes'] / res['read_raw_cold_s'] / 1e9:.1f} GB/s)", "target": ""},
        {"what": f"read files ({res['cache']}, faster of plain / safetensors)", "value": f"{res['read_s']:.2f} s ({res['read_GBps']:.1f} GB/s)", "target": ""},
        {"what": f"load_model's reader alone, onto {device}", "value": f"{res['stream_s']:.2f} s ({res['bytes'] / res['stream_s'] / 1e9:.1f} GB/s)", "target": ""},
        {"what": "load_model nf4", "value": f"{res['load_s']:.2f} s ({res['load_GBps']:.1f} GB/s)", "target": ""},
        {"what": "read, load in each round (s)", "value": " ".join(f"{r:.2f}/{x:.2f}" for r, x in zip(res.get("read_s_rounds", []), res.get("load_s_rounds", []))), "target": ""},
        {"what": "load / read (median load / fastest read)", "value": f"{res['load_over_read']:.2f}x", "target": f"<= {TARGET_RATIO}x"},
        {"what": "peak GPU (max_memory_allocated)", "value": f"{res.get('gpu_peak_GiB', float('nan')):.2f} GiB", "target": f"<= {TARGET_PEAK_GIB} GiB"},
        {"what": "model on GPU after load", "value": f"{res.get('gpu_model_GiB', float('nan')):.2f} GiB", "target": ""},
        {"what": "peak host RSS (extra during load)", "value": f"{res['host_rss_peak_GiB']:.2f} GiB (+{res['host_rss_peak_extra_GiB']:.2f})", "target": "~ the read ring (256 MiB)"},
        {"what": "layers == quantize_nf4(stored)", "value": str(res["layers_match_quantize_nf4"]), "target": "True"},
        {"what": "bitsandbytes save: weights bitwise", "value": str(res.get("bnb_weights_bitwise_equal")), "target": "True (GPU)"},
        {"what": "bitsandbytes save: logits rel diff", "value": f"{res.get('bnb_logits_max_rel_diff', float('nan')):.2e}", "target": "< 2e-2"},
    ]  # fmt: skip
    print(table(rows, ["what", "value", "target"]))
    res["command"] = res["env"]["command"]
    write_json(args.out, res)
    ok = res["pass_time"] is not False and res["pass_peak"] is not False and res["layers_match_quantize_nf4"]
    ok = ok and res.get("bnb_logits_match", False) and res.get("bnb_weights_bitwise_equal") is not False
    verdict = ("PASS" if ok else "FAIL") + (
        "" if timed else " (--tiny: correctness only, no time/memory targets)"
    )
    print(verdict, f"(total {res['total_s']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
