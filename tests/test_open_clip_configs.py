"""The task_vectors configs compose with FusionBench's names and keys, and scripts/reproduce/clip_ta8.sh's
task_vectors lineage composes for all three architectures (a dry run: the commands recorded, then
composed). Needs no open_clip."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

ROOT = Path(__file__).resolve().parents[1]
TA8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
HEAD_FILES = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]


def composed(*overrides: str):
    with initialize_config_module("fusion_bench_config", version_base=None):
        return compose("fusion_bench", overrides=list(overrides))


@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_the_ta8_configs_name_fusion_bench_s_files_and_keys(arch):
    config = composed(f"modelpool=OpenCLIPVisionModelPool/{arch}_TA8", f"taskpool=OpenCLIPVisionModelTaskPool/{arch}_TA8")
    pool, taskpool = config.modelpool, config.taskpool
    assert pool._target_ == "fusion_bench.modelpool.OpenCLIPVisionModelPool" and pool.model_dir == "./.cache/task_vectors_checkpoints/"
    assert list(pool.models) == ["_pretrained_", *TA8] and list(pool.train_datasets) == list(pool.test_datasets) == TA8
    assert dict(pool.models._pretrained_) == {"model_name": arch, "pickle_path": f"./.cache/task_vectors_checkpoints//{arch}/zeroshot.pt"}
    assert [pool.models[task].pickle_path for task in TA8] == [f"./.cache/task_vectors_checkpoints//{arch}/{name}/finetuned.pt" for name in HEAD_FILES]
    heads = [f"./.cache/task_vectors_checkpoints//{arch}/head_{name}.pt" for name in HEAD_FILES]
    assert list(pool.classification_heads.values()) == list(taskpool.classification_heads.values()) == heads
    assert taskpool._target_ == "fusion_bench.taskpool.OpenCLIPVisionModelTaskPool" and taskpool.model_name == arch
    assert list(taskpool.test_datasets) == TA8 and taskpool.dataloader_kwargs.batch_size == 128


def test_fusion_bench_s_two_task_and_individual_pools_compose():
    for name, tasks in {"cars_dtd": ["stanford-cars", "dtd"], "sun397_cars": ["sun397", "stanford-cars"], "sun397_dtd": ["sun397", "dtd"]}.items():
        pool = composed(f"modelpool=OpenCLIPVisionModelPool/ViT-B-32_TA_{name}").modelpool
        assert list(pool.models) == ["_pretrained_", *tasks] and list(pool.classification_heads) == tasks
    assert list(composed("modelpool=OpenCLIPVisionModelPool/ViT-B-32_individual").modelpool.models) == ["_pretrained_"]


def test_the_reproduce_script_s_task_vectors_lineage_composes_for_every_architecture(tmp_path):
    log = tmp_path / "commands"
    recorder = tmp_path / "fusion_bench"
    recorder.write_text(  # records its arguments and makes the sweep's folder, as fusion_bench would
        f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {log}\necho >> {log}\n'
        'for arg in "$@"; do case $arg in hydra.sweep.dir=*) mkdir -p "${arg#hydra.sweep.dir=}" ;; esac; done\n'
    )
    recorder.chmod(0o755)
    env = {**os.environ, "FUSION_BENCH": str(recorder), "FUSION_BENCH_REPORT": "true"}
    result = subprocess.run(["bash", str(ROOT / "scripts/reproduce/clip_ta8.sh"), str(tmp_path / "out"), "tv-b32", "tv-b16", "tv-l14"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in log.read_text().splitlines()]
    assert len(commands) == 15  # per architecture: zero-shot, individual, simple average, task arithmetic, TIES
    for arch, runs in zip(["ViT-B-32", "ViT-B-16", "ViT-L-14"], [commands[:5], commands[5:10], commands[10:]]):
        for command in runs:
            overrides = [arg.split(",")[0] for arg in command if arg != "--multirun" and not arg.startswith("hydra.")]  # each sweep's first job
            config = composed(*overrides)
            assert config.modelpool.models._pretrained_.model_name == arch and config.taskpool.model_name == arch
        assert [next(arg for arg in command if arg.startswith("method=")) for command in runs] == [
            "method=dummy", "method=dummy", "method=simple_average", "method=task_arithmetic", "method=ties_merging",
        ]  # fmt: skip
    bad = subprocess.run(["bash", str(ROOT / "scripts/reproduce/clip_ta8.sh"), str(tmp_path / "bad"), "tv-h14"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "use b32, l14, tv-b32, tv-b16 or tv-l14" in bad.stderr
