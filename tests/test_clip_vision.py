"""CLIP on image classification: the model pool, the zero-shot task pool, and the CLI through both,
on the tiny CLIP world of tests/clip_fixtures.py."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from datasets import load_dataset
from hydra import compose, initialize_config_module
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, CLIPVisionConfig, CLIPVisionModel

from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.modelpool.lazy_state_dict import SafetensorsStateDict
from fusion_bench.reporting.report import meta, task_metrics
from fusion_bench.taskpool import CLIPVisionModelTaskPool
from fusion_bench.taskpool.clip_vision import taskpool as taskpool_module
from fusion_bench.taskpool.clip_vision.images import CLIPImageTransform, evaluation_indices
from fusion_bench.taskpool.clip_vision.tower_check import check_tower_fits
from fusion_bench.taskpool.clip_vision.zeroshot_heads import head_key, text_tower_digest
from fusion_bench.tasks.clip_classification import ClassificationTask, classification_task
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import instantiate_checked
from tests.clip_fixtures import CLIP_TASKS, IMAGES_PER_TASK, write_clip_configs
from tests.conftest import run_cli

# transformers' PIL image processing, which FusionBench runs and our batched preprocessing equals: transformers 5
# defaults to its torchvision backend where torchvision is installed; 4.x has only the PIL one
PIL_BACKEND = {"backend": "pil"} if hasattr(transformers, "CLIPImageProcessorPil") else {}
CLIPImageProcessorPil = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
TA8 = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")


def test_the_eight_tasks_have_clip_class_names_and_templates():
    classes = {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43, "mnist": 10, "dtd": 47}
    templates = {"sun397": 2, "stanford-cars": 8, "resisc45": 18, "eurosat": 3, "svhn": 1, "gtsrb": 3, "mnist": 1, "dtd": 8}
    for task in TA8:
        spec = classification_task(task)
        assert len(spec.classnames) == classes[task] == len(set(spec.classnames)) and len(spec.templates) == templates[task]
        assert all(template.count("{}") == 1 for template in spec.templates)
    assert classification_task("stanford_cars") == classification_task("stanford-cars")
    assert classification_task("eurosat").prompts()[:2] == ["a centered satellite photo of annual crop land.", "a centered satellite photo of a annual crop land."]
    with pytest.raises(InputError, match="no class names and prompt templates for task 'cifar10'; the known tasks are dtd, eurosat"):
        classification_task("cifar10")


@pytest.mark.parametrize("shortest_edge", [32, 224])
def test_batched_preprocessing_equals_the_clip_processor(shortest_edge):
    processor = CLIPImageProcessorPil(size={"shortest_edge": shortest_edge}, crop_size={"height": shortest_edge, "width": shortest_edge})
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L"),
        Image.fromarray(rng.integers(0, 256, (61, 40, 3), dtype=np.uint8)),  # portrait
        Image.fromarray(rng.integers(0, 256, (37, 300, 3), dtype=np.uint8)),  # wide
        Image.fromarray(rng.integers(0, 256, (250, 250, 3), dtype=np.uint8)),
    ]
    transform = CLIPImageTransform(processor)
    ours = transform.normalize(torch.from_numpy(np.stack([transform.to_uint8(image) for image in images])))
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    assert ours.dtype == torch.float32 and ours.shape == expected.shape == (4, 3, shortest_edge, shortest_edge)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="CLIP's resize the shortest edge, and only those are supported"):
        CLIPImageTransform(CLIPImageProcessorPil(size={"height": 32, "width": 32}))


def fusion_bench_pool_yaml(world) -> str:
    """The model pool as FusionBench's own YAML writes it (clip-vit-base-patch32_TA8.yaml), composed."""
    models = "\n".join(f"  {task}: {world / 'towers' / task}" for task in CLIP_TASKS)
    datasets = {
        split: "\n".join(f"  {task}:\n    _target_: datasets.load_dataset\n    path: {world / 'data' / task}\n    split: {split}" for task in CLIP_TASKS)
        for split in ("train", "test")
    }
    return (
        f"train_datasets:\n{datasets['train']}\ntest_datasets:\n{datasets['test']}\n"
        f"_target_: fusion_bench.modelpool.CLIPVisionModelPool\n_recursive_: False\nprocessor: {world / 'clip'}\n"
        f"models:\n  _pretrained_: {world / 'clip'}\n{models}\nplatform: hf\n"
    )


def test_the_pool_reads_fusion_bench_yaml_and_reads_towers_lazily(clip_world):
    from omegaconf import OmegaConf

    pool = instantiate_checked(OmegaConf.create(fusion_bench_pool_yaml(clip_world)), "modelpool")
    assert isinstance(pool, CLIPVisionModelPool) and pool.model_names == list(CLIP_TASKS) and pool.has_pretrained
    # _pretrained_ is a whole CLIPModel checkpoint: its vision tower is read key by key, text tower left out
    lazy = pool.state_dict("_pretrained_")
    assert isinstance(lazy, SafetensorsStateDict)
    expected = CLIPVisionModel.from_pretrained(clip_world / "clip").state_dict()
    assert set(lazy) == set(expected)
    for key, value in expected.items():
        assert torch.equal(lazy[key], value), key
    tower = pool.state_dict("eurosat")  # a 4.x-layout tower, as on the hub
    assert isinstance(tower, SafetensorsStateDict) and set(tower) == set(expected)
    assert isinstance(pool.load_model("eurosat"), CLIPVisionModel)
    assert isinstance(pool.load_processor(), CLIPProcessor) and isinstance(pool.load_clip_model("_pretrained_"), CLIPModel)
    assert pool.test_dataset_names == pool.train_dataset_names == list(CLIP_TASKS)
    assert len(pool.load_test_dataset("mnist")) == IMAGES_PER_TASK and len(pool.load_train_dataset("mnist")) == 4
    with pytest.raises(InputError, match="the model pool has no validation dataset 'mnist'; it has: none"):
        pool.load_val_dataset("mnist")
    with pytest.raises(InputError, match="platform='modelscope' is not supported"):
        CLIPVisionModelPool({"_pretrained_": str(clip_world / "clip")}, platform="modelscope")
    with pytest.raises(InputError, match="dataset 'x' cannot be loaded"):
        CLIPVisionModelPool({"a": str(clip_world / "clip")}, test_datasets={"x": str(clip_world / "no-such-data")}).load_test_dataset("x")


@pytest.mark.parametrize("arch, base", [("clip-vit-base-patch32", None), ("clip-vit-large-patch14", "_L14")])
def test_shipped_configs_name_the_hub_models_and_datasets(arch, base):
    with initialize_config_module("fusion_bench_config", version_base=None):
        config = compose(
            "fusion_bench",
            overrides=[f"modelpool=CLIPVisionModelPool/{arch}_TA8", f"taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8{base or ''}"],
        )
        model_only = compose("fusion_bench", overrides=[f"modelpool=CLIPVisionModelPool/{arch}_TA8_model_only"])
    pool, taskpool = config.modelpool, config.taskpool
    assert dict(pool.models) == {"_pretrained_": f"openai/{arch}", **{task: f"tanganke/{arch}_{task}" for task in TA8}}
    assert pool.processor == f"openai/{arch}" and pool.platform == "hf" and not pool._recursive_
    assert model_only.modelpool.models == pool.models and "test_datasets" not in model_only.modelpool
    paths = {task: spec.path for task, spec in taskpool.test_datasets.items()}
    assert paths == {
        "sun397": "tanganke/sun397", "stanford-cars": "tanganke/stanford_cars", "resisc45": "tanganke/resisc45",
        "eurosat": "tanganke/eurosat", "svhn": "ufldl-stanford/svhn", "gtsrb": "tanganke/gtsrb", "mnist": "ylecun/mnist", "dtd": "tanganke/dtd",
    }
    assert taskpool.test_datasets.svhn.name == "cropped_digits" and {spec.split for spec in taskpool.test_datasets.values()} == {"test"}
    assert {spec.split for spec in pool.train_datasets.values()} == {"train"} and pool.test_datasets == taskpool.test_datasets
    assert taskpool.base_model == f"openai/{arch}"
    # both build without touching the network: models and datasets load on first use
    assert isinstance(instantiate_checked(pool, "modelpool"), CLIPVisionModelPool)
    assert list(instantiate_checked(taskpool, "taskpool").tasks) == list(TA8)


def test_mismatched_towers_name_the_config_to_use():
    b32 = CLIPVisionConfig()  # the defaults are ViT-B/32's
    l14 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
    b16 = CLIPVisionConfig(patch_size=16)
    check_tower_fits(CLIPVisionConfig(), b32, "openai/clip-vit-base-patch32")
    with pytest.raises(InputError, match=r"the merged model does not fit the task pool's base model openai/clip-vit-base-patch32 \(hidden_size 1024 vs 768, .*\); "
                       r"its shape is openai/clip-vit-large-patch14's: use taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14$"):
        check_tower_fits(l14, b32, "openai/clip-vit-base-patch32")
    with pytest.raises(InputError, match=r"use taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8$"):
        check_tower_fits(b32, l14, "openai/clip-vit-large-patch14")
    with pytest.raises(InputError, match=r"\(patch_size 16 vs 32\); its shape is openai/clip-vit-base-patch16's: set taskpool.base_model=openai/clip-vit-base-patch16$"):
        check_tower_fits(b16, b32, "openai/clip-vit-base-patch32")
    from transformers import BertConfig

    with pytest.raises(InputError, match="the merged model is Bert, not a CLIP vision tower"):
        check_tower_fits(BertConfig(), b32, "openai/clip-vit-base-patch32")


def test_data_and_options_are_checked(clip_world):
    data = {task: str(clip_world / "data" / task) for task in CLIP_TASKS}
    with pytest.raises(InputError, match="no class names and prompt templates for task 'cifar10'"):
        CLIPVisionModelTaskPool({"cifar10": data["mnist"]}, base_model=str(clip_world / "clip"))
    with pytest.raises(InputError, match=r"dataloader_kwargs.shuffle=True would change the metrics"):
        CLIPVisionModelTaskPool(data, dataloader_kwargs={"shuffle": True})
    with pytest.raises(InputError, match="dataloader_kwargs has an unknown key 'batchsize'"):
        CLIPVisionModelTaskPool(data, dataloader_kwargs={"batchsize": 8})
    with pytest.raises(InputError, match="max_samples=0 must be a positive integer"):
        CLIPVisionModelTaskPool(data, max_samples=0)
    splits = CLIPVisionModelTaskPool({"mnist": {"_target_": "datasets.load_dataset", "path": data["mnist"]}}, base_model=str(clip_world / "clip"))
    with pytest.raises(InputError, match="the test dataset of 'mnist' has splits train, test; choose one, e.g. split: test"):
        splits.dataset("mnist")
    wrong = CLIPVisionModelTaskPool({"gtsrb": data["mnist"]}, base_model=str(clip_world / "clip"))
    with pytest.raises(InputError, match="the test dataset of 'gtsrb' has 10 classes, but task 'gtsrb' has 43 class names"):
        wrong.evaluate(CLIPVisionModel.from_pretrained(clip_world / "clip"))
    with pytest.raises(InputError, match="the task pool's base_model .*nowhere' cannot be loaded"):
        CLIPVisionModelTaskPool(data, base_model=str(clip_world / "nowhere")).evaluate(CLIPVisionModel.from_pretrained(clip_world / "clip"))


def make_taskpool(world, **options) -> CLIPVisionModelTaskPool:
    datasets = {task: {"_target_": "datasets.load_dataset", "path": str(world / "data" / task), "split": "test"} for task in CLIP_TASKS}
    options.setdefault("dataloader_kwargs", {"batch_size": 8, "num_workers": 0})
    return CLIPVisionModelTaskPool(datasets, base_model=str(world / "clip"), **options)


def merged_tower(world) -> CLIPVisionModel:
    pool = CLIPVisionModelPool({"_pretrained_": str(world / "clip"), **{t: str(world / "towers" / t) for t in CLIP_TASKS}})
    return TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)


@torch.no_grad()
def hand_metrics(world, tower: CLIPVisionModel, task: str, indices: list[int]) -> dict[str, float]:
    """Zero-shot metrics written out as CLIP's paper describes them, with the stock CLIPProcessor, one
    class at a time (as FusionBench computes heads)."""
    clip, processor = CLIPModel.from_pretrained(world / "clip"), CLIPProcessor.from_pretrained(world / "clip", **PIL_BACKEND)
    rows = [load_dataset(str(world / "data" / task), split="test")[i] for i in indices]
    pixels = processor(images=[row["image"] for row in rows], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([row["label"] for row in rows])
    images = clip.visual_projection(tower(pixel_values=pixels).pooler_output)
    images = images / images.norm(dim=-1, keepdim=True)
    spec, heads = classification_task(task), []
    for name in spec.classnames:
        tokens = processor(text=[template.format(name) for template in spec.templates], padding=True, return_tensors="pt")
        text = clip.text_projection(clip.text_model(**tokens).pooler_output)
        text = (text / text.norm(dim=-1, keepdim=True)).mean(dim=0)
        heads.append(text / text.norm())
    logits = clip.logit_scale.exp() * images @ torch.stack(heads).T
    return {"accuracy": (logits.argmax(dim=1) == labels).sum().item() / len(labels), "loss": F.cross_entropy(logits, labels).item()}


def assert_metrics_equal(ours: dict[str, float], expected: dict[str, float]) -> None:
    assert ours["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert ours["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_accuracy_and_loss_equal_a_hand_computation(clip_world):
    tower = merged_tower(clip_world)
    report = make_taskpool(clip_world).evaluate(tower)  # FusionBench's layout: tasks, their average, the model's size
    results = {task: report[task] for task in CLIP_TASKS}
    assert list(report) == [*CLIP_TASKS, "average", "model_info"]
    assert report["average"]["accuracy"] == pytest.approx(sum(m["accuracy"] for m in results.values()) / len(CLIP_TASKS))
    assert report["model_info"]["all_params"] == sum(p.numel() for p in tower.parameters())
    everything = list(range(IMAGES_PER_TASK))  # 20 images in batches of 8: the last batch is smaller
    for task in ("mnist", "eurosat"):  # one template; three templates averaged
        assert_metrics_equal(results[task], hand_metrics(clip_world, tower, task, everything))


def test_max_samples_and_fast_dev_run_score_fewer_images(clip_world):
    tower = merged_tower(clip_world)
    subset = evaluation_indices(IMAGES_PER_TASK, 7)
    assert len(subset) == 7 == len(set(subset)) and subset == sorted(subset) and subset == evaluation_indices(IMAGES_PER_TASK, 7)
    assert subset != list(range(7)) and evaluation_indices(5, 7) == list(range(5))
    assert_metrics_equal(make_taskpool(clip_world, max_samples=7).evaluate(tower)["eurosat"], hand_metrics(clip_world, tower, "eurosat", subset))
    first_batch = make_taskpool(clip_world, fast_dev_run=True).evaluate(tower)["gtsrb"]
    assert_metrics_equal(first_batch, hand_metrics(clip_world, tower, "gtsrb", list(range(8))))


def test_dataloader_workers_give_the_same_numbers(clip_world):
    tower = merged_tower(clip_world)
    in_process = make_taskpool(clip_world, max_samples=12).evaluate(tower)
    workers = make_taskpool(clip_world, max_samples=12, dataloader_kwargs={"batch_size": 5, "num_workers": 2}).evaluate(tower)
    for task in CLIP_TASKS:
        assert workers[task]["accuracy"] == in_process[task]["accuracy"]
        assert workers[task]["loss"] == pytest.approx(in_process[task]["loss"], rel=1e-5)


def test_heads_are_cached_on_disk_and_never_rebuilt(clip_world, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path / "cache"))
    tower = CLIPVisionModel.from_pretrained(clip_world / "clip")
    first = make_taskpool(clip_world, fast_dev_run=True)
    expected = first.evaluate(tower)
    files = sorted((tmp_path / "cache" / "clip_zeroshot_heads").glob("*.safetensors"))
    assert len(files) == len(CLIP_TASKS)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached head was computed again")

    monkeypatch.setattr(taskpool_module, "compute_head", no_rebuild)
    assert first.evaluate(tower) == expected  # the same task pool: heads held in memory
    assert make_taskpool(clip_world, fast_dev_run=True).evaluate(tower) == expected  # a new one: read from disk
    assert sorted((tmp_path / "cache" / "clip_zeroshot_heads").glob("*")) == files

    # the key changes with anything the head is built from
    clip, tokenizer = CLIPModel.from_pretrained(clip_world / "clip"), CLIPProcessor.from_pretrained(clip_world / "clip").tokenizer
    digest, task = text_tower_digest(clip, tokenizer), classification_task("eurosat")
    assert head_key(digest, task) == head_key(text_tower_digest(CLIPModel.from_pretrained(clip_world / "clip"), tokenizer), task)
    assert head_key(digest, task) != head_key(digest, ClassificationTask(task.classnames, task.templates[:1]))
    assert head_key(digest, task) != head_key(digest, ClassificationTask(task.classnames[::-1], task.templates))
    with torch.no_grad():
        clip.text_projection.weight[0, 0] += 1e-3
    assert text_tower_digest(clip, tokenizer) != digest
    assert text_tower_digest(CLIPModel.from_pretrained(clip_world / "clip_wide"), tokenizer) != digest


@pytest.fixture()
def clip_workdir(tmp_path, clip_world):
    write_clip_configs(tmp_path / "config", clip_world)
    return tmp_path


def clip_args(workdir, *overrides):
    return ["--config-dir", str(workdir / "config"), "modelpool=tiny_clip", "taskpool=tiny_clip", f"hydra.run.dir={workdir / 'run'}", *overrides]


@pytest.mark.parametrize("method", ["ties_merging", "task_arithmetic", "simple_average"])
def test_cli_merges_and_scores_the_eight_task_layout(clip_workdir, clip_world, method):
    saved = clip_workdir / "merged"
    result = run_cli(*clip_args(clip_workdir, f"method={method}", f"merged_model_save_path={saved}"), cwd=clip_workdir)
    report = json.loads((clip_workdir / "run" / "report.json").read_text())
    assert list(task_metrics(report)) == list(CLIP_TASKS) and set(report["average"]) == {"accuracy", "loss"}
    assert report["average"]["accuracy"] == pytest.approx(sum(m["accuracy"] for m in task_metrics(report).values()) / len(CLIP_TASKS))
    assert meta(report)["models"]["_pretrained_"] == str(clip_world / "clip") and meta(report)["timing"]["eval_seconds"] > 0
    assert all(line in result.stdout for line in ("mnist", "eurosat", "gtsrb", "average"))
    # the report holds the numbers of the merged model it saved, as the Python API scores it
    again = make_taskpool(clip_world).evaluate(CLIPVisionModel.from_pretrained(saved))
    for task in CLIP_TASKS:
        assert_metrics_equal(task_metrics(report)[task], again[task])


def test_cli_refuses_a_tower_of_another_shape_before_merging(clip_workdir, clip_world):
    write_clip_configs(clip_workdir / "config", clip_world, base="clip_wide")
    saved = clip_workdir / "merged"
    result = run_cli(*clip_args(clip_workdir, f"merged_model_save_path={saved}"), cwd=clip_workdir, check=False)
    assert result.returncode == 2
    assert "fusion_bench: error: the pool's model '_pretrained_' does not fit the task pool's base model" in result.stderr
    assert "(hidden_size 32 vs 48, intermediate_size 64 vs 96); set taskpool.base_model to the CLIP model" in result.stderr
    assert not saved.exists() and not (clip_workdir / "run" / "report.json").exists()
    # and the task pool itself refuses a merged model that does not fit
    wide = CLIPVisionModelTaskPool({"mnist": str(clip_world / "data" / "mnist")}, base_model=str(clip_world / "clip_wide"))
    with pytest.raises(InputError, match="the merged model does not fit the task pool's base model"):
        wide.evaluate(CLIPVisionModel.from_pretrained(clip_world / "clip"))


def test_cli_fast_dev_run_and_max_samples_from_the_command_line(clip_workdir):
    run_cli(*clip_args(clip_workdir, "method=simple_average", "taskpool.fast_dev_run=true", "taskpool.max_samples=5"), cwd=clip_workdir)
    report = json.loads((clip_workdir / "run" / "report.json").read_text())
    assert meta(report)["config"]["taskpool"]["fast_dev_run"] is True and meta(report)["config"]["taskpool"]["max_samples"] == 5
    assert all(m["accuracy"] * 5 == pytest.approx(round(m["accuracy"] * 5)) for m in task_metrics(report).values())
