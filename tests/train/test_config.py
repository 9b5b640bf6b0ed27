import pytest

from hoptune.config import ConfigError, SFTConfig, check_sft_config, dump_config, load_config, parse_override


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_loads_yaml_and_overrides(tmp_path):
    p = _yaml(tmp_path, "train:\n  lr: 1.0e-4\n  batch_size: 4\nlora:\n  r: 8\n")
    cfg = load_config(
        p, ["train.lr=3e-4", "lora.target_modules=[q_proj, v_proj]", "data.eval=null", "train.epochs=2"]
    )
    assert isinstance(cfg, SFTConfig)
    assert cfg.train.lr == 3e-4 and cfg.train.batch_size == 4 and cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.eval is None and cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("train.learnig_rate", "train.lr"),
        ("train.learning_rate", "train.lr"),
        ("lr", "train.lr"),
        ("trian.lr", "train"),
        ("data.max_len", "data.max_seq_len"),
        ("lora.rank", "lora.r"),
        ("model.quantise", "model.quantize"),
        ("train.gradient_accumulation_steps", "train.grad_accum"),
        ("data.packnig", "data.packing"),
        # what HF / TRL call them: the nearest-looking key would be another setting
        ("train.save_steps", "train.save_every"),
        ("train.eval_steps", "train.eval_every"),
        ("train.logging_steps", "train.log_every"),
        ("train.save_total_limit", "train.keep_checkpoints"),
        ("train.per_device_eval_batch_size", "train.eval_batch_size"),
        ("data.dataset", "data.train"),  # a key in a section is never answered with a section
        # other trainers' names that look like another key (train.eps, model.path, output.dir)
        ("train.steps", "train.max_steps"),
        ("model.load_in_4bit", "model.quantize"),
        ("model.bf16", "model.dtype"),
        ("model.torch_dtype", "model.dtype"),
        ("output.save_dir", "output.dir"),
    ],
)
def test_unknown_key_names_the_nearest(tmp_path, key, suggestion):
    reported = key.split(".")[0] if key.startswith("trian") else key  # an unknown section is reported as such
    with pytest.raises(ConfigError, match=f"unknown config key '{reported}'; did you mean '{suggestion}'"):
        load_config(None, [f"{key}=1"])
    # the same in a YAML file
    section, _, leaf = key.rpartition(".")
    text = f"{section}:\n  {leaf}: 1\n" if section else f"{leaf}: 1\n"
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        load_config(_yaml(tmp_path, text))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=abc", r"train.lr: expected float, got 'abc' \(str\)"),
        ("train.batch_size=2.5", "train.batch_size: expected int, got 2.5"),
        ("train.grad_accum=true", "train.grad_accum: expected int, got True"),
        ("train.lr=true", r"train.lr: expected float, got True \(bool\)"),  # (not read as 1.0)
        ("train.lr=null", "train.lr: expected float, got null$"),  # (was "None (NoneType)")
        ("data.truncation=null", "data.truncation: expected one of 'right' | 'left', got null$"),
        ("data.packing=3", "data.packing: expected bool, got 3"),
        ("model.quantize=nf8", "model.quantize: expected one of 'nf4' | null, got 'nf8'"),
        ("train.betas=0.9", r"train.betas: expected list\[float\]"),
        ("lora.target_modules=3", r"lora.target_modules: expected str \| list\[str\], got 3"),
        ("train=3", "train: expected a mapping"),
        ("train.lr.x=1", "train.lr is not a section"),
        ("trainlr", "must look like section.key=value"),
    ],
)
def test_wrong_type_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_value_checks():
    cfg = load_config(None, ["data.train=x.jsonl", "lora.enabled=false"])
    with pytest.raises(ConfigError, match="needs model.quantize=null"):
        check_sft_config(cfg)
    cfg = load_config(None, ["data.train=x.jsonl", "data.eval_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"data.eval_fraction must be in \[0, 1\)"):
        check_sft_config(cfg)
    with pytest.raises(ConfigError, match="data.train: set the training JSONL"):
        check_sft_config(load_config(None))


@pytest.mark.parametrize("value", ["[]", "''", "' '", "['']"])
def test_empty_target_modules_are_refused_before_the_model_loads(value):
    cfg = load_config(None, ["data.train=x.jsonl", f"lora.target_modules={value}"])
    with pytest.raises(ConfigError, match="lora.target_modules must name the layers to adapt"):
        check_sft_config(cfg)
    # full fine-tuning adapts nothing: the value is not used
    check_sft_config(
        load_config(
            None,
            [
                "data.train=x.jsonl",
                "lora.enabled=false",
                "model.quantize=null",
                f"lora.target_modules={value}",
            ],
        )
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.betas=[0.9, 1.5]", r"train.betas must each be in \[0, 1\), got \[0.9, 1.5\]"),
        ("train.log_every=0", "train.log_every must be >= 1, got 0"),
        ("train.lr=.inf", "train.lr must be a finite number > 0, got inf"),
        ("train.lr=0", "train.lr must be a finite number > 0, got 0"),
        ("train.eval_batch_size=-1", "train.eval_batch_size must be >= 0"),
        ("train.eval_every=-1", "train.eval_every must be >= 0"),
        # nothing to evaluate: every eval would be skipped without a word (transformers' Trainer refuses too)
        ("train.eval_every=10", "train.eval_every=10 needs eval data: set data.eval or data.eval_fraction"),
        ("train.eps=.inf", "train.eps must be a finite number > 0, got inf"),
        ("train.weight_decay=.inf", "train.weight_decay must be a finite number >= 0, got inf"),
        ("train.epochs=.inf", "train.epochs must be a finite number, got inf"),
        # (passed with train.max_steps set, which makes epochs unused: a sign the config is not what was meant)
        (("train.max_steps=10", "train.epochs=-1"), r"train.epochs must be >= 0 \(0 with train.max_steps"),
        ("lora.alpha=.nan", "lora.alpha must be a finite number > 0, got nan"),
        ("lora.alpha=-16", "lora.alpha must be a finite number > 0, got -16"),
        ("model.device=gpu", "model.device must be auto, cpu, cuda, cuda:N, mps or xpu .*, got 'gpu'"),
        (
            "model.chat_template=templates/chatml.jinja",
            "model.chat_template='templates/chatml.jinja': no such file",
        ),
        # the data order's generator takes seed x 1_000_003 + epoch: a larger seed overflowed it mid-run
        ("train.seed=99999999999999", r"train.seed must be a 32-bit number \(\|seed\| < 2\*\*32\)"),
        ("train.seed=-4294967296", "train.seed must be a 32-bit number"),
        # an empty path: output.dir= wrote the run into the current folder, data.eval= evaluated nothing
        ("output.dir=", "output.dir is an empty string"),
        ("data.eval=", "data.eval is an empty string"),
        ("data.general_data=", "data.general_data is an empty string"),
        ("model.path=", "model.path is an empty string"),
        # fp16 weights under AdamW (eps 1e-8 is 0 in fp16) were NaN after the first step
        (
            ("lora.enabled=false", "model.quantize=null", "model.dtype=fp16"),
            "full fine-tuning.* with model.dtype=fp16",
        ),
        ("data.max_seq_len=1", "data.max_seq_len must be >= 2, got 1"),
        ("data.general_fraction=1.0", r"data.general_fraction must be in \[0, 1\), got 1.0"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.grad_accum=0", "train.grad_accum must be >= 1, got 0"),
        (("train.epochs=0", "train.max_steps=0"), "set train.epochs > 0 or train.max_steps > 0"),
        ("train.max_steps=-1", "train.max_steps must be >= 0, got -1"),
        ("train.betas=[0.9, 0.99, 0.999]", r"train.betas must be two floats \[beta1, beta2\]"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0, got -1"),
        ("train.warmup_ratio=1.0", r"train.warmup_ratio must be in \[0, 1\), got 1.0"),
        ("train.min_lr_ratio=1.5", r"train.min_lr_ratio must be in \[0, 1\], got 1.5"),
        ("train.max_grad_norm=-1", "train.max_grad_norm must be >= 0, got -1"),
        ("train.save_every=-1", r"train.save_every must be >= 0 \(0 = no checkpoints\), got -1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1, got 0"),
        ("lora.r=0", "lora.r must be >= 1, got 0"),
        ("lora.dropout=1.0", r"lora.dropout must be in \[0, 1\), got 1.0"),
        # an empty path would train on nothing found, without a word
        ("data.train=", "data.train is an empty string"),
    ],
)
def test_value_checks_of_train_and_model(override, message):
    overrides = [override] if isinstance(override, str) else list(override)
    cfg = load_config(None, ["data.train=x.jsonl", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_sft_config(cfg)


@pytest.mark.parametrize(
    "override",
    [
        "train.seed=-1",
        "train.seed=4294967295",
        "lora.enabled=false model.quantize=null model.dtype=bf16",
        "model.dtype=fp16",  # (LoRA: the adapters train in fp32)
        "train.epochs=0 train.max_steps=5",
        "data.max_seq_len=2",
        "train.min_lr_ratio=1.0",  # (a constant learning rate after warmup)
        "train.max_grad_norm=0",  # 0 = no clipping
        "train.save_every=0 train.warmup_steps=0 train.max_steps=0",
        "train.warmup_ratio=0.99 data.general_fraction=0.99 lora.dropout=0.99",
        "lora.r=1 train.batch_size=1 train.grad_accum=1 train.keep_checkpoints=1",
        # eval data from a file rather than a split
        "train.eval_every=10 data.eval=eval.jsonl",
        # auto is resolved to 0 without checkpointing: no contradiction
        "model.uncheckpointed_layers=auto model.gradient_checkpointing=false",
    ],
)
def test_values_at_the_edge_of_the_checks_pass(override):
    check_sft_config(load_config(None, ["data.train=x.jsonl", *override.split(" ")]))


def _adamw_step_is_finite(t) -> bool:
    """One AdamW step with ``t``'s settings over random weights, one of them with a zero gradient
    (lora_A's at the first step, lora_B being zero); raises what AdamW raises."""
    import torch

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))
    opt = torch.optim.AdamW(
        [a, b], lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, foreach=False
    )
    a.grad, b.grad = torch.zeros_like(a), torch.randn_like(b)
    opt.step()
    return bool(a.isfinite().all() and b.isfinite().all())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # AdamW stopped at the first step with a bare "value cannot be converted to type float"
        ("train.lr=1e38", r"train.lr=1e\+38 is too large: .*lr / \(1 - beta1\) = 1e\+39"),
        (("train.lr=1e37", "train.betas=[0.99, 0.999]"), r"train.lr=1e\+37 is too large"),
        # 0 in float32: the weights with a zero gradient became NaN
        ("train.eps=1e-46", r"train.eps must be >= 1.18e-38 .*, got 1e-46"),
    ],
)
def test_values_adamw_cannot_take_are_refused(override, message):
    overrides = [override] if isinstance(override, str) else list(override)
    cfg = load_config(None, ["data.train=x.jsonl", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_sft_config(cfg)
    try:  # (what the run would have met)
        assert not _adamw_step_is_finite(cfg.train)
    except RuntimeError as e:
        assert "without overflow" in str(e)


@pytest.mark.parametrize("override", ["train.lr=3e37", "train.eps=1.2e-38", "train.lr=0.5"])
def test_values_adamw_takes_pass(override):
    cfg = load_config(None, ["data.train=x.jsonl", override])
    check_sft_config(cfg)
    assert _adamw_step_is_finite(cfg.train)


@pytest.mark.parametrize("device", ["cpu", "cpu:0", "cuda", "cuda:1", "mps:0", "auto"])
def test_device_forms_torch_reads(device):
    check_sft_config(load_config(None, ["data.train=x.jsonl", f"model.device={device}"]))


def test_target_modules_as_comma_separated_names():
    assert load_config(None, ["lora.target_modules=q_proj,v_proj"]).lora.target_modules == [
        "q_proj",
        "v_proj",
    ]
    assert load_config(None, ["lora.target_modules=q_proj, v_proj"]).lora.target_modules == [
        "q_proj",
        "v_proj",
    ]
    # a single name or a regular expression stays a string
    assert load_config(None, ["lora.target_modules=.*(q|v)_proj"]).lora.target_modules == ".*(q|v)_proj"
    assert load_config(None, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"


def test_parse_override_yaml_values():
    # YAML reads 1e-4 as a string; the float field converts it
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_shipped_configs_load():
    from importlib import resources

    root = resources.files("hoptune.configs")
    names = [p.name for p in root.iterdir() if p.name.endswith(".yaml")]
    assert names
    for n in names:
        text = root.joinpath(n).read_text()
        assert text.startswith("#") and "hoptune " in text.splitlines()[0] + text, (
            f"{n}: header must show the command"
        )
        load_config(str(root.joinpath(n)))


def test_a_key_written_twice_in_a_yaml_file_is_an_error(tmp_path):
    # YAML readers keep the last of two equal keys: the first train section would be dropped whole
    p = _yaml(tmp_path, "train:\n  lr: 1.0e-4\nmodel:\n  device: cpu\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml': key 'train' is written twice \(lines 1 and 5\)"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"key 'lr' is written twice \(lines 2 and 3\)"):
        load_config(_yaml(tmp_path, "train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n"))
    # a YAML merge key may be overridden by the mapping's own keys
    cfg = load_config(_yaml(tmp_path, "train:\n  <<: {lr: 1.0e-4, epochs: 2}\n  lr: 3.0e-4\n"))
    assert cfg.train.lr == 3e-4 and cfg.train.epochs == 2.0


def test_dotted_key_in_a_yaml_file_says_to_nest_it(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_yaml(tmp_path, "train.lr: 1.0e-4\n"))
    assert "'train.lr'" in str(e.value) and "nest" in str(e.value) and "did you mean" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("output.dir=runs/exp #2", "runs/exp #2"),
        ("data.train=#1.jsonl", "#1.jsonl"),
        ('output.dir="runs/exp #2"', "runs/exp #2"),
        ("output.dir='a: b'", "a: b"),
    ],
)
def test_a_hash_in_an_override_is_part_of_the_value(override, value):
    key, _ = override.split("=", 1)
    section, leaf = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), leaf) == value


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    cfg = load_config(None, ["data.train=x.jsonl", f"output.dir={f}"])
    with pytest.raises(ConfigError, match="output.dir=.*notes.txt' is a file, not a folder"):
        check_sft_config(cfg)
    # a folder to make under the file: the raw errno message ("Not a directory") came at its makedirs
    cfg = load_config(None, ["data.train=x.jsonl", f"output.dir={f / 'run' / 'a'}"])
    with pytest.raises(ConfigError, match=r"output.dir=.*notes.txt/run/a' lies under .*notes.txt', a file"):
        check_sft_config(cfg)


def test_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    """The shell leaves ``~`` after an override's ``=`` (and YAML leaves it in a file) as it is:
    ``output.dir=~/runs/a`` wrote into a folder named ``~`` under the current one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    path = _yaml(tmp_path, "data:\n  train: ~/data/train.jsonl\noutput:\n  dir: ~/runs/a\n")
    cfg = load_config(
        path,
        ["model.path=~/models/llama", "data.eval=~/data/eval.jsonl", "output.resume=~/runs/a/checkpoints/x"],
    )
    assert cfg.model.path == f"{home}/models/llama"
    assert (cfg.data.train, cfg.data.eval) == (f"{home}/data/train.jsonl", f"{home}/data/eval.jsonl")
    assert (cfg.output.dir, cfg.output.resume) == (f"{home}/runs/a", f"{home}/runs/a/checkpoints/x")
    default = load_config(None, [])
    assert (default.model.path, default.output.resume) == ("hoptune/tiny", "auto")


def test_chat_template_file_starting_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """``model.chat_template=~/chat.jinja`` was refused as "no such file" while the file was there:
    every other path key reads ``~`` as the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    cfg = load_config(None, ["data.train=x.jsonl", "model.chat_template=~/chat.jinja"])
    assert cfg.model.chat_template == str(tmp_path / "chat.jinja")
    check_sft_config(cfg)
    # an inline template keeps its text (Jinja's ~ joins strings)
    inline = "{{ '~' ~ messages[0].content }}"
    assert load_config(None, [f"model.chat_template={inline}"]).model.chat_template == inline


def test_a_mapping_override_of_a_section_keeps_its_other_keys(tmp_path):
    """``train={lr: 1e-4}`` replaced the whole section: the file's other train keys (save_every,
    eval_every, warmup...) went back to their defaults without a word."""
    p = _yaml(tmp_path, "train:\n  lr: 2.0e-4\n  save_every: 200\n  warmup_ratio: 0.03\nlora:\n  r: 8\n")
    cfg = load_config(p, ["train={lr: 1e-4, epochs: 2}", "lora={alpha: 64}"])
    assert (cfg.train.lr, cfg.train.epochs) == (1e-4, 2.0)
    assert (cfg.train.save_every, cfg.train.warmup_ratio) == (200, 0.03)
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 64.0)
    # a key of the mapping is checked as a dotted override is
    with pytest.raises(ConfigError, match="unknown config key 'train.learnig_rate'; did you mean 'train.lr'"):
        load_config(p, ["train={learnig_rate: 1e-4}"])
    # null would silently reset the section to its defaults
    with pytest.raises(ConfigError, match=r"override 'train=null': train is a section; set its keys"):
        load_config(p, ["train=null"])


@pytest.mark.parametrize(
    ("text", "message"),
    [("0123", None), ("+0099", None), ("-010", None), ("1:30", r"expected int, got '1:30' \(str\)")],
)
def test_numbers_with_leading_zeros_are_decimal(tmp_path, text, message):
    """YAML 1.1 (PyYAML) reads 0123 as octal (83) and 1:30 as base 60 (90): a seed or step count
    written that way silently became another number."""
    for cfg_of in (
        lambda: load_config(None, [f"train.seed={text}"]),
        lambda: load_config(_yaml(tmp_path, f"train:\n  seed: {text}\n")),
    ):
        if message is None:
            assert cfg_of().train.seed == int(text)
        else:
            with pytest.raises(ConfigError, match=message):
                cfg_of()
    # what YAML and Python both read as hexadecimal or binary stays so
    cfg = load_config(None, ["train.seed=0x10", "train.max_steps=0b11"])
    assert (cfg.train.seed, cfg.train.max_steps) == (16, 3)
    with pytest.raises(ConfigError, match=r"train.lr: expected float, got '1:30.5' \(str\)"):
        load_config(None, ["train.lr=1:30.5"])


@pytest.mark.parametrize("text", ["2024", "0123", "2024_01", "1.10", "2024-01-05"])
def test_a_path_of_digits_keeps_its_text(tmp_path, text):
    """A folder or file named like a number (or a date) was read as one and refused ("expected str,
    got 2024 (int)"), or would have been written back as another name (0123 -> 123, 1.10 -> 1.1)."""
    keys = ("model.path", "data.train", "data.eval", "data.general_data", "output.dir", "output.resume")
    yaml_text = "".join(f"{k.split('.')[0]}:\n  {k.split('.')[1]}: {text}\n" for k in keys[:2])
    for cfg in (
        load_config(None, [f"{k}={text}" for k in keys]),
        load_config(_yaml(tmp_path, yaml_text), [f"{k}={text}" for k in keys[2:]]),
    ):
        assert (cfg.model.path, cfg.data.train, cfg.data.eval) == (text, text, text)
        assert (cfg.data.general_data, cfg.output.dir, cfg.output.resume) == (text, text, text)
    # a number key still reads numbers as numbers, and refuses a date
    cfg = load_config(_yaml(tmp_path, "train:\n  seed: 0123\n  lr: 1.10\n"), ["train.max_steps=2_000"])
    assert (cfg.train.seed, cfg.train.lr, cfg.train.max_steps) == (123, 1.1, 2000)
    assert type(cfg.train.seed) is int and type(cfg.train.lr) is float
    assert "seed: 123\n" in dump_config(cfg)
    with pytest.raises(ConfigError, match=r"train.seed: expected int, got '2024-01-05' \(str\)"):
        load_config(None, ["train.seed=2024-01-05"])


@pytest.mark.parametrize(
    "text", ["&x", "*run", "&x eval.jsonl", "!x", "!!str 5", "|", ">", "%x", "@x", "`x`"]
)
def test_a_path_starting_with_a_yaml_indicator_keeps_its_text(text):
    """An anchor (&x), alias (*run), tag or block mark at the start of a path was read as YAML: the
    path became null (eval data silently dropped), an empty string, or lost its first word."""
    keys = ("model.path", "data.train", "data.eval", "data.general_data", "output.dir", "output.resume")
    cfg = load_config(None, [f"{k}={text}" for k in keys])
    assert (cfg.model.path, cfg.data.train, cfg.data.eval) == (text, text, text)
    assert (cfg.data.general_data, cfg.output.dir, cfg.output.resume) == (text, text, text)
    # quoted, null and plain values read as before
    cfg = load_config(None, ["data.eval='&x'", "data.train=null", "output.dir=runs/a"])
    assert (cfg.data.eval, cfg.data.train, cfg.output.dir) == ("&x", None, "runs/a")


def test_an_anchor_alone_in_an_override_of_another_key_is_an_error():
    # YAML reads a bare anchor as null: model.quantize=&x silently loaded the model unquantized
    with pytest.raises(ConfigError, match=r"override 'model.quantize=&x': .*anchor"):
        load_config(None, ["model.quantize=&x"])
    assert load_config(None, ["model.quantize=&x nf4"]).model.quantize == "nf4"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.r=8.0", "lora.r: expected int, got 8.0 (float)"),
        ("train.max_steps=1500.0", "train.max_steps: expected int, got 1500.0 (float)"),
        ("train.betas=0.95", "train.betas: expected list[float], got 0.95 (float)"),
        ("model.device=3", "model.device: expected str, got 3 (int)"),
        ("model.chat_template=true", "model.chat_template: expected str | null, got True (bool)"),
        (
            "model.attn_implementation=7",
            "model.attn_implementation: expected str | null, got 7 (int)",
        ),
    ],
)
def test_a_wrong_type_is_named_as_yaml_reads_it(tmp_path, override, message):
    # the loader's number classes (which keep a number's text) showed in the error: (_Float), (_Int)
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message
    key, value = override.split("=")
    section, leaf = key.split(".")
    with pytest.raises(ConfigError) as e:
        load_config(_yaml(tmp_path, f"{section}:\n  {leaf}: {value}\n"))
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("[]\n", "list"),
        ("- train\n", "list"),
        ("0\n", "int"),
        ("42\n", "int"),
        ("1.5\n", "float"),
        ("false\n", "bool"),
        ("''\n", "str"),
        ("lr=1e-4\n", "str"),
    ],
)
def test_a_yaml_file_that_is_not_a_mapping_is_an_error(tmp_path, text, kind):
    """A file of one list or value is an error naming its YAML type: an empty one ([], 0, false, '')
    loaded as the defaults, and a number was named by the loader's own class (_Int)."""
    p = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"config file {p!r} must hold a mapping of sections, got {kind}"


@pytest.mark.parametrize("item", ["train..lr=1", ".lr=1", "train.=1"])
def test_an_override_key_with_an_empty_part_is_named(item):
    with pytest.raises(ConfigError, match=r"is not a dotted name like train\.lr"):
        load_config(None, [item])


def test_a_config_file_that_is_not_utf8_is_named_as_such(tmp_path):
    # (a file saved as Latin-1 by an editor: a comment's "é")
    p = tmp_path / "c.yaml"
    p.write_bytes("# r\xe9glages\ntrain:\n  lr: 1e-4\n".encode("latin-1"))
    with pytest.raises(
        ConfigError,
        match=r"config file '.*c\.yaml' is not UTF-8 text \(invalid continuation byte at byte 3\)",
    ):
        load_config(str(p))


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "null\n", "{}\n"])
def test_an_empty_yaml_file_is_the_defaults(tmp_path, text):
    assert load_config(_yaml(tmp_path, text)) == SFTConfig()


@pytest.mark.parametrize(
    ("text", "overrides", "shown"),
    [
        ("train: 3\n", ["train.lr=1e-3"], "train: expected a mapping of keys, got 3"),
        ("lora: true\n", ["lora.r=8"], "lora: expected a mapping of keys, got True"),
        ("lora: [q_proj]\n", ["lora={r: 8}"], "lora: expected a mapping of keys, got ['q_proj']"),
    ],
)
def test_an_override_into_a_non_mapping_section_is_an_error(tmp_path, text, overrides, shown):
    """A file's section that is not a mapping (``lora: true``) is an error, but an override of one
    of its keys silently replaced it with a mapping of that key alone."""
    p = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == shown
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    assert shown in str(e.value) and str(e.value).startswith("override ")
    # an empty section (null) is the defaults: an override fills it
    cfg = load_config(_yaml(tmp_path, "train:\nlora:\n"), ["train.lr=1e-3", "lora={r: 8}"])
    assert (cfg.train.lr, cfg.lora.r) == (1e-3, 8)


@pytest.mark.parametrize("key", ["output.overwrite", "train.overwrite_output_dir"])
def test_an_overwrite_key_says_how_runs_and_folders_go(key):
    """output.overwrite was answered 'did you mean output.progress?'."""
    with pytest.raises(
        ConfigError, match=rf"unknown config key '{key}'; a run never overwrites another: a new"
    ):
        load_config(None, [f"{key}=true"])


@pytest.mark.parametrize("device", ["cuda:10", "xpu", "xpu:1"])
def test_device_forms_with_more_digits_or_xpu_pass(device):
    check_sft_config(load_config(None, ["data.train=x.jsonl", f"model.device={device}"]))


def test_general_data_starting_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """data.general_data is a path like data.train: ``~`` is the home folder."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["data.general_data=~/general.jsonl"])
    assert cfg.data.general_data == str(tmp_path / "general.jsonl")


def test_a_section_set_to_null_names_its_first_key():
    with pytest.raises(
        ConfigError, match=r"train is a section; set its keys one by one \(train\.epochs=\.\.\.\)"
    ):
        load_config(None, ["train=null"])
    with pytest.raises(ConfigError, match=r"\(lora\.enabled=\.\.\.\)"):
        load_config(None, ["lora=null"])


def test_an_override_given_twice_keeps_the_last(tmp_path):
    """Overrides apply in order: the last value of a key wins, over the file's too."""
    p = _yaml(tmp_path, "train:\n  lr: 1.0e-3\n")
    cfg = load_config(p, ["train.lr=1e-4", "train.lr=3e-4", "train={lr: 5e-4}", "train.lr=2e-5"])
    assert cfg.train.lr == 2e-5
    assert load_config(p, ["train.lr=2e-5", "train={lr: 5e-4}"]).train.lr == 5e-4


def test_a_config_path_that_is_a_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*' does not exist"):
        load_config(str(tmp_path))


def test_an_empty_section_in_a_yaml_file_is_its_defaults(tmp_path):
    """``train:`` with no keys below it (YAML's null) is the section's defaults, not an error."""
    cfg = load_config(_yaml(tmp_path, "model:\ntrain:\n  lr: 1.0e-3\noutput:\n"))
    assert cfg.model == SFTConfig().model and cfg.output == SFTConfig().output
    assert cfg.train.lr == 1e-3


def test_an_unknown_top_level_key_with_no_near_name_lists_the_sections():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["zz=1"])
    assert str(e.value) == "unknown config key 'zz'; valid keys here: model, lora, data, train, output"


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("num_train_epochs", "train.epochs"),
        ("train.num_train_epochs", "train.epochs"),
        ("adam_epsilon", "train.eps"),
    ],
)
def test_other_trainers_names_at_any_level_name_the_key(key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'; did you mean '{suggestion}'"):
        load_config(None, [f"{key}=1"])


def test_a_chat_template_file_that_is_not_utf8_is_a_config_error(tmp_path):
    """Checked with the config, before the model loads: a ConfigError naming the key and the file."""
    p = tmp_path / "chat.jinja"
    p.write_bytes("{# r\xe9ponse #}{{ messages[0].content }}".encode("latin-1"))
    cfg = load_config(None, ["data.train=x.jsonl", f"model.chat_template={p}"])
    with pytest.raises(ConfigError, match=r"model.chat_template='.*chat\.jinja' is not UTF-8 text"):
        check_sft_config(cfg)
