"""load_model on sharded checkpoints whose shards do not hold what their index says."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file, save_file

import hoptune
from hoptune import loading
from tests.test_loading import tiny_model


def _no_reads(monkeypatch):
    def fail(self, entries):
        raise AssertionError("tensors were read before the missing tensor was reported")

    monkeypatch.setattr(loading._Reader, "stream_entries", fail)


@pytest.mark.parametrize("quantize, base", [(None, False), ("nf4", False), ("nf4", True)])
def test_shard_without_a_tensor_its_index_lists_names_both(tmp_path, monkeypatch, quantize, base):
    model = tiny_model(tie=True)
    # base: the files of the base model, keys without its prefix ("layers.1...")
    (model.model if base else model).save_pretrained(tmp_path, max_shard_size="40KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    key = "layers.1.mlp.down_proj.weight" if base else "model.layers.1.mlp.down_proj.weight"
    shard = weight_map[key]
    sd = load_file(tmp_path / shard)
    del sd[key]
    save_file(sd, tmp_path / shard, metadata={"format": "pt"})
    _no_reads(monkeypatch)
    k, f = re.escape(key), re.escape(shard)
    match = rf"lacks 1 tensors.*{k}.*lists {k} in {f}, which does not hold it"
    with pytest.raises(ValueError, match=match):
        hoptune.load_model(tmp_path, quantize=quantize, device="cpu", progress=False)


def test_missing_tensor_of_a_single_file_is_reported_before_reading(tmp_path, monkeypatch):
    tiny_model().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.norm.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _no_reads(monkeypatch)
    match = r"lacks 1 tensors .*\['model\.norm\.weight'\] \(a checkpoint"
    with pytest.raises(ValueError, match=match):
        hoptune.load_model(tmp_path, device="cpu", progress=False)
