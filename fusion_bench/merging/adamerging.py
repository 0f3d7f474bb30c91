"""AdaMerging (Yang et al., ICLR 2024): θ = θ₀ + Σ_t λ_t τ_t, with λ learnt by minimising the
entropy of the merged model's predictions on unlabeled test inputs.

Task-wise AdaMerging has one λ per task, λ ∈ ℝ^T; layer-wise has one per task and parameter tensor
("layer"), λ ∈ ℝ^{T×L}, columns in the order of the model's named parameters (FusionBench's
get_layer_wise_weights / LayerWiseMergedModel). Task vectors are stored as one stack [T, *shape]
per parameter. Gradients reach λ by the chain rule through the merge, done here by hand:
∂loss/∂λ_{t,l} = ⟨∂loss/∂θ_l, τ_{t,l}⟩, so the merged parameters can be plain leaf tensors and
nothing of the task vectors is kept in an autograd graph.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

ENTROPY_EPS = 1e-8  # FusionBench's entropy_loss: log(p + 1e-8)


def entropy_loss(logits: Tensor, eps: float = ENTROPY_EPS) -> Tensor:
    """The mean over the batch of the prediction entropy −Σ_c p_c log(p_c + eps), p = softmax(logits)."""
    if logits.dim() != 2:
        raise ValueError(f"entropy_loss expects logits [examples, classes], got shape {tuple(logits.shape)}")
    probabilities = logits.softmax(dim=-1)
    return -(probabilities * (probabilities + eps).log()).sum(dim=-1).mean()


def initial_weights(num_tasks: int, num_layers: int | None, init_value: float | None) -> Tensor:
    """λ filled with init_value (None: 1/T, FusionBench's default): [T] task-wise (num_layers
    None), [T, L] layer-wise."""
    value = 1.0 / num_tasks if init_value is None else float(init_value)
    shape = (num_tasks,) if num_layers is None else (num_tasks, num_layers)
    return torch.full(shape, value, dtype=torch.float32)


def effective_weights(weights: Tensor, clamp: bool) -> Tensor:
    """The λ the merge uses: clamped to [0, 1] with clamp (differentiable, as torch.clamp is)."""
    return weights.clamp(0, 1) if clamp else weights


def per_layer(weights: Tensor, num_layers: int) -> Tensor:
    """λ as [T, L]: a task-wise λ [T] repeated for every layer."""
    return weights[:, None].expand(-1, num_layers) if weights.dim() == 1 else weights


def stack_task_vectors(pretrained: Tensor, finetuned: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """[T, *shape]: τ_t = θ_t − θ₀ for one parameter, computed in θ₀'s dtype, stored in `dtype`."""
    stacked = torch.stack([tensor.to(pretrained.device, pretrained.dtype) - pretrained for tensor in finetuned])
    return stacked if dtype is None else stacked.to(dtype)


@torch.no_grad()
def merged_parameters(
    pretrained: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor], weights: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    """θ_l = θ₀_l + Σ_t w[t, l] τ_{t,l} for the l-th of `names` (w: [T, L]), summed in float32 (or
    θ₀'s wider dtype) and returned in θ₀'s dtype. A name without task vectors (no task changes it)
    keeps θ₀ (the same tensor)."""
    merged = {}
    for layer, name in enumerate(names):
        base = pretrained[name]
        if name not in task_vectors:
            merged[name] = base
            continue
        stack = task_vectors[name]
        dtype = torch.promote_types(base.dtype, torch.float32)
        delta = weights[:, layer].to(stack.device, dtype) @ stack.reshape(len(stack), -1).to(dtype)
        merged[name] = (base.to(dtype) + delta.view(base.shape)).to(base.dtype)
    return merged


@torch.no_grad()
def weights_gradient(parameter_grads: Mapping[str, Tensor | None], task_vectors: Mapping[str, Tensor], names: Sequence[str], num_tasks: int) -> Tensor:
    """∂loss/∂w [T, L] from ∂loss/∂θ_l: ⟨∂loss/∂θ_l, τ_{t,l}⟩, in float32 or the gradients' wider
    dtype (zero where θ_l got no gradient or has no task vectors)."""
    columns = {}
    for layer, name in enumerate(names):
        grad = parameter_grads.get(name)
        if grad is not None and name in task_vectors:
            dtype = torch.promote_types(grad.dtype, torch.float32)
            columns[layer] = task_vectors[name].reshape(num_tasks, -1).to(dtype) @ grad.reshape(-1).to(dtype)
    if not columns:
        return torch.zeros(num_tasks, len(names))
    first = next(iter(columns.values()))
    gradient = torch.zeros(num_tasks, len(names), dtype=first.dtype, device=first.device)
    gradient[:, list(columns)] = torch.stack(list(columns.values()), dim=1)
    return gradient


def loss_and_gradient(
    weights: Tensor,
    pretrained: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    names: Sequence[str],
    task_losses: Callable[[dict[str, Tensor]], Iterable[Tensor]],
    clamp: bool = False,
) -> tuple[Tensor, Tensor]:
    """(Σ_tasks loss, ∂/∂weights) at λ = weights ([T] or [T, L]).

    task_losses(parameters) yields each task's loss of the model with those parameters (e.g. its
    batch's entropy); each is back-propagated as it comes, so one task's activations live at a
    time. The merged parameters are leaves: their gradients, summed over the tasks, give λ's by
    weights_gradient, and clamp's derivative (1 inside [0, 1], 0 outside) by autograd.
    """
    leaf = weights.detach().requires_grad_()
    effective = per_layer(effective_weights(leaf, clamp), len(names))
    merged = merged_parameters(pretrained, task_vectors, effective.detach(), names)
    # parameters no task changes need no gradient
    parameters = {name: tensor.detach().requires_grad_(name in task_vectors) for name, tensor in merged.items()}
    total = torch.zeros((), dtype=weights.dtype, device=weights.device)
    for loss in task_losses(parameters):
        loss.backward()
        total = total + loss.detach().to(total)
    grads = {name: tensor.grad for name, tensor in parameters.items()}
    effective.backward(weights_gradient(grads, task_vectors, names, len(weights)).to(effective))
    return total, leaf.grad
