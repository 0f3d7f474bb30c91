"""What the SVD merges cost per matrix, and so per model: CPU seconds on one core for 8 tasks'
copies of each matrix shape of ViT-B (768 / 3072) and ViT-L (1024 / 4096), and the whole vision
tower extrapolated from its layers (four attention matrices, fc1 tall, fc2 wide).

    .venv/bin/python benchmarks/svd_tensors.py [--tasks 8] [--repeats 3]

One core (torch.set_num_threads(1)) and process time, so the figures do not move with what else
runs on the machine; random task vectors of a ViT's scale.
"""

import argparse
import statistics
import time

import torch

from fusion_bench.merging.isotropic import iso_c_merge, iso_cts_merge
from fusion_bench.merging.task_singular_vectors import tsv_merge

METHODS = {"TSV-M": tsv_merge, "Iso-C": iso_c_merge, "Iso-CTS": lambda task_vectors: iso_cts_merge(task_vectors, 0.8)}
TOWERS = {"ViT-B/32": (768, 3072, 12), "ViT-L/14": (1024, 4096, 24)}  # width, MLP width, layers


def cpu_seconds(merge, task_vectors: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        merge(task_vectors)
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    shapes = [shape for width, mlp, _ in TOWERS.values() for shape in ((width, width), (mlp, width), (width, mlp))]
    seconds = {}
    for name, merge in METHODS.items():
        for shape in shapes:
            task_vectors = 1e-3 * torch.randn(args.tasks, *shape, generator=generator)
            seconds[name, shape] = cpu_seconds(merge, task_vectors, args.repeats)
    print(f"{args.tasks} tasks, CPU seconds on one core, median of {args.repeats}:\n")
    print("| method | " + " | ".join(f"{rows}×{cols}" for rows, cols in shapes) + " | " + " | ".join(f"{tower} (whole tower)" for tower in TOWERS) + " |")
    print("|---" * (1 + len(shapes) + len(TOWERS)) + "|")
    for name in METHODS:
        per_tower = []
        for width, mlp, layers in TOWERS.values():
            layer = 4 * seconds[name, (width, width)] + seconds[name, (mlp, width)] + seconds[name, (width, mlp)]
            per_tower.append(f"{layers * layer / 60:.1f} min")
        print(f"| {name} | " + " | ".join(f"{seconds[name, shape]:.2f} s" for shape in shapes) + " | " + " | ".join(per_tower) + " |")


if __name__ == "__main__":
    main()
