"""Fisher merging (Matena & Raffel, 2022, arXiv 2111.09832): diagonal Fisher estimates and the
Fisher-weighted average of the task models.

Merge, per tensor and element:

    θ = Σ_t c_t (F_t + ε) θ_t / Σ_t c_t (F_t + ε)

F_t: task t's diagonal Fisher (0 where a model has none: buffers, parameters the task's head does
not reach); ε: `minimal_fisher_weight`; c_t = 1/T, or with `normalize_fisher_weight`
c_t = (1/T) · (1/(‖F_t‖ + ε)) / Σ_s 1/(‖F_s‖ + ε), ‖F_t‖ the L2 norm of model t's Fisher over
every merged tensor, as FusionBench normalises it. Where every F_t is 0 the merge is Σ c_t θ_t / Σ c_t.

Estimates of F_t, from the log-probabilities log p(y|x) = log_softmax(logits) of the task's
examples x_1..x_N (labels y_i):

- empirical: (1/N) Σ_i (∇ log p(y_i|x_i))², one gradient per example (the issue's, and the
  usual "empirical Fisher");
- exact: (1/N) Σ_i Σ_y p(y|x_i) (∇ log p(y|x_i))², one gradient per example and class (the
  expectation over the model's own predictive distribution, as in the paper);
- fusionbench: (1/N) Σ_batches (∇ Σ_{i∈batch} Σ_y √p(y|x_i)·log p(y|x_i))², √p held constant:
  FusionBench 0.2.33's. It squares a sum over a batch, so cross-example products enter and the
  result depends on how examples are grouped into batches; with batches of one example it is
  Σ_i (Σ_y √p_y ∇ log p_y)², still not the paper's Σ_y p_y (∇ log p_y)².
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

ESTIMATES = ("empirical", "exact", "fusionbench")
# estimates whose terms are per example: the caller hands them one example at a time
PER_EXAMPLE = {"empirical": True, "exact": True, "fusionbench": False}


def add_fisher_terms(sums: Sequence[Tensor], logits: Tensor, labels: Tensor | None, params: Sequence[Tensor], estimate: str) -> None:
    """Add the squared-gradient terms of `logits` ([examples, classes], a graph over `params`) to
    `sums` (float32, one per parameter, shaped like it). For the per-example estimates `logits`
    holds one example; a parameter the logits do not depend on gets 0."""
    log_probs = torch.log_softmax(logits, dim=-1)
    if estimate == "empirical":
        if labels is None:
            raise ValueError("the empirical Fisher needs labels")
        _add_squares(sums, torch.autograd.grad(log_probs[0, labels[0]], params, materialize_grads=True))
    elif estimate == "exact":
        probs = torch.softmax(logits, dim=-1).detach()[0]
        classes = log_probs.shape[-1]
        for y in range(classes):
            grads = torch.autograd.grad(log_probs[0, y], params, retain_graph=y < classes - 1, materialize_grads=True)
            _add_squares(sums, grads, float(probs[y]))
    elif estimate == "fusionbench":
        probs = torch.softmax(logits, dim=-1).detach()
        objective = (torch.sqrt(probs) * log_probs).sum(dim=-1).sum(dim=0)
        _add_squares(sums, torch.autograd.grad(objective, params, materialize_grads=True))
    else:
        raise ValueError(f"unknown Fisher estimate {estimate!r}; the estimates are {', '.join(ESTIMATES)}")


def _add_squares(sums: Sequence[Tensor], grads: Sequence[Tensor], weight: float = 1.0) -> None:
    for total, grad in zip(sums, grads):
        total.add_(grad.float().square(), alpha=weight)


def fisher_norm(key_norms: Sequence[Tensor | float]) -> Tensor:
    """A model's global Fisher norm from its per-tensor norms: sqrt(Σ_k ‖F_k‖²)."""
    return torch.linalg.vector_norm(torch.as_tensor([float(norm) for norm in key_norms], dtype=torch.float32))


def tensor_fisher_norm(fisher: Tensor | None) -> Tensor:
    """‖F_k‖ of one tensor (0 for a tensor without a Fisher)."""
    return torch.zeros(()) if fisher is None else torch.linalg.vector_norm(fisher.float())


def fisher_coefficients(norms: Tensor, normalize: bool, minimal_fisher_weight: float) -> Tensor:
    """c_t: 1/T each, times (1/(‖F_t‖ + ε)) / Σ_s 1/(‖F_s‖ + ε) when normalising."""
    coefficients = torch.ones(len(norms)) / len(norms)
    if normalize:
        inverse = 1.0 / (norms + minimal_fisher_weight)
        coefficients = coefficients * (inverse / inverse.sum())
    return coefficients


def fisher_weighted_average(tensors: Sequence[Tensor], fishers: Sequence[Tensor | None], coefficients: Tensor, minimal_fisher_weight: float) -> Tensor:
    """Σ_t c_t (F_t + ε) θ_t / Σ_t c_t (F_t + ε) of one tensor, in float32; F_t None counts as 0."""
    theta = torch.stack([tensor.float() for tensor in tensors])
    weights = torch.stack([torch.zeros_like(theta[0]) if fisher is None else fisher.float() for fisher in fishers]) + minimal_fisher_weight
    c = coefficients.float().reshape(-1, *[1] * (theta.dim() - 1))
    return (c * weights * theta).sum(dim=0) / (c * weights).sum(dim=0)


def merged_fisher_norms(fishers: Mapping[str, Mapping[str, Tensor | None]], keys: Sequence[str]) -> Tensor:
    """Each model's global norm over `keys` ({model: {key: F or None}}), one pass over the Fishers."""
    return torch.stack([fisher_norm([tensor_fisher_norm(per_key[key]) for key in keys]) for per_key in fishers.values()])
