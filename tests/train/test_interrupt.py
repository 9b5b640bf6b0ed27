"""Ctrl-C (SIGINT) in the training loop: recorded by the latch, raised at the loop's safe points."""

import os
import signal
import threading

import pytest

from hoptune.models.tiny import build_model
from hoptune.train import loop, sft
from tests.conftest import SMALL

from .conftest import small_config


@pytest.fixture(autouse=True)
def _default_sigint():
    """Each test starts and ends with Python's own SIGINT handler (a test that failed half-way must
    not leave a latch's handler to the next one)."""
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, prev)
    assert loop._ACTIVE_LATCH is None


def test_the_first_ctrl_c_is_recorded_and_raised_at_check():
    latch = loop.InterruptLatch().start()
    try:
        assert latch.active and signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        latch.check()  # nothing yet
        loop.check_interrupt()
        signal.raise_signal(signal.SIGINT)  # (no KeyboardInterrupt here)
        assert latch.hits == 1
        with pytest.raises(KeyboardInterrupt):
            latch.check()
        with pytest.raises(KeyboardInterrupt):
            loop.check_interrupt()  # (the function the loop's inner code calls)
    finally:
        assert latch.stop() is True
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not latch.active and latch.stop() is False
    loop.check_interrupt()  # no latch: a no-op


def test_a_second_ctrl_c_raises_at_once():
    latch = loop.InterruptLatch().start()
    try:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        latch.stop()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stop_without_a_ctrl_c():
    latch = loop.InterruptLatch().start()
    latch.check()
    assert latch.stop() is False
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_of_the_program_is_left_alone():
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    signal.signal(signal.SIGINT, mine)
    latch = loop.InterruptLatch().start()
    assert not latch.active
    signal.raise_signal(signal.SIGINT)
    assert seen == [signal.SIGINT]
    latch.check()  # (inactive: nothing to raise)
    assert latch.stop() is False
    assert signal.getsignal(signal.SIGINT) is mine


def test_one_latch_at_a_time():
    """A latch started inside an active one stays inactive; the outer one takes the Ctrl-C."""
    outer = loop.InterruptLatch().start()
    try:
        inner = loop.InterruptLatch().start()
        assert not inner.active and loop._ACTIVE_LATCH is outer
        signal.raise_signal(signal.SIGINT)
        inner.check()  # (inactive)
        with pytest.raises(KeyboardInterrupt):
            loop.check_interrupt()
        assert inner.stop() is False and loop._ACTIVE_LATCH is outer
    finally:
        outer.stop()


def test_inactive_outside_the_main_thread():
    out = {}

    def run():
        latch = loop.InterruptLatch().start()
        out["active"] = latch.active
        latch.stop()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out == {"active": False}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _sigint_in_forward(monkeypatch, at, training=True):
    """Raise a real SIGINT in the ``at``-th forward (1-based) of the model in that mode (training,
    or eval); returns the modes of the forwards started and of those that finished."""
    real = loop.batch_logprobs
    started, finished = [], []

    def forward(model, *a, **k):
        started.append(model.training)
        if model.training == training and started.count(training) == at:
            signal.raise_signal(signal.SIGINT)
        out = real(model, *a, **k)
        finished.append(model.training)  # (reached: the SIGINT did not raise in the forward)
        return out

    monkeypatch.setattr(loop, "batch_logprobs", forward)
    return started, finished


def _train_until_interrupted(cfg, tokenizer):
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    return loop.Checkpointer(cfg.output.dir).latest()


def test_sft_stops_at_the_next_micro_batch(tmp_path, tokenizer, demo_data, monkeypatch):
    """A SIGINT in step 3's first micro-batch: the micro-batch finishes, the run stops before the
    second one, nothing of step 3 is saved, the handler is Python's again, and the checkpoint of step
    2 is the newest (the same command resumes from it)."""
    cfg = small_config(tmp_path, demo_data, "train.save_every=1", "train.grad_accum=2", "data.eval=null")
    started, finished = _sigint_in_forward(monkeypatch, 5)  # step 3's first micro-batch (two a step)
    latest = _train_until_interrupted(cfg, tokenizer)
    assert len(started) == len(finished) == 5  # the micro-batch it came in finished, the next did not start
    assert os.path.basename(latest) == "step-00000002"
    assert loop.Checkpointer.read_state(latest)["step"] == 2
    train = [
        r for r in loop.read_metrics(os.path.join(cfg.output.dir, "metrics.jsonl")) if r["split"] == "train"
    ]
    assert [r["step"] for r in train] == [1, 2]


def test_sft_stops_in_an_eval_inside_the_loop(tmp_path, tokenizer, demo_data, monkeypatch):
    """A SIGINT during the eval of train.eval_every: the eval stops at its next batch; the step
    before it was saved."""
    cfg = small_config(
        tmp_path, demo_data, "train.save_every=1", "train.eval_every=2", "train.eval_batch_size=2"
    )
    started, finished = _sigint_in_forward(monkeypatch, 1, training=False)
    latest = _train_until_interrupted(cfg, tokenizer)
    assert started.count(False) == finished.count(False) == 1  # that eval batch finished, no other began
    assert loop.Checkpointer.read_state(latest)["step"] == 1  # (step 2's save comes after its eval)


def test_a_ctrl_c_in_the_last_step_stops_before_the_final_save(tmp_path, tokenizer, demo_data, monkeypatch):
    """The last step's last micro-batch gets the SIGINT after its check: the loop ends, and the run
    still stops (no adapter written) rather than losing the Ctrl-C."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1", "data.eval=null")
    started, finished = _sigint_in_forward(monkeypatch, 4)  # step 2's second (last) micro-batch
    latest = _train_until_interrupted(cfg, tokenizer)
    assert len(started) == len(finished) == 4
    assert not os.path.exists(os.path.join(cfg.output.dir, "adapter"))
    assert loop.Checkpointer.read_state(latest)["step"] == 1
