"""Records the reference FusionBench's AdaMerging (CLIPTaskWiseAdaMergingAlgorithm and
CLIPLayerWiseAdaMergingAlgorithm) on a tiny CLIP vision pool as a test fixture.

Run it with the reference's own python (it needs transformers<5, so it lives in its own venv):

    $(../shared/tools/reference-venv.sh) scripts/make_reference_adamerging_fixtures.py

The pool: a 2-layer, 32-px CLIPVisionModel built here (transformers 4.x) and three copies moved by
0.05·N(0, 1), tasks t0..t2 with 4 random test images each. Each task's test set is exactly one
batch (batch_size 4), so every step sees the same images and the reference's shuffling changes
only their order. The zero-shot head (visual projection, logit scale, class embeddings) is given
rather than built from a text tower: the head is the pool's part, tested with the task pools; here
the reference's own test-time adaptation loop, merged-model wrappers, entropy and Adam run as
they are. Only its data loader (the test images) and head set-up are replaced, and its
hyper-parameter logging (which needs a logger) is skipped.

It writes tests/data/reference_adamerging.safetensors: the models ("input/<model>/<key>", 4.x
keys), images ("data/<task>"), head ("head/..."), and per case the learned merging weights
("output/<case>/merging_weights") and merged model ("output/<case>/merged/<key>"); the cases are
in the metadata. tests/test_adamerging.py checks that fusion_bench reproduces every case.
"""

import json
import tempfile
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench.method import CLIPLayerWiseAdaMergingAlgorithm, CLIPTaskWiseAdaMergingAlgorithm
from fusion_bench.modelpool import BaseModelPool

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference_adamerging.safetensors"
TASKS = ("t0", "t1", "t2")
IMAGES, CLASSES, PROJECTION = 4, 5, 16
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
CASES = [
    ("task_wise", {"lr": 0.05, "init_values": 0.3, "clamp_weights": False}),
    ("layer_wise", {"lr": 0.05, "init_values": 0.3, "clamp_weights": False}),
    ("task_wise", {"lr": 0.05, "init_values": 0.98, "clamp_weights": True}),
    ("layer_wise", {"lr": 0.05, "init_values": 0.98, "clamp_weights": True}),
]
STEPS = 5


def endless(loader):
    """The loader's batches, a fresh shuffle each pass (the reference's InfiniteDataLoader)."""
    while True:
        yield from loader


def given_head_and_data(cls, data, head):
    """The reference class with the test images and the zero-shot head given."""

    class Recorded(cls):
        def on_test_time_adaptation_start(self):
            self.visual_projection = head["projection"]
            self.logit_scale_exp = head["logit_scale_exp"]
            self.zeroshot_weights = dict(head["class_embeddings"])
            self._loaders = {}

        def get_shuffled_test_loader_iter(self, task):
            if task not in self._loaders:
                images = data[task]
                dataset = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
                self._loaders[task] = endless(DataLoader(dataset, batch_size=IMAGES, shuffle=True))
            return self._loaders[task]

        def log_hyperparams(self, *args, **kwargs):  # needs a logger; logging only
            pass

        def test_time_adaptation(self, module):
            module = super().test_time_adaptation(module)
            self.learned = module.merge_weight.detach().clone()
            return module

    return Recorded


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(20251202)
    config = CLIPVisionConfig(**VISION)
    pretrained = CLIPVisionModel(config).eval()
    state = pretrained.state_dict()
    inputs = {"_pretrained_": state}
    for task in TASKS:
        inputs[task] = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v for k, v in state.items()}
    data = {task: torch.randn(IMAGES, 3, 32, 32, generator=generator) for task in TASKS}
    projection = torch.nn.Linear(VISION["hidden_size"], PROJECTION, bias=False).requires_grad_(False)
    class_embeddings = {task: torch.nn.functional.normalize(torch.randn(CLASSES, PROJECTION, generator=generator), dim=-1) for task in TASKS}
    logit_scale = torch.tensor(2.6592)  # CLIP's initial log(1/0.07)
    head = {"projection": projection, "logit_scale_exp": logit_scale.exp(), "class_embeddings": class_embeddings}

    tensors = {f"input/{name}/{k}": v.clone().contiguous() for name, sd in inputs.items() for k, v in sd.items()}
    tensors.update({f"data/{task}": images for task, images in data.items()})
    tensors.update({f"head/class_embeddings/{task}": e for task, e in class_embeddings.items()})
    tensors["head/visual_projection.weight"] = projection.weight.detach().clone()
    tensors["head/logit_scale"] = logit_scale
    cases = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for kind, params in CASES:
            models = {}
            for name, sd in inputs.items():
                models[name] = CLIPVisionModel(config)
                models[name].load_state_dict(sd)
            cls = CLIPTaskWiseAdaMergingAlgorithm if kind == "task_wise" else CLIPLayerWiseAdaMergingAlgorithm
            keys = {
                "name": f"clip_{kind}_adamerging", "weights": None, "optimizer": "adam", "tie_weights": True, "strict": False,
                "devices": 1, "batch_size": IMAGES, "num_workers": 0, "max_steps": STEPS, "fast_dev_run": False,
                "save_merging_weights": False, "cache_dir": cache_dir, **params,
            }  # fmt: skip
            algorithm = given_head_and_data(cls, data, head)(DictConfig(keys))
            fabric = L.Fabric(accelerator="cpu", devices=1)
            fabric.launch()
            if kind == "task_wise":
                algorithm._fabric = fabric  # the task-wise class builds a Fabric only where CUDA is
            else:
                algorithm.fabric = fabric
            merged = algorithm.run(BaseModelPool(models))
            case = f"{kind}/" + ",".join(f"{k}={v}" for k, v in params.items())
            cases.append({"case": case, "kind": kind, "params": params, "steps": STEPS})
            tensors[f"output/{case}/merging_weights"] = algorithm.learned.contiguous()
            for key, value in merged.state_dict().items():
                tensors[f"output/{case}/merged/{key}"] = value.detach().clone().contiguous()
    names = [name for name, _ in pretrained.named_parameters()]
    metadata = {
        "fusion_bench": "0.2.33", "torch": torch.__version__, "cases": json.dumps(cases), "tasks": json.dumps(TASKS),
        "vision_config": json.dumps(VISION), "parameter_names": json.dumps(names),
    }  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
