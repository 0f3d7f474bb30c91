"""Isotropic merging (Marczak et al., 2025, "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces"), one matrix at a time.

Iso-C: the sum of the task vectors, Σ_t τ_t = UΣVᵀ, with its spectrum flattened to the mean
singular value: Δ = σ̄ UVᵀ, so every direction of the common subspace counts alike.

Iso-CTS: keep the top c directions of that common subspace and give each task d more directions
of its own, the top singular vectors of the part of τ_t outside the common subspace; orthogonalise
the k = c + T·d directions together and flatten their spectrum:

    U_c, σ_c, V_c = top c of svd(Σ_t τ_t)
    τ_t − U_c U_cᵀ τ_t = U_t S_t V_tᵀ                 (each task, outside the common subspace)
    U = [U_1[:, :d] … U_T[:, :d]  U_c],  V likewise,  σ = [S_1[:d] … S_T[:d]  σ_c]
    Δ = mean(σ) · polar(U) polar(V)ᵀ                   (polar: see svd.polar_decomposition)
"""

import torch
from torch import Tensor

from fusion_bench.merging.svd import leading_subspace, polar_decomposition, polar_factor, top_singular_triplets


def iso_c_merge(task_vectors: Tensor) -> Tensor:
    """Δ = σ̄ UVᵀ for Σ_t τ_t = UΣVᵀ; task_vectors is [T, m, n]."""
    polar, singular = polar_decomposition(task_vectors.sum(dim=0))
    return singular.mean() * polar


def iso_cts_dimensions(rank: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, d): the common directions and each task's own, with c + T·d = k = min(m, n).

    As FusionBench: the task-specific total k − ⌊k·f⌋ is rounded (Python's round, half to even)
    to a multiple of T, and c takes the rest. Where rounding up would ask for more directions than
    the matrix has (T·d > k: k = 3, T = 2, f < 1/3, say), d is rounded down instead; FusionBench
    slices with a negative c there.
    """
    common = int(rank * common_space_fraction)
    per_task = round((rank - common) / n_tasks)
    if per_task * n_tasks > rank:
        per_task = (rank - common) // n_tasks
    return rank - per_task * n_tasks, per_task


def iso_cts_merge(task_vectors: Tensor, common_space_fraction: float) -> Tensor:
    """Δ = mean(σ) · polar(U) polar(V)ᵀ over the common and task-specific directions (see the
    module docstring); task_vectors is [T, m, n], 0 < common_space_fraction ≤ 1."""
    n_tasks, rows, cols = task_vectors.shape
    common, per_task = iso_cts_dimensions(min(rows, cols), n_tasks, common_space_fraction)
    u_common, s_common, vh_common, complement = leading_subspace(task_vectors.sum(dim=0), common)
    if per_task:
        u_own, s_own, vh_own = own_directions(task_vectors, u_common, complement, per_task)
        u_common = torch.cat([u_own.permute(1, 0, 2).reshape(rows, n_tasks * per_task), u_common], dim=1)
        s_common = torch.cat([s_own.reshape(n_tasks * per_task), s_common])
        vh_common = torch.cat([vh_own.reshape(n_tasks * per_task, cols), vh_common])
    return s_common.mean() * (polar_factor(u_common) @ polar_factor(vh_common))


def own_directions(task_vectors: Tensor, u_common: Tensor, complement: Tensor | None, per_task: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top `per_task` singular triplets of each τ_t − U_c U_cᵀ τ_t, U_c = u_common (the top
    directions of Σ_t τ_t), `complement` the rest of its left singular basis where that basis is
    square: U [T, m, d], S [T, d], Vᴴ [T, d, n]."""
    if complement is not None:
        # I − U_c U_cᵀ = U_⊥ U_⊥ᵀ with U_⊥ = complement: τ_t's part outside is U_⊥ (U_⊥ᵀ τ_t),
        # whose triplets come from a [m − c, n] matrix, not an [m, n] one
        u_own, s_own, vh_own = top_singular_triplets(complement.T @ task_vectors, per_task)
        return complement @ u_own, s_own, vh_own
    return top_singular_triplets(task_vectors - u_common @ (u_common.T @ task_vectors), per_task)  # no m×m projector
