"""Host time from a layer call to its first kernel launch, on the CPU (no GPU needed).

In a call timed on its own (the anchors' per-call protocol) the GPU idles until the first kernel
is launched, so this host time adds to the call's time. Here the compiled extension is replaced
by a stub that notes when it is first called and launches nothing, and the dispatch check is
told that the kernels run: what is timed is the Python path a GPU run takes up to its first
launch (the merged dequantize of the QLoRA forward, M = 16 rows of bf16, K = N = 64, r = 16:
above the rows the small-M kernel takes for this weight; results/host_first_launch.json was
measured with 4 rows, which took the same path before that kernel).
nn.Linear's whole call (its CPU matmul included) is given for orientation.

    python bench/host_first_launch.py [--out bench/results/host_first_launch.json]
    python bench/host_first_launch.py --compare REV    # also a checkout of git revision REV,
                                                       # alternated with this tree
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def measure(calls: int = 3000, repeats: int = 5) -> dict:
    """µs, in this process (the hoptune on sys.path is the one measured): for each path the least
    of ``repeats`` medians over ``calls`` calls."""
    import torch
    from torch import nn

    from hoptune import _lib
    from hoptune.nn import LoRALinear
    from hoptune.ops import nf4_lora_linear

    torch.manual_seed(0)
    k = n = 64
    dense = nn.Linear(k, n, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(
        dense, r=16, lora_alpha=32, quantize="nf4", adapter_dtype=torch.bfloat16, init_lora_weights=False
    )
    q = layer.weight_nf4  # (quantized before the stub replaces the kernels)
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    first: list[float] = []

    class Stub:
        def __getattr__(self, name):
            def launch(*args, **kwargs):
                if not first:
                    first.append(time.perf_counter())

            return launch

    _lib.use_kernel = lambda t, op: True
    _lib._load = lambda: (Stub(), None)
    _lib.stream = lambda t: 0
    x = torch.randn(16, k, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_(True)

    def to_first_launch(fn) -> float:
        for _ in range(200):
            first.clear()
            fn()
        meds = []
        for _ in range(repeats):
            ds = []
            for _ in range(calls):
                first.clear()
                t = time.perf_counter()
                fn()
                ds.append(first[0] - t)
            meds.append(statistics.median(ds) * 1e6)
        return min(meds)

    def whole_call(fn) -> float:
        for _ in range(200):
            fn()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t) / calls * 1e6)
        return best

    import hoptune

    return {
        "hoptune_from": os.path.dirname(hoptune.__file__),
        "layer_no_grad_us": to_first_launch(lambda: layer(x)),
        "layer_recorded_us": to_first_launch(lambda: layer(xg)),
        "op_us": to_first_launch(lambda: nf4_lora_linear(x, q, a, b, 2.0)),
        "nn_linear_whole_call_us": whole_call(lambda: dense(x)),
    }


def _child(src: str) -> dict:
    # an editable install's import hook would win over sys.path: drop it, so src is what is measured
    code = "import sys, json; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
    code += f"type(f).__module__]; sys.path.insert(0, {src!r}); sys.path.insert(0, {HERE!r}); "
    code += "import host_first_launch as h; print(json.dumps(h.measure()))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "host_first_launch.json"))
    ap.add_argument("--compare", metavar="REV", help="also measure a checkout of this git revision")
    ap.add_argument("--rounds", type=int, default=3, help="alternations with --compare")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from harness import env_info, write_json

    res = {"env": env_info(), "what": __doc__.split("\n\n")[1].replace("\n", " ")}
    trees = {"this_tree": os.path.join(ROOT, "python")}
    tmp = None
    if args.compare:
        tmp = tempfile.mkdtemp()
        wt = os.path.join(tmp, "rev")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", wt, args.compare], check=True)
        trees[args.compare] = os.path.join(wt, "python")
    try:
        runs = {name: [] for name in trees}
        for _ in range(args.rounds if args.compare else 1):
            for name, src in trees.items():
                runs[name].append(_child(src))
        for name, rs in runs.items():
            # the least over the runs: this machine's host speed swings by up to 2x between
            # measurements, so the least is the closest to the path's own cost
            res[name] = {k: min(r[k] for r in rs) for k in rs[0] if k.endswith("_us")}
            res[name]["hoptune_from"] = rs[0]["hoptune_from"]
            res[name]["runs"] = rs
            print(
                name,
                {
                    k: (round(v, 1) if isinstance(v, float) else v)
                    for k, v in res[name].items()
                    if k != "runs"
                },
            )
    finally:
        if tmp:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", wt], check=False)
            shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
