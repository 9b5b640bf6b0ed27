"""Packing examples into fixed-capacity rows, and collating rows into batches.

A packed row holds several documents back to back. Each document's position ids restart at 0:
transformers reads a restart (with ``attention_mask=None``) as a document boundary and builds a
block-diagonal causal mask (sdpa / eager) or varlen arguments (flash-attention, which finds them
only in a batch of one row: ``train.loop.batch_logprobs`` passes it a packed batch as one row), so
documents never attend to each other. The first token of each document is never a target (it would be
predicted from the previous document).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from hoptune.data.formatting import Example


@dataclass
class Row:
    """One row of a batch: tokens, targets, and (packed rows only) per-document position ids."""

    input_ids: list[int]
    loss_mask: list[int]
    position_ids: list[int] | None = None
    num_docs: int = 1

    def __len__(self) -> int:
        return len(self.input_ids)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's total length <= capacity.

    Longest item first, each into the bin whose free space is the smallest that still fits it
    (a new bin when none does). O(n log n) lookups over free space kept sorted."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}; truncate it first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            space -= n
        else:
            b = len(bins)
            bins.append([i])
            space = capacity - n
        if space > 0:
            bisect.insort(free, (space, b))
    return bins


def pack_examples(examples: list[Example], capacity: int) -> list[Row]:
    """Best-fit-decreasing packing into rows of at most ``capacity`` tokens (no padding inside)."""
    for i, e in enumerate(examples):
        # a mask of another length would shift every later document's targets in its row
        if not len(e) or len(e.loss_mask) != len(e):
            raise ValueError(
                f"example {i} ({e.where or 'no source'}) has {len(e)} input_ids and {len(e.loss_mask)} "
                "loss_mask entries; packing needs a non-empty example with one mask entry per token"
            )
    bins = best_fit_decreasing([len(e) for e in examples], capacity)
    rows = []
    for b in bins:
        ids: list[int] = []
        mask: list[int] = []
        pos: list[int] = []
        for i in sorted(b):  # document order inside a row: as in the data
            e = examples[i]
            ids.extend(e.input_ids)
            mask.append(0)  # a document's first token is not predicted from the previous document
            mask.extend(e.loss_mask[1:])
            pos.extend(range(len(e)))
        rows.append(Row(ids, mask, pos, num_docs=len(b)))
    return rows


def rows_from_examples(examples: list[Example]) -> list[Row]:
    return [Row(list(e.input_ids), list(e.loss_mask)) for e in examples]


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor | None]:
    """A right-padded batch.

    Returns ``input_ids`` (B, T) int64, ``loss_mask`` (B, T) bool (False on padding),
    ``attention_mask`` (B, T) int64 for unpacked rows or None for packed rows, ``position_ids``
    (B, T) int64 for packed rows (padding continues the last document's positions, so the pad
    tokens only see that document and nothing sees them) or None, and ``num_tokens`` (real tokens).
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    packed = rows[0].position_ids is not None
    if any((r.position_ids is not None) != packed for r in rows):
        raise ValueError("cannot mix packed and unpacked rows in one batch")
    t = max(len(r) for r in rows)
    b = len(rows)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.bool)
    attn = None if packed else torch.zeros((b, t), dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long) if packed else None
    for i, r in enumerate(rows):
        n = len(r)
        ids[i, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        mask[i, :n] = torch.tensor(r.loss_mask, dtype=torch.bool)
        if packed:
            p = torch.tensor(r.position_ids, dtype=torch.long)
            pos[i, :n] = p
            if n < t:
                pos[i, n:] = torch.arange(1, t - n + 1) + p[-1]
        else:
            attn[i, :n] = 1
    return {
        "input_ids": ids,
        "loss_mask": mask,
        "attention_mask": attn,
        "position_ids": pos,
        "num_tokens": torch.tensor(sum(len(r) for r in rows)),
    }
