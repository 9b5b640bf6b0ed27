"""The demo task: small arithmetic with answers that can be checked exactly.

The built-in tiny model is pretrained on "general" text: equations (``3+4=7``, ``9-2=7``) and
chat conversations asking for differences (``What is 9-2?`` -> ``7``): it knows sums as
equations but has never been asked for one in a chat (asked ``What is 3+4?`` it answers wrong
almost always). The SFT task is exactly that question; training uses 70 of the 100
operand pairs and the other 30 are held out, so held-out accuracy measures whether the model
learned to answer (reusing what pretraining taught it), not the answers themselves. Asking the
pretraining-style subtraction questions before and after shows what fine-tuning does to a skill
it did not train (the replay mix is there to keep it).
"""

from __future__ import annotations

import random
from typing import Any

import torch

OPERANDS = range(10)
TRAIN_FRACTION = 0.7


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in OPERANDS for b in OPERANDS]


def split_pairs(seed: int = 1) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train pairs, held-out pairs): a fixed seeded 70 / 30 split of the 100 operand pairs."""
    pairs = all_pairs()
    random.Random(seed).shuffle(pairs)
    n = int(TRAIN_FRACTION * len(pairs))
    return sorted(pairs[:n]), sorted(pairs[n:])


def plus_question(a: int, b: int) -> str:
    return f"What is {a}+{b}?"


def minus_question(a: int, b: int) -> str:
    return f"What is {a}-{b}?"


def chat_record(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def sft_records(pairs: list[tuple[int, int]]) -> list[dict]:
    """The SFT task as chat records: ``What is a+b?`` -> the sum."""
    return [chat_record(plus_question(a, b), str(a + b)) for a, b in pairs]


def plus_qa(pairs: list[tuple[int, int]]) -> list[tuple[str, str]]:
    return [(plus_question(a, b), str(a + b)) for a, b in pairs]


def minus_qa() -> list[tuple[str, str]]:
    """Every subtraction question of the pretraining data (a >= b)."""
    return [(minus_question(a, b), str(a - b)) for a, b in all_pairs() if a >= b]


def general_records(n: int, seed: int = 2) -> list[dict]:
    """Replay data in the pretraining's style: subtraction chats and lines of equations (as text)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            q, a = rng.choice(minus_qa())
            out.append(chat_record(q, a))
        else:
            out.append({"text": "\n".join(_equation(rng) for _ in range(6))})
    return out


def _equation(rng: random.Random) -> str:
    if rng.random() < 0.5:
        a, b = rng.choice(OPERANDS), rng.choice(OPERANDS)
        return f"{a}+{b}={a + b}"
    a = rng.choice(OPERANDS)
    b = rng.randint(0, a)
    return f"{a}-{b}={a - b}"


def pretraining_document(tokenizer: Any, rng: random.Random) -> str:
    """One document of the tiny model's pretraining corpus (half equations, half subtraction chats)."""
    if rng.random() < 0.5:
        body = "\n".join(_equation(rng) for _ in range(8))
        return f"{tokenizer.bos_token}{body}{tokenizer.eos_token}"
    q, a = rng.choice(minus_qa())
    text = tokenizer.apply_chat_template(chat_record(q, a)["messages"], tokenize=False)
    return text + tokenizer.eos_token


def pretraining_batch(tokenizer: Any, rng: random.Random, batch: int, seq_len: int) -> torch.Tensor:
    """``(batch, seq_len)`` int64 token ids: fresh documents back to back, cut into rows (every step
    sees new samples, so the model learns the facts rather than a fixed text)."""
    need = batch * seq_len
    ids: list[int] = []
    while len(ids) < need:
        ids.extend(tokenizer(pretraining_document(tokenizer, rng), add_special_tokens=False)["input_ids"])
    return torch.tensor(ids[:need], dtype=torch.long).view(batch, seq_len)


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int = 4, device: Any = "cpu"
) -> list[str]:
    """Greedy answers to chat ``questions`` (text up to the end-of-turn). Prompts of equal length
    are batched together, so no padding (and no attention mask) is involved."""
    was_training = model.training
    model.eval()
    end_ids = {tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id}
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(len(e), []).append(i)
    answers = [""] * len(questions)
    try:
        for n, idx in groups.items():
            x = torch.tensor([encoded[i] for i in idx], dtype=torch.long, device=device)
            for _ in range(max_new_tokens):
                nxt = model(input_ids=x, use_cache=False).logits[:, -1].argmax(-1)
                x = torch.cat([x, nxt[:, None]], dim=1)
            for row, i in enumerate(idx):
                out = []
                for tok in x[row, n:].tolist():
                    if tok in end_ids:
                        break
                    out.append(tok)
                answers[i] = tokenizer.decode(out)
    finally:
        model.train(was_training)
    return answers


def accuracy(model: Any, tokenizer: Any, qa: list[tuple[str, str]], device: Any = "cpu") -> float:
    """Exact-match accuracy of greedy answers."""
    got = greedy_answers(model, tokenizer, [q for q, _ in qa], device=device)
    return sum(g.strip() == a for g, (_, a) in zip(got, qa)) / max(1, len(qa))
