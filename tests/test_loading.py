"""load_model: local safetensors checkpoints (single file or sharded), NF4 on load, pre-quantized
bitsandbytes checkpoints without re-quantization, and clear errors for bad folders and files."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hoptune
from hoptune.loading import _Reader, read_safetensors_header
from hoptune.nn import LoRALinear, NF4Linear
from hoptune.quant import dequantize_nf4, from_bnb_state_dict, quantize_nf4, save_pretrained_nf4
from tests.conftest import TINY_DECODER, poison_cuda_cache


def tiny_model(arch: str = "llama", tie: bool = False, dtype=torch.bfloat16, seed: int = 0):
    tf = transformers
    kw = dict(TINY_DECODER, max_position_embeddings=64, tie_word_embeddings=tie)
    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),  # biases on q/k/v
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**kw)).to(dtype).eval()


def ids():
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _bnb_checkpoint(src, dst, **config):
    """transformers + bitsandbytes quantize the checkpoint in ``src`` to NF4 and save it in ``dst``
    (``config``: BitsAndBytesConfig's fields besides load_in_4bit and the quant type); returns
    that model."""
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **config)
    qm = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu")
    qm.save_pretrained(dst)
    return qm


def logits(model):
    with torch.no_grad():
        return model(ids()).logits.float()


def nf4_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


@pytest.mark.parametrize(
    "arch, tie, shard",
    [
        ("llama", False, None),
        ("llama", False, "40KB"),
        ("qwen2", True, "40KB"),
        ("phi3", False, None),
        ("gemma2", True, None),
    ],
)
def test_dense_load_equals_from_pretrained(tmp_path, arch, tie, shard):
    model = tiny_model(arch, tie)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    assert not ours.training
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32  # computed, not read or cast


@pytest.mark.parametrize("arch, tie", [("llama", False), ("qwen2", True), ("phi3", False)])
def test_nf4_on_load(tmp_path, arch, tie):
    model = tiny_model(arch, tie)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    ours = hoptune.load_model(tmp_path, quantize="nf4", device="cpu", progress=False)
    layers = nf4_layers(ours)
    assert len(layers) == (8 if arch == "phi3" else 14)
    assert type(ours.lm_head) is torch.nn.Linear  # the output head stays dense
    if arch == "qwen2":
        assert layers["model.layers.0.self_attn.q_proj"].bias is not None
    # same as quantizing the checkpoint's weights ourselves
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    for name, layer in layers.items():
        w = ref.get_submodule(name).weight.data
        q = hoptune.quantize_nf4(w.contiguous())
        assert torch.equal(layer.weight_packed, q.packed) and torch.equal(layer.weight_absmax, q.absmax), name
        w.copy_(dequantize_nf4(q))
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)
    # LoRA on top, without dequantizing
    packed = {n: m.weight_packed for n, m in layers.items()}
    hoptune.apply_lora(ours, r=4)
    assert all(ours.get_submodule(n).weight_packed is p for n, p in packed.items())
    assert all(isinstance(ours.get_submodule(n), LoRALinear) for n in packed)
    ours.train()
    ours(input_ids=ids(), labels=ids()).loss.backward()
    for n in packed:  # (B starts at zero: A's gradient is zero on this first step, B's is not)
        grad = ours.get_submodule(n).lora_B.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, n


def test_peft_adapter_onto_an_nf4_model(tmp_path):
    import peft

    base = tiny_model(dtype=torch.float32)
    base.save_pretrained(tmp_path / "ckpt")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=True
    )
    peft.get_peft_model(base, cfg).save_pretrained(tmp_path / "adapter")
    model = hoptune.load_model(tmp_path / "ckpt", device="cpu", dtype=torch.float32, progress=False)
    packed = {n: m.weight_packed for n, m in nf4_layers(model).items()}
    want = logits(model)
    hoptune.load_adapter(model, tmp_path / "adapter")
    assert all(
        model.get_submodule(n).quantized and model.get_submodule(n).weight_packed is p
        for n, p in packed.items()
    )
    assert (logits(model) - want).abs().max() > 1e-3  # the adapter is in
    hoptune.remove_lora(model)
    torch.testing.assert_close(logits(model), want, atol=0, rtol=0)


def test_skip_modules_and_progress(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path)
    ours = hoptune.load_model(tmp_path, device="cpu", skip_modules=["down_proj"], progress=True)
    assert type(ours.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(ours.model.layers[0].mlp.up_proj, NF4Linear)
    assert "Loading" in capsys.readouterr().err


def test_prequantized_bnb_checkpoint_loads_without_requantizing(tmp_path):
    import bitsandbytes  # noqa: F401

    tiny_model().save_pretrained(tmp_path / "bf16")
    qm = _bnb_checkpoint(
        tmp_path / "bf16",
        tmp_path / "nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    want = logits(qm)
    ours = hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    assert not hasattr(ours.config, "quantization_config")
    sd = load_file(tmp_path / "nf4" / "model.safetensors")
    layers = nf4_layers(ours)
    assert len(layers) == 14
    for name, layer in layers.items():
        q = from_bnb_state_dict(sd, f"{name}.weight")
        assert torch.equal(layer.weight_packed, q.packed) and torch.equal(layer.weight_absmax, q.absmax), name
        assert layer._nf4_meta[3] == q.offset
    torch.testing.assert_close(logits(ours), want, atol=2e-2, rtol=2e-2)  # bnb's CPU matmul path


def test_our_nf4_checkpoint_loads(tmp_path):
    model = tiny_model()
    save_pretrained_nf4(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)  # NF4 as stored
    for name, layer in nf4_layers(ours).items():
        assert torch.equal(layer.weight_packed, from_bnb_state_dict(sd, f"{name}.weight").packed)
    assert len(nf4_layers(ours)) == 14


@pytest.mark.parametrize("tie", [False, True])
def test_an_nf4_model_saves_as_it_is(tmp_path, tie):
    tiny_model("qwen2", tie).save_pretrained(tmp_path / "bf16")  # qwen2: biases on q/k/v
    model = hoptune.load_model(tmp_path / "bf16", device="cpu", skip_modules=["down_proj"], progress=False)
    packed = {n: m.weight_packed for n, m in nf4_layers(model).items()}
    # by default the layers load_model kept dense stay dense (down_proj was quantized, unsaid)
    assert sorted(save_pretrained_nf4(model, tmp_path / "as_loaded")) == sorted(packed)
    config = json.loads((tmp_path / "as_loaded" / "config.json").read_text())["quantization_config"]
    assert [s for s in config["llm_int8_skip_modules"] if "down_proj" in s] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    again = hoptune.load_model(tmp_path / "as_loaded", device="cpu", progress=False)
    assert sorted(nf4_layers(again)) == sorted(packed)
    assert type(again.model.layers[1].mlp.down_proj) is torch.nn.Linear
    # named skip_modules quantize them
    names = save_pretrained_nf4(model, tmp_path / "nf4", skip_modules=["lm_head"])
    assert len(packed) == 12 and len(names) == 14  # the NF4 layers as they are, down_proj quantized
    sd = load_file(tmp_path / "nf4" / "model.safetensors")
    assert not [k for k in sd if "weight_" in k or "nf4_meta" in k]  # no raw NF4 buffers
    assert all(torch.equal(from_bnb_state_dict(sd, f"{n}.weight").packed, p) for n, p in packed.items())
    for i in range(2):  # the in-memory model with down_proj as saved
        q = from_bnb_state_dict(sd, f"model.layers.{i}.mlp.down_proj.weight")
        model.model.layers[i].mlp.down_proj = NF4Linear(q)
    loaded = hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    assert len(nf4_layers(loaded)) == 14
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_save_pretrained_nf4_refuses_lora_and_other_nf4_settings(tmp_path):
    tiny_model().save_pretrained(tmp_path / "bf16")
    model = hoptune.load_model(tmp_path / "bf16", device="cpu", blocksize=128, progress=False)
    out = tmp_path / "nf4"
    with pytest.raises(
        ValueError,
        match=r"layers\.0\.self_attn\.q_proj is NF4 already with blocksize=128, double_quant=True, but "
        r"blocksize=64, double_quant=True were asked for; pass blocksize=128",
    ):
        save_pretrained_nf4(model, out, blocksize=64)
    with pytest.raises(ValueError, match=r"q_proj is in skip_modules=\['lm_head', 'q_proj'\] but is NF4"):
        save_pretrained_nf4(model, out, blocksize=128, skip_modules=["lm_head", "q_proj"])
    want = logits(model)
    hoptune.apply_lora(model, r=4)
    with pytest.raises(ValueError, match=r"model has 14 LoRA layers.*merge_and_unload.*remove_lora"):
        save_pretrained_nf4(model, out, blocksize=128)
    assert not out.exists()
    hoptune.remove_lora(model)
    assert len(save_pretrained_nf4(model, out, blocksize=128)) == 14
    loaded = hoptune.load_model(out, device="cpu", progress=False)
    torch.testing.assert_close(logits(loaded), want, atol=0, rtol=0)


def test_save_pretrained_nf4_takes_the_nf4_layers_settings_by_default(tmp_path):
    """By default the blocksize and double quantization of the NF4 layers the model holds: a model
    loaded with blocksize=128 and no double quantization saved as it is (64 and True were asked for,
    and refused); layers of two settings need them named."""
    tiny_model().save_pretrained(tmp_path / "bf16")
    model = hoptune.load_model(
        tmp_path / "bf16", device="cpu", blocksize=128, double_quant=False, progress=False
    )
    save_pretrained_nf4(model, tmp_path / "nf4")
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_use_double_quant"] is False
    loaded = hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    assert {n: (m.weight_nf4.blocksize, m.weight_nf4.nested) for n, m in nf4_layers(loaded).items()} == {
        n: (128, False) for n in nf4_layers(model)
    }
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    q_proj = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = NF4Linear(quantize_nf4(q_proj.dequantize(), blocksize=64))
    with pytest.raises(
        ValueError, match=r"NF4 layers were quantized with blocksize \[64, 128\].*pass blocksize"
    ):
        save_pretrained_nf4(model, tmp_path / "mixed")
    assert not (tmp_path / "mixed" / "model.safetensors").exists()


def _stream_all(reader, path):
    entries = sorted(read_safetensors_header(path).values(), key=lambda e: e.start)
    return {e.key: t.clone() for e, t in reader.stream_entries(entries)}


READERS = {
    "direct": dict(),
    "direct-1-thread": dict(threads=1),
    "staged": dict(chunk=1000, slots=3, staged=True, threads=4),
    "staged-1-slot": dict(chunk=777, slots=1, staged=True, threads=3),
    "staged-big-chunk": dict(chunk=1 << 20, slots=2, staged=True),
}


@pytest.mark.parametrize("how", sorted(READERS))
def test_reader_reassembles_chunks(tmp_path, how):
    """The pinned-buffer ring of the CUDA path, run on the CPU with tiny chunks, and the direct
    reads of the CPU path, with several threads."""
    tiny_model().save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    sd = load_file(path)
    got = _stream_all(_Reader(torch.device("cpu"), **READERS[how]), path)
    assert got.keys() == sd.keys()
    for key, t in sd.items():
        assert t.dtype == got[key].dtype and torch.equal(got[key], t), key


def _write_raw(path, layout, total):
    """A safetensors file with ``layout`` = [(key, dtype name, shape, begin)] placed where asked
    (gaps, overlaps); the data section is ``total`` bytes counting 0, 1, 2, ... mod 251."""
    header = {}
    for key, dt, shape, begin in layout:
        nbytes = math.prod(shape) * {"U8": 1, "BF16": 2, "F32": 4, "I64": 8}[dt]
        header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytes(i % 251 for i in range(total))
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)
    return data


@pytest.mark.parametrize("how", sorted(READERS))
def test_reader_odd_sizes_gaps_overlaps_and_many_small_tensors(tmp_path, how):
    layout, pos = [], 0
    for i in range(700):  # many small tensors, odd sizes, some empty, sometimes a gap
        n = (i * 37) % 97
        layout.append((f"small.{i}", "U8", (n,), pos))
        pos += n + (13 if i % 50 == 7 else 0)
    layout.append(("big.odd", "U8", (3, 12347), pos))  # spans several chunks of the ring
    pos += 3 * 12347
    layout.append(("big.bf16", "BF16", (5, 1001), pos + (1 << 21)))  # after a gap > 1 MiB
    layout.append(("overlap", "U8", (100,), pos - 50))  # shares bytes with big.odd
    layout.append(("f32", "F32", (3, 3), 8))
    layout.append(("empty", "F32", (0, 4), 0))
    total = pos + (1 << 21) + 2 * 5 * 1001
    path = str(tmp_path / "odd.safetensors")
    data = _write_raw(path, layout, total)
    entries = read_safetensors_header(path)
    got = _stream_all(_Reader(torch.device("cpu"), **READERS[how]), path)
    assert got.keys() == entries.keys()
    base = entries["empty"].start
    for key, e in entries.items():
        want = torch.tensor(list(data[e.start - base : e.start - base + e.nbytes]), dtype=torch.uint8)
        t = got[key]
        assert t.dtype == e.dtype and tuple(t.shape) == e.shape, key
        assert torch.equal(t.reshape(-1).view(torch.uint8), want), key


def test_plan_chunks_shares_reads_and_splits_big_tensors(tmp_path):
    from hoptune.loading import _plan_chunks

    layout = [
        ("a", "U8", (10,), 0),
        ("b", "U8", (20,), 10),
        ("c", "U8", (2500,), 40),
        ("d", "U8", (5,), 10_000),
    ]
    path = str(tmp_path / "x.safetensors")
    _write_raw(path, layout, 10_005)
    entries = sorted(read_safetensors_header(path).values(), key=lambda e: e.start)
    chunks, last = _plan_chunks(entries, chunk=1000, max_gap=100)
    assert [(c.end - c.start, len(c.pieces)) for c in chunks] == [(1000, 3), (1000, 1), (540, 1), (5, 1)]
    assert last == [0, 0, 2, 3]
    assert sum(n for c in chunks for *_, n in c.pieces) == sum(e.nbytes for e in entries)
    chunks, _ = _plan_chunks(entries, chunk=1000, max_gap=100, max_pieces=2)
    assert [len(c.pieces) for c in chunks] == [2, 1, 1, 1, 1]
    # a gap wider than max_gap inside one chunk's reach starts another read (its bytes are not read)
    path = str(tmp_path / "y.safetensors")
    _write_raw(path, [("e", "U8", (10,), 0), ("f", "U8", (10,), 500)], 510)
    entries = sorted(read_safetensors_header(path).values(), key=lambda e: e.start)
    chunks, _ = _plan_chunks(entries, chunk=1000, max_gap=100)
    assert [(c.end - c.start, len(c.pieces)) for c in chunks] == [(10, 1), (10, 1)]
    chunks, _ = _plan_chunks(entries, chunk=1000, max_gap=490)
    assert [(c.end - c.start, len(c.pieces)) for c in chunks] == [(510, 2)]


@pytest.mark.parametrize("how", sorted(READERS))
def test_reader_file_cut_after_its_header_was_read(tmp_path, how):
    tiny_model().save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    entries = sorted(read_safetensors_header(path).values(), key=lambda e: e.start)
    os.truncate(path, entries[len(entries) // 2].start + 3)
    reader = _Reader(torch.device("cpu"), **READERS[how])
    with pytest.raises(
        ValueError, match=r"model\.safetensors is truncated: it is \d+ bytes but its tensors run to byte"
    ):
        for _ in reader.stream_entries(entries):
            pass


def test_pread_of_a_file_cut_while_being_read(tmp_path, monkeypatch):
    """A file cut short after the reader checked its size: os.preadv comes back short."""
    from hoptune import loading

    tiny_model().save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    entries = sorted(read_safetensors_header(path).values(), key=lambda e: e.start)
    data = (tmp_path / "model.safetensors").read_bytes()
    real = os.fstat

    def fstat_then_cut(fd):
        st = real(fd)
        os.truncate(path, entries[len(entries) // 2].start + 3)
        return st

    monkeypatch.setattr(loading.os, "fstat", fstat_then_cut)
    for staged in (False, True):
        with open(path, "wb") as f:
            f.write(data)
        reader = _Reader(torch.device("cpu"), chunk=4096, slots=2, staged=staged, method="pread")
        with pytest.raises(
            ValueError, match=r"model\.safetensors ended early at byte \d+: the file is truncated"
        ):
            for _ in reader.stream_entries(entries):
                pass


def test_nf4_stream_equals_quantize_nf4():
    from hoptune.loading import _NF4Stream

    torch.manual_seed(0)
    ws = [torch.randn(64, 96).to(torch.bfloat16), torch.randn(7, 128) * 100, torch.zeros(2, 64).half()]
    for blocksize, dq in [(64, True), (128, False), (64, False)]:
        got = {}
        s = _NF4Stream(torch.device("cpu"), len(ws), blocksize, dq, got.__setitem__)
        for i, w in enumerate(ws):
            s.submit("f", f"w{i}", i, w)
            s.poll()
        s.finish()
        for i, w in enumerate(ws):
            want, q = hoptune.quantize_nf4(w, blocksize=blocksize, double_quant=dq), got[i]
            assert q.offset == want.offset and q.shape == want.shape and q.dtype == want.dtype
            for a, b in [(q.packed, want.packed), (q.absmax, want.absmax), (q.absmax2, want.absmax2)]:
                assert (a is None and b is None) or torch.equal(a, b)


def test_nan_weight_names_the_tensor(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    with pytest.raises(
        ValueError, match=r"cannot quantize model\.layers\.1\.mlp\.up_proj\.weight: .*inf or NaN"
    ):
        hoptune.load_model(tmp_path, device="cpu", progress=False)
    ours = hoptune.load_model(tmp_path, device="cpu", progress=False, skip_modules=["up_proj"])
    assert torch.isnan(ours.model.layers[1].mlp.up_proj.weight).any()  # dense layers keep it


def test_wrong_shape_names_the_tensor(tmp_path):
    from safetensors.torch import save_file

    tiny_model().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"] = sd["model.layers.0.mlp.down_proj.weight"].reshape(128, 64)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"down_proj\.weight has shape \[128, 64\] but LlamaForCausalLM needs \[64, 128\]"
    ):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_keep_in_fp32_modules_as_from_pretrained(tmp_path, monkeypatch, dtype):
    # _keep_in_fp32_modules for float16 only, _keep_in_fp32_modules_strict for float16 and bfloat16;
    # each a regular expression searched for in the tensor's name, "*" for any text
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_keep_in_fp32_modules", ["embed_tokens"])
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["layers.1.*norm"])
    tiny_model().save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", dtype=dtype, progress=False)
    want, got = ref.state_dict(), ours.state_dict()
    assert {k: t.dtype for k, t in got.items()} == {k: t.dtype for k, t in want.items()}
    assert all(torch.equal(got[k], want[k]) for k in want)
    fp32 = {k for k, t in got.items() if t.dtype == torch.float32}
    strict = {f"model.layers.1.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
    expect = {
        torch.bfloat16: strict,
        torch.float16: strict | {"model.embed_tokens.weight"},
        torch.float32: set(want),
    }[dtype]
    assert fp32 == expect


def test_keep_in_fp32_modules_stay_dense_with_nf4(tmp_path, monkeypatch):
    """transformers + bitsandbytes never convert a model's _keep_in_fp32_modules (whatever the
    dtype), and save_pretrained_nf4 keeps them dense: load_model quantized them."""
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_keep_in_fp32_modules", ["o_proj"])
    tiny_model().save_pretrained(tmp_path)
    ours = hoptune.load_model(tmp_path, quantize="nf4", device="cpu", progress=False)
    attn = ours.model.layers[0].self_attn
    assert type(attn.o_proj) is torch.nn.Linear and isinstance(attn.q_proj, NF4Linear)


def test_strict_fp32_linear_is_quantized_from_float32_as_bitsandbytes(tmp_path, monkeypatch):
    """A plain linear layer in _keep_in_fp32_modules_strict (HY-V4's indexer.weights_proj) is
    quantized by transformers + bitsandbytes from its float32 weight, and computes in float32;
    load_model quantized the weight cast to the model's dtype (other absmax, other codes: up to
    2e-3 off in the weights) and computed in bf16."""
    import bitsandbytes

    monkeypatch.setattr(transformers.LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["o_proj"])
    tiny_model(dtype=torch.float32).save_pretrained(tmp_path)
    cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, quantization_config=cfg, device_map="cpu"
    )
    ours = hoptune.load_model(tmp_path, device="cpu", dtype=torch.bfloat16, progress=False)
    for i in range(2):
        theirs = ref.model.layers[i].self_attn.o_proj.weight
        mine = ours.model.layers[i].self_attn.o_proj
        assert theirs.quant_state.dtype == torch.float32 and mine.base_dtype == torch.float32
        want = bitsandbytes.functional.dequantize_4bit(theirs.data, theirs.quant_state).float()
        assert torch.equal(mine.dequantize(torch.float32), want)
        assert ours.model.layers[i].self_attn.q_proj.base_dtype == torch.bfloat16


def test_router_kept_in_fp32_as_from_pretrained(tmp_path):
    if not hasattr(transformers, "Dots1ForCausalLM"):
        pytest.skip("this transformers has no Dots1")
    from safetensors.torch import save_file

    cfg = transformers.Dots1Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=64,
        n_group=1,
        topk_group=1,
    )
    torch.manual_seed(0)
    model = transformers.Dots1ForCausalLM(cfg).eval()
    with torch.no_grad():  # a routing bias that bfloat16 would round (its values near 1)
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 1e-3).add_(1.0)
    model.save_pretrained(tmp_path)
    # the model's own tensor names (fused experts): the layout load_model reads
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    gate = ours.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)


def test_moe_checkpoint_in_a_converted_layout_is_refused(tmp_path):
    from safetensors.torch import save_file

    cfg = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    saved = read_safetensors_header(str(tmp_path / "model.safetensors"))
    if set(saved) != set(model.state_dict()):  # transformers >= 5: per-expert tensors on disk
        with pytest.raises(ValueError) as err:
            hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
        msg = str(err.value)
        assert "MixtralForCausalLM in the layout that transformers converts while loading" in msg
        assert "does not support this architecture's checkpoint layout yet" in msg
        assert "from_pretrained" in msg and "apply_lora(model, quantize='nf4'" in msg
        assert "incomplete" not in msg and "lacks" not in msg
    # with the model's own tensor names (fused experts) it loads as from_pretrained does
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)


def test_a_checkpoint_transformers_reshapes_while_loading_is_named_so(tmp_path):
    """Inkling 2 stores its vocabulary padded (128 rows here) and transformers cuts it to
    unpadded_vocab_size while loading: load_model called that "a checkpoint for another
    configuration?"; it is named as the converted layout it is, with the route that loads it."""
    from tests.conftest import TINY_DECODER

    cfg = transformers.AutoConfig.for_model(
        "inkling2_text", **TINY_DECODER, unpadded_vocab_size=120, head_dim=16
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    msg = str(err.value)
    assert "in the layout that transformers converts while loading" in msg
    assert "of shape [128, 64] where the model has [120, 64]" in msg and "another configuration" not in msg
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # (the route the message gives)


def _gemma3_multimodal():
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
        max_position_embeddings=64,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16).eval()


def test_incomplete_checkpoint_of_a_model_transformers_only_renames_names_the_missing_tensor(tmp_path):
    # Gemma 3's conversion mapping in transformers 5 only renames keys (language_model.model. ->
    # model.language_model.), which load_model does too: a tensor missing from its files is a
    # missing tensor, not a layout load_model cannot read
    _gemma3_multimodal().save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    want, got = ref.state_dict(), ours.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    sd = load_file(tmp_path / "model.safetensors")
    gone = next(k for k in sd if k.endswith("layers.1.mlp.up_proj.weight"))
    sd.pop(gone)
    sd[gone.replace("layers.1.mlp.up_proj", "layers.0.extra")] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="not used by Gemma3ForConditionalGeneration.*extra"):
        with pytest.raises(ValueError, match=r"lacks 1 tensors.*layers\.1\.mlp\.up_proj\.weight"):
            hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)


# -- bad input --------------------------------------------------------------------------------
def test_missing_path_and_folder_problems(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*never downloads"):
        hoptune.load_model(tmp_path / "nope", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hoptune.load_model("meta-llama/Meta-Llama-3-8B", device="cpu")  # a hub name is not a folder
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        hoptune.load_model(tmp_path / "f", device="cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hoptune.load_model(tmp_path, device="cpu")
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        hoptune.load_model(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="quantize must be"):
        hoptune.load_model(tmp_path, quantize="int4", device="cpu")


def test_dtype_by_name_as_from_pretrained_takes_it(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    named = hoptune.load_model(tmp_path, quantize=None, device="cpu", dtype="float32", progress=False)
    typed = hoptune.load_model(tmp_path, quantize=None, device="cpu", dtype=torch.float32, progress=False)
    assert named.dtype == torch.float32
    torch.testing.assert_close(logits(named), logits(typed), atol=0, rtol=0)
    short = hoptune.load_model(tmp_path, quantize=None, device="cpu", dtype="fp32", progress=False)
    assert short.dtype == torch.float32  # (the config's spelling, model.dtype: fp32)
    with pytest.raises(TypeError, match=r"dtype must be torch\.float32, torch\.bfloat16 .* got 'auto'"):
        hoptune.load_model(tmp_path, quantize=None, device="cpu", dtype="auto")


def test_config_dtype_auto_loads_as_from_pretrained(tmp_path):
    # from_pretrained(path, dtype=...) reads a config.json whose dtype is "auto" (the dtype asked
    # for wins); building the config alone fails on it (torch has no attribute "auto")
    tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "auto"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    assert ours.config.to_dict() == ref.config.to_dict()
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"rope_parameters": {"rope_type": "linear"}}, "factor"),  # a KeyError in transformers
        ({"hidden_size": "64"}, "hidden_size"),  # huggingface_hub's validation error
    ],
)
def test_invalid_config_json_names_the_file(tmp_path, edit, match):
    tiny_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"cannot read .*config\.json: .*{match}"):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


@pytest.mark.parametrize("device", ["mps", "meta", "xpu"])
def test_device_other_than_cuda_or_cpu_is_refused_up_front(tmp_path, device):
    # the reader fills CPU tensors through numpy and CUDA ones through pinned buffers: any other
    # device failed late (after the model was built) with an error about numpy or the torch build
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"device must be 'cuda', 'cuda:N' or 'cpu', got '{device}'"):
        hoptune.load_model(tmp_path, device=device, progress=False)


def test_device_as_an_int_or_an_unknown_name_is_named(tmp_path, monkeypatch):
    tiny_model().save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine
    # an int is that GPU (torch's own error on a CPU machine named no argument)
    with pytest.raises(ValueError, match="device='cuda:0' but no CUDA device is visible"):
        hoptune.load_model(tmp_path, device=0, progress=False)
    with pytest.raises(ValueError, match="device must be 'cuda', 'cuda:N' or 'cpu', got 'gpu'"):
        hoptune.load_model(tmp_path, device="gpu", progress=False)


def test_cuda_device_index_beyond_the_visible_ones_is_refused(tmp_path, monkeypatch):
    tiny_model().save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine
    with pytest.raises(ValueError, match="device='cuda' but no CUDA device is visible; pass device='cpu'"):
        hoptune.load_model(tmp_path, device="cuda", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:2' but only 1 CUDA device is visible \(cuda:0\)"):
        hoptune.load_model(tmp_path, device="cuda:2", progress=False)


def test_cuda_without_an_index_is_the_current_gpu(monkeypatch):
    """device='cuda' (or an int, or torch.device('cuda')) resolves to a GPU index: 'cuda' to the
    current GPU's, as torch places a tensor made with device='cuda', so that the loader's
    comparisons with its tensors' devices (cuda:N) and its `with torch.cuda.device(device)` on
    the reader's thread name that GPU. Stood in here: two visible GPUs, the second current."""
    from hoptune.ops import _check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _check.device("device", "cuda") == torch.device("cuda", 1)
    assert _check.device("device", torch.device("cuda")) == torch.device("cuda", 1)
    assert _check.device("device", "cuda:0") == torch.device("cuda", 0)
    assert _check.device("device", 0) == torch.device("cuda", 0)
    assert _check.device("device", "cpu") == torch.device("cpu")


@pytest.mark.gpu
def test_cuda_without_an_index_is_the_current_gpu_on_the_gpu():
    """On a GPU machine: 'cuda' is the current GPU's index, the device a tensor made with
    device='cuda' lands on."""
    from hoptune.ops import _check

    dev = _check.device("device", "cuda")
    assert dev.index is not None and dev == torch.empty(0, device="cuda").device
    with torch.cuda.device(0):
        assert _check.device("device", "cuda") == torch.device("cuda", 0)
        assert _check.device("device", torch.device("cuda")) == torch.device("cuda", 0)


@pytest.mark.parametrize("cut", [0.5, 0.999, 4, 100])  # (100: inside the header)
def test_truncated_file_names_the_file(tmp_path, cut):
    tiny_model().save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    data = (tmp_path / shard).read_bytes()
    n = int(len(data) * cut) if cut < 1 else cut
    (tmp_path / shard).write_bytes(data[:n])
    with pytest.raises(ValueError, match=f"{shard}.*(truncated|too short)"):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_corrupt_header_and_index(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    data = bytearray((tmp_path / shard).read_bytes())
    data[9:14] = b"\xff\xfe{[:"
    (tmp_path / shard).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard}.*header is not valid JSON"):
        hoptune.load_model(tmp_path, device="cpu", progress=False)
    os.unlink(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=f"lists {shard}"):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="not used by LlamaForCausalLM.*extra"):
        with pytest.raises(ValueError, match=r"lacks 1 tensors.*model\.layers\.1\.mlp\.up_proj"):
            hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_folder_of_trainer_state_only_gets_no_hint_at_another_format(tmp_path):
    # a training run's folder without its weights (DeepSpeed ZeRO-3 keeps them in global_step*/)
    # holds trainer state: the error named optimizer.pt or the like as if it were the weights
    tiny_model().config.save_pretrained(tmp_path)
    for name in ("optimizer.pt", "rng_state_0.pth", "scheduler.pt", "training_args.bin"):
        torch.save({"state": torch.rand(3)}, tmp_path / name)
    with pytest.raises(FileNotFoundError) as err:
        hoptune.load_model(tmp_path, device="cpu", progress=False)
    assert str(err.value).endswith("nor model.safetensors.index.json"), str(err.value)
    torch.save(tiny_model().state_dict(), tmp_path / "pytorch_model-00001-of-00002.bin")
    with pytest.raises(
        FileNotFoundError, match=r"found pytorch_model-00001-of-00002\.bin: .*safetensors only"
    ):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_index_naming_shards_in_a_subfolder_loads_as_from_pretrained(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="40KB")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    (tmp_path / "weights").mkdir()
    for name in set(index["weight_map"].values()):
        os.rename(tmp_path / name, tmp_path / "weights" / name)
    index["weight_map"] = {k: f"weights/{v}" for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)
    # a name that leads out of the folder stays an error
    first = next(iter(index["weight_map"]))
    (tmp_path.parent / "elsewhere.safetensors").write_bytes(b"")
    for bad in ("../elsewhere.safetensors", str(tmp_path.parent / "elsewhere.safetensors")):
        index["weight_map"][first] = bad
        index_file.write_text(json.dumps(index))
        with pytest.raises(ValueError, match="must name a file inside the folder"):
            hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_other_quantization_methods_are_refused(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bitsandbytes 4-bit NF4 checkpoints only"):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


@pytest.mark.gpu
def test_load_on_gpu_equals_cpu(tmp_path):
    tiny_model("qwen2", tie=True).save_pretrained(tmp_path, max_shard_size="40KB")
    cpu = hoptune.load_model(tmp_path, device="cpu", progress=False)
    poison_cuda_cache()
    gpu = hoptune.load_model(tmp_path, device="cuda", progress=False)
    for name, layer in nf4_layers(cpu).items():
        other = gpu.get_submodule(name)
        assert other.weight_packed.is_cuda
        assert torch.equal(other.weight_packed.cpu(), layer.weight_packed), name
    with torch.no_grad():
        got = gpu(ids().cuda()).logits.float().cpu()
    torch.testing.assert_close(got, logits(cpu), atol=2e-2, rtol=2e-2)
    shutil.rmtree(tmp_path)


def test_bench_script_logic(tmp_path, monkeypatch):
    """bench/bench_loading.py --tiny: writer, reads, load, layer check and the bitsandbytes save."""
    import importlib.util

    import bitsandbytes  # noqa: F401

    bench = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "bench_loading.py")
    spec = importlib.util.spec_from_file_location("bench_loading", bench)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "loading.json"
    assert mod.main(["--tiny", "--dir", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["layers_match_quantize_nf4"] and res["bnb_logits_match"] and res["shards"] > 1
    assert os.listdir(tmp_path / "ckpt") == []  # the checkpoint is deleted, the folder given is kept


def test_prequantized_weight_of_another_shape_names_the_tensor(tmp_path):
    import json

    from safetensors.torch import save_file

    save_pretrained_nf4(tiny_model(), tmp_path / "nf4")
    cfg = json.loads((tmp_path / "nf4" / "config.json").read_text())
    cfg["intermediate_size"] = 192  # a model of another size: its mlp weights have more values
    (tmp_path / "nf4" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.down_proj\.weight holds 8192 4-bit codes but LlamaForCausalLM needs",
    ):
        hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    # as many values, another shape (in the quant state): also refused, naming the tensor
    cfg["intermediate_size"] = 128
    (tmp_path / "nf4" / "config.json").write_text(json.dumps(cfg))
    sd = load_file(tmp_path / "nf4" / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta["shape"] = [64, 128]
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(sd, tmp_path / "nf4" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: the NF4 weight model\.layers\.0\.mlp\.up_proj\.weight has shape "
        r"\[64, 128\] but LlamaForCausalLM needs \[128, 64\]",
    ):
        hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)


def test_skip_modules_as_a_bare_string_is_refused(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "bf16")
    with pytest.raises(TypeError, match=r"skip_modules must be a list .*pass \['down_proj'\]"):
        hoptune.load_model(tmp_path / "bf16", device="cpu", skip_modules="down_proj", progress=False)
    with pytest.raises(TypeError, match=r"skip_modules must be a list .*pass \['lm_head'\]"):
        save_pretrained_nf4(model, tmp_path / "nf4", skip_modules="lm_head")
    assert not os.path.exists(tmp_path / "nf4" / "model.safetensors")


@pytest.mark.parametrize("dq", [None, "no"])
def test_double_quant_that_is_no_bool_is_refused(tmp_path, dq):
    # None quantized without double quantization, where apply_lora's None means True
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=rf"double_quant must be True or False, got {dq!r}"):
        hoptune.load_model(tmp_path, device="cpu", double_quant=dq, progress=False)


def test_blocksize_that_is_no_int_is_refused_before_reading_and_numpy_ints_load(tmp_path):
    # 64.0 passed the check (64.0 == 64) and failed half-way through the load with torch's
    # "Expected a value of type 'int' for argument 'blocksize'"; a NumPy int failed there with
    # "blocksize must be one of (64, ...), got np.int64(64)"
    import numpy as np

    model = tiny_model()
    model.save_pretrained(tmp_path / "bf16")
    with pytest.raises(ValueError, match=r"^blocksize must be one of \(64, .*got 64\.0$"):
        hoptune.load_model(tmp_path / "bf16", device="cpu", blocksize=64.0, progress=False)
    with pytest.raises(ValueError, match=r"^blocksize must be one of \(64, .*got 64\.0$"):
        save_pretrained_nf4(model, tmp_path / "nf4", blocksize=64.0)
    assert not os.path.exists(tmp_path / "nf4" / "model.safetensors")
    ours = hoptune.load_model(tmp_path / "bf16", device="cpu", blocksize=np.int64(128), progress=False)
    assert {m.weight_nf4.blocksize for m in nf4_layers(ours).values()} == {128}
    save_pretrained_nf4(ours, tmp_path / "nf4", blocksize=np.int64(128))
    assert len(nf4_layers(hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False))) == 14


def test_save_pretrained_nf4_refuses_a_tied_head(tmp_path):
    # a head tied to the embeddings is stored once, as the (dense) embeddings: quantizing it
    # used to drop its packed weight from the file, which neither loader could read back
    model = tiny_model("qwen2", tie=True)
    with pytest.raises(ValueError, match=r"lm_head\.weight is tied to the input embeddings"):
        save_pretrained_nf4(model, tmp_path, skip_modules=[])
    assert not os.path.exists(tmp_path / "model.safetensors")
    untied = tiny_model("qwen2", tie=False)
    assert "lm_head" in save_pretrained_nf4(untied, tmp_path, skip_modules=[])
    loaded = hoptune.load_model(tmp_path, device="cpu", progress=False)
    assert isinstance(loaded.lm_head, NF4Linear)


def test_save_pretrained_nf4_errors_name_the_layer(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(
        ValueError, match=r"cannot quantize model\.layers\.1\.mlp\.down_proj\.weight .*inf or NaN"
    ):
        save_pretrained_nf4(model, tmp_path)
    assert not os.path.exists(tmp_path / "model.safetensors")


@pytest.mark.parametrize("skip", [None, ["lm_head"], ["o_proj"]])
def test_save_pretrained_nf4_keeps_a_layer_nf4_cannot_hold_dense_whatever_skip_modules_holds(tmp_path, skip):
    # it stayed dense with skip_modules left at its default only: with any list given the save
    # failed ("cannot quantize ...extra.weight ... blocksize=64"), where load_model keeps it dense
    model = tiny_model()
    model.model.layers[0].mlp.extra = torch.nn.Linear(3, 5)  # 15 weights: no whole NF4 block
    kw = {} if skip is None else {"skip_modules": skip}
    with pytest.warns(
        UserWarning, match=r"1 layers stay dense: .*blocksize=64 .*model\.layers\.0\.mlp\.extra"
    ):
        names = save_pretrained_nf4(model, tmp_path, **kw)
    assert "model.layers.0.mlp.extra" not in names and len(names) == (13 if skip == ["o_proj"] else 14)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == [*(skip or ["lm_head"]), "model.layers.0.mlp.extra"]
    assert "model.layers.0.mlp.extra.weight" in load_file(tmp_path / "model.safetensors")


def test_prequantized_bnb_checkpoint_keeps_its_dense_layers_dense(tmp_path):
    # layers bitsandbytes left dense (llm_int8_skip_modules) load dense, as transformers loads them
    import bitsandbytes  # noqa: F401

    tiny_model().save_pretrained(tmp_path / "bf16")
    _bnb_checkpoint(
        tmp_path / "bf16",
        tmp_path / "nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=["lm_head", "down_proj"],
    )
    ours = hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    assert len(nf4_layers(ours)) == 12
    sd = load_file(tmp_path / "nf4" / "model.safetensors")
    for i in range(2):
        layer = ours.model.layers[i].mlp.down_proj
        assert type(layer) is torch.nn.Linear
        assert torch.equal(layer.weight, sd[f"model.layers.{i}.mlp.down_proj.weight"])


@pytest.mark.parametrize("skip", [["lm_head", "down_proj"], []])
def test_prequantized_bnb_checkpoint_saves_back_as_it_was_by_default(tmp_path, skip):
    # load_model drops the checkpoint's quantization_config, and save_pretrained_nf4's defaults then
    # quantized the down_proj layers it kept dense (writing llm_int8_skip_modules ['lm_head']), and
    # refused a head stored in NF4: "lm_head is in skip_modules=['lm_head'] but is NF4 already"
    import bitsandbytes

    tiny_model().save_pretrained(tmp_path / "bf16")
    _bnb_checkpoint(
        tmp_path / "bf16",
        tmp_path / "nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=skip,
    )
    ours = hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    save_pretrained_nf4(ours, tmp_path / "again")
    theirs, again = (load_file(tmp_path / d / "model.safetensors") for d in ("nf4", "again"))
    assert sorted(again) == sorted(theirs) and all(torch.equal(again[k], theirs[k]) for k in theirs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", device_map="cpu")
    want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    types = [{n: type(m) for n, m in x.named_modules()} for x in (loaded, want)]
    assert types[0] == types[1]
    assert (type(want.lm_head) is bitsandbytes.nn.Linear4bit) == (skip == [])


def test_single_file_is_read_before_an_index_as_transformers_does(tmp_path):
    # a folder saved sharded, then saved again as one file, keeps the old index (transformers
    # removes the old shards only); transformers reads model.safetensors first
    tiny_model().save_pretrained(tmp_path, max_shard_size="40KB")
    tiny_model(seed=1).save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)


def test_linear_subclasses_stay_as_they_are(tmp_path):
    # transformers + bitsandbytes convert plain nn.Linear layers only: a subclass (Llama 4's
    # router returns scores and logits) is not a linear layer NF4Linear can stand in for
    if not hasattr(transformers, "Llama4ForCausalLM"):
        pytest.skip("this transformers has no Llama4")
    cfg = transformers.Llama4TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        intermediate_size_mlp=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=1,
        max_position_embeddings=64,
        moe_layers=[0, 1],
        no_rope_layers=[1, 1],
    )
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "bf16")
    ours = hoptune.load_model(tmp_path / "bf16", device="cpu", progress=False)
    router = ours.model.layers[0].feed_forward.router
    assert type(router) is type(model.model.layers[0].feed_forward.router)
    assert isinstance(ours.model.layers[0].self_attn.q_proj, NF4Linear)
    want = logits(ours)
    names = save_pretrained_nf4(ours, tmp_path / "nf4")
    assert names and not [n for n in names if "router" in n]
    loaded = hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    torch.testing.assert_close(logits(loaded), want, atol=0, rtol=0)


def test_save_pretrained_nf4_keeps_the_generation_config(tmp_path):
    # as save_pretrained does: the stop tokens and sampling defaults travel with the model
    model = tiny_model()
    model.generation_config.eos_token_id = [2, 5]
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.save_pretrained(tmp_path / "bf16")
    ours = hoptune.load_model(tmp_path / "bf16", device="cpu", progress=False)
    save_pretrained_nf4(ours, tmp_path / "nf4")
    for loaded in (
        hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False),
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu"),
    ):
        gc = loaded.generation_config
        assert (gc.eos_token_id, gc.do_sample, gc.temperature) == ([2, 5], True, 0.6)


def test_prequantized_layers_take_the_dtype_asked_for(tmp_path):
    # a float16 bitsandbytes checkpoint loaded as bfloat16: its NF4 layers dequantize to bfloat16
    # like every other layer (a merge that keeps each layer's dtype used to mix the two)
    import bitsandbytes  # noqa: F401

    tiny_model(dtype=torch.float16).save_pretrained(tmp_path / "fp16")
    _bnb_checkpoint(tmp_path / "fp16", tmp_path / "nf4", bnb_4bit_compute_dtype=torch.float16)
    ours = hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    layers = nf4_layers(ours)
    assert len(layers) == 14 and all(m.dequantize().dtype == torch.bfloat16 for m in layers.values())
    want = logits(ours)
    hoptune.merge_and_unload(ours, dtype=None)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(ours), want, atol=5e-2, rtol=5e-2)


def _gpt2(tie: bool = True):
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, tie_word_embeddings=tie
    )
    cfg.bos_token_id = cfg.eos_token_id = 2
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpoint_of_the_base_model_loads_as_from_pretrained(tmp_path, arch):
    # GPT-2's own files (and any saved from the base model, LlamaModel) lack base_model_prefix
    # ("h.0.attn.c_attn.weight", not "transformer.h.0..."): transformers adds it to keys the model
    # lacks but has with it
    from safetensors.torch import save_file

    model = _gpt2() if arch == "gpt2" else tiny_model(tie=True)
    model.save_pretrained(tmp_path)
    prefix = model.base_model_prefix + "."
    sd = load_file(tmp_path / "model.safetensors")
    sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    want, got = ref.state_dict(), ours.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)
    if arch == "llama":  # and with NF4 on load
        assert len(nf4_layers(hoptune.load_model(tmp_path, device="cpu", progress=False))) == 14
    # a tensor stored both with and without the prefix is an error that names both
    norm = "norm.weight" if arch == "llama" else "ln_f.weight"
    sd[prefix + norm] = sd[norm].clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"(ln_f|norm)\.weight' is stored twice: as '\S+' in \S+ and as '\S+' in "
    ):
        hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)


@pytest.mark.parametrize("how", ["alias", "overlap", "gap", "trailing"])
def test_header_whose_tensors_do_not_tile_the_data_is_refused(tmp_path, how):
    # safetensors (so from_pretrained) refuses these; two keys on the same bytes would otherwise
    # load one tensor's values into the other
    tiny_model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    if how == "alias":  # b points at a's bytes
        header[b]["data_offsets"] = header[a]["data_offsets"]
    elif how == "overlap":  # a and b shifted into each other's bytes
        begin, end = header[b]["data_offsets"]
        header[b]["data_offsets"] = [begin - 2, end - 2]
    elif how == "gap":
        last = max(header, key=lambda k: k != "__metadata__" and header[k]["data_offsets"][0])
        begin, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [begin + 2, end + 2]
        body += b"\0\0"
    else:
        body += b"\0" * 8
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    with pytest.raises(
        ValueError, match=r"model\.safetensors: .*(tensor '\S+' starts at data byte|end at data byte)"
    ):
        hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)


def test_gpt2_conv1d_layers_become_nf4_as_with_bitsandbytes(tmp_path):
    # GPT-2's projections are transformers' Conv1D (y = x @ W + b, W stored (in, out)), which
    # transformers + bitsandbytes quantize like nn.Linear, transposed; its NF4 checkpoints hold them so
    import bitsandbytes  # noqa: F401

    _gpt2().save_pretrained(tmp_path / "bf16")
    names = {
        f"transformer.h.{i}.{n}"
        for i in range(2)
        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path / "bf16", device="cpu", progress=False)
    layers = nf4_layers(ours)
    assert set(layers) == names and type(ours.lm_head) is torch.nn.Linear
    for name, layer in layers.items():
        conv = ref.get_submodule(name)
        q = hoptune.quantize_nf4(conv.weight.data.t().contiguous())
        assert torch.equal(layer.weight_packed, q.packed) and torch.equal(layer.weight_absmax, q.absmax), name
        assert torch.equal(layer.bias, conv.bias), name
        conv.weight.data.copy_(dequantize_nf4(q).t())
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)
    # a bitsandbytes NF4 checkpoint of GPT-2 loads as stored
    qm = _bnb_checkpoint(tmp_path / "bf16", tmp_path / "nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    loaded = hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    sd = load_file(tmp_path / "nf4" / "model.safetensors")
    assert set(nf4_layers(loaded)) == names
    for name, layer in nf4_layers(loaded).items():
        assert torch.equal(layer.weight_packed, from_bnb_state_dict(sd, f"{name}.weight").packed), name
    torch.testing.assert_close(logits(loaded), logits(qm), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("adapted", [False, True], ids=["nf4", "lora"])
def test_gpt2_nf4_model_merges_back_into_conv1d_layers(tmp_path, adapted):
    """The NF4 layers load_model makes from GPT-2's Conv1D come back as Conv1D from
    merge_and_unload (an nn.Linear there would save (out, in) weights that the model's class reads
    as (in, out)), with an adapter or without, and as NF4Linear from remove_lora."""
    from transformers.pytorch_utils import Conv1D

    _gpt2().save_pretrained(tmp_path / "bf16")
    model = hoptune.load_model(tmp_path / "bf16", device="cpu", dtype=torch.float32, progress=False)
    if adapted:
        hoptune.apply_lora(model, r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    want = logits(model)
    merged = hoptune.merge_and_unload(copy.deepcopy(model), dtype=torch.float32)
    for i in range(2):
        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert type(merged.get_submodule(f"transformer.h.{i}.{n}")) is Conv1D, n
    merged.save_pretrained(tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(back), want, atol=1e-4, rtol=1e-4)
    if adapted:
        hoptune.remove_lora(model)
        assert isinstance(model.transformer.h[0].attn.c_attn, NF4Linear)
        assert type(hoptune.merge_and_unload(model).transformer.h[0].attn.c_attn) is Conv1D


def test_non_persistent_buffers_as_from_pretrained(tmp_path):
    # transformers 5 recomputes a model's non-persistent buffers after loading (its _init_weights,
    # outside the dtype of the build): GPT-J's sin/cos table built in the bfloat16 of the build
    # has its frequencies rounded to bfloat16
    cfg = transformers.GPTJConfig(
        n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=128, n_positions=64
    )
    torch.manual_seed(0)
    transformers.GPTJForCausalLM(cfg).to(torch.bfloat16).eval().save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    for quantize in (None, "nf4"):
        ours = hoptune.load_model(tmp_path, quantize=quantize, device="cpu", progress=False)
        want, got = dict(ref.named_buffers()), dict(ours.named_buffers())
        for k, b in want.items():
            assert b.dtype == got[k].dtype and torch.equal(b, got[k]), k
        if quantize is None:
            torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)
            assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_generation_settings_in_config_json_as_from_pretrained(tmp_path):
    # an older checkpoint without generation_config.json keeps its sampling defaults in config.json,
    # where from_pretrained reads them (a transformers 5 config drops them when it is built)
    tiny_model().save_pretrained(tmp_path)
    os.unlink(tmp_path / "generation_config.json")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(do_sample=True, temperature=0.6, top_p=0.9, max_length=77)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    assert ours.generation_config.to_dict() == ref.generation_config.to_dict()
    gc = ours.generation_config
    assert (gc.do_sample, gc.temperature, gc.top_p, gc.max_length) == (True, 0.6, 0.9, 77)


def test_checkpoint_with_keys_transformers_renames_loads_as_from_pretrained(tmp_path):
    # GPT-NeoX (Pythia) files name the head embed_out, which transformers 5 renames to lm_head
    # while loading (and back while saving)
    cfg = transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(cfg).to(torch.bfloat16).eval().save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    want, got = ref.state_dict(), ours.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)
    nf4 = hoptune.load_model(tmp_path, device="cpu", progress=False)
    assert len(nf4_layers(nf4)) == 8 and type(nf4.get_output_embeddings()) is torch.nn.Linear


@pytest.mark.parametrize("weight_map", [[], {"a.weight": None}, "model.safetensors"])
def test_index_with_a_malformed_weight_map_names_the_file(tmp_path, weight_map):
    tiny_model().save_pretrained(tmp_path, max_shard_size="40KB")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not a valid safetensors index"):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_progress_bar_is_closed_when_the_reader_cannot_be_made(tmp_path, monkeypatch):
    from tqdm.auto import tqdm

    from hoptune import loading

    tiny_model().save_pretrained(tmp_path)

    def fail(device):
        raise RuntimeError("cannot pin memory")

    monkeypatch.setattr(loading, "_make_reader", fail)
    before = set(getattr(tqdm, "_instances", ()))
    with pytest.raises(RuntimeError, match="cannot pin memory"):
        hoptune.load_model(tmp_path, device="cpu", progress=True)
    assert set(getattr(tqdm, "_instances", ())) == before


def test_tensor_stored_as_integers_takes_the_model_dtype_as_from_pretrained(tmp_path):
    # from_pretrained casts every tensor to the dtype the model declares, integer ones included
    tiny_model().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], 2, dtype=torch.int64)
    sd["model.layers.0.mlp.up_proj.weight"] = (sd["model.layers.0.mlp.up_proj.weight"] * 100).to(torch.int32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    want = ref.state_dict()
    for key, t in ours.state_dict().items():
        assert t.dtype == want[key].dtype and torch.equal(t, want[key]), key
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)


@pytest.mark.parametrize("same", [True, False])
def test_tied_head_stored_with_other_values_stays_apart_as_from_pretrained(tmp_path, same):
    # transformers 5 ties lm_head to embed_tokens when the files hold both with the same values,
    # and keeps the stored head (untied) when they differ
    tiny_model("qwen2", tie=True).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    emb = sd["model.embed_tokens.weight"]
    sd["lm_head.weight"] = emb.clone() if same else torch.randn_like(emb)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = hoptune.load_model(tmp_path, quantize=None, device="cpu", progress=False)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == same
    assert (ref.lm_head.weight is ref.model.embed_tokens.weight) == same
    assert torch.equal(ours.lm_head.weight, sd["lm_head.weight"])
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)


@pytest.mark.parametrize("part", ["absmax", "quant_map", "quant_state.bitsandbytes__nf4"])
def test_a_bitsandbytes_weight_without_one_of_its_tensors_names_it(tmp_path, part):
    save_pretrained_nf4(tiny_model(), tmp_path, double_quant=False)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    key = "model.layers.1.self_attn.q_proj.weight"
    del sd[f"{key}.{part}"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"the NF4 weight {key} lacks its tensor {key}\.{part}$"):
        hoptune.load_model(tmp_path, device="cpu", progress=False)
