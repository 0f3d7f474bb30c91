"""A tiny CLIP world on disk: a CLIP model (2 layers, 32 px) with a real CLIP BPE tokenizer, vision
towers 'fine-tuned' from it, and small image datasets in the hub's parquet layout (image + ClassLabel).

Registered as a pytest plugin by conftest.py; benchmarks/clip_eval.py builds on the same helpers.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusion_bench.tasks.clip_classification import classification_task

CLIP_TASKS = ("mnist", "eurosat", "gtsrb")  # grey 28 px digits, square RGB, RGB of varied shapes
IMAGES_PER_TASK = 20
_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def build_clip_tokenizer(corpus: list[str], vocab_size: int = 1000):
    """A CLIP tokenizer (CLIP's normaliser, pre-tokeniser, `</w>` BPE and special tokens) whose
    merges are learnt from `corpus`; its vocabulary is laid out as CLIP's: 256 bytes, the same with
    `</w>`, merges, then the special tokens last."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    merges = [tuple(pair) for pair in json.loads(backend.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [f"{c}</w>" for c in alphabet] + ["".join(pair) for pair in merges] + _SPECIAL_TOKENS
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_clip(tokenizer, seed: int = 0, hidden_size: int = 32, image_size: int = 32, patch_size: int = 8):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch_size,
        ),
        projection_dim=16,
    )
    return CLIPModel(config)


def clip_processor(tokenizer, image_size: int = 32):
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_clip(folder: Path, tokenizer, seed: int = 0, **shape) -> None:
    """A full CLIPModel with its processor, as the openai/* hub folders hold them."""
    tiny_clip(tokenizer, seed, **shape).save_pretrained(folder)
    clip_processor(tokenizer, shape.get("image_size", 32)).save_pretrained(folder)


def save_finetuned_tower(clip_folder: Path, folder: Path, seed: int, scale: float = 0.05) -> None:
    """The CLIP model's vision tower moved a little, saved as the hub's tanganke/* towers are: a
    CLIPVisionModel in the transformers 4.x layout (`vision_model.*` keys)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(clip_folder)
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    tower.config.save_pretrained(folder)
    weights = {f"vision_model.{k}": (v + scale * torch.randn(v.shape, generator=generator)).contiguous() for k, v in tower.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def random_image(generator: np.random.Generator, task: str, index: int) -> Image.Image:
    if task == "mnist":
        return Image.fromarray(generator.integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    if task == "eurosat":
        return Image.fromarray(generator.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    height, width = 24 + 7 * (index % 5), 40 + 3 * (index % 4)  # landscape, portrait and square
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))


def save_image_dataset(folder: Path, task: str, sizes: dict[str, int], seed: int = 0) -> None:
    """Splits of `task` as the hub stores them: data/<split>-00000-of-00001.parquet, with features
    {image: Image, label: ClassLabel(the task's class names)}."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    classnames = list(classification_task(task).classnames)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=classnames)})
    generator = np.random.default_rng(seed)
    for split, size in sizes.items():
        rows = {
            "image": [random_image(generator, task, i) for i in range(size)],
            "label": [int(generator.integers(len(classnames))) for _ in range(size)],
        }
        path = folder / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(rows, features=features).to_parquet(str(path))


def task_corpus(tasks) -> list[str]:
    return [prompt for task in tasks for prompt in classification_task(task).prompts()]


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    """Heads and dataset caches of the tests stay in a temporary folder (also for CLI subprocesses)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("FUSION_BENCH_CACHE", str(tmp_path_factory.mktemp("fusion_bench_cache")))
    patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets_cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def clip_world(tmp_path_factory) -> Path:
    """root/clip (CLIPModel + processor), root/towers/<task>, root/data/<task>, and root/clip_wide,
    a CLIP of another width, for mismatches."""
    root = tmp_path_factory.mktemp("clip_world")
    tokenizer = build_clip_tokenizer(task_corpus(CLIP_TASKS))
    save_clip(root / "clip", tokenizer)
    save_clip(root / "clip_wide", tokenizer, seed=1, hidden_size=48)
    for i, task in enumerate(CLIP_TASKS):
        save_finetuned_tower(root / "clip", root / "towers" / task, seed=i + 1)
        save_image_dataset(root / "data" / task, task, {"test": IMAGES_PER_TASK, "train": 4}, seed=i)
    return root


def write_clip_configs(config_dir: Path, world: Path, base: str = "clip", **taskpool_options) -> None:
    """modelpool/tiny_clip.yaml (FusionBench's layout) and taskpool/tiny_clip.yaml for --config-dir."""
    (config_dir / "modelpool").mkdir(parents=True, exist_ok=True)
    (config_dir / "taskpool").mkdir(parents=True, exist_ok=True)
    models = "\n".join(f"  {task}: {world / 'towers' / task}" for task in CLIP_TASKS)
    datasets = "\n".join(f"  {task}:\n    _target_: datasets.load_dataset\n    path: {world / 'data' / task}\n    split: test" for task in CLIP_TASKS)
    (config_dir / "modelpool" / "tiny_clip.yaml").write_text(
        f"_target_: fusion_bench.modelpool.CLIPVisionModelPool\n_recursive_: false\nprocessor: {world / 'clip'}\n"
        f"models:\n  _pretrained_: {world / 'clip'}\n{models}\nplatform: hf\n"
    )
    options = "".join(f"{key}: {json.dumps(value)}\n" for key, value in taskpool_options.items())
    (config_dir / "taskpool" / "tiny_clip.yaml").write_text(
        f"defaults:\n  - CLIPVisionModelTaskPool@: _template\n  - _self_\nbase_model: {world / base}\n"
        f"dataloader_kwargs:\n  batch_size: 8\n  num_workers: 0\ntest_datasets:\n{datasets}\n{options}"
    )
