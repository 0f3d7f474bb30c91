"""The tiny BERT world the FusionBench drop-in tests share: the session's BERT pool with a
tokenizer saved beside its pretrained model, and a --config-dir naming it modelpool=tiny_bert."""

import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import BertTokenizerFast

from fusion_bench.modelpool import AutoModelPool
from tests.conftest import TASKS, write_pool_config

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "merge"]


def assert_same_weights(expected: nn.Module, actual: nn.Module, atol: float = 0.0) -> None:
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert set(expected_state) == set(actual_state)
    for key, value in expected_state.items():
        torch.testing.assert_close(actual_state[key], value, atol=atol, rtol=0 if atol == 0 else 1e-6, msg=key)


def write_bert_world(root: Path, bert_pool_dir: Path) -> Path:
    """root/pool (a copy of the BERT pool; `pretrained` also holds a BertTokenizerFast of VOCAB)
    and root/config/modelpool/tiny_bert.yaml pointing at it."""
    pool = root / "pool"
    shutil.copytree(bert_pool_dir, pool)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(pool / "pretrained")
    write_pool_config(root / "config", pool)
    return root


def bert_pool(world: Path) -> AutoModelPool:
    pool = world / "pool"
    return AutoModelPool({"_pretrained_": str(pool / "pretrained"), **{task: str(pool / task) for task in TASKS}})


def bert_args(world: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["--config-dir", str(world / "config"), "modelpool=tiny_bert", "taskpool=dummy", f"hydra.run.dir={run_dir}", *overrides]
