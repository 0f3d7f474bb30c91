"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024), with mergekit's `breadcrumbs` semantics.

Per tensor and task, the mask m_t drops the largest `gamma` share of |τ_t| (outliers) and as many
of the smallest as it takes for a `density` share to stay; then θ = θ₀ + λ·Σ_t m_t ⊙ τ_t. The kept
entries are not rescaled (mergekit's `breadcrumbs` has rescale off).
"""

from torch import Tensor

from fusion_bench.utils.errors import InputError


def check_density_and_gamma(density: float, gamma: float) -> tuple[float, float]:
    """density ∈ (0, 1], gamma ∈ [0, 1), and density + gamma ≤ 1 (the kept share and the outliers
    dropped above it cannot overlap)."""
    for name, value in (("density", density), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{name}={value!r} must be a number, e.g. density=0.9 gamma=0.01")
    if not 0 < density <= 1:
        raise InputError(f"density={density!r} must lie in (0, 1]: the share of each tensor's task-vector entries kept, e.g. density=0.9")
    if not 0 <= gamma < 1:
        raise InputError(f"gamma={gamma!r} must lie in [0, 1): the share of the largest |τ| dropped as outliers, e.g. gamma=0.01")
    if density + gamma > 1 + 1e-9:
        raise InputError(f"density={density} plus gamma={gamma} exceeds 1: the entries kept and the outliers dropped above them cannot overlap; lower one of them")
    return float(density), float(gamma)


def dropped_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """(bottom, top): how many of a tensor's `numel` smallest and largest |τ| are dropped.

    As mergekit counts them: ⌊density·numel⌋ are kept and top = ⌊gamma·numel⌋, fewer if the two
    together exceed numel; the rest, bottom = numel − kept − top, are the smallest.
    """
    kept = int(density * numel)
    top = min(int(gamma * numel), numel - kept)
    return numel - kept - top, top


def breadcrumbs_sparsify(task_vector: Tensor, density: float, gamma: float) -> Tensor:
    """m ⊙ τ, where m keeps low ≤ |τ| ≤ high: low the (bottom + 1)-th smallest |τ| and high the
    (top + 1)-th largest, (bottom, top) = dropped_counts (no bound where that count is 0).

    Entries tied with a bound are kept, so ties may keep a few more than ⌊density·numel⌋ (mergekit
    breaks them by its sort order). The bounds are exact order statistics (kthvalue) of this one
    tensor. Multiplying by the mask keeps a NaN or Inf in τ visible to the merges' checks.
    """
    magnitudes = task_vector.abs().reshape(-1)
    numel = magnitudes.numel()
    bottom, top = dropped_counts(numel, density, gamma)
    if bottom + top == numel:
        return task_vector * 0
    keep = magnitudes.new_ones(numel, dtype=bool)
    if bottom:
        keep &= magnitudes >= magnitudes.kthvalue(bottom + 1).values
    if top:
        keep &= magnitudes <= magnitudes.kthvalue(numel - top).values
    return task_vector * keep.view(task_vector.shape)
