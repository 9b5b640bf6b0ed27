"""load_model errors about dtypes: a weight that does not fit the dtype asked for, and a
safetensors dtype the reader does not know, each named as such (not as a corrupt checkpoint)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
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


def _with_raw_dtype(path, key, name):
    """Rewrite the safetensors file ``path`` with tensor ``key`` recorded as dtype ``name``."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header[key]["dtype"] = name
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_unknown_safetensors_dtype_names_the_dtype_and_tensor(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.scale"] = torch.randint(1, 255, (8,), dtype=torch.uint8)  # 1 byte each
    save_file(sd, f, metadata={"format": "pt"})
    _with_raw_dtype(f, "model.layers.0.scale", "F8_E8M0")
    match = r"'model\.layers\.0\.scale' has dtype 'F8_E8M0'.*it reads .*BF16"
    with pytest.raises(ValueError, match=match):
        read_safetensors_header(str(f))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.scale'"):
        hoptune.load_model(tmp_path, device="cpu", progress=False)
