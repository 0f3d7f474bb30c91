"""Fixtures: tiny models built and saved locally, and a helper that runs the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The models here are tiny: one thread beats several, and on a shared machine several threads can
# wait out each other's time slices (a 20× slowdown seen). Set before torch starts, for CLI runs too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest_plugins = ["tests.clip_fixtures"]  # the tiny CLIP model, towers and image datasets

TASKS = ("alpha", "beta", "gamma")


def tiny_bert(seed: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    return BertModel(config)


def finetuned_copy(model, seed: int, scale: float = 0.02):
    """The model with every floating tensor moved a little, as fine-tuning would."""
    generator = torch.Generator().manual_seed(seed)
    tuned = type(model)(model.config)
    state = {k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    tuned.load_state_dict(state)
    return tuned


@pytest.fixture(scope="session")
def bert_pool_dir(tmp_path_factory) -> Path:
    """A pretrained tiny BERT and three fine-tuned copies, as Hugging Face folders."""
    root = tmp_path_factory.mktemp("bert_pool")
    pretrained = tiny_bert(0)
    pretrained.save_pretrained(root / "pretrained")
    for i, task in enumerate(TASKS):
        finetuned_copy(pretrained, seed=i + 1).save_pretrained(root / task)
    return root


def write_pool_config(config_dir: Path, pool_dir: Path, name: str = "tiny_bert") -> str:
    """A modelpool config for `pool_dir` in a user config dir (--config-dir)."""
    (config_dir / "modelpool").mkdir(parents=True, exist_ok=True)
    models = "\n".join(f"  {task}: {pool_dir / task}" for task in TASKS)
    (config_dir / "modelpool" / f"{name}.yaml").write_text(
        f"_target_: fusion_bench.modelpool.AutoModelPool\nmodels:\n  _pretrained_: {pool_dir / 'pretrained'}\n{models}\n"
    )
    return name


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "fusion_bench", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fusion_bench {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The command's bad-input promise: exit status 2 and a single `fusion_bench: error: ...` line
    on stderr holding every fragment; returns that line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("fusion_bench: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
