"""TIES-merging (Yadav et al., 2023), streamed chunk by chunk with the exact global trim.

θ = θ₀ + λ·τ_m, where τ_m is the disjoint merge of the trimmed task vectors under the elected
sign. Each task's cut (its k-th largest |τ_t|) is found exactly by radix selection
(magnitude_select), in two passes over the models in all:

1. A histogram of the high bits of |τ_t| brackets each cut in a narrow bucket [low_t, high_t).
2. The merge pass trims at high_t. That is exact for every column with no entry inside its task's
   bucket; the few columns that have one (about 0.2% for fine-tuned models) are set aside, and
   since they hold every in-bucket value, they give the exact cuts at the end, when they are merged.
   Should they outgrow a memory budget (say, many ties), the cuts come from a second histogram
   pass instead and the merge pass runs again.

The elected sign is 0 where the trimmed sum is exactly 0; there the reference uses the sign of Σγ
over all parameters, known only at the end, so such columns too are set aside and patched last.
With trim_scope "tensor" each tensor's cut comes from two histogram passes over that tensor alone.

The global quantities (the cut, Σγ) are taken over the task vector as the reference flattens it:
a tensor listed under m state-dict names (tied weights) counts m times (`multiplicity`), and
parameters no task changed, left out of `keys` (LoRA adapters), count as `zero_entries` zeros.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fusion_bench.errors import InputError
from fusion_bench.merging.disjoint_merge import check_merge_func, disjoint_merge, merge_all
from fusion_bench.merging.elect import elect_sign, majority_sign
from fusion_bench.merging.magnitude_select import MagnitudeSelector
from fusion_bench.merging.streaming import FlatOutput, StateDict, aligned_chunks, progress
from fusion_bench.merging.trim import keep_count, keep_fraction, trim

TRIM_SCOPES = ("global", "tensor")
DEFERRED_FRACTION = 0.25  # columns set aside may take this share of the merged tensors' size


def check_trim_scope(trim_scope: str) -> str:
    if trim_scope not in TRIM_SCOPES:
        raise InputError(f"trim_scope={trim_scope!r} is unknown; use one of {', '.join(TRIM_SCOPES)}")
    return trim_scope


def ties_merge(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    out: StateDict,
    keys: Sequence[str],
    *,
    scaling_factor: float,
    threshold: float,
    merge_func: str = "sum",
    trim_scope: str = "global",
    multiplicity: Mapping[str, int] | None = None,
    zero_entries: int = 0,
    elect: bool = True,
) -> None:
    """Write the TIES merge into out[key] for every key (other keys are left as they are).

    multiplicity[key] (default 1): how many times the key's entries count in the global cut and in
    Σγ. zero_entries: further entries of every task vector, all zero, that count in the global cut.
    elect=False is the paper's ablation without sign election (merge_all); threshold=100 is the
    one without trimming.
    """
    keep_fraction(threshold)
    check_merge_func(merge_func)
    check_trim_scope(trim_scope)
    models = {"_pretrained_": pretrained, **finetuned}
    sizes = {key: out[key].numel() for key in keys}
    weights = {key: 1 for key in keys} | dict(multiplicity or {})
    tasks = len(finetuned)
    if trim_scope == "tensor":
        merger = _Merger(out, tasks, scaling_factor, merge_func, weights=weights, elect=elect)
        for key in progress(keys, "TIES merge"):
            selector = _select(models, {key: sizes[key]}, {key: 1}, 0, threshold, passes=2, show_progress=False)
            merger.merge_key(models, key, selector.values, check_finite=False)
        merger.finish()
        return

    selector = _select(models, sizes, weights, zero_entries, threshold, passes=1, show_progress=True)
    if selector.done:  # threshold 100: no cut, and nothing read yet
        merger = _Merger(out, tasks, scaling_factor, merge_func, weights=weights, elect=elect)
        for key in progress(keys, "TIES merge"):
            merger.merge_key(models, key, selector.values, check_finite=True)
        merger.finish()
        return
    budget = DEFERRED_FRACTION * 4 * sum(sizes.values())
    low, high = selector.bucket_bounds
    merger = _Merger(out, tasks, scaling_factor, merge_func, weights=weights, elect=elect, bucket_bounds=(low, high), budget=budget)
    try:
        for key in progress(keys, "TIES merge"):
            merger.merge_key(models, key, high, check_finite=False)
    except _BudgetExceeded:
        _run_pass(models, sizes, weights, zero_entries, selector, check_finite=False, desc="TIES trim, pass 2")
        merger = _Merger(out, tasks, scaling_factor, merge_func, weights=weights, elect=elect)
        for key in progress(keys, "TIES merge"):
            merger.merge_key(models, key, selector.values, check_finite=False)
    else:
        selector.resolve([merger.deferred_magnitudes(row, low[row], high[row]) for row in range(tasks)])
        merger.merge_deferred(selector.values)
    merger.finish()


def _select(
    models: Mapping[str, StateDict],
    sizes: Mapping[str, int],
    weights: Mapping[str, int],
    zero_entries: int,
    threshold: float,
    *,
    passes: int,
    show_progress: bool,
) -> MagnitudeSelector:
    """A selector for each task's cut over `sizes`' keys (each counted `weights` times) and
    `zero_entries` zeros, after up to `passes` passes (the first checks the models for NaN/Inf)."""
    numel = sum(size * weights[key] for key, size in sizes.items()) + zero_entries
    selector = MagnitudeSelector(rows=len(models) - 1, numel=numel, k=keep_count(numel, threshold))
    for index in range(passes):
        if selector.done:
            break
        desc = f"TIES trim, pass {index + 1}" if show_progress else None
        _run_pass(models, sizes, weights, zero_entries, selector, check_finite=index == 0, desc=desc)
    return selector


def _run_pass(models, sizes, weights, zero_entries: int, selector: MagnitudeSelector, *, check_finite: bool, desc: str | None) -> None:
    for key in progress(list(sizes), desc) if desc else sizes:
        for _, stack in aligned_chunks(models, key, task_vectors=True, check_finite=check_finite):
            selector.update(stack[1:], weights[key])
    if zero_entries:
        selector.add_zeros(zero_entries)
    selector.end_pass()


class _BudgetExceeded(Exception):
    """The columns set aside outgrew their budget."""


class _ColumnStore:
    """Columns set aside: their tensor, flat positions, θ₀ and task-vector entries.

    Kept in a few growable buffers: thousands of small tensors kept alive among the merge pass's
    large temporaries would fragment the heap, and memory would grow several-fold.
    """

    def __init__(self, rows: int):
        self.index = torch.empty(0, dtype=torch.int64)
        self.theta0 = torch.empty(0)
        self.task_vectors = torch.empty(rows, 0)
        self.size = 0
        self.ranges: list[tuple[str, int, int]] = []  # (key, start, stop) in the buffers

    @property
    def nbytes(self) -> int:
        return self.size * (self.task_vectors.shape[0] + 3) * 4

    def add(self, key: str, index: Tensor, theta0: Tensor, task_vectors: Tensor) -> None:
        start, stop = self.size, self.size + index.numel()
        if stop > self.index.numel():
            capacity = max(stop, 2 * self.index.numel(), 1 << 16)
            self.index = _grown(self.index, capacity, start)
            self.theta0 = _grown(self.theta0, capacity, start)
            self.task_vectors = _grown(self.task_vectors, capacity, start)
        self.index[start:stop], self.theta0[start:stop], self.task_vectors[:, start:stop] = index, theta0, task_vectors
        if self.ranges and self.ranges[-1][0] == key and self.ranges[-1][2] == start:
            self.ranges[-1] = (key, self.ranges[-1][1], stop)
        else:
            self.ranges.append((key, start, stop))
        self.size = stop

    def blocks(self):
        """(key, positions, θ₀, task vectors) for each tensor's columns."""
        for key, start, stop in self.ranges:
            yield key, self.index[start:stop], self.theta0[start:stop], self.task_vectors[:, start:stop]


def _grown(tensor: Tensor, capacity: int, used: int) -> Tensor:
    grown = tensor.new_empty(*tensor.shape[:-1], capacity)
    grown[..., :used] = tensor[..., :used]
    return grown


class _Merger:
    """The merge pass: writes θ₀ + λ·τ_m chunk by chunk, sums the elected signs, and sets aside
    the columns it cannot finish yet.

    With bucket_bounds (each task's cut bracketed in [low, high)), it trims at `high` and sets
    aside every column with an entry inside its task's bracket, to merge again with exact cuts.
    """

    def __init__(
        self,
        out: StateDict,
        tasks: int,
        scaling_factor: float,
        merge_func: str,
        *,
        weights: Mapping[str, int],
        elect: bool,
        bucket_bounds=None,
        budget=0.0,
    ):
        self.out, self.scaling_factor, self.merge_func = out, scaling_factor, merge_func
        self.weights, self.elect = weights, elect
        self.bucket_bounds, self.budget = bucket_bounds, budget
        self.sign_total = 0
        self.undecided = _ColumnStore(tasks)  # trimmed sum exactly 0: need the majority sign
        self.deferred = _ColumnStore(tasks)  # an entry inside its task's bracket: need the exact cut

    def merge_key(self, models: Mapping[str, StateDict], key: str, cuts: Tensor, *, check_finite: bool) -> None:
        output = FlatOutput(self.out[key])
        for positions, stack in aligned_chunks(models, key, task_vectors=True, check_finite=check_finite):
            theta0, task_vectors = stack[0], stack[1:]
            trimmed = trim(task_vectors, cuts)
            deferred = None
            if self.bucket_bounds is not None:
                in_bracket = trim(task_vectors, self.bucket_bounds[0]) - trimmed
                deferred = (in_bracket.abs().amax(dim=0) > 0).nonzero().squeeze(1)
                if deferred.numel():
                    self.deferred.add(key, deferred + positions.start, theta0[deferred], task_vectors[:, deferred])
                    if self.deferred.nbytes > self.budget:
                        raise _BudgetExceeded
            output[positions] = self._merge(key, positions.start + torch.arange(theta0.numel()), theta0, trimmed, deferred)
        output.finish()

    def merge_deferred(self, cuts: Tensor) -> None:
        """Merge the columns set aside for their cuts, now that the cuts are known."""
        for key, index, theta0, task_vectors in self.deferred.blocks():
            output = FlatOutput(self.out[key])
            output[index] = self._merge(key, index, theta0, trim(task_vectors, cuts))
            output.finish()

    def deferred_magnitudes(self, row: int, low: Tensor, high: Tensor) -> Tensor:
        """Task `row`'s nonzero magnitudes in [low, high) among the columns set aside: all there are,
        each repeated as many times as its tensor counts."""
        in_bracket = lambda values: values[(values >= low) & (values < high) & (values > 0)]  # noqa: E731
        found = [in_bracket(self.deferred.task_vectors[row, : self.deferred.size].abs())]
        for key, _, _, task_vectors in self.deferred.blocks():
            if self.weights[key] > 1:
                found.append(in_bracket(task_vectors[row].abs()).repeat(self.weights[key] - 1))
        return torch.cat(found)

    def finish(self) -> None:
        """Patch the undecided columns with the majority sign."""
        majority = majority_sign(self.sign_total)
        for key, index, theta0, trimmed in self.undecided.blocks():
            sign = torch.full((index.numel(),), float(majority))
            output = FlatOutput(self.out[key])
            output[index] = theta0 + self.scaling_factor * disjoint_merge(trimmed, sign, self.merge_func)
            output.finish()

    def _merge(self, key: str, index: Tensor, theta0: Tensor, trimmed: Tensor, exclude: Tensor | None = None) -> Tensor:
        """θ₀ + λ·τ_m for these columns (at flat positions `index`). Undecided columns are set
        aside; `exclude`d ones, to be merged again, count neither in Σγ nor as undecided."""
        if not self.elect:
            return theta0 + self.scaling_factor * merge_all(trimmed, self.merge_func)
        sign = elect_sign(trimmed)
        undecided = (sign == 0) & (trimmed.abs().amax(dim=0) > 0)
        counted = sign
        if exclude is not None and exclude.numel():
            counted = sign.index_fill(0, exclude, 0)
            undecided[exclude] = False
        self.sign_total += int(counted.sum()) * self.weights[key]
        columns = undecided.nonzero().squeeze(1)
        if columns.numel():
            self.undecided.add(key, index[columns], theta0[columns], trimmed[:, columns])
        return theta0 + self.scaling_factor * disjoint_merge(trimmed, sign, self.merge_func)
