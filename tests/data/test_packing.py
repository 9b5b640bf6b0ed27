"""Packing: best-fit decreasing, per-document positions, and the same loss and gradient as
unpacked batches (documents must not attend to each other)."""

import itertools
import random

import pytest
import torch

from hoptune.data import (
    DataError,
    StepSampler,
    best_fit_decreasing,
    collate,
    mix_replay,
    pack_examples,
    split_eval,
)
from hoptune.data.formatting import Example
from hoptune.data.packing import Row, rows_from_examples
from hoptune.train.sft import sft_step
from tests.conftest import report_close


def test_best_fit_decreasing():
    lengths = [7, 5, 4, 3, 3, 2, 2, 1, 9]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 36 tokens: the optimum is 4 bins of 10
    # best fit: the 4 goes beside the 6 (free 4), not beside the 5 (free 5), which leaves room
    # for the 3 and the 2; worst fit (the most free space) or first-fit by bin space opens a third bin
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    with pytest.raises(ValueError, match="truncate it first"):
        best_fit_decreasing([11], 10)


def test_best_fit_many_items_is_tight():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 256)
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert len(bins) <= sum(lengths) / 256 * 1.02 + 1


def _examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(10, 60, (length,), generator=g).tolist()
        # p = 0: a text record's mask, the first token too (it is still never a target in a row)
        p = int(torch.randint(0, length - 1, (1,), generator=g))
        out.append(Example(ids, [0] * p + [1] * (length - p), f"x:{i}"))
    return out


def test_packed_rows_positions_and_masks():
    ex = _examples(6)
    rows = pack_examples(ex, 40)
    assert sum(r.num_docs for r in rows) == 6
    for r in rows:
        assert len(r) <= 40
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert len(starts) == r.num_docs and starts[0] == 0
        assert all(r.loss_mask[s] == 0 for s in starts)  # never predicted across documents
    b = collate(rows, pad_id=0)
    assert b["attention_mask"] is None and b["position_ids"].shape == b["input_ids"].shape
    assert int(b["num_tokens"]) == sum(len(e) for e in ex)
    total_targets = sum(e.num_loss_tokens for e in ex)
    assert int(b["loss_mask"][:, 1:].sum()) == total_targets


@pytest.mark.parametrize(
    "bad",
    [Example([8, 9], [0], "c.jsonl:2"), Example([], [], "c.jsonl:2"), Example([8], [0, 1], "c.jsonl:2")],
)
def test_pack_refuses_a_mask_of_another_length(bad):
    """One mask entry per token: another length would move the later documents' targets (here the
    first token of the next document would become a target, predicted across the boundary)."""
    good = Example([5, 6, 7], [0, 1, 1], "a.jsonl:1")
    with pytest.raises(ValueError, match=r"example 1 \(c.jsonl:2\) has"):
        pack_examples([good, bad, Example([3, 4], [0, 1])], 16)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(small_model, attn):
    model = small_model
    model.set_attn_implementation(attn)
    model.train()
    ex = _examples(9, seed=3)
    unpacked = collate(rows_from_examples(ex), pad_id=0)
    packed_rows = pack_examples(ex, 48)
    assert len(packed_rows) < len(ex)
    packed = collate(packed_rows, pad_id=0)

    loss_u, n_u, _ = sft_step(model, [unpacked], torch.device("cpu"))
    g_u = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss_p, n_p, _ = sft_step(model, [packed], torch.device("cpu"))
    g_p = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert n_u == n_p
    assert loss_p == pytest.approx(loss_u, rel=1e-5)
    for n in g_u:
        report_close(g_p[n], g_u[n], 1e-6, 1e-4, n)

    # and the check is real: the same rows without per-document positions give another loss
    leaky = dict(packed)
    leaky["position_ids"] = None
    leaky["attention_mask"] = (packed["input_ids"] != -1).long()
    model.zero_grad(set_to_none=True)
    loss_leak, _, _ = sft_step(model, [leaky], torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    assert abs(loss_leak - loss_u) > 1e-4


def test_packed_batch_goes_flat_to_flash_attention(small_model, monkeypatch):
    """Flash-attention finds packed documents from position ids only in a batch of one row, so a
    packed batch of several rows goes to it as one row of B * T tokens (sdpa and eager take the
    rows as they are); the log-probs are those of the rows."""
    from types import SimpleNamespace

    from hoptune.train import loop

    model = small_model.eval()
    model.set_attn_implementation("sdpa")
    packed = collate(pack_examples(_examples(9, seed=3), 48), pad_id=0)
    b, t = packed["input_ids"].shape
    assert b > 1
    seen = []
    model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True
    )
    with torch.no_grad():
        ref, labels = loop.batch_logprobs(model, packed)
        assert seen.pop() == (b, t)
        # sdpa also finds the documents of one long row: taken as flash-attention would be
        monkeypatch.setattr(loop, "_PACKED_ROWS_OK", (None, "eager"))
        flat, flat_labels = loop.batch_logprobs(model, packed)
        assert seen.pop() == (1, b * t)
    assert torch.equal(flat_labels, labels)
    report_close(flat, ref, 1e-6, 1e-5, "log-probs")

    monkeypatch.undo()

    def cfg(impl):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=impl))

    for impl in ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn3"):
        assert loop._flatten_packed(cfg(impl), packed)
    for impl in ("sdpa", "eager", "flex_attention", None):
        assert not loop._flatten_packed(cfg(impl), packed)
    one_row = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in packed.items()}
    assert not loop._flatten_packed(cfg("flash_attention_2"), one_row)
    unpacked = collate(rows_from_examples(_examples(3)), pad_id=0)
    assert not loop._flatten_packed(cfg("flash_attention_2"), unpacked)


def test_split_and_replay():
    ex = _examples(50)
    train, held = split_eval(ex, 0.2, seed=0)
    assert len(held) == 10 and len(train) == 40
    assert not {e.where for e in train} & {e.where for e in held}
    assert split_eval(ex, 0.2, seed=0)[1] == held  # deterministic
    # the share rounded to the nearest whole number of examples, at least one
    assert [len(split_eval(ex[:20], f, seed=0)[1]) for f in (0.33, 0.01, 0.274)] == [7, 1, 5]
    # a share that rounds to every example leaves none to train on: an error, not an empty run
    with pytest.raises(DataError, match=r"data.eval_fraction=0.75 leaves no training example out of 2"):
        split_eval(ex[:2], 0.75, seed=0)
    general = _examples(3, seed=9)
    mixed, added = mix_replay(train, general, 0.2, seed=0)
    assert added == 10 and len(mixed) == 50  # 10 of 50 = 20%, drawn again once the 3 are used
    assert mix_replay(train, general, 0.0, seed=0) == (train, 0)


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1, float("nan")])
def test_replay_and_split_fractions_out_of_range_are_named(fraction):
    """A fraction outside [0, 1) is an error naming the argument (not a ZeroDivisionError, nor a
    replay or a held-out split silently left out)."""
    ex, general = _examples(10), _examples(3, seed=9)
    with pytest.raises(ValueError, match=rf"mix_replay: fraction must be in \[0, 1\), got {fraction}"):
        mix_replay(ex, general, fraction, seed=0)
    with pytest.raises(ValueError, match=rf"split_eval: fraction must be in \[0, 1\), got {fraction}"):
        split_eval(ex, fraction, seed=0)


def test_step_sampler_is_deterministic_and_covers_epochs():
    s = StepSampler(num_rows=10, rows_per_step=4, seed=7)
    seq = [i for step in range(5) for i in s.rows_for_step(step)]
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert seq[:10] != seq[10:20]  # a new order each epoch
    s2 = StepSampler(num_rows=10, rows_per_step=4, seed=7)
    assert s2.rows_for_step(3) == s.rows_for_step(3)  # any step, without replaying the others
    assert s.steps_for_epochs(2) == 5


def test_step_sampler_whole_epochs():
    """train.epochs: each epoch is cut on its own, its last step takes the rows left over, and no
    step holds a row twice (not even with fewer rows than a step takes)."""
    s = StepSampler(num_rows=10, rows_per_step=4, seed=7, whole_epochs=True)
    assert s.steps_for_epochs(1) == 3 and s.steps_for_epochs(2) == 6 and s.steps_for_epochs(0.5) == 2
    steps = [s.rows_for_step(k) for k in range(6)]
    assert [len(r) for r in steps] == [4, 4, 2, 4, 4, 2]
    assert sorted(i for r in steps[:3] for i in r) == list(range(10))
    assert sorted(i for r in steps[3:] for i in r) == list(range(10))
    assert [s.epoch_at(k) for k in range(7)] == [0.0, 0.4, 0.8, 1.0, 1.4, 1.8, 2.0]
    small = StepSampler(num_rows=10, rows_per_step=16, seed=7, whole_epochs=True)
    assert small.steps_for_epochs(1) == 1 and sorted(small.rows_for_step(0)) == list(range(10))
    assert StepSampler(30, 1, 0, whole_epochs=True).steps_for_epochs(0.1) == 3  # 0.1 x 30 is 3, not 4


def test_step_sampler_stream_epochs_round_as_written():
    """Steps for a fraction of epochs on the streamed order: 1.1 x 50 rows is 55 steps of one row
    (1.1 * 50 is 55.00000000000001 in floats: 56 before), as with whole epochs."""
    assert StepSampler(50, 1, 0).steps_for_epochs(1.1) == 55
    assert StepSampler(50, 1, 0, whole_epochs=True).steps_for_epochs(1.1) == 55
    assert StepSampler(50, 1, 0).steps_for_epochs(1.11) == 56  # 55.5 rows: a step more
    assert StepSampler(10, 4, 0).steps_for_epochs(0.1) == 1


@pytest.mark.parametrize("num_rows", [3, 10])
def test_step_sampler_stream_smaller_than_a_step_takes_each_row_once(num_rows):
    """train.max_steps over fewer rows than a step: each step takes every row once, in a new order
    each step, as transformers' Trainer does (3 rows, 16 a step took 5, 5 and 6 copies before: an
    uneven weight on the rows), and counts as one epoch; as with whole epochs."""
    s = StepSampler(num_rows=num_rows, rows_per_step=16, seed=5)
    steps = [s.rows_for_step(k) for k in range(4)]
    assert all(sorted(r) == list(range(num_rows)) for r in steps)
    assert len({tuple(r) for r in steps}) > 1  # still shuffled, step by step
    assert [s.epoch_at(k) for k in range(3)] == [0.0, 1.0, 2.0]
    assert s.steps_for_epochs(2) == 2 and s.steps_for_epochs(0.5) == 1
    whole = StepSampler(num_rows=num_rows, rows_per_step=16, seed=5, whole_epochs=True)
    assert steps == [whole.rows_for_step(k) for k in range(4)]


def test_the_data_fingerprint_tells_rows_apart_by_their_cuts_masks_and_positions():
    # a resumed run compares it: the same tokens cut into other rows, another mask or other
    # positions (another packing) are other training data
    from hoptune.data.dataset import fingerprint

    base = [Row([1, 2, 3], [0, 1, 1], [0, 1, 0]), Row([4], [1])]
    others = [
        [Row([1, 2], [0, 1], [0, 1]), Row([3, 4], [1, 1])],
        [Row([1, 2, 3], [0, 0, 1], [0, 1, 0]), Row([4], [1])],
        [Row([1, 2, 3], [0, 1, 1], [0, 1, 2]), Row([4], [1])],
        [Row([1, 2, 3], [0, 1, 1], None), Row([4], [1])],
    ]
    fp = fingerprint(base)
    assert fingerprint([Row([1, 2, 3], [0, 1, 1], [0, 1, 0]), Row([4], [1])]) == fp
    assert len({fp, *(fingerprint(rows) for rows in others)}) == 1 + len(others)
    # (the bytes of these two are the same but for each row's length, which the hash takes first)
    assert fingerprint([Row([1], [1]), Row([0], [0])]) != fingerprint([Row([1, 1], [0, 0])])


def test_an_item_of_exactly_the_capacity_fills_a_bin_of_its_own():
    """An item as long as the capacity is taken (not refused as too long) and fills its bin alone;
    one token more is refused, naming the item."""
    assert best_fit_decreasing([3, 10, 7], 10) == [[1], [2, 0]]
    with pytest.raises(ValueError, match="item 1 has length 11 > capacity 10"):
        best_fit_decreasing([3, 11], 10)


def test_documents_keep_their_data_order_inside_a_row():
    """A packed row holds its documents in the order of the data (not longest first), each with its
    own tokens, positions from 0 and its first token never a target."""
    g = torch.Generator().manual_seed(11)
    lengths = [3, 9, 5, 7, 2]
    ex = [
        Example(torch.randint(10, 60, (n,), generator=g).tolist(), [1] * n, f"x:{i}")
        for i, n in enumerate(lengths)
    ]
    rows = pack_examples(ex, 12)
    seen = []
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r)]
        docs = [r.input_ids[a:b] for a, b in itertools.pairwise(starts)]
        idx = [next(i for i, e in enumerate(ex) if e.input_ids == d) for d in docs]
        assert idx == sorted(idx) and len(idx) == r.num_docs
        assert r.loss_mask == [m for i in idx for m in [0] + [1] * (lengths[i] - 1)]
        seen += idx
    assert sorted(seen) == list(range(len(ex))) and any(r.num_docs > 1 for r in rows)


def test_collate_pads_on_the_right_and_marks_only_the_real_tokens():
    """Unpacked rows: pad ids after each row's tokens, an attention mask of ones over exactly the
    row's tokens, no target on padding; packed rows: padding continues the last document's
    positions (1, 2, ... past its last one) and there is no attention mask."""
    rows = [Row([5, 6, 7, 8], [0, 1, 1, 1]), Row([9, 10], [0, 1])]
    b = collate(rows, pad_id=3)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 3, 3]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["loss_mask"].dtype == torch.bool and b["loss_mask"].tolist() == [
        [False, True, True, True],
        [False, True, False, False],
    ]
    assert b["position_ids"] is None and int(b["num_tokens"]) == 6

    packed = [
        Row([5, 6, 7, 8, 9], [0, 1, 0, 1, 1], [0, 1, 0, 1, 2], num_docs=2),
        Row([4, 5, 6], [0, 1, 1], [0, 1, 2]),
        Row([7, 8, 9, 4], [0, 1, 0, 1], [0, 1, 0, 1], num_docs=2),
    ]
    b = collate(packed, pad_id=0)
    assert b["attention_mask"] is None
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert b["input_ids"][1].tolist() == [4, 5, 6, 0, 0] and not b["loss_mask"][1, 3:].any()


def test_collate_refuses_packed_and_unpacked_rows_together():
    """A batch is all packed rows or all unpacked ones: mixing them (either one first) is an error
    naming the problem, not positions silently dropped or a failure inside torch."""
    packed, unpacked = Row([5, 6], [0, 1], [0, 1]), Row([7, 8, 9], [0, 1, 1])
    for rows in ([packed, unpacked], [unpacked, packed]):
        with pytest.raises(ValueError, match="cannot mix packed and unpacked rows"):
            collate(rows, pad_id=0)
    with pytest.raises(ValueError, match="collate needs at least one row"):
        collate([], pad_id=0)
