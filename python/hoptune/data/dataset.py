"""From JSONL files to the rows a trainer consumes: tokenize, mask, truncate, check, split, mix,
pack; and the deterministic order in which optimizer steps take rows (so a run can resume at
any step with the same data).

Every example must keep at least one loss token after truncation. One that does not is an
error: the run stops with the count and the first offending lines, or, with
``skip_bad_examples``, the example is dropped and counted in the report. A batch can therefore
never be all-ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from hoptune.data.formatting import (
    ChatFormatter,
    Example,
    ExampleError,
    record_kind,
    tokenize_record,
    truncate,
)
from hoptune.data.jsonl import DataError, Record, read_jsonl, show_lines
from hoptune.data.packing import Row, pack_examples, rows_from_examples


@dataclass
class DataReport:
    """What happened to a file's lines on the way to examples."""

    path: str
    lines: int = 0
    examples: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)  # missing fields, wrong types
    no_loss: list[tuple[int, str]] = field(default_factory=list)  # no loss token (after truncation)
    truncated: int = 0  # examples kept after truncation
    # prompt/completion records whose prompt, tokenized alone, is not a prefix of their tokens: (line,
    # the prompt's end beyond the common prefix)
    prompt_cut: list[tuple[int, str]] = field(default_factory=list)
    tokens: int = 0
    loss_tokens: int = 0

    @property
    def skipped(self) -> int:
        return len(self.malformed) + len(self.invalid) + len(self.no_loss)

    def summary(self) -> str:
        parts = [
            f"{self.path}: {self.examples} examples, {self.tokens} tokens ({self.loss_tokens} in the loss)"
        ]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.prompt_cut:
            k = len(self.prompt_cut)
            shown = "; ".join(f"line {ln}: {end!r}" for ln, end in self.prompt_cut[:3])
            parts.append(
                f"{k} prompt{'s' if k > 1 else ''} not a prefix of the tokens of prompt + completion "
                f"({shown}{'; ...' if k > 3 else ''}: the prompt's end as tokenized alone): the loss starts "
                "where the two diverge, and the model trains on a context other than the prompt's own "
                "tokens, which inference gives it; end prompts on a token boundary (tokens merge across "
                "it), or use a chat template that renders the prompt alone as in the conversation"
            )
        if self.malformed:
            parts.append(f"{len(self.malformed)} malformed lines skipped ({_lines(self.malformed)})")
        if self.invalid:
            parts.append(f"{len(self.invalid)} invalid records skipped ({_lines(self.invalid)})")
        if self.no_loss:
            parts.append(
                f"{len(self.no_loss)} examples without a loss token skipped ({_lines(self.no_loss)})"
            )
        return "; ".join(parts)


def _lines(items: list[tuple[int, str]], n: int = 5) -> str:
    s = ", ".join(str(ln) for ln, _ in items[:n])
    return s + (", ..." if len(items) > n else "")


def build_examples(
    records: list[Record],
    tokenizer: Any,
    *,
    max_seq_len: int,
    truncation: str = "right",
    add_eos: bool = True,
    chat_template: str | None = None,
    skip_bad: bool = False,
    report: DataReport | None = None,
) -> tuple[list[Example], DataReport]:
    """Tokenized, masked and truncated examples of ``records``.

    A record with missing fields, or an example left with no loss token, is collected; unless
    ``skip_bad``, DataError lists them (line numbers and reasons) once all records are seen,
    together with the malformed lines ``report`` already holds (load_examples passes those in),
    so that one run shows every problem of the file.

    ``chat_template``: model.chat_template, the template text, a template file, or the name of
    one of the tokenizer's named templates (see ``resolve_chat_template``); None: the
    tokenizer's own."""
    report = report or DataReport(path=records[0].path if records else "<empty>")
    with _no_too_long_warning(tokenizer):
        examples = _examples(records, tokenizer, max_seq_len, truncation, add_eos, chat_template, report)
    report.examples = len(examples)
    bad = sorted(report.invalid + report.no_loss)
    if not skip_bad and (report.malformed or bad):
        problems = []
        if report.malformed:
            problems.append(f"{len(report.malformed)} malformed line(s): {show_lines(report.malformed)}")
        if bad:
            problems.append(f"{len(bad)} example(s) cannot be trained on: {show_lines(bad)}")
        raise DataError(
            f"{report.path}: {'. '.join(problems)}. Fix them, or set data.skip_bad_examples=true to skip "
            "and report them"
        )
    return examples, report


# transformers warns (once per tokenizer) that a text tokenized beyond the tokenizer's
# model_max_length "will result in indexing errors": the examples here are cut to data.max_seq_len
# after tokenizing, and the trainer warns of rows beyond the model's positions itself
_TOO_LONG_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


@contextlib.contextmanager
def _no_too_long_warning(tokenizer: Any) -> Iterator[None]:
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if not isinstance(warned, dict):
        yield
        return
    before = warned.get(_TOO_LONG_WARNING)
    warned[_TOO_LONG_WARNING] = True
    try:
        yield
    finally:
        if before is None:  # (the user's own long texts still get the warning)
            warned.pop(_TOO_LONG_WARNING, None)
        else:
            warned[_TOO_LONG_WARNING] = before


def _examples(records, tokenizer, max_seq_len, truncation, add_eos, chat_template, report) -> list[Example]:
    """build_examples' loop: the examples kept; the others go into ``report``."""
    chat = None
    examples: list[Example] = []
    for rec in records:
        try:
            kind = record_kind(rec.data)
        except ExampleError as e:
            report.invalid.append((rec.line, str(e)))
            continue
        if chat is None and (kind == "messages" or isinstance(rec.data.get("prompt"), list)):
            try:  # a tokenizer that cannot format chats is a setup error, not a per-example one
                chat = ChatFormatter(tokenizer, chat_template)
            except ExampleError as e:
                raise DataError(f"{rec.where}: {e}") from None
        prompt_ends: list[str] = []
        try:
            ids, mask = tokenize_record(rec.data, tokenizer, chat, add_eos, prompt_ends)
        except ExampleError as e:
            report.invalid.append((rec.line, str(e)))
            continue
        full_loss = sum(mask[1:])
        no_token, first_only = not ids, bool(mask) and mask[0] == 1 and full_loss == 0
        cut = len(ids) > max_seq_len
        if cut:
            ids, mask = truncate(ids, mask, max_seq_len, truncation)
        ex = Example(ids, mask, rec.where)
        if ex.num_loss_tokens == 0:
            if no_token and kind == "text":
                why = "the text tokenizes to no token"
            elif first_only:
                # token 0 has no context, so it is never a target (Example.num_loss_tokens)
                why = (
                    "its only loss token is the first token, which nothing before it predicts "
                    f"({len(ids)} token(s); data.add_eos={str(add_eos).lower()})"
                )
            elif full_loss == 0:
                why = "no token is in the loss (empty completion / assistant turns)"
            else:
                why = (
                    f"truncation to data.max_seq_len={max_seq_len} (side {truncation!r}) cut all "
                    f"{full_loss} loss tokens"
                )
            report.no_loss.append((rec.line, why))
            continue
        examples.append(ex)
        report.truncated += cut  # of the examples kept (one dropped is counted in no_loss only)
        report.prompt_cut.extend((rec.line, end) for end in prompt_ends)
        report.tokens += len(ex)
        report.loss_tokens += ex.num_loss_tokens
    return examples


def load_examples(
    path: str,
    tokenizer: Any,
    *,
    max_seq_len: int,
    truncation: str = "right",
    add_eos: bool = True,
    chat_template: str | None = None,
    skip_bad: bool = False,
) -> tuple[list[Example], DataReport]:
    """Read a JSONL file and build its examples (see ``build_examples``). Malformed lines are kept
    aside, not raised at once, so that the error lists them with the bad records of the other lines."""
    records, rr = read_jsonl(path, skip_malformed=True)
    if not records and not rr.malformed:
        raise DataError(f"{path}: no record (the file is empty or has only blank lines)")
    report = DataReport(path=path, lines=rr.records + len(rr.malformed), malformed=list(rr.malformed))
    examples, report = build_examples(
        records,
        tokenizer,
        max_seq_len=max_seq_len,
        truncation=truncation,
        add_eos=add_eos,
        chat_template=chat_template,
        skip_bad=skip_bad,
        report=report,
    )
    if not examples:
        raise DataError(f"{path}: no usable example ({report.summary()})")
    return examples, report


def _check_fraction(function: str, fraction: float, meaning: str) -> None:
    # 1 divides by zero in mix_replay; above 1 or below 0, nothing would be mixed in or split off, silently
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{function}: fraction must be in [0, 1), got {fraction} ({meaning})")


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded random ``fraction`` of the examples held out (at least one)."""
    _check_fraction("split_eval", fraction, "the share of the examples held out: data.eval_fraction")
    if fraction == 0:
        return examples, []
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise DataError(f"data.eval_fraction={fraction} leaves no training example out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def mix_replay(
    train: list[Example], general: list[Example], fraction: float, seed: int
) -> tuple[list[Example], int]:
    """``train`` plus general examples making up ``fraction`` of the result (drawn without
    replacement while they last, then again from the top). Returns (mixed, number added)."""
    _check_fraction(
        "mix_replay", fraction, "the share of general examples in the result: data.general_fraction"
    )
    if fraction == 0 or not general:
        return train, 0
    n_general = round(fraction / (1.0 - fraction) * len(train))
    rng = random.Random(seed)
    picked: list[Example] = []
    while len(picked) < n_general:
        order = list(range(len(general)))
        rng.shuffle(order)
        picked.extend(general[i] for i in order[: n_general - len(picked)])
    return train + picked, len(picked)


def fingerprint(rows: list[Row]) -> str:
    """A short hash of the rows (tokens, masks, positions): a resumed run checks it sees the same data."""
    h = hashlib.sha256()
    for r in rows:
        h.update(len(r).to_bytes(4, "little"))
        h.update(torch.tensor(r.input_ids, dtype=torch.int64).numpy().tobytes())
        h.update(bytes(r.loss_mask))
        if r.position_ids is not None:
            h.update(torch.tensor(r.position_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def make_rows(examples: list[Example], packing: bool, max_seq_len: int) -> list[Row]:
    return pack_examples(examples, max_seq_len) if packing else rows_from_examples(examples)


class StepSampler:
    """Which rows each optimizer step takes. Every epoch is a seeded permutation of the rows; how
    the epochs are cut into steps of ``rows_per_step`` depends on what sets the run's length:

    * ``whole_epochs=False`` (``train.max_steps``): the epochs form one stream, cut into full steps;
      a step may span two epochs (and then may take a row of each epoch's permutation). With fewer
      rows than a step takes, each step is one epoch: every row once, as in transformers' Trainer.
    * ``whole_epochs=True`` (``train.epochs``): each epoch is cut on its own into
      ``ceil(num_rows / rows_per_step)`` steps, the last one taking the rows left over (a smaller
      step), so every row is seen once per epoch and never twice in one step.

    The data position of a run is just its step count, so resuming needs nothing else."""

    def __init__(
        self, num_rows: int, rows_per_step: int, seed: int, shuffle: bool = True, whole_epochs: bool = False
    ) -> None:
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if rows_per_step < 1:
            raise ValueError(f"rows_per_step must be >= 1, got {rows_per_step}")
        self.num_rows = num_rows
        self.rows_per_step = rows_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.whole_epochs = whole_epochs
        self.steps_per_epoch = math.ceil(num_rows / rows_per_step)
        # rows a streamed step takes: a step of more rows than there are would take each row several
        # times, unevenly (3 rows, 16 a step: 5, 5 and 6 copies), weighing the rows unequally
        self._stream_step = min(rows_per_step, num_rows)
        self._perm: dict[int, list[int]] = {}

    def steps_for_epochs(self, epochs: float) -> int:
        if self.whole_epochs:
            # the tolerance keeps e.g. 0.1 x 30 (= 3.0000000000000004) at 3 steps
            return max(1, math.ceil(epochs * self.steps_per_epoch - 1e-9))
        return max(1, math.ceil(epochs * self.num_rows / self._stream_step - 1e-9))

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._perm:
            if len(self._perm) > 2:
                self._perm.clear()
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm[epoch] = torch.randperm(self.num_rows, generator=g).tolist()
            else:
                self._perm[epoch] = list(range(self.num_rows))
        return self._perm[epoch]

    def epoch_at(self, step: int) -> float:
        if self.whole_epochs:
            epoch, j = divmod(step, self.steps_per_epoch)
            return epoch + min(j * self.rows_per_step, self.num_rows) / self.num_rows
        return step * self._stream_step / self.num_rows

    def rows_for_step(self, step: int) -> list[int]:
        if self.whole_epochs:
            epoch, j = divmod(step, self.steps_per_epoch)
            return self._order(epoch)[j * self.rows_per_step : (j + 1) * self.rows_per_step]
        out = []
        for k in range(step * self._stream_step, (step + 1) * self._stream_step):
            epoch, i = divmod(k, self.num_rows)
            out.append(self._order(epoch)[i])
        return out
