"""load_model errors about dtypes: a weight that does not fit the dtype asked for, and a
safetensors dtype the reader does not know, each named as such (not as a corrupt checkpoint)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hoptune
from hoptune.loading import read_safetensors_header
from tests.test_loading import tiny_model


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_weight_beyond_float16_names_dtype_not_the_checkpoint(tmp_path, stored):
    model = tiny_model(dtype=stored)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = -(2.0**17)  # finite, but inf in float16
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"up_proj\.weight holds values up to 131072 ") as err:
        hoptune.load_model(tmp_path, dtype=torch.float16, device="cpu", progress=False)
    assert "dtype=torch.float16" in str(err.value) and "check the checkpoint" not in str(err.value)
    # the dtype that holds it loads it
    ours = hoptune.load_model(tmp_path, dtype=torch.bfloat16, device="cpu", progress=False)
    assert ours.model.layers[1].mlp.up_proj.dequantize(torch.float32).abs().amax() > 1e5


def test_inf_stored_in_the_checkpoint_still_blames_the_checkpoint(tmp_path):
    model = tiny_model(dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[1, 2] = float("inf")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"o_proj\.weight: .*inf or NaN.*check the checkpoint"):
        hoptune.load_model(tmp_path, dtype=torch.float16, device="cpu", progress=False)


def test_absmax_whose_mean_overflows_float32_names_the_tensor_and_double_quant(tmp_path):
    # finite weights, but the mean of their block maxima is inf in float32: the error named an
    # internal field of the NF4 weight ("offset must be finite, got inf")
    model = tiny_model(dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.fill_(3e38)
    model.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"cannot quantize model\.layers\.0\.self_attn\.o_proj\.weight: double_quant=True .*mean "
        r"of their block maxima .*overflows float32 .*pass double_quant=False",
    ):
        hoptune.load_model(tmp_path, dtype=torch.float32, device="cpu", progress=False)
    ours = hoptune.load_model(tmp_path, dtype=torch.float32, device="cpu", progress=False, double_quant=False)
    assert torch.equal(
        ours.model.layers[0].self_attn.o_proj.dequantize(torch.float32),
        model.model.layers[0].self_attn.o_proj.weight,
    )


def _with_raw_dtype(path, key, name):
    """Rewrite the safetensors file ``path`` with tensor ``key`` recorded as dtype ``name``."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header[key]["dtype"] = name
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _with_extra_tensor(folder, key, name, n=8):
    """Add an ``n``-byte tensor ``key`` of safetensors dtype ``name`` (1 byte per element) to the
    checkpoint in ``folder``."""
    f = folder / "model.safetensors"
    sd = load_file(f)
    sd[key] = torch.randint(1, 255, (n,), dtype=torch.uint8)
    save_file(sd, f, metadata={"format": "pt"})
    _with_raw_dtype(f, key, name)
    return f


def test_unused_tensor_of_a_dtype_not_read_is_only_warned_about(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    f = _with_extra_tensor(tmp_path, "model.layers.0.scale", "F8_E8M0")
    # read_safetensors_header alone refuses it: its callers read every tensor
    match = r"'model\.layers\.0\.scale' has dtype 'F8_E8M0'.*it reads .*BF16"
    with pytest.raises(ValueError, match=match):
        read_safetensors_header(str(f))
    # as from_pretrained: the model loads and the tensor is reported as unused
    with pytest.warns(UserWarning, match=r"not used by LlamaForCausalLM.*model\.layers\.0\.scale"):
        ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    theirs = model.state_dict()
    for key, t in ours.state_dict().items():
        assert torch.equal(t, theirs[key]), key


def test_tensor_of_a_dtype_not_read_that_the_model_uses_is_an_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.post_attention_layernorm.weight"  # (64,) bfloat16: 128 bytes
    sd[key] = torch.randint(1, 255, (128,), dtype=torch.uint8)
    save_file(sd, f, metadata={"format": "pt"})
    _with_raw_dtype(f, key, "F8_E8M0")
    match = r"model\.safetensors: tensor 'model\.layers\.1\.post_\w+\.weight' has dtype 'F8_E8M0'"
    with pytest.raises(ValueError, match=match):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_sub_byte_dtype_not_read_is_checked_against_its_bytes(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    # F4: 4 bits an element, so 8 bytes hold 16 elements, not 8
    _with_extra_tensor(tmp_path, "model.layers.0.blocks", "F4")
    match = r"'model\.layers\.0\.blocks' spans 8 bytes but F4 \[8\] needs 4"
    with pytest.raises(ValueError, match=match):
        hoptune.load_model(tmp_path, device="cpu", progress=False)
    odd = tmp_path / "odd"
    tiny_model().save_pretrained(odd)
    _with_extra_tensor(odd, "model.layers.0.blocks", "F6_E2M3", n=9)  # 54 bits: not whole bytes
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.blocks' is F6_E2M3 \[9\], 54 bits"):
        hoptune.load_model(odd, device="cpu", progress=False)


def test_name_that_is_no_safetensors_dtype_is_an_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    _with_extra_tensor(tmp_path, "model.layers.0.scale", "Q4_K")  # safetensors cannot open the file
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.scale' has dtype 'Q4_K'"):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_other_quantized_checkpoint_is_refused_for_its_format_not_a_dtype(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    # an MXFP4 checkpoint's shape: E8M0 scales next to its weights; config.json names the format
    _with_extra_tensor(tmp_path, "model.layers.0.mlp.up_proj.weight_scale", "F8_E8M0")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    match = "quant_method': 'mxfp4'.*bitsandbytes 4-bit NF4 checkpoints only"
    with pytest.raises(ValueError, match=match):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_bitsandbytes_fp4_checkpoint_is_refused_by_its_config(tmp_path):
    # bitsandbytes' other 4-bit code: the same keys as NF4, another table
    tiny_model().save_pretrained(tmp_path / "dense")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    qm = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=cfg, device_map="cpu"
    )
    qm.save_pretrained(tmp_path / "fp4")
    match = "'bnb_4bit_quant_type': 'fp4'.*bitsandbytes 4-bit NF4 checkpoints only"
    with pytest.raises(ValueError, match=match):
        hoptune.load_model(tmp_path / "fp4", device="cpu", progress=False)


@pytest.mark.parametrize("fnuz", [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
def test_fnuz_float8_tensor_loads_as_from_pretrained_casts_it(tmp_path, fnuz):
    """safetensors' FNUZ float8 dtypes (F8_E4M3FNUZ, F8_E5M2FNUZ) were refused for a tensor the
    model uses; from_pretrained casts it to the model's dtype, and so does load_model now."""
    from transformers import AutoModelForCausalLM

    tiny_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.1.post_attention_layernorm.weight"
    sd[key] = (torch.rand(sd[key].shape) + 0.5).to(fnuz)
    save_file(sd, f, metadata={"format": "pt"})
    ours = hoptune.load_model(tmp_path, quantize=None, dtype=torch.bfloat16, device="cpu", progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    got = ours.state_dict()[key]
    assert got.dtype == torch.bfloat16 and torch.equal(got, theirs.state_dict()[key])
    assert torch.equal(got, sd[key].to(torch.bfloat16))
