"""Records the reference FusionBench's RegMean and RegMean++ merges of a tiny CLIP vision pool as
test fixtures (RegMeanAlgorithmForCLIP, RegMeanAlgorithmForCLIPPlusPlus).

Run it with the reference's own python (it needs transformers<5, so it lives in its own venv):

    $(../shared/tools/reference-venv.sh) scripts/make_reference_regmean_fixtures.py

The pool: a 2-layer, 32-pixel CLIPVisionModel (`_pretrained_`) and three towers moved from it, each
with 8 train images. The images are stored as the pixel values the model sees (the reference's
processor is replaced by the identity), so both sides read the same inputs; every case uses all 8
images, so the reference's shuffled loader order does not matter. The Gram matrices do not depend
on the zero-shot head, which is replaced by a random one (the reference only computes its logits).

It writes tests/data/reference_regmean.safetensors: the vision config and the cases in the
metadata, the models ("input/<model>/<key>"), the images ("data/<task>/pixel_values"), and the
reference's merged weights ("output/<case>/<key>"). tests/test_regmean.py and
tests/test_regmean_plusplus.py check that fusion_bench reproduces every case.
"""

import json
from pathlib import Path

import torch
from bidict import bidict
from lightning.fabric import Fabric
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench.method import RegMeanAlgorithmForCLIP
from fusion_bench.method.regmean_plusplus import RegMeanAlgorithmForCLIPPlusPlus, RegMeanAlgorithmPlusPlus
from fusion_bench.modelpool import BaseModelPool

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference_regmean.safetensors"
TASKS = ("mnist", "eurosat", "gtsrb")
IMAGES = 8
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
CASES = [
    ("RegMeanAlgorithmForCLIP", {"reduce_non_diagonal_ratio": 0.95, "exclude_param_names_regex": []}),
    ("RegMeanAlgorithmForCLIP", {"reduce_non_diagonal_ratio": 1.0, "exclude_param_names_regex": []}),
    ("RegMeanAlgorithmForCLIP", {"reduce_non_diagonal_ratio": 0.5, "exclude_param_names_regex": [".*mlp.fc2.*"]}),
    ("RegMeanAlgorithmForCLIPPlusPlus", {"reduce_non_diagonal_ratio": 0.95, "exclude_param_names_regex": []}),
    ("RegMeanAlgorithmForCLIPPlusPlus", {"reduce_non_diagonal_ratio": 0.5, "exclude_param_names_regex": [".*mlp.fc2.*"]}),
]


class PatchedRegMeanForCLIPPlusPlus(RegMeanAlgorithmForCLIPPlusPlus):
    """As released, RegMeanAlgorithmForCLIPPlusPlus cannot be constructed (AttributeError: 'dict'
    object has no attribute 'inverse'): it sets `_config_mapping` to a plain dict, which the
    auto_register_config __init__ it inherits reads as a bidict. The same mapping, as a bidict."""

    _config_mapping = bidict({**RegMeanAlgorithmPlusPlus._config_mapping, "_dataloader_kwargs": "dataloader_kwargs"})


CLASSES = {"RegMeanAlgorithmForCLIP": RegMeanAlgorithmForCLIP, "RegMeanAlgorithmForCLIPPlusPlus": PatchedRegMeanForCLIPPlusPlus}


def make_models(generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    pretrained = CLIPVisionModel(CLIPVisionConfig(**CONFIG)).state_dict()
    models = {"_pretrained_": pretrained}
    for task in TASKS:
        models[task] = {key: value + 0.05 * torch.randn(value.shape, generator=generator) for key, value in pretrained.items()}
    return models


def as_module(state_dict: dict[str, torch.Tensor]) -> CLIPVisionModel:
    model = CLIPVisionModel(CLIPVisionConfig(**CONFIG))
    model.load_state_dict(state_dict)
    return model.eval()


def run_reference(method: str, params: dict, models, images, generator: torch.Generator) -> dict[str, torch.Tensor]:
    algorithm = CLASSES[method](num_regmean_examples=IMAGES, weight_transpose=True, dataloader_kwargs={"batch_size": 3, "num_workers": 0}, **params)
    algorithm.fabric = Fabric(accelerator="cpu", devices=1)
    algorithm._clip_processor = lambda image: image  # the stored images are already pixel values
    projection = torch.nn.Linear(CONFIG["hidden_size"], CONFIG["projection_dim"], bias=False)

    def random_head(*args, **kwargs):
        algorithm.visual_projection = projection
        algorithm.logit_scale_exp = torch.tensor(100.0)
        algorithm.zeroshot_weights = {task: torch.randn(10, CONFIG["projection_dim"], generator=generator) for task in TASKS}

    algorithm.setup_zero_shot_classification_head = random_head
    pool = BaseModelPool({name: as_module(state_dict) for name, state_dict in models.items()})
    pool.load_train_dataset = lambda task: [(images[task][i], 0) for i in range(IMAGES)]
    return {key: value.detach().clone() for key, value in algorithm.run(pool).state_dict().items()}


def main():
    generator = torch.Generator().manual_seed(20250613)
    models = make_models(generator)
    images = {task: torch.randn(IMAGES, 3, CONFIG["image_size"], CONFIG["image_size"], generator=generator) for task in TASKS}
    tensors = {f"input/{name}/{key}": value.contiguous() for name, state_dict in models.items() for key, value in state_dict.items()}
    tensors.update({f"data/{task}/pixel_values": pixels for task, pixels in images.items()})
    cases = []
    for method, params in CASES:
        case = f"{method}/" + ",".join(f"{k}={v}" for k, v in params.items())
        cases.append({"case": case, "method": method, "params": params})
        merged = run_reference(method, params, models, images, generator)
        tensors.update({f"output/{case}/{key}": value.contiguous() for key, value in merged.items()})
    metadata = {"config": json.dumps(CONFIG), "cases": json.dumps(cases), "num_regmean_examples": str(IMAGES), "fusion_bench": "0.2.33"}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {OUT}: {len(cases)} cases, {OUT.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
