"""The SFT loss equals TRL's definition (docs/FORMATS.md §3): masked token NLL summed over the
whole accumulated batch, divided by the number of loss tokens of the whole batch.

The oracle is independent of hoptune's forward: TRL's collator builds the labels, the model's
full logits go through transformers' ``ForCausalLMLoss`` with ``num_items_in_batch`` (what TRL's
trainer does), and the gradients of every micro-batch are summed."""

import re

import pytest
import torch

from hoptune.data.packing import Row, collate
from hoptune.losses import (
    count_loss_tokens,
    head_logprobs,
    sft_loss,
    shift_for_next_token,
    token_logprobs_from_logits,
)
from hoptune.train.sft import sft_step
from tests.conftest import report_close


def test_token_logprobs_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 2] = -100
    lp = token_logprobs_from_logits(logits, labels)
    assert lp.dtype == torch.float32 and lp.shape == (3, 5)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    ref[0, 2] = 0.0
    report_close(lp, ref, 1e-6, 1e-6, "logprobs")
    lp_t = token_logprobs_from_logits(logits, labels, temperature=0.7)
    ref_t = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    ref_t[0, 2] = 0.0
    report_close(lp_t, ref_t, 1e-6, 1e-6, "logprobs temperature")


def test_token_logprobs_errors():
    with pytest.raises(ValueError, match="labels must have the shape"):
        token_logprobs_from_logits(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        token_logprobs_from_logits(torch.randn(2, 5), torch.tensor([1, 7]))
    with pytest.raises(TypeError, match="int64"):
        token_logprobs_from_logits(torch.randn(2, 5), torch.tensor([1.0, 2.0]))
    # a bad label's position is given in the labels' own shape
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 2] = 9
    with pytest.raises(ValueError, match=r"got 9 at position \(1, 2\)"):
        token_logprobs_from_logits(torch.randn(2, 3, 5), labels)
    with pytest.raises(ValueError, match="empty vocabulary"):
        token_logprobs_from_logits(torch.randn(2, 3, 0), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        token_logprobs_from_logits(torch.randn(2, 5), [1, 2])
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        token_logprobs_from_logits([[0.0, 1.0]], torch.zeros(1, dtype=torch.long))
    # integer logits are not scores: refused rather than cast
    with pytest.raises(TypeError, match="logits must be a floating-point tensor, got torch.int64"):
        token_logprobs_from_logits(torch.randint(0, 9, (2, 5)), torch.tensor([1, 2]))


BAD_LABEL_AT = [((), ()), ((2, 3, 4), (1, 2, 3)), ((3, 2, 2, 5), (2, 0, 1, 4))]


@pytest.mark.parametrize("shape,pos", BAD_LABEL_AT)
def test_token_logprobs_bad_label_position_in_labels_shape(shape, pos):
    """A label out of range is reported at its position in labels' own shape, whatever the number
    of leading dims (not at its index in the flattened labels)."""
    g = torch.Generator().manual_seed(len(shape))
    logits = torch.randn(*shape, 13, generator=g)
    labels = torch.randint(0, 13, shape, generator=g)
    labels[pos] = 13
    with pytest.raises(ValueError, match=re.escape(f"got 13 at position {pos}")):
        token_logprobs_from_logits(logits, labels)


@pytest.mark.parametrize("shape", [(), (7,), (2, 3), (2, 3, 2)])
def test_token_logprobs_any_leading_shape(shape):
    """(*, V) logits with (*) labels, shifted views included, against fp64 log_softmax + gather."""
    base = torch.randn(*shape, 4, 11, dtype=torch.float64)
    logits = base[..., :-1, :]  # a strided view (the shift)
    labels = torch.randint(0, 11, (*shape, 3))
    if labels.numel() > 1:
        labels.view(-1)[1] = -100
    logits.requires_grad_(True)
    got = token_logprobs_from_logits(logits, labels, temperature=0.8)
    ref = torch.log_softmax(logits / 0.8, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    ref = torch.where(labels != -100, ref, 0.0)
    assert got.shape == labels.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs_from_logits(z, labels, temperature=0.8), (logits,)
    )


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
def test_token_logprobs_ignore_index_other_than_minus_100_at_any_shape(shape):
    """ignore_index (3 here, a token id of the vocabulary) gives 0.0 at its positions whatever the
    logits' dims: 1-D and 4-D logits take the flattened path, 2-D the op's own."""
    g = torch.Generator().manual_seed(len(shape))
    logits = torch.randn(*shape, 11, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 11, shape, generator=g)
    labels.view(-1)[0] = 3
    got = token_logprobs_from_logits(logits, labels, ignore_index=3)
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(got, torch.where(labels != 3, ref, 0.0), rtol=0, atol=1e-12)


def test_token_logprobs_of_float8_logits_are_those_of_their_fp32_values():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 3, 11, generator=g) * 3).to(torch.float8_e4m3fn)
    labels = torch.randint(0, 11, (4, 3), generator=g)
    got = token_logprobs_from_logits(logits, labels)
    assert got.dtype == torch.float32
    assert torch.equal(got, token_logprobs_from_logits(logits.float(), labels))


def test_head_logprobs_fp64():
    """An fp64 nn.Linear head (the fused op takes 16/32-bit only) runs through its logits: the
    fp64 oracle's values, with the scale, soft-cap and temperature, and gradcheck."""
    head = torch.nn.Linear(6, 13, dtype=torch.float64)
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (5,))
    kw = dict(logit_scale=0.5, softcap=3.0, temperature=0.9)
    got = head_logprobs(head, hidden, labels, **kw)
    z = 3.0 * torch.tanh(head(hidden) * 0.5 / 3.0) / 0.9
    ref = torch.log_softmax(z, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda h: head_logprobs(head, h, labels, **kw), (hidden,))


def test_sft_loss_normalises_by_whole_batch():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert float(sft_loss(lp, mask)) == pytest.approx((1 + 3 + 6) / 3)
    assert float(sft_loss(lp, mask, num_loss_tokens=10)) == pytest.approx(10 / 10)
    assert float(sft_loss(lp, mask, num_loss_tokens=10.0)) == pytest.approx(10 / 10)
    assert float(sft_loss(lp, mask, num_loss_tokens=torch.tensor(10))) == pytest.approx(10 / 10)
    with pytest.raises(ValueError, match="num_loss_tokens must be a whole number of tokens, got 0.5"):
        sft_loss(lp, mask, num_loss_tokens=0.5)
    with pytest.raises(ValueError, match="no loss token"):
        sft_loss(lp, torch.zeros_like(mask))
    assert count_loss_tokens([mask, mask[:1]]) == 5
    # a masked-out position may hold -inf or nan (e.g. a forbidden token): it adds nothing
    bad = torch.tensor([[-1.0, float("nan"), -2.0], [float("-inf"), -4.0, -5.0]])
    m = torch.tensor([[1, 0, 1], [0, 1, 1]])
    assert float(sft_loss(bad, m)) == pytest.approx((1 + 2 + 4 + 5) / 4)
    assert float(sft_loss(bad, m.bool())) == pytest.approx((1 + 2 + 4 + 5) / 4)


def test_sft_loss_fp64_gradcheck():
    """fp64 log-probs give an fp64 loss (at least fp32, never rounded down to it): gradcheck of
    the masked form, the form normalised by the whole batch, and the unmasked ones."""
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, dtype=torch.float64, generator=g)
    lp.requires_grad_(True)
    mask = torch.rand(3, 5, generator=g) > 0.3
    for args in ((mask,), (mask.long(), 20), (None,), (None, 20)):
        assert sft_loss(lp, *args).dtype == torch.float64
        assert torch.autograd.gradcheck(lambda x, a=args: sft_loss(x, *a), (lp,))
    assert sft_loss(lp.detach().bfloat16(), mask).dtype == torch.float32


def test_sft_loss_bad_arguments():
    """Masks and token counts that have no meaning in TRL's loss are errors naming the argument,
    not a loss rounded some other way: a mask of 0.5s (it weighted the sum but the count was
    truncated), a fractional or multi-element tensor count, a mask on another device."""
    lp = -torch.rand(2, 3)
    with pytest.raises(ValueError, match="loss_mask must be bool or hold only 0 and 1, got 0.5"):
        sft_loss(lp, torch.full((2, 3), 0.5))
    # (a mask passed as the log-probs summed as a count: sft_loss(tensor([True, False])) was -0.5)
    for not_logprobs in (torch.tensor([True, False]), torch.tensor([-1, -2])):
        with pytest.raises(TypeError, match="logprobs must be a floating-point tensor, got torch"):
            sft_loss(not_logprobs)
    with pytest.raises(ValueError, match="loss_masks must be bool or hold only 0 and 1, got 2"):
        count_loss_tokens([torch.ones(2, 3), torch.tensor([[0, 2, 1]])])
    with pytest.raises(ValueError, match="num_loss_tokens must be a whole number of tokens, got 2.5"):
        sft_loss(lp, None, torch.tensor(2.5))
    with pytest.raises(ValueError, match="num_loss_tokens must be a whole number of tokens, got inf"):
        sft_loss(lp, None, float("inf"))
    with pytest.raises(ValueError, match=r"num_loss_tokens must be one number, got a tensor of shape \(2,\)"):
        sft_loss(lp, None, torch.tensor([3, 3]))
    with pytest.raises(ValueError, match=r"logprobs on cpu, loss_mask on meta"):
        sft_loss(lp, torch.ones(2, 3, dtype=torch.bool, device="meta"))
    # 0/1 masks of any dtype are masks
    for m in (torch.tensor([[1, 0, 1], [0, 0, 1]]), torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])):
        assert float(sft_loss(lp, m)) == pytest.approx(float(-(lp[0, 0] + lp[0, 2] + lp[1, 2]) / 3))
        assert count_loss_tokens(m) == 3


def test_shift_for_next_token():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1]], dtype=torch.bool)
    assert shift_for_next_token(ids, mask).tolist() == [[-100, 7, 8]]


def test_shift_for_next_token_fills_with_the_given_ignore_index():
    """Positions outside the loss take the ignore_index given (a collator's own, e.g. -1), and
    token_logprobs_from_logits with the same ignore_index gives them 0."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (2, 6), generator=g, dtype=torch.int32)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [0, 0, 0, 1, 1, 0]])
    labels = shift_for_next_token(ids, mask, ignore_index=-1)
    assert labels.dtype == torch.int64
    want = torch.where(mask[:, 1:].bool(), ids[:, 1:].long(), -1)
    assert torch.equal(labels, want)
    lp = token_logprobs_from_logits(torch.randn(2, 5, 11, generator=g), labels, ignore_index=-1)
    assert (lp[labels == -1] == 0).all() and (lp[labels != -1] < 0).all()


def test_head_logprobs_bad_arguments():
    """A plain nn.Linear head whose dtype differs from hidden's: an error naming both (F.linear's
    speaks of mat1 and mat2); under autocast the head runs as autocast casts it, as it does
    inside the model."""
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(3, 8, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (3,))
    with pytest.raises(
        TypeError, match=r"hidden must have head.weight's dtype torch.float32, got torch.bfloat16"
    ):
        head_logprobs(head, hidden, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head_logprobs(head, hidden, labels)
    z = torch.nn.functional.linear(hidden, head.weight.bfloat16(), head.bias.bfloat16()).double()
    ref = torch.log_softmax(z, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        head_logprobs(head, [[0.0] * 8] * 3, labels)
    # softcap=0 means the same on every head: refused (a plain Linear head's fused op refused it,
    # any other head took it as no cap)
    for h in (torch.nn.Linear(8, 11, dtype=torch.float64), torch.nn.Sequential(torch.nn.Linear(8, 11))):
        hid = torch.randn(
            3, 8, dtype=h[0].weight.dtype if isinstance(h, torch.nn.Sequential) else h.weight.dtype
        )
        for cap in (0.0, -2.0):
            with pytest.raises(
                ValueError, match=f"softcap must be positive \\(or None for no cap\\), got {cap}"
            ):
                head_logprobs(h, hid, labels, softcap=cap)


def test_shift_for_next_token_bad_arguments():
    """(B, T) integer ids only: a 3-D batch would be shifted along its second dim without a
    word, float ids truncated, and a 1-D row or a mask on another device failed inside torch."""
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\), got shape \(5,\)"):
        shift_for_next_token(torch.arange(5), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\), got shape \(2, 3, 4\)"):
        shift_for_next_token(torch.zeros(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="input_ids must be integer token ids, got torch.float32"):
        shift_for_next_token(torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match=r"input_ids on cpu, loss_mask on meta"):
        shift_for_next_token(torch.zeros(2, 3, dtype=torch.long), mask.to("meta"))
    # a mask of other values than 0 and 1 was taken as bool: 0.5 and 2 selected the token, as
    # sft_loss and the trainer's batches refuse them
    ids = torch.tensor([[5, 6, 7]])
    for bad, shown in ((torch.tensor([[0, 0.5, 1]]), "0.5"), (torch.tensor([[1, 1, 2]]), "2")):
        with pytest.raises(ValueError, match=f"loss_mask must be bool or hold only 0 and 1, got {shown}"):
            shift_for_next_token(ids, bad)
    for ok in (torch.tensor([[1, 0, 1]]), torch.tensor([[1.0, 0.0, 1.0]])):
        assert shift_for_next_token(ids, ok).tolist() == [[-100, 7]]


def _examples(tokenizer, n, seed):
    """Prompt/completion examples of very different lengths (uneven loss tokens per micro-batch)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p_len = int(torch.randint(2, 12, (1,), generator=g))
        c_len = 1 + (i * 7) % 13
        ids = torch.randint(10, 60, (p_len + c_len,), generator=g).tolist()
        out.append((ids, [0] * p_len + [1] * c_len))
    return out


def _oracle_step(model, micro_examples):
    """TRL's collator + transformers' loss with num_items_in_batch, summed over micro-batches."""
    # imported here: the pure tests above need neither
    from transformers.loss.loss_utils import ForCausalLMLoss
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0)
    batches = []
    for ex in micro_examples:
        feats = [
            {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]} for ids, mask in ex
        ]
        batches.append(collator(feats))
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = ForCausalLMLoss(logits, b["labels"], vocab_size=logits.shape[-1], num_items_in_batch=n_items)
        loss.backward()
        total += float(loss.detach())
    return total


def _hoptune_step(model, micro_examples):
    micro = [collate([Row(ids, mask) for ids, mask in ex], pad_id=0) for ex in micro_examples]
    loss, _, _ = sft_step(model, micro, torch.device("cpu"))
    return loss


def _grads(model):
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_sft_step_matches_trl_definition(small_model, tokenizer, lora):
    """Per-step loss and gradient, 3 micro-batches with very uneven loss-token counts."""
    model = small_model
    if lora:
        from hoptune.patch import apply_lora

        apply_lora(model, r=4, alpha=8, init_lora_weights=False)
    model.train()
    ex = _examples(tokenizer, 7, seed=1)
    micro = [ex[:1], ex[1:5], ex[5:]]  # 1, 4 and 2 examples
    counts = [sum(sum(m[1:]) for _, m in e) for e in micro]
    assert len(set(counts)) == 3, counts

    ours = _hoptune_step(model, micro)
    g_ours = _grads(model)
    ref = _oracle_step(model, micro)
    g_ref = _grads(model)
    assert ours == pytest.approx(ref, rel=1e-5)
    assert set(g_ours) == set(g_ref) and g_ours
    for n in g_ref:
        report_close(g_ours[n], g_ref[n], 1e-6, 1e-4, n)

    # the test can tell the definitions apart: a mean of per-micro-batch means is not this loss
    means = 0.0
    for e in micro:
        means += _oracle_step(model, [e]) / len(micro)
    model.zero_grad(set_to_none=True)
    assert abs(means - ref) > 1e-3


def test_one_batch_equals_accumulated(small_model, tokenizer):
    """Accumulating micro-batches gives the loss and gradient of the same examples as one batch."""
    model = small_model
    model.train()
    ex = _examples(tokenizer, 6, seed=2)
    one = _hoptune_step(model, [ex])
    g_one = _grads(model)
    acc = _hoptune_step(model, [ex[:2], ex[2:3], ex[3:]])
    g_acc = _grads(model)
    assert acc == pytest.approx(one, rel=1e-5)
    for n in g_one:
        report_close(g_acc[n], g_one[n], 1e-6, 1e-4, n)


def test_sft_step_unread_loss_is_the_same_step(small_model, tokenizer):
    """``read=False`` (the trainer's: the loss read after the optimizer's launches) returns the same
    loss as a 0-dim float32 tensor, and the same gradients."""
    model = small_model
    model.train()
    micro = [
        collate([Row(ids, mask) for ids, mask in ex], pad_id=0) for ex in [_examples(tokenizer, 3, seed=3)]
    ]
    read, n_loss, n_tok = sft_step(model, micro, torch.device("cpu"))
    g_read = _grads(model)
    unread, n_loss2, n_tok2 = sft_step(model, micro, torch.device("cpu"), read=False)
    g_unread = _grads(model)
    assert isinstance(read, float) and isinstance(unread, torch.Tensor)
    assert unread.shape == () and unread.dtype == torch.float32 and float(unread) == read
    assert (n_loss, n_tok) == (n_loss2, n_tok2) and set(g_read) == set(g_unread)
    for n in g_read:
        assert torch.equal(g_read[n], g_unread[n])


def test_loss_functions_name_a_bad_argument():
    """Arguments that are not tensors or not numbers are errors naming the argument (they failed
    with an AttributeError / TypeError from inside), and a count of loss tokens below the number
    the mask holds, which would scale the loss up, is refused where it costs no device sync."""
    lp = -torch.rand(3)
    with pytest.raises(TypeError, match="loss_mask must be a torch.Tensor, got list"):
        sft_loss(lp, [1, 1, 1], 3)
    with pytest.raises(TypeError, match="logprobs must be a torch.Tensor, got list"):
        sft_loss([0.1, 0.2])
    with pytest.raises(TypeError, match=r"loss_masks\[0\] must be a torch.Tensor, got list"):
        count_loss_tokens([[1, 0]])
    with pytest.raises(TypeError, match=r"loss_masks\[1\] must be a torch.Tensor, got NoneType"):
        count_loss_tokens([torch.ones(2), None])
    with pytest.raises(TypeError, match="loss_masks must be a torch.Tensor or a list of them, got int"):
        count_loss_tokens(3)
    for bad in ("", "10", b"1"):  # (iterable, but not masks: "" would count 0 tokens)
        with pytest.raises(TypeError, match=f"a list of them, got {type(bad).__name__}"):
            count_loss_tokens(bad)
    for bad in (True, "3", torch.tensor(True)):
        with pytest.raises(TypeError, match="num_loss_tokens must be a number of tokens"):
            sft_loss(lp, None, bad)
    mask = torch.tensor([True, False, True])
    with pytest.raises(
        ValueError, match=r"num_loss_tokens must be at least the 2 loss tokens of loss_mask, got 1"
    ):
        sft_loss(lp, mask, 1)
    with pytest.raises(
        ValueError, match=r"num_loss_tokens must be at least the 3 loss tokens of logprobs, got 2"
    ):
        sft_loss(lp, None, torch.tensor(2))
    assert float(sft_loss(lp, mask, 2)) == pytest.approx(float(-(lp[0] + lp[2]) / 2))
    assert float(sft_loss(lp, None, 3)) == pytest.approx(float(-lp.sum() / 3))
    # counts are taken as before: floats that are whole, NumPy integers
    np = pytest.importorskip("numpy")
    assert float(sft_loss(lp, mask, np.int64(4))) == pytest.approx(float(-(lp[0] + lp[2]) / 4))
    assert float(sft_loss(lp, mask, 4.0)) == pytest.approx(float(-(lp[0] + lp[2]) / 4))
    with pytest.raises(TypeError, match="num_loss_tokens must be a number of tokens"):
        sft_loss(lp, None, np.True_)


def test_token_logprobs_temperature_not_a_number():
    logits, labels = torch.randn(2, 5), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="temperature must be a real number, got 'a'"):
        token_logprobs_from_logits(logits, labels, temperature="a")
    with pytest.raises(TypeError, match="temperature must be a real number, got None"):
        token_logprobs_from_logits(logits, labels, temperature=None)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        token_logprobs_from_logits(logits, labels, temperature=0)
    ref = token_logprobs_from_logits(logits, labels, temperature=0.5)
    torch.testing.assert_close(token_logprobs_from_logits(logits, labels, temperature=torch.tensor(0.5)), ref)


def test_head_logprobs_scalars_not_numbers():
    """The same message on the fused path (a plain nn.Linear head) and on any other head."""
    head = torch.nn.Linear(4, 6)
    hidden, labels = torch.randn(2, 4), torch.tensor([1, 2])
    for h in (head, torch.nn.Sequential(head)):
        with pytest.raises(TypeError, match="logit_scale must be a real number, got 'a'"):
            head_logprobs(h, hidden, labels, logit_scale="a")
        with pytest.raises(TypeError, match="logit_scale must be a real number, got None"):
            head_logprobs(h, hidden, labels, logit_scale=None)
        with pytest.raises(TypeError, match=r"softcap must be a real number \(or None for no cap\), got 'a'"):
            head_logprobs(h, hidden, labels, softcap="a")
        with pytest.raises(TypeError, match="temperature must be a real number, got 'a'"):
            head_logprobs(h, hidden, labels, temperature="a")
