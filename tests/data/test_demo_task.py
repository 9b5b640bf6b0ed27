"""The demo task's data (the operand split, the SFT and replay records) and its scoring (greedy
answers up to the end of the turn, exact match)."""

import re

import pytest
import torch

from hoptune.data import demo_task


def test_split_is_a_seeded_partition_of_the_operand_pairs():
    """70 training pairs and 30 held out, together every pair once, sorted; the same for a seed and
    shuffled by it (another seed holds out other pairs, not the last 30 in order)."""
    train, held = demo_task.split_pairs()
    assert (len(train), len(held)) == (70, 30)
    assert train == sorted(train) and held == sorted(held)
    assert sorted(train + held) == demo_task.all_pairs()
    assert demo_task.split_pairs() == (train, held)
    assert demo_task.split_pairs(seed=2)[1] != held
    assert held != demo_task.all_pairs()[70:]


def test_records_ask_and_answer_the_task():
    """SFT chats and scored questions ask ``What is a+b?`` for the pairs given, answered with the
    sum; the subtraction questions are every a-b with a >= b, answered with the difference."""
    pairs = [(3, 4), (9, 0), (7, 8)]
    recs = demo_task.sft_records(pairs)
    assert [[m["role"] for m in r["messages"]] for r in recs] == [["user", "assistant"]] * 3
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in recs] == [
        ("What is 3+4?", "7"),
        ("What is 9+0?", "9"),
        ("What is 7+8?", "15"),
    ]
    assert demo_task.plus_qa(pairs) == [("What is 3+4?", "7"), ("What is 9+0?", "9"), ("What is 7+8?", "15")]
    minus = demo_task.minus_qa()
    assert len(minus) == 55 and ("What is 4-4?", "0") in minus and ("What is 9-0?", "9") in minus
    for q, a in minus:
        x, y = map(int, re.fullmatch(r"What is (\d)-(\d)\?", q).groups())
        assert x >= y and a == str(x - y)


def test_replay_records_mix_subtraction_chats_and_equations():
    """The replay data: subtraction chats and texts of six correct equations, both kinds present,
    the same for a seed."""
    recs = demo_task.general_records(40)
    assert len(recs) == 40 and demo_task.general_records(40) == recs
    chats = [r for r in recs if "messages" in r]
    texts = [r["text"] for r in recs if "text" in r]
    assert len(chats) + len(texts) == 40 and len(chats) >= 5 and len(texts) >= 5
    minus = demo_task.minus_qa()
    assert all((r["messages"][0]["content"], r["messages"][1]["content"]) in minus for r in chats)
    for text in texts:
        lines = text.split("\n")
        assert len(lines) == 6
        for line in lines:
            x, op, y, z = re.fullmatch(r"(\d)([+-])(\d)=(\d+)", line).groups()
            assert int(z) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0


class _Scripted(torch.nn.Module):
    """Greedy next tokens from a script per question (its prompt's length picks the step); records
    the mode it was called in."""

    def __init__(self, tok, scripts):
        super().__init__()
        self.tok, self.prompt, self.modes, self.rows = tok, {}, [], []
        for q, script in scripts.items():
            p = tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            self.prompt[tuple(tok(p, add_special_tokens=False)["input_ids"])] = [
                tok.convert_tokens_to_ids(t) for t in script
            ]

    def forward(self, input_ids, use_cache=False):
        self.modes.append(self.training)
        self.rows.append(input_ids.shape[0])
        logits = torch.zeros(*input_ids.shape, len(self.tok))
        for row, ids in enumerate(input_ids.tolist()):
            for n in range(len(ids), 0, -1):
                if tuple(ids[:n]) in self.prompt:
                    logits[row, -1, self.prompt[tuple(ids[:n])][len(ids) - n]] = 1.0
                    break
        return type("Out", (), {"logits": logits})()


def test_greedy_answers_to_questions_of_several_lengths(tokenizer):
    """Questions of other lengths are answered in groups of equal prompt length (no padding), each
    answer in its question's place; the model runs in eval mode and gets its own mode back."""
    end = "<|end|>"
    scripts = {
        "What is 3+4?": ["7", end, "1", "1"],
        "What is 12+30?": ["4", "2", end, "1"],
        "What is 5+5?": ["1", "0", end, "9"],
    }
    model = _Scripted(tokenizer, scripts)
    model.train()
    got = demo_task.greedy_answers(model, tokenizer, list(scripts))
    assert got == ["7", "42", "10"]
    assert model.training and not any(model.modes)
    assert sorted(model.rows) == [1] * 4 + [2] * 4  # (two prompt lengths: 4 steps each)
    model.eval()
    demo_task.greedy_answers(model, tokenizer, ["What is 3+4?"])
    assert not model.training


def test_accuracy_ignores_surrounding_spaces_and_is_zero_for_no_questions(tokenizer):
    """An answer is compared without the spaces around it (" 7" is 7); no questions score 0.0."""
    model = _Scripted(
        tokenizer, {"What is 3+4?": [" ", "7", " ", "<|end|>"], "What is 1+1?": ["3", "<|end|>", "2", "2"]}
    )
    assert demo_task.greedy_answers(model, tokenizer, ["What is 3+4?"]) == [" 7 "]
    qa = [("What is 3+4?", "7"), ("What is 1+1?", "2")]
    assert demo_task.accuracy(model, tokenizer, qa) == pytest.approx(0.5)
    assert demo_task.accuracy(model, tokenizer, []) == 0.0


def test_answers_end_at_the_end_of_turn_and_are_compared_whole(tokenizer):
    """The demo's accuracy: greedy tokens up to <|end|> (or </s>), compared whole with the answer:
    "12" is not "1", and what follows the end of the turn is not part of the answer."""
    end, eos = "<|end|>", tokenizer.eos_token
    model = _Scripted(
        tokenizer, {"a": ["1", end, "2", "3"], "b": ["1", "2", end, "3"], "c": ["3", eos, "1", "1"]}
    )
    assert demo_task.greedy_answers(model, tokenizer, ["a", "b", "c"]) == ["1", "12", "3"]
    assert demo_task.accuracy(model, tokenizer, [("a", "1"), ("b", "1"), ("c", "3")]) == pytest.approx(2 / 3)
    assert demo_task.accuracy(model, tokenizer, [("b", "12")]) == 1.0
