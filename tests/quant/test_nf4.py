"""NF4 format on the CPU: the reference against bitsandbytes' stored state, packing, the bnb
safetensors keys, and bad input. GPU comparisons live in test_nf4_gpu.py."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch

from hoptune.quant import (
    NF4Weight,
    dequantize_nf4,
    from_bnb_state_dict,
    quantize_nf4,
    to_bnb_state_dict,
)
from hoptune.reference import nf4 as ref

SHAPES = [(128, 192), (96, 200), (64, 4096), (333, 64)]  # 96x200: in_features not a multiple of 64


def _weight(shape, dtype, seed=0, zero_block=True):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    if zero_block:
        w.view(-1)[64:128] = 0  # one all-zero quant block
    return w


def _bnb_state_dict(qb, st, key="w"):
    sd = {key: qb, f"{key}.absmax": st.absmax, f"{key}.quant_map": st.code}
    meta = {
        "quant_type": "nf4",
        "blocksize": st.blocksize,
        "dtype": str(st.dtype).replace("torch.", ""),
        "shape": list(st.shape),
    }
    if st.nested:
        sd[f"{key}.nested_absmax"] = st.state2.absmax
        sd[f"{key}.nested_quant_map"] = st.state2.code
        meta.update(
            nested_blocksize=st.state2.blocksize, nested_dtype="float32", nested_offset=st.offset.item()
        )
    sd[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(
        list(json.dumps(meta).encode()), dtype=torch.uint8
    )
    return sd


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(ref.dynamic_map(), bnbf.create_dynamic_map(signed=True))


def test_code_table_matches_bitsandbytes():
    assert torch.equal(ref.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu").float())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_equals_bitsandbytes_bit_for_bit(out_dtype, double_quant):
    """Given bitsandbytes' stored state, our dequantize returns its bytes exactly."""
    for shape in SHAPES:
        w = _weight(shape, torch.float32)
        qb, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        st.dtype = out_dtype  # dequantize_4bit returns st.dtype
        expected = bnbf.dequantize_4bit(qb, st)
        q = from_bnb_state_dict(_bnb_state_dict(qb, st), "w")
        ours = dequantize_nf4(q, out_dtype)
        assert ours.dtype == out_dtype and ours.shape == expected.shape
        assert torch.equal(ours.view(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_codes_and_absmax(dtype):
    """Codes and fp32 absmax equal bitsandbytes' (its CPU path here; the CUDA path is checked on GPU)."""
    for shape in SHAPES:
        w = _weight(shape, dtype)
        qb, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        q = quantize_nf4(w, double_quant=False)
        assert torch.equal(q.absmax, st.absmax)
        zero = (q.absmax == 0).repeat_interleave(32)
        same = q.packed == qb.view(-1)
        assert same[~zero].all(), f"{shape}: {int((~same[~zero]).sum())} codes differ outside all-zero blocks"
        # our convention for an all-zero block: code 7 (0.0) in both nibbles
        assert (q.packed[zero] == 0x77).all()


@pytest.mark.parametrize("chunk", [64 * 3, 100, 64 * 1000])
def test_reference_in_chunks_equals_one_pass(chunk, monkeypatch):
    """The reference quantizes and dequantizes in chunks of whole blocks (bounded memory): any chunk
    size, a last partial chunk among them, gives the codes, absmax and values of one pass."""
    w = _weight((10, 320), torch.bfloat16)  # 50 blocks of 64
    one = quantize_nf4(w, double_quant=True)
    want = dequantize_nf4(one)
    monkeypatch.setattr(ref, "_CHUNK", chunk)
    q = quantize_nf4(w, double_quant=True)
    assert torch.equal(q.packed, one.packed) and torch.equal(q.absmax, one.absmax)
    assert torch.equal(dequantize_nf4(q), want)


def test_all_zero_block_dequantizes_to_exact_zeros():
    w = _weight((4, 256), torch.bfloat16)
    w[1] = 0
    for dq in (False, True):
        d = dequantize_nf4(quantize_nf4(w, double_quant=dq))
        assert torch.equal(d[1], torch.zeros_like(d[1])), dq
        assert (d.view(-1)[64:128] == 0).all()


def test_nested_absmax_close_to_bitsandbytes_cpu():
    """bitsandbytes' CPU 8-bit quantizer picks another code for some values; ours follows its CUDA
    kernel (compared exactly on GPU). On this weight the two differ by at most one code (near 0,
    where the dynamic map is dense, by up to a few: docs/FORMATS.md §1)."""
    w = _weight((1024, 1024), torch.bfloat16, zero_block=False)
    qb, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(w)
    assert q.offset == st.offset.item()
    assert torch.equal(q.absmax2, st.state2.absmax)
    diff = (q.absmax.int() - st.absmax.int()).abs()
    assert diff.max() <= 1
    assert torch.equal(q.packed, qb.view(-1))


def test_nested_absmax_scale_from_blocks_far_below_the_mean():
    """The nested scale of each 256 absmax values is their largest distance from the mean absmax,
    on either side: with a few blocks far smaller than the rest (a row of near-zero weights) that
    is a distance below the mean, as bitsandbytes stores it; their absmax still round-trips close."""
    w = _weight((64, 1024), torch.bfloat16, zero_block=False)
    w[:2] *= 1e-3  # 32 blocks of absmax ~1e-4 among ~0.05
    _, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(w)
    assert torch.equal(q.absmax2, st.state2.absmax)
    exact = w.float().view(-1, 64).abs().amax(1)
    decoded = ref.decode_absmax(q.absmax, q.absmax2, q.code2, q.offset, q.blocksize2)
    assert ((decoded - exact).abs() <= 0.02 * exact.max()).all()


def test_nested_absmax_codes_follow_the_binary_search_step_for_step():
    """The vectorized 8-bit search (nested absmax codes) gives, for every value, the code of
    bitsandbytes' scalar search (dQuantize), ported here step for step in fp32: the midpoints
    between codes (ties go to the searched pivot), the codes themselves, the ends, random values."""

    def search(code, x):
        code = [np.float32(c) for c in code.tolist()]
        x = np.float32(x)
        pivot, upper_pivot, lower_pivot = 127, 255, 0
        lower, upper = np.float32(-1.0), np.float32(1.0)
        val = code[pivot]
        i = 64
        while i > 0:
            if x > val:
                lower_pivot, lower, pivot = pivot, val, pivot + i
            else:
                upper_pivot, upper, pivot = pivot, val, pivot - i
            val = code[pivot]
            i >>= 1
        if upper_pivot == 255:
            upper = code[upper_pivot]
        if lower_pivot == 0:
            lower = code[lower_pivot]
        if x > val:
            return upper_pivot if x > (upper + val) * np.float32(0.5) else pivot
        return lower_pivot if x < (lower + val) * np.float32(0.5) else pivot

    code = ref.dynamic_map()
    ends = torch.tensor([-1.0, 1.0, -0.999, 0.999, 0.0])
    x = torch.cat([(code[:-1] + code[1:]) * 0.5, code, torch.rand(300) * 2 - 1, ends])
    want = torch.tensor([search(code, v) for v in x.tolist()], dtype=torch.uint8)
    assert torch.equal(ref._quantize_dynamic(code, x), want)


def test_packing_order_high_nibble_first():
    # a block whose elements are exactly code values times absmax=1: element 2j -> high nibble
    codes = torch.arange(16).repeat(4)  # 64 elements
    vals = ref.nf4_code()[codes]
    q = quantize_nf4(vals.view(1, 64), double_quant=False)
    assert q.absmax.item() == 1.0
    expected = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8)
    assert torch.equal(q.packed, expected)
    assert torch.equal(dequantize_nf4(q).view(-1), vals)


def test_midpoint_ties_go_down():
    """x exactly on a midpoint takes the lower code (strict >), as bitsandbytes' tree does."""
    mids = ref.nf4_midpoints()
    block = torch.zeros(64)
    block[0] = 1.0  # absmax 1 so x * (1/absmax) == x exactly
    block[1 : 1 + 15] = mids
    block[16 : 16 + 15] = torch.nextafter(mids, torch.full_like(mids, 2.0))
    q = quantize_nf4(block.view(1, 64), double_quant=False)
    nib = torch.stack((q.packed >> 4, q.packed & 15), 1).view(-1).long()
    assert torch.equal(nib[1:16], torch.arange(15))
    assert torch.equal(nib[16:31], torch.arange(1, 16))


def test_zero_in_a_block_of_subnormals_takes_code_0():
    """A block whose absmax is subnormal: 1/absmax overflows to inf, so a zero scales to NaN
    (0 * inf), which is above none of the midpoints: code 0, as the strict > comparisons of our
    CUDA kernel give, not the last code (where bucketize puts NaN)."""
    block = torch.zeros(64)
    block[0] = 1e-40  # fp32 subnormal: 1 / 1e-40 is above the fp32 range
    block[1] = -4e-41
    q = quantize_nf4(block.view(1, 64), double_quant=False)
    assert q.absmax.item() == block[0].item()
    nib = torch.stack((q.packed >> 4, q.packed & 15), 1).view(-1)
    assert nib[0] == 15 and nib[1] == 0 and (nib[2:] == 0).all()


@pytest.mark.parametrize("double_quant", [True, False])
def test_roundtrip_through_safetensors(tmp_path, double_quant):
    from safetensors.torch import load_file, save_file

    w = _weight((96, 200), torch.bfloat16)
    q = quantize_nf4(w, double_quant=double_quant)
    sd = to_bnb_state_dict(q, "model.layers.0.mlp.up_proj.weight")
    save_file(sd, tmp_path / "m.safetensors", metadata={"format": "pt"})
    q2 = from_bnb_state_dict(load_file(tmp_path / "m.safetensors"), "model.layers.0.mlp.up_proj.weight")
    assert q2.shape == q.shape and q2.dtype == q.dtype and q2.offset == q.offset
    assert torch.equal(dequantize_nf4(q2), dequantize_nf4(q))
    meta = json.loads(bytes(sd["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["shape"] == [96, 200] and meta["dtype"] == "bfloat16"


def test_bitsandbytes_reads_our_state():
    """bitsandbytes' own QuantState.from_dict accepts our keys and dequantizes to our values."""
    w = _weight((128, 192), torch.bfloat16)
    q = quantize_nf4(w)
    sd = to_bnb_state_dict(q, "w")
    qs = bnbf.QuantState.from_dict({k[2:]: v for k, v in sd.items() if k != "w"}, device="cpu")
    theirs = bnbf.dequantize_4bit(sd["w"], qs)
    assert torch.equal(theirs.view(torch.int16), dequantize_nf4(q).view(torch.int16))


def test_error_wrong_dtype():
    with pytest.raises(TypeError, match="w must be bfloat16, float16 or float32, got torch.int32"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_nf4([1.0] * 64)
    with pytest.raises(TypeError, match="q must be an NF4Weight, got Tensor"):
        dequantize_nf4(torch.randn(64))


def test_error_meta_device():
    """A weight not loaded yet (meta device, as from an empty-weights init) is named as such, not
    reported as an .item() failure."""
    with pytest.raises(ValueError, match="w is on the meta device; load the weights first"):
        quantize_nf4(torch.empty(4, 64, device="meta"))


def test_error_to_a_dtype():
    """NF4Weight.to moves the codes to a device; given a dtype it says so, not that the packed
    codes (converted to that dtype) are not uint8."""
    q = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(TypeError, match=r"NF4Weight.to takes a device, got the dtype torch.bfloat16"):
        q.to(torch.bfloat16)
    assert torch.equal(q.to("cpu").packed, q.packed)


def test_numpy_blocksizes_and_a_tensor_offset_are_stored_as_python_numbers():
    """Blocksizes given as NumPy integers and the offset as bitsandbytes holds it (a 0-d tensor)
    are kept as int and float: the state writes as JSON (to_bnb_state_dict failed with "Object of
    type int64 is not JSON serializable") and reads back to the same weights."""
    w = _weight((64, 256), torch.bfloat16, zero_block=False)
    q = quantize_nf4(w, blocksize=np.int64(128), blocksize2=np.int32(256))
    assert type(q.blocksize) is int and type(q.blocksize2) is int
    offset = torch.tensor(q.offset)  # (bitsandbytes' QuantState.offset)
    nested = dict(absmax2=q.absmax2, code2=q.code2, offset=offset, blocksize2=np.int64(256))
    built = NF4Weight(q.packed, q.absmax, q.shape, q.dtype, np.int64(128), **nested)
    assert (type(built.blocksize), type(built.offset), type(built.blocksize2)) == (int, float, int)
    for x in (q, built):
        back = from_bnb_state_dict(to_bnb_state_dict(x, "w"), "w")
        assert (back.blocksize, back.blocksize2, back.offset) == (128, 256, q.offset)
        assert torch.equal(dequantize_nf4(back), dequantize_nf4(q))


def test_error_numel_not_divisible():
    with pytest.raises(ValueError, match="multiple of blocksize=64"):
        quantize_nf4(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"a positive multiple of blocksize=64, got 0 \(shape \(0, 64\)\)"):
        quantize_nf4(torch.randn(0, 64))


def test_repr_says_shape_dtype_blocksizes_and_size():
    q = quantize_nf4(torch.randn(128, 64, dtype=torch.bfloat16))
    assert repr(q) == (
        "NF4Weight(shape=(128, 64), dtype=torch.bfloat16, blocksize=64, double_quant(blocksize2=256), "
        f"device=cpu, {q.nbytes / 2**20:.2f} MiB)"
    )
    # 4096 bytes of codes, 128 uint8 absmax, one fp32 nested absmax, the 1 KiB nested table
    assert q.nbytes == 4096 + 128 + 4 + 1024
    plain = quantize_nf4(torch.randn(128, 64), blocksize=128, double_quant=False)
    assert repr(plain).startswith("NF4Weight(shape=(128, 64), dtype=torch.float32, blocksize=128, device=cpu")
    assert plain.nbytes == 4096 + 4 * 64


def test_error_blocksize():
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)


def test_error_non_contiguous():
    with pytest.raises(ValueError, match="w must be contiguous"):
        quantize_nf4(torch.randn(64, 128).t())


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), float("-inf")])
def test_error_non_finite(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_nf4(w)


def test_absmax_whose_mean_overflows_float32_is_refused_naming_double_quant():
    # finite fp32 weights whose block maxima sum beyond float32 (4 x 3e38): the error named an
    # internal field ("offset must be finite, got inf"); bitsandbytes stores that offset, and NaN
    # comes back from its dequantize
    w = torch.full((4, 64), 3e38)
    with pytest.raises(
        ValueError,
        match=r"double_quant=True .*mean of their block maxima .*overflows float32 .*double_quant=False",
    ):
        quantize_nf4(w)
    assert torch.equal(dequantize_nf4(quantize_nf4(w, double_quant=False)), w)


def test_error_mixed_devices():
    q = quantize_nf4(torch.randn(4, 64), double_quant=False)
    with pytest.raises(ValueError, match="one device"):
        NF4Weight(q.packed, q.absmax.to("meta"), q.shape, q.dtype)


def test_error_inconsistent_sizes():
    q = quantize_nf4(torch.randn(4, 64), double_quant=False)
    with pytest.raises(ValueError, match="shape"):
        NF4Weight(q.packed, q.absmax, torch.Size([5, 64]), q.dtype)


def _sd():
    return to_bnb_state_dict(quantize_nf4(torch.randn(8, 64)), "w")


def test_error_corrupted_quant_state_json():
    sd = _sd()
    raw = sd["w.quant_state.bitsandbytes__nf4"].clone()
    raw[3] = 0xFF
    sd["w.quant_state.bitsandbytes__nf4"] = raw
    with pytest.raises(ValueError, match=r"w\.quant_state\.bitsandbytes__nf4.*not valid UTF-8 JSON"):
        from_bnb_state_dict(sd, "w")


def test_error_quant_state_missing_field():
    sd = _sd()
    sd["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b'{"quant_type": "nf4"}'), dtype=torch.uint8)
    with pytest.raises(ValueError, match="lacks the field 'blocksize'"):
        from_bnb_state_dict(sd, "w")


def test_error_shape_mismatch_in_checkpoint():
    sd = _sd()
    sd["w"] = sd["w"][:-1]
    with pytest.raises(ValueError, match="holds 255 bytes"):
        from_bnb_state_dict(sd, "w")


def test_error_negative_shape_in_checkpoint_and_state():
    """A shape whose negative sizes multiply to the code count (e.g. (-8, -64) for 512 codes): the
    checkpoint reader refuses it, and a hand-built NF4Weight, which took it and failed later in a
    reshape, does too."""
    sd = _sd()
    state = json.loads(bytes(sd["w.quant_state.bitsandbytes__nf4"].tolist()))
    state["shape"] = [-8, -64]
    sd["w.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"shape must be a list of positive ints, got \[-8, -64\]"):
        from_bnb_state_dict(sd, "w")
    q = quantize_nf4(torch.randn(8, 64), double_quant=False)
    with pytest.raises(ValueError, match=r"shape must have sizes >= 0, got \(-8, -64\)"):
        NF4Weight(q.packed, q.absmax, (-8, -64), torch.float32)
    assert NF4Weight(q.packed, q.absmax, (8, 64), torch.float32).shape == (8, 64)


def test_error_missing_tensor_and_fp4():
    sd = _sd()
    del sd["w.nested_quant_map"]
    with pytest.raises(ValueError, match="missing the tensor 'w.nested_quant_map'"):
        from_bnb_state_dict(sd, "w")
    sd = _sd()
    sd["w.quant_state.bitsandbytes__fp4"] = sd.pop("w.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="FP4"):
        from_bnb_state_dict(sd, "w")


def test_error_missing_nested_absmax_names_it():
    # the absmax of a double-quantized weight is uint8 codes: without its nested absmax the error
    # named the absmax's dtype, as if the weight were not double quantized
    sd = _sd()
    del sd["w.nested_absmax"]
    with pytest.raises(ValueError, match="missing the tensor 'w.nested_absmax'"):
        from_bnb_state_dict(sd, "w")


def test_error_wrong_quant_map():
    sd = _sd()
    sd["w.quant_map"] = torch.linspace(-1, 1, 16)
    with pytest.raises(ValueError, match="not the NF4 code table"):
        from_bnb_state_dict(sd, "w")


def _with_meta(sd, key="w", **fields):
    """``sd`` with fields of its quant_state JSON replaced (a value of None removes the field)."""
    name = f"{key}.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[name].tolist()))
    meta.update(fields)
    meta = {k: v for k, v in meta.items() if v is not None}
    return {**sd, name: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize("nested_dtype", ["bfloat16", "float16"])
def test_nested_dtype_other_than_float32_is_refused(nested_dtype):
    """bitsandbytes decodes the nested absmax in nested_dtype (and adds the offset there): reading
    such a state as float32 would give other weights than bitsandbytes, without an error."""
    w = _weight((128, 192), torch.bfloat16, zero_block=False)
    sd = _with_meta(to_bnb_state_dict(quantize_nf4(w), "w"), nested_dtype=nested_dtype)
    qs = bnbf.QuantState.from_dict({k[2:]: v for k, v in sd.items() if k != "w"}, device="cpu")
    theirs = bnbf.dequantize_4bit(sd["w"], qs)
    ours_as_float32 = dequantize_nf4(from_bnb_state_dict(_with_meta(sd, nested_dtype="float32"), "w"))
    assert not torch.equal(theirs.view(torch.int16), ours_as_float32.view(torch.int16))
    with pytest.raises(ValueError, match=rf"nested_dtype must be 'float32', got '{nested_dtype}'"):
        from_bnb_state_dict(sd, "w")


def _grown(sd, name, extra):
    """``sd`` with ``extra`` values appended to tensor ``name`` (flattened, its dtype kept)."""
    t = sd[name].reshape(-1)
    return {**sd, name: torch.cat([t, t[:extra]])}


QS = r"'w\.quant_state\.bitsandbytes__nf4': "


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (
            lambda sd: _with_meta(sd, blocksize=32),
            QS + r"blocksize 32 is not supported; hoptune reads",
        ),
        (
            lambda sd: _with_meta(sd, dtype="float64"),
            QS + r"dtype must be one of \['bfloat16', 'float16', 'float32'\], got 'float64'",
        ),
        (
            lambda sd: _with_meta(sd, quant_type="fp4"),
            QS + r"quant_type must be 'nf4', got 'fp4'",
        ),
        (
            lambda sd: {
                **sd,
                "w.quant_state.bitsandbytes__nf4": torch.tensor(list(b"[1, 2]"), dtype=torch.uint8),
            },
            r"'w\.quant_state\.bitsandbytes__nf4' must hold a JSON object, got list",
        ),
        (lambda sd: _grown(sd, "w", 1), r"'w' holds 257 bytes but shape \[8, 64\] needs 256"),
        (lambda sd: _grown(sd, "w.absmax", 1), r"w\.absmax has 9 values, expected 8"),
        (
            lambda sd: _with_meta(sd, nested_blocksize=100),
            QS + r"nested_blocksize must be one of",
        ),
        (
            lambda sd: _with_meta(sd, nested_offset=float("nan")),
            QS + r"nested_offset must be a finite number, got nan",
        ),
        (
            lambda sd: {**sd, "w.absmax": sd["w.absmax"].float()},
            r"w\.absmax must be uint8 codes with double quantization, got torch\.float32",
        ),
        (
            lambda sd: _grown(sd, "w.nested_absmax", 1),
            r"w\.nested_absmax must be float32 \[1\], got torch\.float32 \(2,\)",
        ),
        (
            lambda sd: {**sd, "w.nested_quant_map": sd["w.nested_quant_map"][:255]},
            r"w\.nested_quant_map must be float32 \[256\], got torch\.float32 \(255,\)",
        ),
    ],
)
def test_each_bad_part_of_a_bitsandbytes_state_is_refused_naming_it(corrupt, match):
    """Each part of a double-quantized weight's state (8 x 64: 8 absmax codes, 1 nested absmax) is
    checked where it is read, so the error names the key and what it should hold; NF4Weight's own
    checks, which would catch some later, name none of the checkpoint's keys."""
    sd = _sd()
    assert from_bnb_state_dict(sd, "w").shape == (8, 64)
    with pytest.raises(ValueError, match=match):
        from_bnb_state_dict(corrupt(sd), "w")


def test_nested_dtype_is_required():
    # bitsandbytes' QuantState.from_dict reads it unconditionally (KeyError without it)
    sd = _with_meta(_sd(), nested_dtype=None)
    with pytest.raises(ValueError, match="lacks 'nested_dtype' although w.nested_absmax is present"):
        from_bnb_state_dict(sd, "w")


@pytest.mark.parametrize("shape", [(3, 7), (5, 40), (1, 33)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_partial_last_block_from_bitsandbytes_is_refused_as_such(shape, double_quant):
    """bitsandbytes quantizes any element count: a partial last block (and for an odd count, a
    last byte holding one code). The error says so, not that the file lacks a byte."""
    w = _weight(shape, torch.float32, zero_block=False)
    qb, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert qb.numel() == (w.numel() + 1) // 2
    with pytest.raises(ValueError, match=rf"has {w.numel()} elements, not a multiple of blocksize 64") as e:
        from_bnb_state_dict(_bnb_state_dict(qb, st), "w")
    assert "holds" not in str(e.value)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_saved_after_bitsandbytes_cpu_repacking_is_refused(double_quant):
    """Once bitsandbytes' CPU inference path has repacked a Linear4bit, its state dict holds the
    absmax re-quantized in the weight's dtype (nested_dtype bfloat16), or unquantized as bfloat16 in
    another order (which bitsandbytes itself no longer decodes to the layer's weights)."""
    import bitsandbytes.nn as bnn

    w = _weight((128, 192), torch.bfloat16, zero_block=False)
    lin = bnn.Linear4bit(192, 128, bias=False, compute_dtype=torch.bfloat16, compress_statistics=double_quant)
    lin.weight = bnn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant)
    lin = lin.to("cpu").eval()
    with torch.no_grad():
        lin(torch.randn(2, 192, dtype=torch.bfloat16))
    if not getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes does not repack NF4 weights on this CPU (no AVX512-BF16)")
    sd = lin.state_dict()
    with pytest.raises(ValueError, match="once its CPU inference path has repacked the layer") as e:
        from_bnb_state_dict(sd, "weight")
    assert ("nested_dtype must be 'float32'" if double_quant else "absmax must be float32") in str(e.value)


def _linear4bit(w, double_quant, quant_storage=torch.uint8):
    import bitsandbytes.nn as bnn

    out_f, in_f = w.shape
    lin = bnn.Linear4bit(
        in_f, out_f, bias=False, compress_statistics=double_quant, quant_storage=quant_storage
    )
    lin.weight = bnn.Params4bit(
        w,
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=double_quant,
        quant_storage=quant_storage,
    )
    return lin.to("cpu")


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_reads_linear4bit_state_of_any_quant_storage(quant_storage, double_quant):
    """quant_storage only changes the dtype the packed bytes are viewed as ([n/4, 1] bf16 ...)."""
    w = _weight((128, 192), torch.bfloat16)
    lin = _linear4bit(w, double_quant, quant_storage)
    sd = lin.state_dict()
    assert sd["weight"].dtype == quant_storage
    theirs = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    ours = dequantize_nf4(from_bnb_state_dict(sd, "weight"))
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_written_state_equals_linear4bit_state_dict(dtype, double_quant):
    """Key for key: dtype, shape and bytes (the quant_state JSON too) as Linear4bit saves them. The
    nested codes come from bitsandbytes' state (its CPU quantizer picks other codes than CUDA's for
    some); an all-zero block gets code 7 on its CPU path as in hoptune."""
    w = _weight((128, 192), dtype)
    theirs = _linear4bit(w, double_quant).state_dict()
    q = from_bnb_state_dict(theirs, "weight") if double_quant else quantize_nf4(w, double_quant=False)
    ours = to_bnb_state_dict(q, "weight")
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        assert (ours[k].dtype, ours[k].shape) == (t.dtype, t.shape), k
        assert torch.equal(ours[k], t), k


def test_fp64_never_reaches_the_kernels(monkeypatch):
    """Where the kernels run, fp64 (which they do not read) still takes the reference: the
    dispatch is checked here with the kernels standing in as available (the GPU test runs it)."""
    from hoptune import _lib
    from hoptune.ops import nf4 as nf4_ops

    def no_kernel(*a, **k):
        raise AssertionError("an fp64 tensor reached the CUDA extension")

    monkeypatch.setattr(_lib, "use_kernel", lambda t, op: True)
    monkeypatch.setattr(_lib, "extension", no_kernel)
    w = torch.randn(96, 128, dtype=torch.float64)
    packed, absmax, bad = nf4_ops.nf4_quantize(w, 64)
    rpacked, rabsmax = ref.nf4_quantize(w, 64)
    assert torch.equal(packed, rpacked) and torch.equal(absmax, rabsmax) and bad.item() == 0
    d = nf4_ops.nf4_dequantize(packed, absmax, None, None, 0.0, 64, 256, [96, 128], torch.float64)
    assert torch.equal(
        d, ref.nf4_dequantize(rpacked, rabsmax, None, None, 0.0, 64, 256, [96, 128], torch.float64)
    )


STATE_CASES = [
    "blocksize of another state",
    "short absmax",
    "shape of another size",
    "blocksize not dividing",
    "absmax2 without code2",
    "short absmax2",
    "blocksize2 of another state",
    "packed not uint8",
    "nested codes without absmax2",
    "packed longer than the shape",
    "packed not contiguous",
    "code2 of 255 values",
    "absmax2 not contiguous",
    "offset not finite",
]


def _state_cases(q):
    """{name: (args of nf4_dequantize, the text the error must hold)} for states that disagree
    with themselves: each would make the kernel read past absmax or mislabel the weights."""
    p, a, a2, c2, off, bs, bs2 = q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2
    shape = list(q.shape)
    cases = [
        ("blocksize of another state", (p, a, a2, c2, off, bs * 2, bs2, shape), "absmax must have"),
        ("short absmax", (p, a[:-1], a2, c2, off, bs, bs2, shape), "absmax must have"),
        ("shape of another size", (p, a, a2, c2, off, bs, bs2, [shape[0], shape[1] * 2]), "shape"),
        ("blocksize not dividing", (p, a, a2, c2, off, 96, bs2, shape), "blocksize"),
        ("absmax2 without code2", (p, a, a2, None, off, bs, bs2, shape), "code2"),
        ("short absmax2", (p, a, a2[:-1], c2, off, bs, bs2, shape), r"absmax2 must be float32 \[12\]"),
        (
            "blocksize2 of another state",
            (p, a, a2, c2, off, bs, bs2 * 2, shape),
            r"absmax2 must be float32 \[6\]",
        ),
        ("packed not uint8", (p.to(torch.int16), a, a2, c2, off, bs, bs2, shape), "packed"),
        ("nested codes without absmax2", (p, a, None, None, off, bs, bs2, shape), "absmax"),
        (
            "packed longer than the shape",
            (torch.cat([p, p[:32]]), a, a2, c2, off, bs, bs2, shape),
            r"packed holds 24640 codes but shape \(96, 256\) has 24576 elements",
        ),
        (
            "packed not contiguous",
            (torch.stack([p, p], 1)[:, 0], a, a2, c2, off, bs, bs2, shape),
            "packed must be contiguous",
        ),
        ("code2 of 255 values", (p, a, a2, c2[:-1], off, bs, bs2, shape), r"code2 must be float32 \[256\]"),
        (
            "absmax2 not contiguous",
            (p, a, torch.stack([a2, a2], 1)[:, 0], c2, off, bs, bs2, shape),
            "absmax2 must be contiguous",
        ),
        ("offset not finite", (p, a, a2, c2, float("nan"), bs, bs2, shape), "offset must be finite, got nan"),
    ]
    return {name: (args, text) for name, args, text in cases}


@pytest.mark.parametrize("case", STATE_CASES)
def test_dequantize_ops_refuse_a_state_whose_sizes_disagree(case):
    """The raw ops (hoptune.ops) check the state's sizes against each other: on the GPU a short
    absmax (a state read with the wrong blocksize) would be read past its end."""
    from hoptune.ops import nf4 as nf4_ops

    q = quantize_nf4(_weight((96, 256), torch.bfloat16), blocksize=64, double_quant=True, blocksize2=32)
    assert q.absmax2.numel() == 12  # (384 blocks in nested blocks of 32)
    args, text = _state_cases(q)[case]
    with pytest.raises((ValueError, TypeError), match=text):
        nf4_ops.nf4_dequantize(*args, torch.bfloat16)
    a = torch.randn(8, 256, dtype=torch.bfloat16)
    b = torch.randn(96, 8, dtype=torch.bfloat16)
    with pytest.raises((ValueError, TypeError), match=text):
        nf4_ops.nf4_dequantize_lora(*args, a, b, 0.5)


def test_quantize_nf4_double_quant_must_be_a_bool():
    """double_quant="no" quantized with double quantization (read by its truth), where the layers
    and load_model refuse anything but a bool."""
    w = torch.randn(4, 64)
    with pytest.raises(TypeError, match="double_quant must be True or False, got 'no'"):
        quantize_nf4(w, double_quant="no")


def test_nf4_weights_compare_by_identity_and_keep_a_torch_size():
    """The dataclass's generated == compared the tensors ("Boolean value of Tensor ... is
    ambiguous" from q in [q2, q]); a shape of NumPy ints is kept as a torch.Size of ints."""
    w = torch.randn(4, 64)
    q, q2 = quantize_nf4(w), quantize_nf4(w)
    assert q == q and q != q2 and q in [q2, q] and len({q, q2}) == 2
    shaped = NF4Weight(
        q.packed, q.absmax, (np.int64(4), np.int64(64)), q.dtype, 64, q.absmax2, q.code2, q.offset
    )
    assert type(shaped.shape) is torch.Size and all(type(d) is int for d in shaped.shape)
    assert json.dumps(list(shaped.shape)) == "[4, 64]"


@pytest.mark.parametrize("blocksize2", [64, 512])
def test_writing_a_nested_blocksize_bitsandbytes_cannot_run_is_refused(blocksize2):
    """bitsandbytes double-quantizes with nested blocksize 256 only; its matmul_4bit (every
    Linear4bit forward) raises NotImplementedError on another one, so such a checkpoint loaded
    in transformers but failed at its first forward. The write names blocksize2 instead."""
    import bitsandbytes as bnb

    w = _weight((128, 256), torch.bfloat16, zero_block=False)
    q = quantize_nf4(w, blocksize2=blocksize2)
    nested = bnbf.QuantState(q.absmax2, code=q.code2, blocksize=blocksize2, dtype=torch.float32)
    st = bnbf.QuantState(
        absmax=q.absmax,
        shape=q.shape,
        code=ref.nf4_code(),
        blocksize=64,
        quant_type="nf4",
        dtype=q.dtype,
        offset=torch.tensor(q.offset),
        state2=nested,
    )
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="state2.blocksize != 256"):
        bnb.matmul_4bit(x, q.packed.view(-1, 1).t(), quant_state=st)
    with pytest.raises(ValueError, match=rf"blocksize2 must be 256 .*got {blocksize2}"):
        to_bnb_state_dict(q, "w")
    # 256 still writes, and bitsandbytes runs it
    sd = to_bnb_state_dict(quantize_nf4(w), "w")
    qs = bnbf.QuantState.from_dict({k[2:]: v for k, v in sd.items() if k != "w"}, device="cpu")
    assert bnb.matmul_4bit(x, sd["w"].t(), quant_state=qs).shape == (2, 128)


def test_dtype_given_by_name_is_refused_as_a_string():
    """A dtype's name (as a YAML config holds it) was refused with "dtype must be bfloat16, float16
    or float32, got bfloat16", a message that contradicts itself; it shows the string now."""
    q = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype .*got 'bfloat16' \(a str\)"):
        dequantize_nf4(q, "bfloat16")
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype .*got 'float16' \(a str\)"):
        NF4Weight(q.packed, q.absmax, q.shape, "float16", 64, q.absmax2, q.code2, q.offset)
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype .*got torch\.float64"):
        dequantize_nf4(q, torch.float64)
