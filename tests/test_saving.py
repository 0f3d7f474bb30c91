"""Saving over an earlier merged model: whatever happens (SIGKILL at any moment, a full disk), the
path holds a whole model that loads, the old one until the new one is complete."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool import AutoModelPool
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.model_saving import MARKER, check_save_path, read_marker, save_merged_model
from tests.conftest import TASKS, assert_one_line_error, finetuned_copy, run_cli, write_pool_config

REPO = Path(__file__).resolve().parents[1]

# Runs the command with a SIGKILL injected at one point of the save (argv[1]); the rest of argv is
# the command line. Patched here, in the child, so that the code under test is not changed.
KILLER = """
import os, signal, sys
import fusion_bench.utils.model_saving as saving
from fusion_bench.modelpool.base import BaseModelPool

def die():
    os.kill(os.getpid(), signal.SIGKILL)

point = sys.argv.pop(1)
if point == "writing":  # half of the new model written: its config, not its weights
    def save_model(self, model, path, **kwargs):
        open(os.path.join(path, "config.json"), "w").write("{}")
        die()
    BaseModelPool.save_model = save_model
elif point == "before-swap":  # the new model complete beside the old one
    saving._put_in_place = lambda staging, target: die()
elif point == "after-swap":  # swapped, the old model not yet removed
    exchange = saving._exchange
    def exchange_then_die(a, b):
        exchange(a, b)
        die()
    saving._exchange = exchange_then_die
sys.argv = ["fusion_bench", *sys.argv[1:]]
from fusion_bench.programs.cli import main
main()
"""


def tiny_pool(pool_dir: Path) -> AutoModelPool:
    return AutoModelPool({"_pretrained_": str(pool_dir / "pretrained"), **{t: str(pool_dir / t) for t in TASKS}})


def expected_weights(pool_dir: Path, scaling_factor: float) -> dict[str, torch.Tensor]:
    return TaskArithmeticAlgorithm(scaling_factor=scaling_factor).run(tiny_pool(pool_dir)).state_dict()


def save_earlier_model(target: Path, pool_dir: Path, scaling_factor: float) -> None:
    """A merged model saved as the command saves it (in process: quicker)."""
    pool = tiny_pool(pool_dir)
    merged = TaskArithmeticAlgorithm(scaling_factor=scaling_factor).run(pool)
    save_merged_model(check_save_path(target, overwrite=False, protected={}), lambda staging: pool.save_model(merged, staging), record={})


def assert_holds(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """`folder` is a whole merged model of ours, with exactly these weights."""
    marker = read_marker(folder)
    assert marker is not None and sorted(p.name for p in folder.iterdir()) == sorted([*marker["files"], MARKER])
    loaded = AutoModel.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in weights.items())


@pytest.fixture()
def workdir(tmp_path, bert_pool_dir):
    write_pool_config(tmp_path / "config", bert_pool_dir)
    return tmp_path


def save_args(workdir: Path, scaling_factor: float, run: str, *extra: str) -> list[str]:
    return ["--config-dir", str(workdir / "config"), "modelpool=tiny_bert", "taskpool=dummy", "method=task_arithmetic",
            f"method.scaling_factor={scaling_factor}", f"merged_model_save_path={workdir / 'merged'}", f"hydra.run.dir={workdir / run}", *extra]  # fmt: skip


@pytest.mark.parametrize("point, survivor", [("writing", "old"), ("before-swap", "old"), ("after-swap", "new")])
def test_a_sigkill_at_any_point_of_an_overwrite_leaves_a_whole_model(workdir, bert_pool_dir, point, survivor):
    old, new = expected_weights(bert_pool_dir, 0.1), expected_weights(bert_pool_dir, 0.9)
    save_earlier_model(workdir / "merged", bert_pool_dir, 0.1)
    killed = subprocess.run([sys.executable, "-c", KILLER, point, *save_args(workdir, 0.9, "killed", "merged_model_save_overwrite=true")],
                            cwd=workdir, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_holds(workdir / "merged", old if survivor == "old" else new)
    assert not (workdir / "killed" / "report.json").exists()
    # the killed run's leftovers are left alone, named in a warning, and block nothing
    again = run_cli(*save_args(workdir, 0.9, "again", "merged_model_save_overwrite=true"), cwd=workdir)
    assert "unfinished save(s) of interrupted runs" in again.stdout + again.stderr
    assert_holds(workdir / "merged", new)


def test_a_sigkill_from_outside_during_a_real_save_leaves_a_whole_model(tmp_path):
    """No injection: the command is killed as soon as its new model starts to appear on disk."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    pool_dir = tmp_path / "pool"
    torch.manual_seed(0)
    pretrained = BertModel(config)
    pretrained.save_pretrained(pool_dir / "pretrained")
    for i, task in enumerate(TASKS):
        finetuned_copy(pretrained, seed=i + 1).save_pretrained(pool_dir / task)
    write_pool_config(tmp_path / "config", pool_dir)
    run_cli(*save_args(tmp_path, 0.1, "first"), cwd=tmp_path)
    old = AutoModel.from_pretrained(tmp_path / "merged").state_dict()
    process = subprocess.Popen([sys.executable, "-m", "fusion_bench", *save_args(tmp_path, 0.9, "killed", "merged_model_save_overwrite=true")],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while process.poll() is None and not list(tmp_path.glob(".merged.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.001)
    process.kill()
    process.wait()
    if process.returncode == 0:  # a disk this fast wrote it between two looks: the injected kills above still hold
        pytest.skip("the save finished before it could be killed")
    assert process.returncode == -signal.SIGKILL
    assert_holds(tmp_path / "merged", old)


def test_a_full_disk_while_saving_leaves_the_earlier_model(tmp_path, bert_pool_dir):
    pool = tiny_pool(bert_pool_dir)
    target = tmp_path / "merged"
    first = TaskArithmeticAlgorithm(scaling_factor=0.1).run(pool)
    save_merged_model(target, lambda staging: pool.save_model(first, staging), record={})
    second = TaskArithmeticAlgorithm(scaling_factor=0.9).run(pool)

    def fills_the_disk(staging: Path) -> None:
        second.config.save_pretrained(staging)
        raise OSError(errno.ENOSPC, "No space left on device")

    target = check_save_path(target, overwrite=True, protected={})
    with pytest.raises(InputError, match=r"saving the merged model to .* failed \(No space left on device\); nothing was replaced"):
        save_merged_model(target, fills_the_disk, record={})
    assert_holds(target, first.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # the half-written new model is gone


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 1 MiB file system, where the tests may mount one (root on Linux)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the full disk is covered by test_a_full_disk_while_saving_leaves_the_earlier_model")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: a model read from it may still be mapped


def test_a_disk_too_small_is_refused_before_merging_and_keeps_the_earlier_model(small_tmpfs, bert_pool_dir, tmp_path):
    """The tiny BERT takes 25 kB; with the disk filled up to a few kB, the new model cannot fit."""
    write_pool_config(tmp_path / "config", bert_pool_dir)
    target = small_tmpfs / "merged"
    args = ["--config-dir", str(tmp_path / "config"), "modelpool=tiny_bert", "taskpool=dummy", "method=task_arithmetic", f"merged_model_save_path={target}"]
    run_cli(*args, f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path)
    earlier = {key: value.clone() for key, value in AutoModel.from_pretrained(target).state_dict().items()}  # not mapped from the disk
    filler = small_tmpfs / "filler"
    with open(filler, "wb", buffering=0) as file:  # fill the disk, then give back 8 kB
        try:
            while True:
                file.write(b"\0" * 4096)
                file.flush()
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - 8192)
    result = run_cli(*args, "merged_model_save_overwrite=true", "method.scaling_factor=0.9", f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path, check=False)
    assert_one_line_error(result, "the merged model needs about", "free some space")
    assert_holds(target, earlier)
    assert not (tmp_path / "second" / "report.json").exists()


def test_without_an_atomic_exchange_two_renames_replace_the_earlier_model(tmp_path, bert_pool_dir, monkeypatch):
    """Where the file system cannot swap two folders, the old model is moved aside, the new one in."""
    import fusion_bench.utils.model_saving as saving

    def no_exchange(a, b):
        raise OSError(errno.ENOSYS, "renameat2 is not available")

    save_earlier_model(tmp_path / "merged", bert_pool_dir, 0.1)
    monkeypatch.setattr(saving, "_exchange", no_exchange)
    pool = tiny_pool(bert_pool_dir)
    merged = TaskArithmeticAlgorithm(scaling_factor=0.9).run(pool)
    save_merged_model(check_save_path(tmp_path / "merged", overwrite=True, protected={}), lambda staging: pool.save_model(merged, staging), record={})
    assert_holds(tmp_path / "merged", expected_weights(bert_pool_dir, 0.9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
