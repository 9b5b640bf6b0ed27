"""The compiled launchers' own argument checks (hoptune._C, called directly): a call they refuse
raises before any CUDA work, so these tests need the extension but no GPU (the pointers are
never dereferenced). Each runs in a fresh interpreter, so that a launcher that crashes fails the
test instead of ending the session. The gpu-marked tests run the kernels."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from hoptune import _lib
from hoptune.ops import fused_linear_logprobs, token_logprobs

needs_ext = pytest.mark.skipif(_lib.extension() is None, reason="the CUDA extension hoptune._C is not built")

# fake device addresses: 256-byte aligned, never read (every call below is refused first)
X, PACKED, ABSMAX, SCRATCH, Y, SHIFT, PARTIAL = (i << 20 for i in range(1, 8))


_PRELUDE = """
import json
from hoptune import _C
out = {}
def case(name, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (RuntimeError, ValueError) as e:
        out[name] = f"refused: {type(e).__name__}: {e}"
    else:
        out[name] = "accepted"
"""


def _outcomes(calls: str) -> dict:
    """Runs `calls` (lines `case(name, fn, *args, **kwargs)`) in a fresh interpreter; returns
    {name: "refused: <exception>" or "accepted"}."""
    code = _PRELUDE + textwrap.dedent(calls) + "\nprint(json.dumps(out))\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"the interpreter died (exit {r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_ext
def test_nf4_lora_gemm_scratch_bytes_refuses_nonpositive_blocksize():
    # 0 must not reach k % blocksize (a division by zero), nor a negative one the size (near 2^64)
    out = _outcomes(
        """
        for bs in (0, -64, -4096):
            case(f"bs={bs}", _C.nf4_lora_gemm_scratch_bytes, 128, 4096, 4096, bs, 64, 1)
        """
    )
    for name, what in out.items():
        assert what.startswith("refused: ValueError"), f"{name}: {what}"


@needs_ext
def test_nf4_lora_gemm_refuses_nonpositive_blocksize():
    out = _outcomes(
        f"""
        for bs in (0, -64):
            case(f"bs={{bs}}", _C.nf4_lora_gemm, x={X}, ldx=4096, rows=128, packed={PACKED},
                 absmax={ABSMAX}, qabsmax=0, absmax2=0, code2=0, offset=0.0, blocksize2=256,
                 n=4096, k=4096, blocksize=bs, scratch={SCRATCH}, xs=0, lora_b=0, rank=0, bias=0,
                 y={Y}, ldy=4096, tile_n=64, splits=1, stream=0)
        """
    )
    for name, what in out.items():
        assert what.startswith("refused: RuntimeError") and "cudaErrorInvalidValue" in what, f"{name}: {what}"


@needs_ext
def test_fused_logprob_gemm_refuses_null_or_misaligned_bases():
    # A, B and G are TMA operands: with a base off 16 bytes CUTLASS would launch with a descriptor
    # that failed to encode (its own check is an assert, compiled out)
    out = _outcomes(
        f"""
        ok = dict(a={X}, lda=64, b={PACKED}, ldb=64, g={ABSMAX}, ldg=64, m=16, n=64, k=64, scale=1.0,
                  shift={SHIFT}, partial={PARTIAL}, stream=0)
        for arg in ("a", "b", "g"):
            for name, value in ((f"{{arg}} null", 0), (f"{{arg}} + 8 bytes", ok[arg] + 8),
                                (f"{{arg}} + 2 bytes", ok[arg] + 2)):
                case(name, _C.fused_logprob_gemm, **{{**ok, arg: value}})
        """
    )
    assert len(out) == 9
    for name, what in out.items():
        assert what.startswith("refused: RuntimeError") and "cudaErrorInvalidValue" in what, f"{name}: {what}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_unchecked_out_of_range_label_gpu(dtype):
    """check_labels=False with labels outside [0, V): the forward kernel must not read logits[y]
    out of bounds; such a row gives nan, the others are unaffected."""
    v = 1000
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 8, v, generator=g).to(dtype).cuda()
    y = torch.randint(0, v, (2, 8), generator=g).cuda()
    y[0, 0] = -100
    bad = torch.zeros(2, 8, dtype=torch.bool, device="cuda")
    for pos, label in (((0, 3), v), ((1, 2), 1 << 40), ((1, 5), -7)):
        y[pos] = label
        bad[pos] = True
    lp = token_logprobs(z, y, check_labels=False)
    torch.cuda.synchronize()
    assert torch.isnan(lp[bad]).all()
    ok = ~bad & (y != -100)
    ref = torch.log_softmax(z.double(), -1).gather(-1, y.clamp(0, v - 1)[..., None])[..., 0]
    assert (lp[ok].double() - ref[ok]).abs().max().item() <= 1e-4
    assert (lp[y == -100] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_linear_logprobs_unchecked_out_of_range_label_gpu(dtype):
    """check_labels=False with a label outside [0, V), no gradient (bf16: the fused GEMM, whose nan
    shift sends the block to the two-pass chunks; fp16: those chunks): the chunk kernel must not
    read the row's logit at that label out of bounds; such a row gives nan, the others are
    unaffected."""
    n, h, v = 24, 64, 1000
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(n, h, generator=g) / 8).to(dtype).cuda()
    weight = torch.randn(v, h, generator=g).to(dtype).cuda()
    y = torch.randint(0, v, (n,), generator=g).cuda()
    y[2], y[7], y[11], y[5] = v, 1 << 40, -3, -100
    lp = fused_linear_logprobs(hidden, weight, y, check_labels=False)
    torch.cuda.synchronize()
    bad = torch.zeros(n, dtype=torch.bool, device="cuda")
    bad[[2, 7, 11]] = True
    assert torch.isnan(lp[bad]).all()
    ok = ~bad & (y != -100)
    z = hidden.double() @ weight.double().t()
    ref = torch.log_softmax(z, -1).gather(-1, y.clamp(0, v - 1)[:, None])[:, 0]
    assert (lp[ok].double() - ref[ok]).abs().max().item() <= 5e-2
    assert lp[5] == 0
