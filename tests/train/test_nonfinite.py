"""NaN / inf in training: a non-finite loss or gradient stops the run before its optimizer step
(naming the step, the checkpoints untouched); fp16 trains with dynamic loss scaling, whose
overflowing steps are skipped, and its scale comes back on resume."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from hoptune.models.tiny import build_model
from hoptune.train import loop, sft
from tests.conftest import SMALL

from .conftest import small_config


def _run(cfg, tokenizer, dtype=torch.float32):
    model = build_model(seed=0, dtype=dtype, **SMALL).to(cfg.model.device)
    return sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)


def _on_step(monkeypatch, n: int, action) -> dict:
    """Call ``action(model, out)`` right after the backward of the n-th optimizer step (counted
    through the sft_step calls, in ``calls["n"]``); what it returns replaces sft_step's ``out``."""
    real_step = sft.sft_step
    calls = {"n": 0}

    def step(model, *a, **k):
        calls["n"] += 1
        out = real_step(model, *a, **k)
        if calls["n"] == n:
            return action(model, out)
        return out

    monkeypatch.setattr(sft, "sft_step", step)
    return calls


def _poison_grad(value):
    def action(model, out):
        p = next(p for _, p in loop.trainable_parameters(model) if p.grad is not None)
        p.grad.view(-1)[0] = value
        return out

    return action


def _adapter(folder):
    return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


def _fused_adamw(monkeypatch):
    """loop.build_optimizer with torch's fused AdamW on the CPU too (as on a GPU, where the trainer's
    optimizer skips a non-finite step on the device)."""
    real = loop.build_optimizer

    def build(*a, **k):
        opt = real(*a, **k)
        for g in opt.param_groups:
            g["fused"], g["foreach"] = True, False
        return opt

    monkeypatch.setattr(loop, "build_optimizer", build)


@pytest.mark.parametrize(
    "fused",
    [False, True, pytest.param("cuda", marks=pytest.mark.gpu)],
    ids=["read_first", "device_skip", "cuda"],
)
@pytest.mark.parametrize("what", ["loss", "grad"])
def test_nonfinite_step_stops_the_run_before_its_update(
    tmp_path, tokenizer, demo_data, monkeypatch, what, fused
):
    """A NaN loss (or a finite loss with a NaN gradient: an overflow in the backward) went on
    training without a word; a NaN gradient turned every weight into NaN, saved over the good
    checkpoints. With fused AdamW (the GPU's) the skip is decided on the device and the loss and
    norm are read after the optimizer's launches: the same stop, the same checkpoints."""
    device = ["model.device=cuda"] if fused == "cuda" else []
    cfg = small_config(
        tmp_path, demo_data, "train.max_steps=6", "train.save_every=1", "train.keep_checkpoints=1", *device
    )
    if fused is True:
        _fused_adamw(monkeypatch)
    if what == "loss":
        _on_step(monkeypatch, 3, lambda model, out: (float("nan"), *out[1:]))
        message = "step 3 of 6: the training loss is nan"
    else:
        _on_step(monkeypatch, 3, _poison_grad(float("nan")))
        message = "step 3 of 6: the gradient norm is nan"
    ck = loop.Checkpointer(cfg.output.dir)
    with pytest.raises(FloatingPointError, match=f"{message}. No optimizer step was taken .*step-00000002"):
        _run(cfg, tokenizer)
    assert os.path.basename(ck.latest()) == "step-00000002"
    assert sorted(n for n in os.listdir(ck.dir) if n.startswith("step-")) == ["step-00000002"]
    assert all(torch.isfinite(t).all() for t in _adapter(ck.latest()).values())
    recs = loop.read_metrics(os.path.join(cfg.output.dir, "metrics.jsonl"))
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2, 3]
    assert (recs[-1]["step"], math.isnan(recs[-1]["loss"])) == (3, what == "loss")

    # a resume (here: without the fault) continues from step 2 and drops the line of step 3
    monkeypatch.undo()
    if fused is True:
        _fused_adamw(monkeypatch)
    again = _run(cfg, tokenizer)
    assert again.steps == 6 and len(again.train_losses) == 4
    recs = loop.read_metrics(os.path.join(cfg.output.dir, "metrics.jsonl"))
    assert [r["step"] for r in recs if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in recs)


def test_optimizer_step_refuses_a_nonfinite_gradient():
    p = torch.nn.Parameter(torch.ones(3))
    opt = loop.build_optimizer([("p", p)], lr=0.1)
    sch = loop.build_scheduler(opt, 10, kind="linear")
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(FloatingPointError, match="the gradient norm is inf"):
        loop.optimizer_step(opt, sch, [p], max_grad_norm=1.0)
    assert torch.equal(p.detach(), torch.ones(3)) and p.grad is None
    assert sch.last_epoch == 0


def _fused_state(opt, p):
    st = opt.state[p]
    return [p.detach().clone()] + [st[k].clone() for k in ("exp_avg", "exp_avg_sq", "step")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("bad", ["grad_inf", "grad_nan", "loss_nan", "loss_inf_float"])
def test_fused_adamw_skips_a_nonfinite_step_on_the_device(bad, device):
    """With torch's fused AdamW the step is launched before the norm and the loss are read: a
    non-finite one leaves the weights, both moments and the step count as they were (the
    optimizer's found_inf), the schedule where it was, no gradient behind, and names the cause."""
    torch.manual_seed(0)
    with torch.device(device):  # (torch.set_default_device(None) after breaks torch 2.7's default device)
        _skip_case(bad)


def _skip_case(bad):
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=True)
    sch = loop.build_scheduler(opt, 10, kind="linear")
    assert loop._skips_on_device(opt)
    g = torch.randn(5, 3)
    p.grad = g.clone()
    norm = loop.optimizer_step(opt, sch, [p], max_grad_norm=1.0, loss=torch.tensor(2.5))
    assert norm == pytest.approx(torch.linalg.vector_norm(g).item(), rel=1e-6)
    before, epoch = _fused_state(opt, p), sch.last_epoch
    p.grad = torch.randn(5, 3)
    if bad.startswith("grad"):
        p.grad[1, 2] = float("inf") if bad == "grad_inf" else float("nan")
        loss, match = torch.tensor(1.0), f"the gradient norm is {'inf' if bad == 'grad_inf' else 'nan'}"
    else:
        loss = torch.tensor(float("nan")) if bad == "loss_nan" else float("inf")
        match = f"the training loss is {'nan' if bad == 'loss_nan' else 'inf'}"
    with pytest.raises(FloatingPointError, match=match):
        loop.optimizer_step(opt, sch, [p], max_grad_norm=1.0, loss=loss)
    for got, want in zip(_fused_state(opt, p), before):
        assert torch.equal(got, want)
    assert sch.last_epoch == epoch and p.grad is None and getattr(opt, "found_inf", None) is None
    # and the next good step is taken
    p.grad = torch.randn(5, 3)
    loop.optimizer_step(opt, sch, [p], max_grad_norm=1.0, loss=torch.tensor(1.0))
    assert not torch.equal(p.detach(), before[0]) and opt.state[p]["step"].item() == 2


def test_fused_step_equals_the_step_read_first(monkeypatch):
    """The device-side skip changes when the norm is read, not the update: the same weights, moments
    and norms over a few steps as with the norm read before the optimizer's step."""
    results = []
    for on_device in (True, False):
        monkeypatch.setattr(loop, "SKIP_ON_DEVICE", on_device)
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(7, 4))
        opt = torch.optim.AdamW([p], lr=0.05, fused=True)
        assert loop._skips_on_device(opt) is on_device
        norms = []
        for _ in range(3):
            p.grad = torch.randn(7, 4) * 3
            norms.append(loop.optimizer_step(opt, None, [p], max_grad_norm=1.0, loss=torch.tensor(0.5)))
        results.append((norms, _fused_state(opt, p)))
    assert results[0][0] == results[1][0]
    for got, want in zip(results[0][1], results[1][1]):
        assert torch.equal(got, want)


def test_a_torch_whose_adam_takes_no_found_inf_gets_the_read_first_order(monkeypatch):
    """The device-side skip is taken only where torch's functional Adam / AdamW take found_inf
    (checked once, by signature): elsewhere a non-finite step must still be refused before it."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    assert loop._skips_on_device(opt)
    monkeypatch.setattr(loop, "_found_inf_known", None)
    monkeypatch.setattr(loop, "_ADAM_FUNCTIONALS", (("torch.optim.adam", "no_such_function"),))
    assert not loop._skips_on_device(opt)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    stepped = []
    monkeypatch.setattr(opt, "step", lambda: stepped.append(1))
    with pytest.raises(FloatingPointError, match="the gradient norm is nan"):
        loop.optimizer_step(opt, None, [p], max_grad_norm=1.0, loss=torch.tensor(1.0))
    assert not stepped and torch.equal(p.detach(), torch.ones(3))


def _first_grad_norm(cfg, tokenizer, dtype):
    _run(cfg, tokenizer, dtype)
    return loop.read_metrics(os.path.join(cfg.output.dir, "metrics.jsonl"))[0]["grad_norm"]


def test_fp16_gradients_do_not_underflow(tmp_path, tokenizer, demo_data, monkeypatch):
    """Each token's gradient is divided by the loss tokens of the step: with many of them (here 10,000
    times this small step's) an fp16 backward flushed the gradients to zero (their norm came out 8%
    low here, 0 at 100,000 times) before the loss was scaled."""
    real = sft.count_loss_tokens
    monkeypatch.setattr(sft, "count_loss_tokens", lambda masks: 10_000 * real(masks))
    common = ["train.max_steps=1", "data.eval=null"]
    ref = _first_grad_norm(small_config(tmp_path / "fp32", demo_data, *common), tokenizer, torch.float32)
    cfg = small_config(tmp_path / "fp16", demo_data, *common, "model.dtype=fp16")
    got = _first_grad_norm(cfg, tokenizer, torch.float16)
    assert got == pytest.approx(ref, rel=5e-3)


def test_fp16_overflow_skips_the_step_and_resume_keeps_the_scale(tmp_path, tokenizer, demo_data, monkeypatch):
    """An fp16 step whose (scaled) gradients overflow is skipped: the weights and the schedule stay,
    the scale halves and the run goes on. The scale is part of a checkpoint: a resumed run logs the
    same scales and losses and saves the same adapter as one that was not interrupted."""
    common = ["model.dtype=fp16", "train.max_steps=6", "train.save_every=3", "train.lr_schedule=linear"]
    _on_step(monkeypatch, 2, _poison_grad(float("inf")))
    full = _run(small_config(tmp_path / "a", demo_data, *common), tokenizer, torch.float16)
    recs = [
        r for r in loop.read_metrics(os.path.join(full.run_dir, "metrics.jsonl")) if r["split"] == "train"
    ]
    assert [r["loss_scale"] for r in recs] == [2.0**16] + [2.0**15] * 5
    assert math.isinf(recs[1]["grad_norm"]) and all(math.isfinite(r["grad_norm"]) for r in recs[2:])
    lrs = [r["lr"] for r in recs]
    assert lrs[2] == lrs[1] and lrs[1] < lrs[0]  # the skipped step did not advance the schedule
    # and the run's summary says so (it showed only in metrics.jsonl)
    assert [n for n in full.notes if "skipped" in n] == [
        "fp16 loss scaling skipped 1 of the 6 steps this run took (their gradients overflowed: no update, "
        "the loss scale halved, the schedule held); metrics.jsonl names them (grad_norm null). A few at the "
        "start are usual; many mean the scale keeps overflowing: bf16 (model.dtype=bf16) has fp32's range"
    ]

    cfg = small_config(tmp_path / "b", demo_data, *common)
    calls = _on_step(monkeypatch, 2, _poison_grad(float("inf")))
    real_step = sft.sft_step

    def dies(*a, **k):
        if calls["n"] == 3:  # the 4th step: killed after the checkpoint of step 3
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    monkeypatch.setattr(sft, "sft_step", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tokenizer, torch.float16)
    monkeypatch.undo()
    second = _run(cfg, tokenizer, torch.float16)
    assert second.train_losses == full.train_losses[3:]
    assert not [n for n in second.notes if "skipped" in n]  # (steps 4-6: none skipped)
    resumed = [
        r for r in loop.read_metrics(os.path.join(second.run_dir, "metrics.jsonl")) if r["split"] == "train"
    ]
    assert [r["loss_scale"] for r in resumed] == [r["loss_scale"] for r in recs]
    assert [r["lr"] for r in resumed] == lrs
    a, b = _adapter(full.run_dir), _adapter(second.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_reports_a_nonfinite_stop_on_one_line(monkeypatch, capsys):
    """``hoptune sft`` ends such a run with the message and exit status 1, not a traceback."""

    def stops(cfg):
        raise FloatingPointError(
            "training stopped at step 3 of 6: the training loss is nan. No optimizer step"
        )

    monkeypatch.setattr(sft, "train", stops)
    assert sft.main(None) == 1
    err = capsys.readouterr().err
    assert (
        err
        == "hoptune sft: error: training stopped at step 3 of 6: the training loss is nan. No optimizer step\n"
    )


def test_fp16_overflow_at_unit_scale_stops():
    """Skipped steps halve the scale; gradients that still overflow at a scale of 1 (NaN from the
    backward itself) stop the run instead of skipping every step to the end."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = loop.build_optimizer([("p", p)], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for scale in (4.0, 2.0, 1.0):
        (scaler.scale(p.sum()) * float("nan")).backward()
        if scale > 1:
            assert math.isnan(loop.optimizer_step(opt, None, [p], 1.0, scaler))
            assert scaler.get_scale() == scale / 2
        else:
            with pytest.raises(FloatingPointError, match="the gradient norm is nan even at loss scale 1"):
                loop.optimizer_step(opt, None, [p], 1.0, scaler)
    assert torch.equal(p.detach(), torch.ones(3)) and p.grad is None


def test_a_disabled_loss_scaler_still_refuses_a_nan_gradient():
    # a GradScaler built where it cannot run is disabled: its step() would step on NaN gradients,
    # so the step goes on as with no scaler (the weights stay, FloatingPointError)
    p = torch.nn.Parameter(torch.ones(3))
    opt = loop.build_optimizer([("p", p)], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    (p.sum() * float("nan")).backward()
    with pytest.raises(FloatingPointError, match="the gradient norm is nan"):
        loop.optimizer_step(opt, None, [p], 1.0, scaler)
    assert torch.equal(p.detach(), torch.ones(3)) and p.grad is None


def test_an_optimizer_needs_a_parameter_to_train():
    with pytest.raises(ValueError, match="no trainable parameter"):
        loop.build_optimizer([], lr=0.1)


def _fake_tensorboard(monkeypatch) -> list:
    """A TensorBoard writer that records its close() calls (in the list returned)."""
    import sys
    import types

    closed = []

    class Writer:
        def __init__(self, log_dir, **kwargs):
            pass

        def add_scalar(self, *a, **k):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    return closed


def test_a_stopped_run_flushes_its_tensorboard_log(tmp_path, tokenizer, demo_data, monkeypatch):
    """TensorBoard's writer holds up to 2 minutes of points: a run that stops (a NaN, a Ctrl-C)
    closes it, or the steps that led up to the stop were missing from TensorBoard."""
    closed = _fake_tensorboard(monkeypatch)
    cfg = small_config(tmp_path, demo_data, "output.tensorboard=true")
    _on_step(monkeypatch, 2, lambda model, out: (float("inf"), *out[1:]))
    with pytest.raises(FloatingPointError, match="step 2 of 6: the training loss is inf"):
        _run(cfg, tokenizer)
    assert closed == [True]

    def killed(model, out):
        raise KeyboardInterrupt("killed")

    _on_step(monkeypatch, 2, killed)
    with pytest.raises(KeyboardInterrupt):
        _run(small_config(tmp_path / "b", demo_data, "output.tensorboard=true"), tokenizer)
    assert closed == [True, True]


def test_a_run_stopped_in_its_final_eval_flushes_its_tensorboard_log(
    tmp_path, tokenizer, demo_data, monkeypatch
):
    """Stopped after its last step, in the final eval (Ctrl-C in a long one, an out-of-memory): every
    step was trained and logged, and the writer was left open with the points of the run's end."""
    closed = _fake_tensorboard(monkeypatch)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop, "evaluate_nll", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(small_config(tmp_path, demo_data, "output.tensorboard=true", "train.max_steps=2"), tokenizer)
    assert closed == [True]
    assert os.path.isfile(os.path.join(tmp_path, "run", "adapter", "adapter_model.safetensors"))


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fp16_on_a_cpu_is_remarked_on_at_the_start(tmp_path, tokenizer, demo_data, name, dtype):
    """model.dtype=fp16 on a CPU trained without a word (slow there, and its overflows skip steps);
    bf16 is a choice the resume check itself suggests there, so it goes without one."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=1", "data.eval=null", f"model.dtype={name}")
    lines = []
    sft.train(cfg, log=lines.append, model=build_model(seed=0, dtype=dtype, **SMALL), tokenizer=tokenizer)
    said = [s for s in lines if "on a CPU" in s]
    assert said == (
        [
            "model.dtype=fp16 on a CPU: its matmuls are slow there, and fp16 overflows where bf16 and fp32 "
            "do not (loss scaling skips those steps); model.dtype=auto trains in fp32 on a CPU"
        ]
        if name == "fp16"
        else []
    )
