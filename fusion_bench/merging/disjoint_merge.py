"""TIES step 3, disjoint merge: combine only the entries that agree with the elected sign."""

from torch import Tensor

from fusion_bench.utils.errors import InputError

MERGE_FUNCS = ("sum", "mean", "max")


def check_merge_func(merge_func: str) -> str:
    if merge_func not in MERGE_FUNCS:
        raise InputError(f"merge_func={merge_func!r} is unknown; use one of {', '.join(MERGE_FUNCS)}")
    return merge_func


def disjoint_merge(trimmed: Tensor, sign: Tensor, merge_func: str) -> Tensor:
    """Merge over dim 0 the entries whose sign is γ (nonzero, so trimmed entries never count).

    sum: Σ_{t∈A} τ̂_t;  mean: that sum / max(|A|, 1);  max: γ · max_{t∈A} |τ̂_t|.
    Where γ = 0 no entry agrees and the result is 0.
    """
    # |τ̂| where τ̂ agrees with γ, else 0, in float ops only (boolean masks are slow on CPU);
    # Σ|τ̂|·γ equals Σ τ̂ over the agreeing entries bit for bit, since rounding is sign-symmetric.
    agreeing = (trimmed * sign).clamp_(min=0)
    if merge_func == "sum":
        return agreeing.sum(dim=0) * sign
    if merge_func == "mean":
        return agreeing.sum(dim=0) * sign / agreeing.sign().sum(dim=0).clamp_(min=1)
    check_merge_func(merge_func)
    return agreeing.amax(dim=0) * sign


def merge_all(trimmed: Tensor, merge_func: str) -> Tensor:
    """The ablation without sign election: combine every kept entry, whatever its sign.

    sum: Σ_t τ̂_t;  mean: that sum / max(#nonzero, 1);  max: the entry of largest |τ̂|, signed.
    """
    if merge_func == "sum":
        return trimmed.sum(dim=0)
    if merge_func == "mean":
        return trimmed.sum(dim=0) / trimmed.sign().abs().sum(dim=0).clamp_(min=1)
    check_merge_func(merge_func)
    return trimmed.gather(0, trimmed.abs().argmax(dim=0, keepdim=True)).squeeze(0)
