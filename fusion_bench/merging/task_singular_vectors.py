"""Task Singular Vectors merging (TSV-M; Gargiulo et al., CVPR 2025), one matrix at a time.

For one weight matrix with task vectors τ_1..τ_T ∈ ℝ^{m×n}, k = min(m, n), r = ⌊k/T⌋:

    τ_t = U_t S_t V_tᵀ                              (thin SVD of each task)
    U = [U_1[:, :r] … U_T[:, :r]],  S = [S_1[:r] … S_T[:r]],  V = [V_1[:, :r] … V_T[:, :r]]
    U⊥ = polar(U),  V⊥ = polar(V)                   (polar(A) = PQᵀ for A = PΣQᵀ: the nearest
                                                      matrix with orthonormal columns)
    Δ = U⊥ diag(S) V⊥ᵀ

and task t's own piece is U⊥[:, t] diag(S_t[:r]) V⊥[:, t]ᵀ over its block of r columns, so
Δ = Σ_t piece_t. FusionBench fills the k − T·r columns that ⌊k/T⌋ leaves over with zeros
before orthogonalising; zero columns change neither polar factor's other columns nor Δ, so they
are left out here.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from fusion_bench.merging.svd import polar_factor, top_singular_triplets


def rank_per_task(shape: torch.Size | tuple[int, ...], n_tasks: int) -> int:
    """r = ⌊min(m, n) / T⌋ singular directions kept from each task (0 when T > min(m, n))."""
    return min(shape) // n_tasks


@dataclass
class TaskSingularVectors:
    """U⊥ [m, T·r], S [T·r], V⊥ᵀ [T·r, n] of one matrix; task t owns columns t·r … (t+1)·r − 1."""

    u: Tensor
    s: Tensor
    vh: Tensor
    rank_per_task: int

    def merged(self) -> Tensor:
        """Δ = U⊥ diag(S) V⊥ᵀ."""
        return (self.u * self.s) @ self.vh

    def of_task(self, task: int) -> Tensor:
        """Task t's piece U⊥_t diag(S_t) V⊥_tᵀ (the pieces sum to Δ)."""
        block = slice(task * self.rank_per_task, (task + 1) * self.rank_per_task)
        return (self.u[:, block] * self.s[block]) @ self.vh[block]


def task_singular_vectors(task_vectors: Tensor) -> TaskSingularVectors:
    """The orthogonalised top-r singular vectors of each task's matrix; task_vectors is [T, m, n]."""
    n_tasks, rows, cols = task_vectors.shape
    rank = rank_per_task((rows, cols), n_tasks)
    if rank == 0:  # more tasks than the rank: nothing of any task fits, Δ = 0 (as FusionBench)
        return TaskSingularVectors(task_vectors.new_zeros(rows, 0), task_vectors.new_zeros(0), task_vectors.new_zeros(0, cols), 0)
    u, s, vh = top_singular_triplets(task_vectors, rank)
    u = u.permute(1, 0, 2).reshape(rows, n_tasks * rank)
    s = s.reshape(n_tasks * rank)
    vh = vh.reshape(n_tasks * rank, cols)
    return TaskSingularVectors(polar_factor(u), s, polar_factor(vh), rank)


def tsv_merge(task_vectors: Tensor) -> Tensor:
    """Δ = U⊥ diag(S) V⊥ᵀ of one matrix (see the module docstring); task_vectors is [T, m, n]."""
    return task_singular_vectors(task_vectors).merged()
