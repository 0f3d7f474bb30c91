"""Records the reference FusionBench's Fisher merging of a tiny CLIP pool as a test fixture.

Run it with the reference's own python (transformers<5, its own venv):

    $(../shared/tools/reference-venv.sh) scripts/make_reference_fisher_fixtures.py

It builds, with the reference's transformers 4.x, a tiny CLIP world in
tests/data/reference_fisher_world/: clip/ (a 2-layer 32-px CLIPModel and its processor, whose
tokenizer has the 512 byte tokens of CLIP's BPE and no merges, so every prompt of the chosen tasks
fits in 77 tokens), towers/<task> (CLIPVisionModel, the CLIP's tower moved a little) and
data/<task> (TRAIN_IMAGES random 32×32 RGB images with labels, in the hub's parquet layout; at
32×32 the processor's resize and crop are the identity, so the two versions' image code cannot
differ). Then it runs FusionBench 0.2.33's FisherMergingForCLIPVisionModel on that pool for each
case and writes tests/data/reference_fisher.safetensors:

    output/<case>/<key>   the merged vision tower's weights
    fisher/<task>/<key>   each task model's Fisher weights (get_fisher_weights)
    head/<task>           the zero-shot head (class text embeddings) it used
    pixels/<task>, labels/<task>, logits/<task>   the train batch as its processor prepared it, and
                          the task model's logits on it

with the cases in the metadata. Keys are the reference's (transformers 4.x: `vision_model.` before
the names transformers 5 gives, which is why the exclusion patterns start with `.*`). num_fisher_examples = batch_size = TRAIN_IMAGES: one batch covers
each train set, so the order in which examples are drawn does not change the result.
tests/test_fisher_merging.py replays every case with fisher_estimate=fusionbench.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "tests" / "data" / "reference_fisher_world"
OUT = REPO / "tests" / "data" / "reference_fisher.safetensors"
TASKS = ("mnist", "eurosat", "dtd")  # prompts of at most 69 characters: one token per character fits
TRAIN_IMAGES = 6
CASES = [
    {"normalize_fisher_weight": True, "minimal_fisher_weight": 1e-6, "exclude_param_names_regex": []},
    {"normalize_fisher_weight": False, "minimal_fisher_weight": 1e-6, "exclude_param_names_regex": []},
    {"normalize_fisher_weight": True, "minimal_fisher_weight": 1e-3, "exclude_param_names_regex": [".*layer_norm", ".*embeddings"]},
]


def byte_tokenizer(folder: Path):
    """CLIP's BPE vocabulary without merges: each character is a token (`</w>` ends a word)."""
    from transformers import CLIPTokenizerFast
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [f"{c}</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))


def build_world() -> None:
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionModel

    from fusion_bench.tasks.clip_classification import get_classnames_and_templates

    shutil.rmtree(WORLD, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = byte_tokenizer(Path(scratch))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    clip = CLIPModel(config)
    # trained CLIPs have logit scale 100: with the initial 14.3 this random CLIP's predictions are
    # nearly uniform, where the reference's objective Σ_y √p_y log p_y has a gradient near 0 made of
    # cancelling terms, and rounding differences between the two versions would dominate it
    clip.logit_scale.data.fill_(float(np.log(100.0)))
    clip.save_pretrained(WORLD / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(WORLD / "clip")
    generator = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(2)
    for task in TASKS:
        tower = CLIPVisionModel.from_pretrained(WORLD / "clip")
        with torch.no_grad():
            for parameter in tower.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        tower.save_pretrained(WORLD / "towers" / task)
        classnames, _ = get_classnames_and_templates(task)
        features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(classnames))})
        rows = {
            "image": [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(TRAIN_IMAGES)],
            "label": [int(rng.integers(len(classnames))) for _ in range(TRAIN_IMAGES)],
        }
        path = WORLD / "data" / task / "data" / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True)
        Dataset.from_dict(rows, features=features).to_parquet(str(path))


def make_pool():
    from omegaconf import DictConfig

    from fusion_bench.modelpool import CLIPVisionModelPool

    models = {"_pretrained_": str(WORLD / "clip"), **{task: str(WORLD / "towers" / task) for task in TASKS}}
    datasets = {task: str(WORLD / "data" / task) for task in TASKS}
    return CLIPVisionModelPool(DictConfig(models), processor=str(WORLD / "clip"), train_datasets=DictConfig(datasets))


def algorithm(case: dict):
    from omegaconf import DictConfig

    from fusion_bench.method import FisherMergingForCLIPVisionModel

    loader = DictConfig({"batch_size": TRAIN_IMAGES, "num_workers": 0})
    return FisherMergingForCLIPVisionModel(num_fisher_examples=TRAIN_IMAGES, dataloader_kwargs=loader, **case)


def main():
    build_world()
    tensors, cases = {}, []
    for index, case in enumerate(CASES):
        method = algorithm(case)
        merged = method.run(make_pool())
        name = f"case{index}"
        cases.append({"case": name, **case})
        for key, value in merged.state_dict().items():
            tensors[f"output/{name}/{key}"] = value.detach().clone().contiguous()
    # the Fisher weights and heads behind those merges, to locate any difference
    method = algorithm(CASES[0])
    pool = make_pool()
    method.modelpool = pool
    method.on_fisher_merging_start()
    from fusion_bench.dataset import CLIPDataset
    from torch.utils.data import DataLoader

    for task in TASKS:
        tensors[f"head/{task}"] = method.zeroshot_weights[task].detach().clone().contiguous()
        images = CLIPDataset(pool.load_train_dataset(task), method.clip_processor)
        tensors[f"pixels/{task}"], tensors[f"labels/{task}"] = next(iter(DataLoader(images, batch_size=TRAIN_IMAGES)))
        model = pool.load_model(task)
        with torch.no_grad():
            tensors[f"logits/{task}"] = method.compute_logits(model, (tensors[f"pixels/{task}"], None), task).contiguous()
        names = [name for name, _ in model.named_parameters()]
        for key, value in method.get_fisher_weights(task, model, pool.load_train_dataset(task), names).items():
            tensors[f"fisher/{task}/{key}"] = value.detach().clone().contiguous()
    from safetensors.torch import save_file
    from transformers import __version__ as transformers_version

    metadata = {"fusion_bench": "0.2.33", "torch": torch.__version__, "transformers": transformers_version, "cases": json.dumps(cases)}
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {len(cases)} cases, {len(tensors)} tensors to {OUT}")


if __name__ == "__main__":
    # the reference caches zero-shot heads under ./outputs/cache, keyed by the CLIP's path only:
    # work in a fresh folder so that a rebuilt world never meets an old head
    os.chdir(tempfile.mkdtemp())
    main()
