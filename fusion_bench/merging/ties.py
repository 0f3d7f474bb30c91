"""TIES-merging (Yadav et al., 2023), streamed chunk by chunk with the exact global trim.

θ = θ₀ + λ·τ_m, where τ_m is the disjoint merge of the trimmed task vectors under the elected
sign. Each task's cut (its k-th largest |τ_t| over the whole task vector) is found exactly by the
merge pass itself, so the models are read once, after a sample:

1. A random sample of the task vectors brackets each cut in [low_t, high_t) (cut_bracket).
2. The merge pass trims at high_t and counts each task's entries at or above it. That is exact
   for every column with no entry inside its task's bracket; the few columns that have one (1.8%
   for 8 ViT-B/32 task vectors) are set aside, and since they hold every in-bracket value, they
   give the exact cuts at the end, when they are merged.
Should the bracket miss a cut (a chance below 1e-6 per task), or the columns set aside outgrow a
memory budget (many tasks, or a sample too small to be sharp), the exact cuts come from two
histogram passes (magnitude_select) and the merge pass runs again.

The elected sign is 0 where the trimmed sum is exactly 0; there the reference uses the sign of Σγ
over all parameters, known only at the end, so such columns too are set aside and patched last.
With trim_scope "tensor" each tensor's cut comes from two histogram passes over that tensor alone.

The global quantities (the cut, Σγ) are taken over the task vector as the reference flattens it:
a tensor listed under m state-dict names (tied weights) counts m times (`multiplicity`), and
parameters no task changed, left out of `keys` (LoRA adapters), count as `zero_entries` zeros.
"""

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import Tensor

from fusion_bench.merging.cut_bracket import CutBracket, expected_inside, sample_bracket
from fusion_bench.merging.disjoint_merge import check_merge_func, disjoint_merge, merge_all
from fusion_bench.merging.elect import elect_sign, majority_sign
from fusion_bench.merging.magnitude_select import MagnitudeSelector
from fusion_bench.merging.streaming import FlatOutput, StateDict, aligned_chunks, flat_numel, progress
from fusion_bench.merging.trim import keep_count, keep_fraction, trim
from fusion_bench.utils.errors import InputError

TRIM_SCOPES = ("global", "tensor")
DEFERRED_FRACTION = 0.5  # columns set aside may take this share of the merged tensors' size


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
    new_merger = partial(_Merger, out, tasks, scaling_factor, merge_func, weights=weights, elect=elect)
    if trim_scope == "tensor":
        merger = new_merger()
        for key in progress(keys, "TIES merge"):
            selector = _select(models, {key: sizes[key]}, {key: 1}, 0, threshold, show_progress=False)
            merger.merge_key(models, key, selector.values, check_finite=False)
        merger.finish()
        return
    numel = flat_numel(sizes, weights) + zero_entries
    k = keep_count(numel, threshold)
    output_bytes = sum(out[key].numel() * out[key].element_size() for key in keys)
    if k < numel and _merge_in_one_pass(models, keys, sizes, weights, zero_entries, k, output_bytes, new_merger):
        return
    # Exact cuts first (threshold 100 needs none, and reads nothing here), then the merge pass.
    selector = _select(models, sizes, weights, zero_entries, threshold, show_progress=True)
    merger = new_merger()
    merger.merge_keys(models, keys, selector.values, check_finite=k >= numel)
    merger.finish()


def _merge_in_one_pass(
    models: Mapping[str, StateDict],
    keys: Sequence[str],
    sizes: Mapping[str, int],
    weights: Mapping[str, int],
    zero_entries: int,
    k: int,
    output_bytes: int,
    new_merger: Callable[..., "_Merger"],
) -> bool:
    """Merge with a sampled bracket of the cuts, if the columns it sets aside fit the budget;
    False (with `out` partly written) if they do not, or the bracket missed a cut."""
    columns = sum(sizes.values())
    budget = DEFERRED_FRACTION * output_bytes
    # Half the budget: room for ties at the cut and for in-bracket entries that cluster by column.
    if _expected_set_aside(expected_inside(sizes, weights), len(models) - 1, columns) > budget / 2:
        return False
    bracket = sample_bracket(models, sizes, weights, zero_entries, k)
    merger = new_merger(bracket=bracket, budget=budget)
    try:
        merger.merge_keys(models, keys, None, check_finite=True)
    except _BudgetExceeded:
        return False
    cuts = merger.exact_cuts(k)
    if cuts is None:
        return False
    merger.merge_deferred(cuts)
    merger.finish()
    return True


def _expected_set_aside(inside: float, tasks: int, columns: int) -> float:
    """The bytes the columns set aside would take, were each task's share `inside` of entries in
    its bracket independent of the others'."""
    share = 1 - (1 - inside) ** tasks
    return share * columns * (tasks + 3) * 4


def _select(
    models: Mapping[str, StateDict], sizes: Mapping[str, int], weights: Mapping[str, int], zero_entries: int, threshold: float, *, show_progress: bool
) -> MagnitudeSelector:
    """Each task's exact cut over `sizes`' keys (each counted `weights` times) and `zero_entries`
    zeros, in two histogram passes (the first checks the models for NaN/Inf); none for threshold 100."""
    numel = flat_numel(sizes, weights) + zero_entries
    selector = MagnitudeSelector(rows=len(models) - 1, numel=numel, k=keep_count(numel, threshold))
    for index in range(2):
        if selector.done:
            break
        keys = progress(list(sizes), f"TIES trim, pass {index + 1}") if show_progress else sizes
        for key in keys:
            for _, stack in aligned_chunks(models, key, task_vectors=True, check_finite=index == 0):
                selector.update(stack[1:], weights[key])
        if zero_entries:
            selector.add_zeros(zero_entries)
        selector.end_pass()
    return selector


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

    With a bracket (each task's cut guessed to lie in [low, high)), it trims at `high`, counts each
    task's entries at or above it, and sets aside every column with an entry inside its task's
    bracket, to merge again once exact_cuts has found the cuts.
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
        bracket: CutBracket | None = None,
        budget=0.0,
    ):
        self.out, self.scaling_factor, self.merge_func = out, scaling_factor, merge_func
        self.weights, self.elect = weights, elect
        self.bracket, self.budget = bracket, budget
        self.above = torch.zeros(tasks, dtype=torch.int64)  # with a bracket: entries ≥ high, counted
        self.at_pivot = torch.zeros(tasks, dtype=torch.int64)  # and entries kept for equalling the pivot
        self.sign_total = 0
        self.undecided = _ColumnStore(tasks)  # trimmed sum exactly 0: need the majority sign
        self.deferred = _ColumnStore(tasks)  # an entry inside its task's bracket: need the exact cut

    def merge_keys(self, models: Mapping[str, StateDict], keys: Sequence[str], cuts: Tensor | None, *, check_finite: bool) -> None:
        """Merge every key, trimming at `cuts` (None: at the bracket's)."""
        for key in progress(keys, "TIES merge"):
            self.merge_key(models, key, cuts, check_finite=check_finite)

    def merge_key(self, models: Mapping[str, StateDict], key: str, cuts: Tensor | None, *, check_finite: bool) -> None:
        output = FlatOutput(self.out[key])
        for positions, stack in aligned_chunks(models, key, task_vectors=True, check_finite=check_finite):
            theta0, task_vectors = stack[0], stack[1:]
            deferred = None
            if self.bracket is not None:
                above, at_pivot, deferred = self.bracket.locate(task_vectors)
                self.above += above * self.weights[key]
                self.at_pivot += at_pivot * self.weights[key]
                cuts = self.bracket.trim_cuts()  # pivots learnt in this chunk count in it
            trimmed = trim(task_vectors, cuts)
            if deferred is not None:
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

    def exact_cuts(self, k: int) -> Tensor | None:
        """Each task's k-th largest |τ|, from the count above its bracket, the entries kept for
        equalling its pivot, and the in-bracket values of the columns set aside; None if a cut lies
        outside its bracket, or above a pivot whose equals were kept."""
        cuts = []
        for row, (low, high) in enumerate(zip(self.bracket.low, self.bracket.high)):
            rank = k - int(self.above[row])  # of the cut among the in-bracket values, from the top
            inside = self._deferred_magnitudes(row, low, high)
            kept, pivot = int(self.at_pivot[row]), self.bracket.pivot(row)
            if kept:
                greater = int((inside > pivot).sum())
                if rank <= greater:
                    return None
                if rank <= greater + int((inside == pivot).sum()) + kept:
                    cuts.append(pivot)
                    continue
                rank -= kept  # the cut lies below the pivot: rank it among the values set aside
            if 1 <= rank <= inside.numel():
                cuts.append(inside.kthvalue(inside.numel() - rank + 1).values)
            elif rank > inside.numel() and low == 0 < high:  # the rest of the bracket: zeros
                cuts.append(torch.zeros(()))
            else:
                return None
        return torch.stack(cuts)

    def _deferred_magnitudes(self, row: int, low: Tensor, high: Tensor) -> Tensor:
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
