"""Records the reference FusionBench's data-free merges (TSV-M, Iso-C, Iso-CTS, WUDI, MagMax,
weighted average, DARE without dropping) of small random pools as test fixtures.

Run it with the reference's own python (it needs transformers<5, so it lives in its own venv):

    $(../shared/tools/reference-venv.sh) scripts/make_reference_data_free_fixtures.py

It writes tests/data/reference_data_free_merges.safetensors: the input models
("input/<pool>/<model>/<key>") and the reference's merged weights ("output/<case>/<key>"; per-task
models under "output/<case>/<model>/<key>"), with the cases described in the metadata.
tests/test_reference_equality_data_free.py checks that fusion_bench reproduces every case.
"""

import copy
import json
from pathlib import Path

import torch
from reference_pools import as_modules, record_pool
from safetensors.torch import save_file
from torch import nn

from fusion_bench.method import (
    DareSimpleAverage,
    DareTaskArithmetic,
    ISO_C_Merge,
    ISO_CTS_Merge,
    MagMaxAlgorithm,
    TaskSingularVectorMerging,
    WeightedAverageAlgorithm,
    WUDIMerging,
)
from fusion_bench.method.dare import DareTiesMerging
from fusion_bench.modelpool import BaseModelPool

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference_data_free_merges.safetensors"
N_TASKS = 4
CLASSES = {
    "TaskSingularVectorMerging": TaskSingularVectorMerging,
    "ISO_C_Merge": ISO_C_Merge,
    "ISO_CTS_Merge": ISO_CTS_Merge,
    "WUDIMerging": WUDIMerging,
    "MagMaxAlgorithm": MagMaxAlgorithm,
    "WeightedAverageAlgorithm": WeightedAverageAlgorithm,
    "DareSimpleAverage": DareSimpleAverage,
    "DareTaskArithmetic": DareTaskArithmetic,
    "DareTiesMerging": DareTiesMerging,
}
NO_DROP = {"sparsity_ratio": 0.0, "only_on_linear_weights": False, "rescale": True}
CASES = [
    ("TaskSingularVectorMerging", {"alpha": 1}),
    ("TaskSingularVectorMerging", {"alpha": 0.7}),
    ("TaskSingularVectorMerging", {"alpha": [0.5, 1.0, 1.5, 2.0]}),
    ("TaskSingularVectorMerging", {"alpha": 1, "exclude_keys": ["2.weight"]}),
    ("TaskSingularVectorMerging", {"alpha": 1, "return_single_task_models": True}),
    ("ISO_C_Merge", {"scaling_factor": 1.0}),
    ("ISO_C_Merge", {"scaling_factor": 1.5, "exclude_keys": ["0.weight"]}),
    ("ISO_CTS_Merge", {"scaling_factor": 1.0, "common_space_fraction": 0.8}),
    ("ISO_CTS_Merge", {"scaling_factor": 1.5, "common_space_fraction": 0.5}),
    ("ISO_CTS_Merge", {"scaling_factor": 1.0, "common_space_fraction": 1.0, "exclude_keys": ["3.weight"]}),
    ("WUDIMerging", {"iter_num": 400}),
    ("WUDIMerging", {"iter_num": 50, "exclude_keys": ["2.weight"]}),
    ("MagMaxAlgorithm", {"scaling_factor": 0.5}),
    ("MagMaxAlgorithm", {"scaling_factor": 1.0}),
    ("WeightedAverageAlgorithm", {"normalize": True, "weights": [1.0, 2.0, 3.0, 4.0]}),
    ("WeightedAverageAlgorithm", {"normalize": False, "weights": [0.1, 0.2, 0.3, 0.4]}),
    ("DareSimpleAverage", NO_DROP),
    ("DareTaskArithmetic", {**NO_DROP, "scaling_factor": 0.3}),
    ("DareTiesMerging", {**NO_DROP, "scaling_factor": 0.5, "threshold": 20, "remove_keys": [], "merge_func": "sum"}),
]


def make_module() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 16), nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 8, bias=False))


def make_pool(kind: str, generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """normal: Gaussian task vectors; lowrank: task vectors of rank 3 in each matrix plus a little
    Gaussian noise, as fine-tuning makes them (a few strong directions over a full-rank tail). The
    noise keeps every singular value well apart from float32 rounding: without it, Σ_t τ_t has null
    directions, whose singular vectors (and so TSV-M's and Iso-C's outputs) are whatever the
    machine's LAPACK makes of rounding noise, different from one CPU to another. Each pool has one
    tensor no task changed ("1.bias")."""
    shapes = {k: v.shape for k, v in make_module().state_dict().items()}
    pretrained = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    pool = {"_pretrained_": pretrained}
    for t in range(N_TASKS):
        model = {}
        for key, value in pretrained.items():
            if kind == "lowrank" and value.dim() == 2:
                delta = 0.05 * torch.randn(value.shape[0], 3, generator=generator) @ torch.randn(3, value.shape[1], generator=generator)
                delta += 0.02 * torch.randn(value.shape, generator=generator)
            else:
                delta = 0.01 * torch.randn(value.shape, generator=generator)
            model[key] = value.clone() if key == "1.bias" else value + delta
        pool[f"task{t}"] = model
    return pool


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(20250301)
    tensors, cases = {}, []
    for kind in ("normal", "lowrank"):
        pool = make_pool(kind, generator)
        record_pool(tensors, kind, pool)
        for method, params in CASES:
            merged = CLASSES[method](**copy.deepcopy(params)).run(BaseModelPool(as_modules(pool, make_module)))
            case = f"{kind}/{method}/" + ",".join(f"{k}={v}" for k, v in params.items())
            cases.append({"case": case, "pool": kind, "method": method, "params": params})
            outputs = merged.items() if isinstance(merged, dict) else [(None, merged)]
            for name, model in outputs:
                prefix = f"output/{case}/" if name is None else f"output/{case}/{name}/"
                for key, value in model.state_dict().items():
                    tensors[prefix + key] = value.detach().clone().contiguous()
    metadata = {"fusion_bench": "0.2.33", "torch": torch.__version__, "cases": json.dumps(cases)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
