"""The exact k-th largest magnitude of each row of a stream of chunks, without holding the stream.

Radix selection on float32 bit patterns: for x ≥ 0 the int32 view of x is ordered like x, so a
histogram of the high bits finds the bucket holding the k-th largest value (pass 1); the value
itself comes either from a histogram of the low bits inside that bucket (pass 2), or, without
another pass, from the bucket's members if the caller collected them (`resolve`). Memory is two
histograms per row, whatever the stream's length; the result equals a sort's, bit for bit.

Histograms are filled with scatter_add_ along the rows (parallel over rows) and pass 2 clamps
out-of-bucket values into two spill bins instead of masking them: on CPU both run several times
faster than bincount or boolean selection.
"""

import torch
from torch import Tensor

_LOW_BITS = 12  # a bucket spans 2**12 float32 values: about 1/2048 of an octave
_HIGH_BINS = 1 << (31 - _LOW_BITS)  # |x| has a zero sign bit
_LOW_BINS = 1 << _LOW_BITS


class MagnitudeSelector:
    """Finds, for each of `rows` streams of `numel` values, the k-th largest |x| (k counts from 1).

    Feed every chunk of the streams to `update` (chunks are [rows, c]; a chunk given weight m stands
    for m copies of itself, and `add_zeros` for zeros never materialised; `numel` counts them all),
    call `end_pass`, and repeat while `done` is False; then `values` holds one float per row. After pass 1, `bucket_bounds`
    brackets each answer, and `resolve` can finish from the values inside the brackets instead of
    a second pass. k ≥ numel needs no pass: the k-th largest is then the smallest magnitude, and a
    cut at 0 keeps everything alike.
    """

    def __init__(self, rows: int, numel: int, k: int):
        self.rows, self.numel, self.k = rows, numel, k
        self.values: Tensor | None = torch.zeros(rows) if k >= numel else None
        self._histogram = torch.zeros(rows, _HIGH_BINS, dtype=torch.int64)
        self._bucket_start: Tensor | None = None  # per row, the bit pattern where the bucket starts
        self._above: Tensor | None = None  # per row, how many values lie above the bucket
        self._in_bucket: Tensor | None = None  # per row, how many lie in it
        self._ones = torch.ones(0, dtype=torch.int64)

    @property
    def done(self) -> bool:
        return self.values is not None

    @property
    def bucket_bounds(self) -> tuple[Tensor, Tensor]:
        """After pass 1: per row, [low, high) holding the k-th largest |x|."""
        return _as_float(self._bucket_start), _as_float(self._bucket_start + _LOW_BINS)

    def update(self, chunk: Tensor, weight: int = 1) -> None:
        bits = chunk.abs().view(torch.int32)
        if self._bucket_start is None:
            index = bits >> _LOW_BITS
        else:  # offsets inside the bucket, shifted by one: bin 0 is below it, the last bin above
            index = (bits - self._bucket_start[:, None]).clamp_(-1, _LOW_BINS).add_(1)
        if self._ones.shape != index.shape:
            self._ones = torch.ones(index.shape, dtype=torch.int64)
        self._histogram.scatter_add_(1, index.long(), self._ones if weight == 1 else self._ones * weight)

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
            self._in_bucket = self._histogram.gather(1, bucket[:, None]).squeeze(1)
            self._bucket_start = bucket.to(torch.int32) << _LOW_BITS
            self._histogram = torch.zeros(self.rows, _LOW_BINS + 2, dtype=torch.int64)
        else:
            low, _ = _kth_from_top(self._histogram[:, 1:-1], self.k - self._above)
            self.values = _as_float(self._bucket_start | low.to(torch.int32))

    def resolve(self, in_bucket: list[Tensor]) -> None:
        """Finish after pass 1 from in_bucket[row]: the row's nonzero magnitudes inside its bucket,
        all of them, each as many times as it was counted (the bucket's zeros, if it holds 0, are
        what its count says is missing)."""
        values = []
        for row, members in enumerate(in_bucket):
            rank = int(self.k - self._above[row])  # of the answer among the bucket's values, from the top
            members = members.abs()
            # Past the nonzero members the bucket holds only zeros, which are never materialised:
            # a sparse task vector (a LoRA adapter's) may have hundreds of millions of them.
            values.append(members.kthvalue(members.numel() - rank + 1).values if rank <= members.numel() else torch.zeros(()))
        self.values = torch.stack(values)


def _as_float(bits: Tensor) -> Tensor:
    return bits.to(torch.int32).view(torch.float32)


def _kth_from_top(histogram: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the bin holding the k-th value counted from the top, and the count above that bin."""
    from_top = histogram.flip(1).cumsum(1)
    position = torch.searchsorted(from_top, k[:, None].to(from_top.dtype)).squeeze(1)
    bins = histogram.shape[1] - 1 - position
    above = from_top.gather(1, position[:, None]).squeeze(1) - histogram.gather(1, bins[:, None]).squeeze(1)
    return bins, above
