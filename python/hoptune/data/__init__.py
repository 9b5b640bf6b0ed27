"""Training data: JSONL reading, chat formatting and loss masks, truncation, packing, replay mix,
and the demo task."""

from hoptune.data.dataset import (
    DataReport,
    StepSampler,
    build_examples,
    load_examples,
    mix_replay,
    split_eval,
)
from hoptune.data.formatting import ChatFormatter, Example, ExampleError, tokenize_record
from hoptune.data.jsonl import DataError, read_jsonl, write_jsonl
from hoptune.data.packing import Row, best_fit_decreasing, collate, pack_examples

__all__ = [
    "ChatFormatter",
    "DataError",
    "DataReport",
    "Example",
    "ExampleError",
    "Row",
    "StepSampler",
    "best_fit_decreasing",
    "build_examples",
    "collate",
    "load_examples",
    "mix_replay",
    "pack_examples",
    "read_jsonl",
    "split_eval",
    "tokenize_record",
    "write_jsonl",
]
