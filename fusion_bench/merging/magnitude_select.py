"""The exact k-th largest magnitude of each row of a stream of chunks, without holding the stream.

Radix selection on float32 bit patterns: for x ≥ 0 the int32 view of x is ordered like x, so a
histogram of the high bits finds the bucket holding the k-th largest value (pass 1); the value
itself comes from a histogram of the low bits inside that bucket (pass 2). Memory is two
histograms per row, whatever the stream's length; the result equals a sort's, bit for bit.
The pass-1 histogram of a weighted sample also brackets the k-th largest (`bin_bounds`).

Histograms are filled with scatter_add_ along the rows (parallel over rows) and pass 2 clamps
out-of-bucket values into two spill bins instead of masking them: on CPU both run several times
faster than bincount or boolean selection.
"""

import torch
from torch import Tensor

_LOW_BITS = 12  # a bucket spans 2**12 float32 values: about 1/2048 of an octave
BUCKET_WIDTH = 1 << _LOW_BITS  # in bit patterns
_HIGH_BINS = 1 << (31 - _LOW_BITS)  # |x| has a zero sign bit
_LOW_BINS = 1 << _LOW_BITS
_INF_BITS = 0x7F800000  # float32 +inf


class MagnitudeSelector:
    """Finds, for each of `rows` streams of `numel` values, the k-th largest |x| (k counts from 1).

    Feed every chunk of the streams to `update` (chunks are [rows, c]; a chunk given weight m stands
    for m copies of itself, and `add_zeros` for zeros never materialised; `numel` counts them all),
    call `end_pass`, and repeat while `done` is False; then `values` holds one float per row.
    k ≥ numel needs no pass: the k-th largest is then the smallest magnitude, and a cut at 0 keeps
    everything alike.
    """

    def __init__(self, rows: int, numel: int, k: int):
        self.rows, self.numel, self.k = rows, numel, k
        self.values: Tensor | None = torch.zeros(rows) if k >= numel else None
        self._histogram = torch.zeros(rows, _HIGH_BINS, dtype=torch.int64)
        self._bucket_start: Tensor | None = None  # per row, the bit pattern where the bucket starts
        self._above: Tensor | None = None  # per row, how many values lie above the bucket
        self._increments, self._increment = torch.ones(0, dtype=torch.int64), 1  # reused: allocating per chunk costs more

    @property
    def done(self) -> bool:
        return self.values is not None

    def update(self, chunk: Tensor, weight: int = 1) -> None:
        bits = chunk.abs().view(torch.int32)
        if self._bucket_start is None:
            index = bits >> _LOW_BITS
        else:  # offsets inside the bucket, shifted by one: bin 0 is below it, the last bin above
            index = (bits - self._bucket_start[:, None]).clamp_(-1, _LOW_BINS).add_(1)
        if self._increments.shape != index.shape or self._increment != weight:
            self._increments, self._increment = torch.full(index.shape, weight, dtype=torch.int64), weight
        self._histogram.scatter_add_(1, index.long(), self._increments)

    def add_zeros(self, count: int) -> None:
        """Count `count` zeros in every row, as if fed to `update`."""
        if self._bucket_start is None:
            self._histogram[:, 0] += count  # 0.0 has the bit pattern 0
        else:
            index = (-self._bucket_start.long()).clamp_(-1, _LOW_BINS).add_(1)
            self._histogram[torch.arange(self.rows), index] += count

    def end_pass(self) -> None:
        if self._bucket_start is None:
            bucket, self._above = _kth_from_top(self._histogram, torch.full((self.rows,), self.k))
            self._bucket_start = bucket.to(torch.int32) << _LOW_BITS
            self._histogram = torch.zeros(self.rows, _LOW_BINS + 2, dtype=torch.int64)
        else:
            low, _ = _kth_from_top(self._histogram[:, 1:-1], self.k - self._above)
            self.values = _as_float(self._bucket_start | low.to(torch.int32))

    def bin_bounds(self, rank: Tensor) -> tuple[Tensor, Tensor]:
        """During pass 1, per row: [start, end) of the bucket holding the rank[row]-th largest |x|
        fed so far (counted from 1); rank < 1 gives (inf, inf), a rank past the count (0, 0)."""
        from_top = self._histogram.flip(1).cumsum(1)
        position = torch.searchsorted(from_top, rank[:, None].clamp(min=1).to(from_top.dtype)).squeeze(1)
        bucket = (_HIGH_BINS - 1 - position).clamp(min=0)
        start = (bucket << _LOW_BITS).where(position < _HIGH_BINS, 0)
        end = ((bucket + 1) << _LOW_BITS).clamp(max=_INF_BITS).where(position < _HIGH_BINS, 0)
        return (_as_float(start.where(rank >= 1, _INF_BITS)), _as_float(end.where(rank >= 1, _INF_BITS)))


def _as_float(bits: Tensor) -> Tensor:
    return bits.to(torch.int32).view(torch.float32)


def _kth_from_top(histogram: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the bin holding the k-th value counted from the top, and the count above that bin."""
    from_top = histogram.flip(1).cumsum(1)
    position = torch.searchsorted(from_top, k[:, None].to(from_top.dtype)).squeeze(1)
    bins = histogram.shape[1] - 1 - position
    above = from_top.gather(1, position[:, None]).squeeze(1) - histogram.gather(1, bins[:, None]).squeeze(1)
    return bins, above
