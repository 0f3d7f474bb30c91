"""RegMean (Jin et al., 2023, arXiv 2212.09849): per linear layer, the weight whose outputs on
every task's inputs are closest to that task model's outputs.

For a linear layer y = W x (W: [out, in]) and task t's inputs X_t (one row per token), with the
Gram matrix G_t = X_tᵀX_t / N_t (the mean over the task's N_t tokens, as FusionBench keeps it, so
each task weighs the same whatever its token count), the merged weight minimises
Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖² / N_t:

    Wᵀ = (Σ_t G_t)⁻¹ Σ_t G_t W_tᵀ,

with the off-diagonal entries of each G_t first scaled by `ratio` (1: the least-squares solution;
0: a per-input-dimension weighted average of the task weights). The system is solved in float64
by Cholesky. Where Σ_t G'_t is singular (an input dimension no example activates, or ratio 1 with
fewer tokens than inputs) it is solved in the least-squares sense nearest the average weight
W̄ = mean_t W_t: Wᵀ = W̄ᵀ + A⁺(B − A W̄ᵀ), A⁺ the pseudo-inverse; see `solve_normal_equations`.
"""

import logging
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# A float32 Gram matrix is known to about this relative precision per input dimension
FLOAT32_EPS = torch.finfo(torch.float32).eps


def reduce_non_diagonal_elements(gram: Tensor, ratio: float) -> Tensor:
    """ratio·G off the diagonal, G's own diagonal on it (FusionBench's reduce_non_diagonal_elements)."""
    reduced = gram * ratio
    reduced.diagonal().copy_(gram.diagonal())
    return reduced


def token_rows(inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """A linear layer's inputs [..., d] as rows [N, d], leaving out the padded positions
    (attention_mask 0) when the inputs are [B, L, d] and the mask is [B, L]."""
    if attention_mask is not None and inputs.dim() == 3 and inputs.shape[:2] == attention_mask.shape:
        return inputs[attention_mask.bool()]
    return inputs.reshape(-1, inputs.shape[-1])


class GramSum:
    """Σ xᵀx over the rows added (accumulated in float32, at least) and how many rows there were."""

    def __init__(self):
        self.total: Tensor | None = None
        self.count = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.detach()
        rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
        product = rows.T @ rows
        self.total = product if self.total is None else self.total.add_(product)
        self.count += rows.shape[0]

    def mean(self) -> Tensor:
        """G = Σ xᵀx / N (FusionBench's running mean, computed once)."""
        return self.total / self.count


class Solution(NamedTuple):
    weight: Tensor
    singular: bool  # the system was singular: the least-squares solution nearest W̄ was taken


def solve_normal_equations(gram_sum: Tensor, targets: Tensor, average: Tensor) -> Solution:
    """X with A X = B (A: [in, in] symmetric positive semi-definite, B: [in, out]), in float64.

    A is taken as singular where its Cholesky factorisation fails, or where a pivot L_jj² (the
    part of input j's energy A_jj that the earlier inputs do not explain) is at most
    in·ε_float32·A_jj: input j is then, at the precision of a float32 Gram, a combination of the
    others (A_jj = 0, an input nothing activates, is the extreme case). With the off-diagonals
    scaled by a ratio r < 1, every pivot is at least (1 − r)·A_jj, so this happens only for inputs
    nothing activates. A singular system is solved as X = X̄ + A⁺(B − A X̄), X̄ = `average`: of all
    least-squares solutions, the one nearest the task models' average (equal to it along every
    direction the data leave free), with A⁺ cutting eigenvalues below in·ε_float32·λ_max.
    """
    a, b = gram_sum.double(), targets.double()
    tolerance = a.shape[0] * FLOAT32_EPS
    factor, info = torch.linalg.cholesky_ex(a)
    if info.item() == 0 and bool((factor.diagonal() ** 2 > tolerance * a.diagonal()).all()):
        return Solution(torch.cholesky_solve(b, factor), False)
    fallback = average.double()
    return Solution(fallback + torch.linalg.pinv(a, rtol=tolerance, hermitian=True) @ (b - a @ fallback), True)


class RegMeanAccumulator:
    """Σ_t G'_t, Σ_t G'_t W_tᵀ and Σ_t W_tᵀ for one linear weight, fed one task at a time, so
    only one task's Gram and weight are read at once."""

    def __init__(self, reduce_non_diagonal_ratio: float, weight_transpose: bool = True):
        self.ratio, self.weight_transpose = reduce_non_diagonal_ratio, weight_transpose
        self.gram_sum = self.targets = self.weight_sum = None
        self.tasks = 0

    def add(self, gram: Tensor, weight: Tensor) -> None:
        """gram: [in, in], that task's mean Gram of the layer's inputs; weight: the task's weight,
        [out, in] (weight_transpose, nn.Linear) or [in, out]."""
        self.dtype = weight.dtype
        w = (weight.T if self.weight_transpose else weight).double()
        if gram.shape[0] != w.shape[0]:
            raise ValueError(f"a Gram matrix of {gram.shape[0]} inputs and a weight of {w.shape[0]} inputs; is weight_transpose right?")
        g = reduce_non_diagonal_elements(gram.double(), self.ratio)
        if self.tasks == 0:
            self.gram_sum, self.targets, self.weight_sum = g, g @ w, w.clone()
        else:
            self.gram_sum += g
            self.targets += g @ w
            self.weight_sum += w
        self.tasks += 1

    def solve(self) -> Solution:
        """The merged weight, in the tasks' layout and dtype."""
        merged, singular = solve_normal_equations(self.gram_sum, self.targets, self.weight_sum / self.tasks)
        merged = merged.T if self.weight_transpose else merged
        return Solution(merged.to(self.dtype).contiguous(), singular)


def regmean_merge(grams_and_weights: Iterable[tuple[Tensor, Tensor]], reduce_non_diagonal_ratio: float, weight_transpose: bool = True) -> Solution:
    """The RegMean weight of one linear layer from each task's (mean Gram, weight), read lazily."""
    accumulator = RegMeanAccumulator(reduce_non_diagonal_ratio, weight_transpose)
    for gram, weight in grams_and_weights:
        accumulator.add(gram, weight)
    return accumulator.solve()
