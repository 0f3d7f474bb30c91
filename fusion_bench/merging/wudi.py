"""WUDI merging (Cheng et al., 2025, "Whoever Started the Interference Should End It"), per tensor.

For each matrix not excluded, the merged task vector τ minimises the interference loss

    L(τ) = Σ_t ‖(τ − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F

with Adam (lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay: the authors' and FusionBench's
settings) for `iter_num` steps from τ = Σ_t τ_t. Every other tensor takes the mean of the τ_t, and
θ = θ₀ + τ.

L is quadratic in τ: ∇L = 2(τA − B) with A = Σ_t τ_tᵀτ_t / ‖τ_t‖² (n×n) and
B = Σ_t τ_t τ_tᵀ τ_t / ‖τ_t‖² (m×n), both fixed. So A and B are formed once per tensor and a step
costs one m×n×n product, where differentiating L as written costs T products of m×n×m, twice.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion_bench.merging.per_tensor import is_merged_as_matrix, merge_per_tensor
from fusion_bench.merging.streaming import StateDict

ADAM_LR = 1e-5
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class InterferenceLoss:
    """L(τ) = Σ_t ‖(τ − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F of one matrix, over the tasks with τ_t ≠ 0 (a task
    that left the matrix unchanged interferes with nothing there, and its term would be 0/0).

    Its gradient 2(τA − B) uses A = Σ_t τ_tᵀτ_t / ‖τ_t‖² as it is (one m×n×n product a step), or,
    when 2·T·m < n, as SᵀS with S the rows of every τ_t / ‖τ_t‖ stacked ([T·m, n]): (τSᵀ)S costs
    2·m·T·m·n. B = Σ_t τ_t τ_tᵀ τ_t / ‖τ_t‖² is formed in the cheaper order.
    """

    def __init__(self, task_vectors: Tensor):
        norms_squared = task_vectors.square().sum(dim=(1, 2))
        changed = norms_squared > 0
        task_vectors, norms_squared = task_vectors[changed], norms_squared[changed]
        tasks, rows, columns = task_vectors.shape
        self.target = task_vectors.new_zeros(rows, columns)  # B
        for task_vector, weight in zip(task_vectors, norms_squared.reciprocal().tolist()):
            if rows <= columns:
                self.target.addmm_(task_vector @ task_vector.T, task_vector, alpha=weight)
            else:
                self.target.addmm_(task_vector, task_vector.T @ task_vector, alpha=weight)
        self.gram: Tensor | None = None  # A, or
        self.scaled_rows: Tensor | None = None  # S
        if 2 * tasks * rows < columns:
            self.scaled_rows = (task_vectors * norms_squared.rsqrt().view(-1, 1, 1)).reshape(tasks * rows, columns)
        else:
            self.gram = task_vectors.new_zeros(columns, columns)
            for task_vector, weight in zip(task_vectors, norms_squared.reciprocal().tolist()):
                self.gram.addmm_(task_vector.T, task_vector, alpha=weight)

    def gradient(self, merged: Tensor, out: Tensor) -> Tensor:
        """∇L at `merged`, 2(τA − B), written into `out`."""
        if self.gram is not None:
            return torch.addmm(self.target, merged, self.gram, beta=-2, alpha=2, out=out)
        return torch.addmm(self.target, merged @ self.scaled_rows.T, self.scaled_rows, beta=-2, alpha=2, out=out)


def wudi_task_vector(task_vectors: Tensor, iter_num: int) -> Tensor:
    """The merged task vector of one matrix: torch.optim.Adam (lr 1e-5, betas (0.9, 0.999), eps
    1e-8) on InterferenceLoss for iter_num steps from Σ_t τ_t. task_vectors: [T, m, n], float32."""
    merged = torch.nn.Parameter(task_vectors.sum(dim=0))
    if iter_num == 0 or not task_vectors.any():
        return merged.detach()
    loss = InterferenceLoss(task_vectors)
    optimizer = torch.optim.Adam([merged], lr=ADAM_LR, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0)
    merged.grad = torch.empty_like(merged.detach())
    for _ in range(iter_num):
        loss.gradient(merged.detach(), out=merged.grad)
        optimizer.step()
    return merged.detach()


def wudi_merge(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    out: StateDict,
    keys: Sequence[str],
    *,
    iter_num: int,
    exclude_keys: Sequence[str],
) -> None:
    """Write θ₀ + τ into out[key] for every key: τ = wudi_task_vector(τ_1..τ_T) for the 2-D keys not
    in exclude_keys, the mean (1/T)·Σ_t τ_t for the others."""

    def merge(key: str, theta0: Tensor, task_vectors: Tensor) -> Tensor:
        if is_merged_as_matrix(key, theta0.shape, exclude_keys):
            return wudi_task_vector(task_vectors, iter_num)
        return task_vectors.sum(dim=0) / len(task_vectors)

    merge_per_tensor(pretrained, finetuned, out, keys, merge, desc="WUDI")
