"""merging/lapack.py: syevr called without the GIL gives what scipy's wrapper of the same routine
gives, bit for bit, and the SVD merges' per-thread use of it does not depend on the thread count."""

import numpy as np
import pytest
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from fusion_bench.merging.lapack import top_eigenpairs
from fusion_bench.merging.svd import top_singular_triplets


def symmetric(n: int, seed: int) -> np.ndarray:
    matrix = np.random.default_rng(seed).standard_normal((n + 3, n))
    return matrix.T @ matrix


@pytest.mark.parametrize("n, count", [(1, 1), (7, 1), (40, 6), (40, 40)])
def test_top_eigenpairs_equal_scipys_syevr(n, count):
    gram = symmetric(n, seed=n + count)
    with threadpool_limits(1, user_api="blas"):
        expected_values, expected_vectors = scipy.linalg.eigh(gram, subset_by_index=(n - count, n - 1), driver="evr")
        values, vectors = top_eigenpairs(gram.copy(), count)
    assert values.shape == (count,) and vectors.shape == (n, count)
    assert np.array_equal(values, expected_values) and np.array_equal(vectors, expected_vectors)
    assert np.allclose(gram @ vectors, vectors * values, atol=1e-10 * values[-1])


def test_top_eigenpairs_read_the_upper_triangle():
    gram = symmetric(12, seed=1)
    garbled = gram + np.tril(np.full_like(gram, 7.0), k=-1)  # only the lower triangle is wrong
    values, vectors = top_eigenpairs(garbled, 3)
    expected_values, expected_vectors = np.linalg.eigh(gram)
    assert np.allclose(values, expected_values[-3:], rtol=1e-12)
    assert np.allclose(np.abs(vectors.T @ expected_vectors[:, -3:]), np.eye(3), atol=1e-10)


@pytest.mark.parametrize(
    "matrix, count",
    [(np.eye(4, dtype=np.float32), 2), (np.eye(4)[:, :3].copy(), 2), (np.asfortranarray(np.eye(4))[:, ::2], 1), (np.eye(4), 0), (np.eye(4), 5)],
    ids=["float32", "not square", "not contiguous", "count 0", "count past n"],
)
def test_top_eigenpairs_refuse_what_syevr_would_misread(matrix, count):
    with pytest.raises(ValueError, match="C-contiguous float64"):
        top_eigenpairs(matrix, count)


def test_top_singular_triplets_do_not_depend_on_the_thread_count():
    """Five tasks on two threads: two chunks of two and one of one, in the stack's order."""
    matrices = torch.randn(5, 60, 36, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = top_singular_triplets(matrices, 5)
        torch.set_num_threads(1)
        one = top_singular_triplets(matrices, 5)
    finally:
        torch.set_num_threads(threads)
    for task in range(5):
        expected = torch.linalg.svd(matrices[task].double(), full_matrices=False)
        assert torch.allclose(two[1][task].double(), expected[1][:5], rtol=1e-6)
    for ours, theirs in zip(two, one):
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)
