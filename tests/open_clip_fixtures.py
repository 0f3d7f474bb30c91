"""A tiny task_vectors world on disk: an open_clip ViT (2 layers, 32 px) given as a local model
folder, its ImageEncoder and ClassificationHeads pickled whole the way task_vectors saves them
(torch.save of modules from `src.modeling`, a package that is gone when they are read), and small
image datasets in the hub's layout (tests/clip_fixtures.py).

    root/model/open_clip_config.json          the architecture (model_name: local-dir:root/model)
    root/clip/open_clip_config.json + open_clip_model.safetensors   the whole CLIP, text tower too
    root/checkpoints/tiny/zeroshot.pt, root/checkpoints/tiny/<Task>/finetuned.pt, root/checkpoints/tiny/head_<Task>.pt
    root/data/<task>
"""

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.clip_fixtures import CLIP_TASKS, IMAGES_PER_TASK, save_image_dataset

OPEN_CLIP_TASKS = {"mnist": "MNIST", "eurosat": "EuroSAT", "gtsrb": "GTSRB"}  # task → task_vectors' folder name
assert tuple(OPEN_CLIP_TASKS) == CLIP_TASKS
TINY_MODEL_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,  # as OpenAI's weights, which task_vectors fine-tunes
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},  # open_clip's tokenizer's vocabulary
}

# task_vectors' src/modeling.py, as far as saving goes: ImageEncoder holds an open_clip model (its
# text transformer deleted) and its preprocessing; ClassificationHead is a normalising Linear.
MODELING = '''
import torch


class ImageEncoder(torch.nn.Module):
    def __init__(self, model, train_preprocess, val_preprocess):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = model, train_preprocess, val_preprocess
        self.cache_dir = None
        if hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")

    def forward(self, images):
        return self.model.encode_image(images)


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))

    def forward(self, inputs):
        if self.normalize:
            inputs = inputs / inputs.norm(dim=-1, keepdim=True)
        return super().forward(inputs)
'''


def write_model_folder(folder: Path, state_dict: dict | None = None) -> str:
    """An open_clip local model folder (config, and the weights if given); its model_name."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CONFIG, "preprocess_cfg": {}}))
    if state_dict is not None:
        from safetensors.torch import save_file

        save_file({key: tensor.contiguous() for key, tensor in state_dict.items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


class task_vectors_modeling:
    """`import src.modeling` from a temporary folder while inside, and neither after: the pickles
    then name classes that no longer exist, as task_vectors' do on any other machine."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self):
        (self.folder / "src").mkdir(parents=True, exist_ok=True)
        (self.folder / "src" / "__init__.py").write_text("")
        (self.folder / "src" / "modeling.py").write_text(textwrap.dedent(MODELING))
        sys.path.insert(0, str(self.folder))
        import src.modeling

        return src.modeling

    def __exit__(self, *exc):
        sys.path.remove(str(self.folder))
        for name in [name for name in sys.modules if name == "src" or name.startswith("src.")]:
            del sys.modules[name]


def tiny_clip(model_name: str, seed: int = 0):
    """The tiny open_clip CLIP (QuickGELU) of the folder `model_name`, with its train and evaluation transforms."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model_and_transforms(model_name, pretrained=None)


def moved(state_dict: dict, seed: int, scale: float = 0.05, prefix: str = "visual.") -> dict:
    """`state_dict` with the image tower's float tensors moved a little, as fine-tuning would
    (the text parts stay: fine-tuning the image encoder never touches them)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value + scale * torch.randn(value.shape, generator=generator) if key.startswith(prefix) and value.is_floating_point() else value
        for key, value in state_dict.items()
    }


@pytest.fixture(scope="session")
def open_clip_world(tmp_path_factory) -> Path:
    """The folders of the module docstring, with `expected.pt`: the tensors each checkpoint
    holds ({name: state dict}, for comparisons)."""
    pytest.importorskip("open_clip")
    from fusion_bench.taskpool.open_clip_vision import zero_shot_weights
    from fusion_bench.tasks.clip_classification import classification_task

    root = tmp_path_factory.mktemp("open_clip_world")
    model_name = write_model_folder(root / "model")
    import open_clip

    clip, train_preprocess, val_preprocess = tiny_clip(model_name)
    clip.eval()
    write_model_folder(root / "clip", clip.state_dict())
    tokenizer = open_clip.get_tokenizer(model_name)
    checkpoints = root / "checkpoints" / "tiny"
    checkpoints.mkdir(parents=True)
    expected = {}
    with task_vectors_modeling(root / "source") as modeling:
        for seed, (name, folder) in enumerate([("_pretrained_", None), *OPEN_CLIP_TASKS.items()]):
            model = tiny_clip(model_name)[0]
            if folder is not None:
                model.load_state_dict(moved(clip.state_dict(), seed))
            encoder = modeling.ImageEncoder(model, train_preprocess, val_preprocess)
            path = checkpoints / "zeroshot.pt" if folder is None else checkpoints / folder / "finetuned.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(encoder, path)
            expected[name] = {key: value.clone() for key, value in encoder.state_dict().items()}
        for task, folder in OPEN_CLIP_TASKS.items():
            head = modeling.ClassificationHead(True, zero_shot_weights(clip, tokenizer, classification_task(task)))
            torch.save(head, checkpoints / f"head_{folder}.pt")
            expected[f"head_{task}"] = {key: value.clone() for key, value in head.state_dict().items()}
    torch.save(expected, root / "expected.pt")
    for i, task in enumerate(OPEN_CLIP_TASKS):
        save_image_dataset(root / "data" / task, task, {"test": IMAGES_PER_TASK, "train": 4}, seed=i)
    return root


def model_name_of(world: Path) -> str:
    return f"local-dir:{world / 'model'}"


def write_open_clip_configs(config_dir: Path, world: Path, *, heads: bool = True) -> None:
    """modelpool/tiny_open_clip.yaml and taskpool/tiny_open_clip.yaml (FusionBench's layout) for --config-dir."""
    (config_dir / "modelpool").mkdir(parents=True, exist_ok=True)
    (config_dir / "taskpool").mkdir(parents=True, exist_ok=True)
    name = model_name_of(world)
    models = "".join(f"  {task}:\n    model_name: {name}\n    pickle_path: ${{...model_dir}}/tiny/{folder}/finetuned.pt\n" for task, folder in OPEN_CLIP_TASKS.items())
    head_lines = "".join(f"  {task}: ${{..model_dir}}/tiny/head_{folder}.pt\n" for task, folder in OPEN_CLIP_TASKS.items())
    datasets = "".join(f"  {task}:\n    _target_: datasets.load_dataset\n    path: {world / 'data' / task}\n    split: test\n" for task in OPEN_CLIP_TASKS)
    (config_dir / "modelpool" / "tiny_open_clip.yaml").write_text(
        f"_target_: fusion_bench.modelpool.OpenCLIPVisionModelPool\n_recursive_: false\nmodel_dir: {world / 'checkpoints'}\n"
        f"models:\n  _pretrained_:\n    model_name: {name}\n    pickle_path: ${{...model_dir}}/tiny/zeroshot.pt\n{models}"
        f"classification_heads:\n{head_lines}"
    )
    (config_dir / "taskpool" / "tiny_open_clip.yaml").write_text(
        f"_target_: fusion_bench.taskpool.OpenCLIPVisionModelTaskPool\n_recursive_: false\n"
        f"model_name: local-dir:{world / 'clip'}\nmodel_dir: {world / 'checkpoints'}\n"
        + (f"classification_heads:\n{head_lines}" if heads else "")
        + f"dataloader_kwargs:\n  batch_size: 8\n  num_workers: 0\n  shuffle: false\n  drop_last: false\ntest_datasets:\n{datasets}"
    )
