"""Records the reference FusionBench's merges of small random pools as test fixtures.

Run it with the reference's own python (it needs transformers<5, so it lives in its own venv):

    $(../shared/tools/reference-venv.sh) scripts/make_reference_fixtures.py

It writes tests/data/reference_merges.safetensors: the input models ("input/<pool>/<model>/<key>") and the
reference's merged weights ("output/<case>/<key>"), with the cases described in the metadata.
tests/test_reference_equality.py checks that fusion_bench reproduces every case.
"""

import json
from pathlib import Path

import torch
from reference_pools import as_modules, record_pool
from safetensors.torch import save_file
from torch import nn

import fusion_bench
from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference_merges.safetensors"
N_TASKS = 4


def make_module() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 12), nn.LayerNorm(12), nn.Linear(12, 8), nn.Linear(8, 4, bias=False))


def make_pool(kind: str, generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
    """normal: Gaussian task vectors; ties: weights and task vectors are small multiples of 1/8,
    exact in float32, so many |τ| tie at the cut and many columns sum to exactly zero. Each pool
    also has one tensor no task changed ("2.bias")."""
    shapes = {k: v.shape for k, v in make_module().state_dict().items()}
    if kind == "normal":
        pretrained = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    else:
        pretrained = {k: torch.randint(-8, 9, shape, generator=generator).float() / 8 for k, shape in shapes.items()}
    pool = {"_pretrained_": pretrained}
    for t in range(N_TASKS):
        model = {}
        for key, value in pretrained.items():
            if kind == "normal":
                delta = 0.01 * torch.randn(value.shape, generator=generator)
            else:
                delta = torch.randint(-2, 3, value.shape, generator=generator).float() / 8
            model[key] = value.clone() if key == "2.bias" else value + delta
        pool[f"task{t}"] = model
    return pool


def main():
    generator = torch.Generator().manual_seed(20231123)
    tensors, cases = {}, []
    for kind in ("normal", "ties"):
        pool = make_pool(kind, generator)
        record_pool(tensors, kind, pool)
        runs = [("simple_average", {}, lambda p: SimpleAverageAlgorithm().run(p))]
        runs.append(("task_arithmetic", {"scaling_factor": 0.3}, lambda p: TaskArithmeticAlgorithm(scaling_factor=0.3).run(p)))
        for merge_func in ("sum", "mean", "max"):
            for threshold in (0.001, 0.05, 5, 20, 50, 99, 99.99):
                params = {"scaling_factor": 0.7, "threshold": threshold, "merge_func": merge_func}
                runs.append(("ties_merging", params, lambda p, params=params: TiesMergingAlgorithm(remove_keys=[], **params).run(p)))
        for method, params, run in runs:
            merged = run(as_modules(pool, make_module)).state_dict()
            case = f"{kind}/{method}/" + ",".join(f"{k}={v}" for k, v in params.items())
            cases.append({"case": case, "pool": kind, "method": method, "params": params})
            for key, value in merged.items():
                tensors[f"output/{case}/{key}"] = value.clone()
    metadata = {"fusion_bench": fusion_bench.__version__ if hasattr(fusion_bench, "__version__") else "0.2.33",
                "torch": torch.__version__, "cases": json.dumps(cases)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
