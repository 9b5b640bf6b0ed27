"""The demo pipeline end to end with a few steps (the real one: ``hoptune demo`` / ``make demo``)."""

import json
import os

import pytest

from hoptune.models import pretrain
from hoptune.train.demo import run_demo


def test_demo_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 4)
    res = run_demo(
        str(tmp_path / "demo"), "cpu", ["train.max_steps=3", "train.eval_every=0", "output.progress=false"]
    )
    out = capsys.readouterr().out
    assert "exact-match accuracy" in out and "held-out addition questions (30)" in out
    assert "TensorBoard" not in out  # (make demo installs no tensorboard: its note was noise)
    assert os.path.isfile(os.path.join(res["adapter"], "adapter_model.safetensors"))
    assert set(res["before"]) == set(res["after"]) == {"held", "train", "minus"}
    # the pretrained base is cached: a second load does not pretrain again
    assert (
        os.listdir(tmp_path / "cache")
        and pretrain.pretrained_tiny_path(log=print) == pretrain.tiny_cache_dir()
    )
    assert "pretraining" not in capsys.readouterr().out


def test_tiny_model_and_tokenizer_are_deterministic():
    import torch

    from hoptune.models import TINY_CONFIG, build_model, build_tokenizer

    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template
    text = "What is 3+4? The answer: 7.\n"
    ids = a(text)["input_ids"]
    assert ids[0] == a.bos_token_id and a.decode(ids[1:]) == text
    assert max(a.get_vocab().values()) < TINY_CONFIG["vocab_size"]
    m1, m2 = build_model(seed=3), build_model(seed=3)
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
    # every linear layer can be stored in NF4 (blocks of 64)
    assert all(mod.weight.numel() % 64 == 0 for mod in m1.modules() if isinstance(mod, torch.nn.Linear))


def test_pretrained_cache_written_meanwhile_by_another_process(tmp_path, monkeypatch):
    """Two processes pretraining at once: when the other one's folder lands just before this one's
    rename, that rename fails on the non-empty folder, and the finished copy is used."""
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 2)
    final = pretrain.tiny_cache_dir()
    real_replace = os.replace

    def other_process_first(src, dst):
        if dst == final and not os.path.exists(final):
            os.makedirs(final)
            with open(os.path.join(final, "config.json"), "w") as f:
                f.write("{}")  # the other process's finished copy
        return real_replace(src, dst)

    monkeypatch.setattr(pretrain.os, "replace", other_process_first)
    assert pretrain.pretrained_tiny_path(log=lambda s: None, progress=False) == final
    assert os.listdir(final) == ["config.json"]  # (left as the other process wrote it)
    assert not [n for n in os.listdir(os.path.dirname(final)) if n.startswith(".tmp-")]


def _demo_config(monkeypatch, out: str):
    """The config ``run_demo(out, "cpu")`` builds, the demo stopped before any work."""
    import hoptune.config

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    seen = []
    real_load = hoptune.config.load_config
    monkeypatch.setattr(
        hoptune.config, "load_config", lambda *a, **k: seen.append(real_load(*a, **k)) or seen[-1]
    )
    monkeypatch.setattr(pretrain, "pretrained_tiny_path", stop)
    with pytest.raises(Stop):
        run_demo(out, "cpu")
    (cfg,) = seen
    return cfg


def test_demo_paths_are_read_as_written(tmp_path, monkeypatch):
    """An output folder whose name YAML would read otherwise (a comment, a mapping)."""
    out = tmp_path / "exp #2: r=8"
    cfg = _demo_config(monkeypatch, str(out))
    assert cfg.data.train == str(out / "data" / "train.jsonl") and cfg.output.dir == str(out / "sft")


@pytest.mark.parametrize(
    "overrides",
    [["model.quantize=null"], ["model.quantize=null", "lora.enabled=false"]],
    ids=["lora", "full-fine-tuning"],
)
def test_demo_evaluates_the_model_it_trained(tmp_path, monkeypatch, capsys, overrides):
    """Without NF4 the scores are those of the dense base and of what was trained over it."""
    import hoptune.adapters
    import hoptune.patch

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 2)
    quantize = []
    for mod, name in ((hoptune.patch, "apply_lora"), (hoptune.adapters, "load_adapter")):
        real = getattr(mod, name)

        def spy(*a, _real=real, **k):
            quantize.append(k.get("quantize"))
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    res = run_demo(
        str(tmp_path / "demo"),
        "cpu",
        ["train.max_steps=1", "train.eval_every=0", "output.progress=false", *overrides],
    )
    # (full fine-tuning puts no adapters anywhere: the before column is the plain dense base)
    assert not any(quantize) and (bool(quantize) == ("lora.enabled=false" not in overrides))
    assert set(res["after"]) == {"held", "train", "minus"}
    assert "base (NF4)" not in capsys.readouterr().out


def test_damaged_pretrained_cache_is_pretrained_again(tmp_path, monkeypatch):
    """A cache folder whose files are not those written (truncated, altered, missing) is set aside
    and the model pretrained again, instead of failing to load on every later run."""
    import json

    from hoptune.models import load_tiny

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 1)
    final = pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)
    weights = os.path.join(final, "model.safetensors")
    good = open(weights, "rb").read()

    def truncate():
        with open(weights, "wb") as f:
            f.write(good[: len(good) // 2])

    def flip_a_byte():  # same size, a valid header: only the digest tells
        with open(weights, "r+b") as f:
            f.seek(len(good) - 100)
            f.write(bytes([good[-100] ^ 0xFF]))

    def drop_config():
        os.remove(os.path.join(final, "config.json"))

    for damage in (truncate, flip_a_byte, drop_config):
        damage()
        assert pretrain.cache_problem(final) is not None, damage.__name__
        logs = []
        assert pretrain.pretrained_tiny_path(log=logs.append, progress=False) == final
        assert any("damaged" in s for s in logs), (damage.__name__, logs)
        assert pretrain.cache_problem(final) is None
        assert open(weights, "rb").read() == good  # pretraining is deterministic
    load_tiny(log=lambda s: None)
    left = sorted(
        n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock")
    )  # (the pretraining lock)
    assert left == [os.path.basename(final)]  # nothing left aside

    # a cache written before the digests were recorded is used while its files load
    info_path = os.path.join(final, "pretrain.json")
    with open(info_path) as f:
        info = json.load(f)
    del info["files"]
    with open(info_path, "w") as f:
        json.dump(info, f)
    logs = []
    assert pretrain.pretrained_tiny_path(log=logs.append, progress=False) == final and not logs
    truncate()
    assert pretrain.cache_problem(final) is not None


def test_demo_base_is_the_base_sft_trains_from(tmp_path, monkeypatch):
    """The "before" model has the NF4 layers and adapters (B = 0) that SFT starts from: with
    lora.target_modules=[q_proj,v_proj] only those layers are quantized, as in the trained model."""
    import torch

    from hoptune.config import load_config
    from hoptune.nn import LoRALinear
    from hoptune.train import demo

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 1)
    cfg = load_config(demo.config_path(), ["lora.target_modules=[q_proj,v_proj]", "lora.r=8"])
    model, _ = demo._tiny_model(cfg, torch.device("cpu"), torch.float32)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {"q_proj", "v_proj"}
    assert {m.r for m in model.modules() if isinstance(m, LoRALinear)} == {8}
    dense = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert len(dense) == 4 * 5 + 1  # k, o, gate, up, down of each layer, and the head


def test_pretraining_on_a_gpu_uses_deterministic_algorithms(monkeypatch):
    """On a GPU the tiny model's pretraining runs with PyTorch's deterministic algorithms (two runs
    on one H200 gave different weights without them), and the caller's settings come back after;
    on a CPU nothing is changed."""
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with pretrain.deterministic(torch.device("cpu")):
        assert not torch.are_deterministic_algorithms_enabled()
    try:
        with pretrain.deterministic(torch.device("cuda")):
            assert torch.are_deterministic_algorithms_enabled()
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    finally:
        torch.use_deterministic_algorithms(False)

    seen = []
    monkeypatch.setattr(
        pretrain, "deterministic", lambda device: seen.append(device) or pretrain.contextlib.nullcontext()
    )
    pretrain.pretrain(steps=1, device="cpu", progress=False)
    assert seen == [torch.device("cpu")]


@pytest.mark.parametrize("override", ["lora.target_modules=[q_prj]", "lora.r=500"])
def test_demo_lora_settings_are_checked_before_pretraining(tmp_path, monkeypatch, override):
    """A LoRA setting the tiny model cannot take stops the demo at once, not after pretraining."""
    from hoptune.config import ConfigError

    def no_pretraining(*a, **k):
        raise AssertionError("pretraining started")

    monkeypatch.setattr(pretrain, "pretrained_tiny_path", no_pretraining)
    with pytest.raises(ConfigError, match="lora settings"):
        run_demo(str(tmp_path / "demo"), "cpu", [override])


@pytest.mark.parametrize(
    "override",
    ["output.resume=auto", "output.resume=true", "output.dir={out}/sft2"],
    ids=["resume-auto", "resume-true", "other-dir"],
)
def test_demo_keeps_the_folder_of_an_earlier_run_it_is_not_replacing(tmp_path, monkeypatch, override):
    """The demo starts fresh by deleting its own SFT folder, but not the checkpoints an override
    asks it to resume from, nor an earlier run's adapter when the output goes to another folder."""
    from hoptune.data import demo_task
    from hoptune.train import demo, sft

    class Stop(Exception):
        pass

    out = tmp_path / "demo"
    earlier = out / "sft" / "checkpoint-10"
    earlier.mkdir(parents=True)
    (earlier / "state.json").write_text("{}")
    monkeypatch.setattr(pretrain, "pretrained_tiny_path", lambda **k: None)
    monkeypatch.setattr(demo, "_tiny_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(demo_task, "accuracy", lambda *a, **k: 0.0)
    seen = []

    def train(cfg):
        seen.append(cfg.output)
        raise Stop

    monkeypatch.setattr(sft, "train", train)
    with pytest.raises(Stop):
        run_demo(str(out), "cpu", [override.format(out=out)])
    assert seen and (earlier / "state.json").is_file()


def test_demo_does_not_delete_a_folder_it_did_not_write(tmp_path, monkeypatch):
    """--out runs puts the demo's SFT run in runs/sft, hoptune sft's default output.dir: a run of
    the user's there is not deleted to start the demo fresh (an error at once, before any work);
    an earlier demo run there is."""
    from hoptune.config import ConfigError, dump_config, load_config
    from hoptune.data import demo_task
    from hoptune.train import demo, sft

    class Stop(Exception):
        pass

    def no_pretraining(*a, **k):
        raise AssertionError("the demo started work before checking its output folder")

    out = tmp_path / "runs"
    user_run = out / "sft" / "adapter"
    user_run.mkdir(parents=True)
    (user_run / "adapter_model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(pretrain, "pretrained_tiny_path", no_pretraining)
    with pytest.raises(ConfigError, match=r"--out .*sft holds files that are not the demo's.*another --out"):
        run_demo(str(out), "cpu")
    assert (user_run / "adapter_model.safetensors").read_bytes() == b"weights"

    # an earlier demo's run (its config.yaml trains on the demo's data) is replaced
    cfg = load_config(demo.config_path(), [f"data.train={out / 'data' / 'train.jsonl'}"])
    (out / "sft" / "config.yaml").write_text(dump_config(cfg))
    monkeypatch.setattr(pretrain, "pretrained_tiny_path", lambda **k: None)
    monkeypatch.setattr(demo, "_tiny_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(demo_task, "accuracy", lambda *a, **k: 0.0)

    def train(cfg):
        assert not (out / "sft").exists()
        raise Stop

    monkeypatch.setattr(sft, "train", train)
    with pytest.raises(Stop):
        run_demo(str(out), "cpu")


def test_demo_scores_in_the_chat_format_it_trained(tmp_path, monkeypatch):
    """With model.chat_template the demo trains on chats in that format: the before and after
    scores ask the questions in it too, not in the tokenizer's own format."""
    import torch

    import hoptune.models
    from hoptune.adapters import save_adapter
    from hoptune.config import load_config
    from hoptune.models import build_model, build_tokenizer
    from hoptune.train import demo

    # (a fresh tiny model in place of the pretrained one: the format is the tokenizer's)
    monkeypatch.setattr(hoptune.models, "load_tiny", lambda **k: (build_model(), build_tokenizer()))
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    (tmp_path / "chat.jinja").write_text(template)
    for value in (template, str(tmp_path / "chat.jinja")):
        cfg = load_config(
            demo.config_path(), [f"model.chat_template={json.dumps(value)}", "model.quantize=null"]
        )
        base, tok = demo._tiny_model(cfg, torch.device("cpu"), torch.float32)
        assert tok.chat_template == template
    # and the trained model's (its adapter as saved)
    save_adapter(base, str(tmp_path / "adapter"))
    _, tok = demo._tiny_model(cfg, torch.device("cpu"), torch.float32, trained=str(tmp_path / "adapter"))
    assert tok.chat_template == template
    # without it, the tokenizer's own
    cfg = load_config(demo.config_path(), ["model.quantize=null"])
    _, tok = demo._tiny_model(cfg, torch.device("cpu"), torch.float32)
    assert tok.chat_template != template and "<|assistant|>" in tok.chat_template


def test_out_that_is_a_file_is_named_as_such(tmp_path):
    # --out naming a file was refused as a folder "that holds files that are not the demo's"
    from hoptune.config import ConfigError
    from hoptune.train.demo import run_demo

    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(ConfigError, match=r"notes.txt is a file"):
        run_demo(str(f), "cpu")
    assert f.read_text() == "mine"


def test_demo_does_not_overwrite_data_it_did_not_write(tmp_path, monkeypatch):
    """--out over a project folder: its data/train.jsonl is the user's, not the demo's to write over
    (an error before any work); the demo's own data from an earlier run is written again."""
    from hoptune.config import ConfigError
    from hoptune.train import demo

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop  # (the data is written by now)

    monkeypatch.setattr(pretrain, "pretrained_tiny_path", lambda **k: None)
    monkeypatch.setattr(demo, "_tiny_model", stop)
    out = tmp_path / "project"
    mine = out / "data" / "train.jsonl"
    mine.parent.mkdir(parents=True)
    text = '{"prompt": "What is 12*7?", "completion": "84"}\n' * 3
    mine.write_text(text)
    with pytest.raises((ConfigError, Stop)) as e:
        run_demo(str(out), "cpu")
    assert mine.read_text() == text
    assert e.type is ConfigError and f"{mine} is not the demo's data" in str(e.value)

    # a run over the data the demo wrote itself goes on
    other = tmp_path / "demo"
    for _ in range(2):
        with pytest.raises(Stop):
            run_demo(str(other), "cpu")
    assert sorted(os.listdir(other / "data")) == ["eval.jsonl", "general.jsonl", "train.jsonl"]


def test_out_is_read_as_the_config_reads_paths(tmp_path, monkeypatch):
    """--out=~/demo (the shell leaves that ~ alone) is in the home folder, not in a folder named ~;
    an empty --out (an unset variable) is an error, not the current folder."""
    from hoptune.config import ConfigError

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = _demo_config(monkeypatch, "~/demo")
    assert cfg.output.dir == str(tmp_path / "home" / "demo" / "sft")
    assert cfg.data.train == str(tmp_path / "home" / "demo" / "data" / "train.jsonl")
    for out in ("", " "):
        with pytest.raises(ConfigError, match="--out is an empty string"):
            run_demo(out, "cpu")


def test_demo_reports_each_score_of_each_model(tmp_path, monkeypatch, capsys):
    """The before/after table and the returned scores: each question set scored on its own (held-out
    additions, trained additions, subtractions), the base in the first column, the model as SFT
    saved it (loaded from its output folder) in the second; then the held-out loss and the paths."""
    from hoptune.data import demo_task
    from hoptune.train import demo, sft
    from hoptune.train.sft import SFTResult

    run = tmp_path / "demo" / "sft"
    loaded = []

    def tiny_model(cfg, dev, dtype, trained=None):
        loaded.append(trained)
        return ("tuned" if trained else "base"), None

    def accuracy(model, tok, qa, device="cpu"):
        # (a score that tells the model and the question set apart: 30, 70 or 55 questions)
        return {"base": 0.0, "tuned": 0.5}[model] + len(qa) / 1000

    def train(cfg):
        return SFTResult(str(run), str(run / "adapter"), 3, [1.0], {"loss": 0.25}, [], ["no plotting here"])

    monkeypatch.setattr(pretrain, "pretrained_tiny_path", lambda **k: None)
    monkeypatch.setattr(demo, "_tiny_model", tiny_model)
    monkeypatch.setattr(demo_task, "accuracy", accuracy)
    monkeypatch.setattr(sft, "train", train)
    res = run_demo(str(tmp_path / "demo"), "cpu")
    assert loaded == [None, str(run / "adapter")]
    assert res["before"] == pytest.approx({"held": 0.03, "train": 0.07, "minus": 0.055})
    assert res["after"] == pytest.approx({"held": 0.53, "train": 0.57, "minus": 0.555})
    assert res["adapter"] == str(run / "adapter")
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if "questions (" in line or "base skill" in line]
    assert [row[-3:] for row in table] == [
        ["(30)", "3.0%", "53.0%"],
        ["(70)", "7.0%", "57.0%"],
        ["(55)", "5.5%", "55.5%"],
    ]
    assert "base (NF4)" in out and "held-out SFT loss: 0.2500" in out
    assert f"adapter (PEFT format): {run / 'adapter'}" in out and "plots: none (no plotting here)" in out
    assert f"metrics: {run / 'metrics.jsonl'}" in out
    # (the data as the report counts it)
    data = tmp_path / "demo" / "data"
    lines = {n: len((data / f"{n}.jsonl").read_text().splitlines()) for n in ("train", "eval", "general")}
    assert lines == {"train": 70, "eval": 30, "general": 200}
    assert "data: 70 training chats, 30 held out, 200 replay records" in out


def test_demo_after_model_is_the_adapter_on_an_nf4_base(tmp_path, monkeypatch):
    """The trained adapter is loaded onto a fresh base quantized as the config trains it (NF4 by
    default), as SFT trained it: not onto a dense base."""
    import torch

    import hoptune.models
    from hoptune.adapters import save_adapter
    from hoptune.config import load_config
    from hoptune.models import build_model, build_tokenizer
    from hoptune.nn import LoRALinear
    from hoptune.train import demo

    monkeypatch.setattr(hoptune.models, "load_tiny", lambda **k: (build_model(), build_tokenizer()))
    cfg = load_config(demo.config_path(), ["lora.target_modules=[q_proj,v_proj]", "lora.r=8"])
    base, _ = demo._tiny_model(cfg, torch.device("cpu"), torch.float32)
    save_adapter(base, str(tmp_path / "adapter"))
    tuned, _ = demo._tiny_model(cfg, torch.device("cpu"), torch.float32, trained=str(tmp_path / "adapter"))
    layers = [m for m in tuned.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 8 and all(m.quantized for m in layers)
    assert not tuned.training


def test_demo_data_is_recognised_only_when_it_is_exactly_the_demos(tmp_path):
    """The demo writes over a data file only when it holds exactly the demo's records: not one that
    holds them and more, a part of them, nothing, or other text."""
    from hoptune.data import demo_task
    from hoptune.data.jsonl import write_jsonl
    from hoptune.train import demo

    rows = demo_task.sft_records(demo_task.split_pairs()[1])
    path = tmp_path / "eval.jsonl"
    write_jsonl(str(path), rows)
    assert demo._holds_records(str(path), rows)
    write_jsonl(str(path), rows + rows[:1])
    assert not demo._holds_records(str(path), rows)
    write_jsonl(str(path), rows[:-1])
    assert not demo._holds_records(str(path), rows)
    path.write_text("")
    assert not demo._holds_records(str(path), rows)
    path.write_text("not json\n")
    assert not demo._holds_records(str(path), rows)
    assert not demo._holds_records(str(tmp_path / "missing.jsonl"), rows)


def test_demo_replaces_only_its_own_sft_runs(tmp_path):
    """The SFT folder the demo may delete to start fresh: none yet, an empty one (or one holding only
    a run's lock file), or a run of the tiny model on the demo's training data; not a run of the
    tiny model on other data, of another model, or a folder without a run's config."""
    from hoptune.config import dump_config, load_config
    from hoptune.train import demo
    from hoptune.train.loop import LOCK_FILE

    data = str(tmp_path / "data" / "train.jsonl")
    folder = tmp_path / "sft"
    assert demo._demo_run(str(folder), {data})
    folder.mkdir()
    assert demo._demo_run(str(folder), {data})
    (folder / LOCK_FILE).write_text("")
    assert demo._demo_run(str(folder), {data})
    for overrides, ours in (
        ([f"data.train={data}"], True),
        ([f"data.train={tmp_path / 'mine.jsonl'}"], False),
        ([f"data.train={data}", f"model.path={tmp_path / 'llama'}"], False),
    ):
        (folder / "config.yaml").write_text(dump_config(load_config(demo.config_path(), overrides)))
        assert demo._demo_run(str(folder), {data}) is ours, overrides
    (folder / "config.yaml").unlink()
    (folder / "adapter").mkdir()
    assert not demo._demo_run(str(folder), {data})


def test_demo_refuses_a_folder_where_its_data_file_goes(tmp_path, monkeypatch):
    """A folder at the path of one of the demo's data files is refused before any work (not a
    failure to write it after pretraining)."""
    from hoptune.config import ConfigError

    def no_pretraining(*a, **k):
        raise AssertionError("pretraining started")

    monkeypatch.setattr(pretrain, "pretrained_tiny_path", no_pretraining)
    out = tmp_path / "demo"
    (out / "data" / "general.jsonl").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"general.jsonl is not the demo's data"):
        run_demo(str(out), "cpu")


def test_tiny_model_options_and_the_callers_random_stream():
    """build_model: the dtype asked for, no KV cache by default (the configs train it with
    checkpointing), overrides of its sizes taken; it leaves the caller's random stream as it was; the
    chat template's generation prompt opens the assistant's turn."""
    import torch

    from hoptune.models import build_model, build_tokenizer

    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    m = build_model(seed=3, dtype=torch.bfloat16, num_hidden_layers=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.config.use_cache is False and len(m.model.layers) == 1
    tok = build_tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 3+4?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s><|user|>What is 3+4?<|end|><|assistant|>"
