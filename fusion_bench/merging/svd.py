"""The singular value decompositions of the SVD merges, done the fast way on CPUs: the same
results as torch.linalg.svd up to float32 rounding and the sign of each pair of singular vectors
(which cancels in every product the merges take).

- thin_svd: LAPACK's gesdd takes 2.6× as long on a wide [768, 3072] matrix as on its transpose
  here (torch 2.13, MKL, 2 cores), so a wide matrix is decomposed through its transpose.
- top_singular_triplets: the top r triplets of each matrix of a stack, where the merge keeps only
  a few (TSV-M: 1/T of the rank; Iso-CTS: each task's own directions), from the eigenvectors of
  the float64 Gram matrix AᵀA (AAᵀ if wide): 1.5× faster than gesdd on a [768, 768] matrix,
  2.7× on a [3072, 768] one. Squaring A squares its condition, which float64 absorbs as long as
  σ_r stands clear of σ_1's rounding (σ_r ≥ 10⁻³ σ_1: σ_r then carries a relative error below
  10⁻⁷); a matrix whose σ_r does not (a low-rank task vector) is decomposed by gesdd instead.
  Where r is a small part of the rank (r ≤ n/6: TSV-M of 8 tasks keeps n/8, Iso-CTS far less),
  only the top r eigenpairs are computed, by LAPACK's syevr (MRRR), not all n: 0.053 s on one
  thread instead of torch.linalg.eigh's 0.075 s on two for r = 96 of n = 768, in a TSV-M merge of
  8 × ViT-B/32 here; and syevr, single-threaded, runs on one task's Gram matrix per core at once,
  called without the GIL (merging/lapack.py): 0.21 s for 8 such matrices on 2 cores, not 0.41 s.
  Past n/6 computing the subset costs more than all of them.
- polar_decomposition: the orthogonal polar factor PQᵀ of A = PΣQᵀ, and Σ. Of a matrix at least
  twice as long as it is wide, from the float64 Gram matrix, A·(AᵀA)^(-1/2): 0.16 s instead of
  gesdd's 0.23 s on a [3072, 768] one, and 100× closer to a float64 SVD's (4e-9, not 3e-7), as
  long as σ_min ≥ 10⁻³ σ_max (else gesdd). On a square matrix gesdd is the faster.
- leading_subspace: the top r triplets of one matrix and the rest of its left singular basis,
  from the same float64 Gram matrix. Iso-CTS splits Σ_t τ_t's column space there, and a float32
  SVD places that split with an error of ε₃₂·σ_1/(σ_r − σ_r+1), which a small gap makes large
  (2.4e-6 in the merged weights of the recorded low-rank pool, where float64 gives 2.7e-7).
"""

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

from fusion_bench.merging.lapack import top_eigenpairs

# σ_r² / σ_1² below which the Gram matrix's r-th eigenpair is too close to rounding (see above)
MIN_EIGENVALUE_RATIO = 1e-6
# the largest r / n for which syevr's top r eigenpairs come faster than all n (see above)
SUBSET_FRACTION = 1 / 6


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd(matrix, full_matrices=False) of a [..., m, n] stack: U, S, Vᴴ."""
    if matrix.shape[-2] >= matrix.shape[-1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    v, s, uh = torch.linalg.svd(matrix.mT, full_matrices=False)
    return uh.mT, s, v.mT


def polar_decomposition(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """The orthogonal polar factor PQᵀ of an [m, n] matrix = PΣQᵀ (thin SVD): orthonormal columns
    (rows, if wide), the closest such matrix to `matrix` in Frobenius norm; and the singular
    values Σ, in no particular order."""
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if wide else matrix
    if tall.shape[0] >= 2 * tall.shape[1]:
        tall64 = tall.double()
        values, vectors = _gram_eigenpairs(tall64)
        if values[-1] > MIN_EIGENVALUE_RATIO * values[0]:
            polar = (tall64 @ ((vectors * values.rsqrt()) @ vectors.T)).to(matrix.dtype)
            return polar.T if wide else polar, values.sqrt().to(matrix.dtype)
    left, singular, right_h = thin_svd(matrix)
    return left @ right_h, singular


def polar_factor(matrix: Tensor) -> Tensor:
    """PQᵀ of matrix = PΣQᵀ: see polar_decomposition."""
    return polar_decomposition(matrix)[0]


def top_singular_triplets(matrices: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top `rank` singular triplets of each matrix of a [T, m, n] stack: U [T, m, r], S [T, r]
    (descending), Vᴴ [T, r, n], in the stack's dtype."""
    wide = matrices.shape[-2] < matrices.shape[-1]
    oriented = matrices.mT if wide else matrices  # tall: the Gram matrix is the smaller side's
    count, rows, cols = oriented.shape
    left, singular, right = matrices.new_empty(count, rows, rank), matrices.new_empty(count, rank), matrices.new_empty(count, cols, rank)
    if rank:
        if rank <= SUBSET_FRACTION * cols and matrices.device.type == "cpu":
            eigenpairs = _top_gram_eigenpairs(oriented, rank)
        else:  # all n of them, one matrix at a time
            eigenpairs = (_gram_eigenpairs(matrix.double()) for matrix in oriented)
        for index, (matrix, (values, vectors)) in enumerate(zip(oriented, eigenpairs)):
            left[index], singular[index], right[index], _ = _triplets_of_tall(matrix, rank, values, vectors)
    if wide:  # oriented = Aᵀ = left · S · rightᵀ, so A's U is right and its Vᴴ is leftᵀ
        return right, singular, left.mT
    return left, singular, right.mT


def _top_gram_eigenpairs(talls: Tensor, rank: int) -> list[tuple[Tensor, Tensor]]:
    """The top `rank` eigenpairs of each float64 Gram matrix of a [T, m, n] stack (m ≥ n), largest
    first: values [r] and vectors [n, r] per matrix. torch makes the Gram matrices on all its
    threads, as many at a time as it has threads, and syevr then decomposes them, one per thread."""
    workers = torch.get_num_threads()
    eigenpairs = []
    with _blas_threads().limit(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as threads:
        for start in range(0, len(talls), workers):
            grams = [_gram(tall.double()).numpy() for tall in talls[start : start + workers]]
            for values, vectors in threads.map(lambda gram: top_eigenpairs(gram, rank), grams):
                eigenpairs.append((torch.from_numpy(values).flip(0), torch.from_numpy(vectors).flip(1)))  # syevr's come ascending
    return eigenpairs


def _triplets_of_tall(matrix: Tensor, rank: int, values: Tensor, vectors: Tensor, with_rest: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """U [m, r], S [r], V [n, r] of an m ≥ n matrix from the eigenpairs of its float64 Gram matrix
    (largest first, at least r of them) where σ_r allows, else from gesdd; and, with_rest, the rest
    of its right singular basis, [n, n − r] (else None; with_rest needs all n eigenpairs)."""
    if rank and values[rank - 1] > MIN_EIGENVALUE_RATIO * values[0]:
        singular = values[:rank].sqrt()
        rest = vectors[:, rank:] if with_rest else None
        return (matrix.double() @ vectors[:, :rank]) / singular, singular, vectors[:, :rank], rest
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].T, vh[rank:].T if with_rest else None


def _gram(matrix64: Tensor) -> Tensor:
    return matrix64.T @ matrix64


def _gram_eigenpairs(matrix64: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenpairs of AᵀA, largest first: values [n], vectors [n, n]."""
    values, vectors = torch.linalg.eigh(_gram(matrix64))
    return values.flip(0), vectors.flip(1)  # eigh's are ascending


@functools.cache
def _blas_threads() -> ThreadpoolController:
    """scipy's OpenBLAS, which syevr calls, held to one thread per call: at two its idle threads
    spin on the cores torch's threads and the other syevr calls need, which made the whole TSV-M
    merge about 15 % slower."""
    return ThreadpoolController()


def leading_subspace(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The top `rank` singular triplets of one [m, n] matrix, U [m, r], S [r], Vᴴ [r, n], and, when
    m ≤ n, the rest of its left singular basis, [m, m − r] (None when m > n: U is not square)."""
    rows, cols = matrix.shape
    if rows > cols:
        u, s, vh = top_singular_triplets(matrix.unsqueeze(0), rank)
        return u[0], s[0], vh[0], None
    # Aᵀ = V S Uᵀ is tall or square, and its right singular basis, all of it, is A's left one
    v, s, u, u_rest = (piece.to(matrix.dtype) for piece in _triplets_of_tall(matrix.T, rank, *_gram_eigenpairs(matrix.T.double()), with_rest=True))
    return u, s, v.T, u_rest
