"""A bracket [low, high) around each task's trim cut, from a random sample of the task vectors.

TIES's global cut, the k-th largest |τ_t| over a whole task vector, is known only once every
entry has been seen; finding it first would cost a pass over all the checkpoints before the merge
pass. A bracket lets the merge pass find it on the way (ties.py): it trims at `high`, sets aside
the few columns with an entry inside the bracket, counts the entries above it, and ends with the
exact cut. Should the bracket miss, the merge falls back to exact passes: the result never
depends on the sample, only the time does.

The sample draws one entry at random from every SAMPLE_EVERY consecutive entries of each tensor
and counts it SAMPLE_EVERY times (stratified sampling). The estimated number of entries at or
above any value is then unbiased, with a variance of at most Σ weight²/4 over the draws (each a
Bernoulli trial) however the magnitudes are laid out in memory, which a sample of whole blocks
would not promise. The bracket spans MARGIN_SIGMAS standard deviations either side of k: it
misses with a chance below 1e-6 per task.
"""

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from fusion_bench.merging.magnitude_select import BUCKET_WIDTH, MagnitudeSelector
from fusion_bench.merging.streaming import StateDict, flat_numel, progress, sampled_task_vectors

SAMPLE_EVERY = 16
MARGIN_SIGMAS = 5.0
PIVOT_EVIDENCE = 16  # in-bracket entries in one chunk before a pivot is chosen


class CutBracket:
    """Per task, [low, high) guessed to hold its cut; optionally a pivot value inside it.

    Task vectors of bf16 models are differences of 16-bit floats: few distinct values, so that the
    cut sits on one value tied hundreds of thousands of times, often a few percent of all
    entries, and a bracket one bucket wide holds all of them: setting aside every column with one
    would cost memory by the gigabyte. Where `pivots` allows it, a row's pivot is the value that
    most of its in-bracket entries equal in the first chunk holding PIVOT_EVIDENCE of them; entries
    equal to the pivot are then kept (trim_cuts) and only counted. The cut turns out to be the
    pivot, or to lie below it (the kept entries were right), or above it, which the merge detects
    and answers with exact passes.
    """

    def __init__(self, low: Tensor, high: Tensor, pivots: Tensor | None = None):
        self.low, self.high = low, high
        # As int32 bit patterns, in which magnitudes are ordered like the floats; zeros never count
        # as inside (a LoRA task vector has hundreds of millions of them), so low starts above 0.
        self._low_bits = low.float().view(torch.int32).clamp(min=1)[:, None]
        self._high_bits = high.float().view(torch.int32)[:, None]
        self._pivots_allowed = torch.zeros(low.shape, dtype=torch.bool) if pivots is None else pivots
        self._pivot_bits = torch.full((low.numel(), 1), -1, dtype=torch.int32)  # -1: none yet

    def pivot(self, row: int) -> Tensor | None:
        """Row's pivot as a float, or None."""
        bits = self._pivot_bits[row]
        return None if bits.item() < 0 else bits.view(torch.float32)[0]

    def trim_cuts(self) -> Tensor:
        """What the merge pass trims at: the pivot where there is one (entries equal to it are
        kept), else high (entries inside the bracket are dropped, their columns set aside)."""
        return torch.where(self._pivot_bits[:, 0] >= 0, self._pivot_bits[:, 0].view(torch.float32), self.high.float())

    def locate(self, task_vectors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per row of a [tasks, c] float32 chunk, how many entries have |τ| ≥ high, and how many
        equal its pivot in the columns not set aside; and the columns set aside: those with a
        nonzero |τ| in [low, high), other than a pivot, in some row. Learns pivots first.

        Compares bit patterns as int32: exact, and several times faster on CPU than float
        comparisons and boolean masks.
        """
        bits = task_vectors.view(torch.int32) & 0x7FFFFFFF  # |τ|
        from_high = bits - self._high_bits  # ≥ 0 where |τ| ≥ high
        below_high = (from_high >> 31).sum(dim=1, dtype=torch.int32)  # >> 31: -1 where |τ| < high, else 0
        from_low = bits.sub_(self._low_bits)  # ≥ 0 where |τ| ≥ low
        above = below_high + bits.shape[1]
        if not self._pivots_allowed.any():
            inside = torch.minimum(from_low, from_high.bitwise_not_(), out=from_low)  # ~x = -x - 1 ≥ 0 where |τ| < high
            return above, torch.zeros_like(above), (inside.amax(dim=0) >= 0).nonzero().squeeze(1)
        inside = torch.minimum(from_low, from_high.bitwise_not_(), out=from_high)
        self._learn_pivots(inside, from_low)
        at_pivot = from_low == (self._pivot_bits - self._low_bits)  # never where there is no pivot: from_low ≥ -low
        inside.masked_fill_(at_pivot, -1)
        set_aside = inside.amax(dim=0) >= 0
        at_pivot &= ~set_aside
        return above, at_pivot.sum(dim=1, dtype=torch.int32), set_aside.nonzero().squeeze(1)

    def _learn_pivots(self, inside: Tensor, from_low: Tensor) -> None:
        for row in (self._pivots_allowed & (self._pivot_bits[:, 0] < 0)).nonzero().flatten().tolist():
            values = from_low[row][inside[row] >= 0]
            if values.numel() < PIVOT_EVIDENCE:
                continue
            distinct, counts = values.unique(return_counts=True)
            best = counts.argmax()
            if 2 * counts[best] > values.numel():  # a tie holding most of the bracket: bf16 task vectors
                self._pivot_bits[row, 0] = distinct[best] + self._low_bits[row, 0]


def margin(sizes: Mapping[str, int], weights: Mapping[str, int]) -> float:
    """MARGIN_SIGMAS standard deviations of the sample's count estimates, at most: known before
    sampling, since each stretch of SAMPLE_EVERY entries adds at most (SAMPLE_EVERY·weight)²/4 to
    the variance (the entries past the last whole stretch are counted, not estimated)."""
    if SAMPLE_EVERY == 1:
        return 0.0
    variance = sum((size // SAMPLE_EVERY) * (SAMPLE_EVERY * weights[key]) ** 2 / 4 for key, size in sizes.items())
    return MARGIN_SIGMAS * math.sqrt(variance)


def expected_inside(sizes: Mapping[str, int], weights: Mapping[str, int]) -> float:
    """The share of a task vector's entries (over `sizes`' keys) that its bracket will hold, about."""
    return min(1.0, 2 * margin(sizes, weights) / max(1, flat_numel(sizes, weights)))


def sample_bracket(
    models: Mapping[str, StateDict], sizes: Mapping[str, int], weights: Mapping[str, int], zero_entries: int, k: int, *, seed: int = 0
) -> CutBracket:
    """Per task, a bracket of its k-th largest |τ| over `sizes`' keys (each counted `weights`
    times) and `zero_entries` zeros; the first model is θ₀.

    A bracket one bucket wide may get a pivot (CutBracket).
    """
    rows = len(models) - 1
    # Only its pass-1 histogram is used, over the weighted sample.
    histogram = MagnitudeSelector(rows, flat_numel(sizes, weights) + zero_entries, k)
    generator = torch.Generator().manual_seed(seed)
    for key in progress(list(sizes), "TIES cut estimate"):
        for sample, every in sampled_task_vectors(models, key, SAMPLE_EVERY, generator):
            histogram.update(sample, every * weights[key])
    histogram.add_zeros(zero_entries)
    spare = margin(sizes, weights)
    low, _ = histogram.bin_bounds(torch.full((rows,), math.ceil(k + spare)))
    _, high = histogram.bin_bounds(torch.full((rows,), math.floor(k - spare)))
    one_bucket = high.view(torch.int32) - low.view(torch.int32) == BUCKET_WIDTH
    return CutBracket(low, high, pivots=one_bucket)
