"""Dense reference implementations, written from the equations, for checking the streaming code.

They flatten every model into one [n_tasks, n_params] matrix, as the reference FusionBench does:
slow and memory-hungry on purpose, simple enough to check by eye.
"""

import torch


def _flatten(state_dict, keys):
    return torch.cat([state_dict[key].reshape(-1).float() for key in keys])


def _split(vector, like, keys):
    out, start = {}, 0
    for key in keys:
        numel = like[key].numel()
        out.setdefault(key, vector[start : start + numel].view_as(like[key]))
        start += numel
    return out


def trim_mask(task_vectors, threshold):
    """Keep |τ| ≥ the (d − ⌊d·f⌋)-th smallest |τ| of each row (the reference's cut); all at 100%."""
    fraction = threshold / 100 if threshold > 1 else threshold
    d = task_vectors.shape[1]
    kept = int(d * fraction)
    if kept >= d:
        return torch.ones_like(task_vectors, dtype=torch.bool)
    cut = task_vectors.abs().kthvalue(d - kept, dim=1, keepdim=True).values
    return task_vectors.abs() >= cut


def ties(pretrained, finetuned, keys, *, scaling_factor, threshold, merge_func, trim_scope="global", multiplicity=None, zero_entries=0, elect=True):
    """multiplicity[key] > 1 lists the key that many times in the flat vector, as the reference
    flattens a state dict with tied names; zero_entries appends that many zeros to every task
    vector (parameters no task changed). The result is read from each key's first copy.
    elect=False: the ablation without sign election."""
    flat_keys = [key for key in keys for _ in range((multiplicity or {}).get(key, 1))]
    theta0 = torch.cat([_flatten(pretrained, flat_keys), torch.zeros(zero_entries)])
    tau = torch.stack([torch.cat([_flatten(model, flat_keys), torch.zeros(zero_entries)]) for model in finetuned]) - theta0
    if trim_scope == "global":
        mask = trim_mask(tau, threshold)
    else:
        sizes = [pretrained[key].numel() for key in flat_keys] + ([zero_entries] if zero_entries else [])
        mask = torch.cat([trim_mask(part, threshold) for part in tau.split(sizes, dim=1)], dim=1)
    trimmed = tau * mask
    if not elect:  # every kept entry counts, whatever its sign
        if merge_func == "sum":
            merged = trimmed.sum(dim=0)
        elif merge_func == "mean":
            merged = trimmed.sum(dim=0) / (trimmed != 0).sum(dim=0).clamp(min=1)
        else:
            merged = trimmed.gather(0, trimmed.abs().argmax(dim=0, keepdim=True)).squeeze(0)
        return _split(theta0 + scaling_factor * merged, pretrained, flat_keys)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0) & (sign != 0)
    selected = trimmed * agree
    if merge_func == "sum":
        merged = selected.sum(dim=0)
    elif merge_func == "mean":
        merged = selected.sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    else:
        merged = selected.abs().max(dim=0).values * sign
    return _split(theta0 + scaling_factor * merged, pretrained, flat_keys)


def task_arithmetic(pretrained, finetuned, keys, *, scaling_factor):
    theta0 = _flatten(pretrained, keys)
    tau = sum(_flatten(model, keys) - theta0 for model in finetuned)
    return _split(theta0 + scaling_factor * tau, pretrained, keys)


def simple_average(models, keys):
    return _split(sum(_flatten(model, keys) for model in models) / len(models), models[0], keys)
