import json

import pytest

from hoptune.config import load_config
from hoptune.data import demo_task


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def demo_data(tmp_path):
    """Chat data of the demo task (train / eval) and replay records, as JSONL files."""
    train_pairs, held = demo_task.split_pairs()
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", demo_task.sft_records(train_pairs)),
        "eval": write_jsonl(tmp_path / "eval.jsonl", demo_task.sft_records(held)),
        "general": write_jsonl(tmp_path / "general.jsonl", demo_task.general_records(20)),
    }


def small_config(tmp_path, data, *overrides):
    """A fast SFT config over ``data`` writing to tmp_path/run (no progress bar, no plots)."""
    return load_config(
        None,
        [
            f"data.train={data['train']}",
            f"data.eval={data['eval']}",
            "data.max_seq_len=64",
            "model.device=cpu",
            "model.quantize=null",
            "model.gradient_checkpointing=false",
            "lora.r=4",
            "lora.alpha=8",
            "train.batch_size=4",
            "train.grad_accum=2",
            "train.lr=1e-3",
            "train.max_steps=6",
            "train.seed=0",
            f"output.dir={tmp_path / 'run'}",
            "output.progress=false",
            "output.plots=false",
            "output.tensorboard=false",
            *overrides,
        ],
    )
