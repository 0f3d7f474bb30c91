"""LAPACK's syevr (MRRR) for the top eigenpairs of a symmetric float64 matrix, called with the
GIL released, so that one thread per core can each decompose a task's Gram matrix at once.

scipy.linalg.eigh(subset_by_index=…, driver="evr") runs the same routine, but its f2py wrapper
holds the GIL for the whole call: on a 768² matrix here a call takes 59 ms on one thread and
53 ms with two threads calling at once; through this module, with two, 28 ms. The routine is the
one scipy's public Cython LAPACK (scipy.linalg.cython_lapack) exports, and ctypes releases the GIL
for every foreign call.
"""

import ctypes
import functools

import numpy as np
from scipy.linalg import cython_lapack

_INT, _DOUBLE = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double)
# jobz range uplo n a lda vl vu il iu abstol m w z ldz isuppz work lwork iwork liwork info
_SYEVR_ARGUMENTS = [ctypes.c_char_p] * 3 + [_INT, _DOUBLE, _INT, _DOUBLE, _DOUBLE, _INT, _INT, _DOUBLE, _INT, _DOUBLE, _DOUBLE, _INT, _INT, _DOUBLE, _INT, _INT, _INT, _INT]


def top_eigenpairs(symmetric: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` largest eigenvalues of an [n, n] symmetric C-contiguous float64 matrix, ascending,
    [count], and their eigenvectors [n, count], as scipy.linalg.eigh(symmetric,
    subset_by_index=(n − count, n − 1), driver="evr") gives them, to the bit. Overwrites `symmetric`;
    reads its upper triangle."""
    n = symmetric.shape[0]
    if symmetric.dtype != np.float64 or symmetric.shape != (n, n) or not symmetric.flags.c_contiguous or not 1 <= count <= n:
        raise ValueError(f"top_eigenpairs takes a C-contiguous float64 [n, n] matrix and 1 ≤ count ≤ n, not {symmetric.dtype} {symmetric.shape} and {count}")
    values = np.empty(n)
    vectors = np.empty((count, n))  # Fortran's [n, count]
    support = np.empty(2 * count, dtype=np.intc)
    found, info = ctypes.c_int(), ctypes.c_int()

    def syevr(work: np.ndarray, work_size: int, iwork: np.ndarray, iwork_size: int) -> None:
        # Fortran reads the C-ordered matrix transposed: its lower triangle, the one scipy reduces,
        # is our upper one
        _syevr()(b"V", b"I", b"L", _int(n), _doubles(symmetric), _int(n), _double(0.0), _double(0.0), _int(n - count + 1), _int(n), _double(0.0), ctypes.byref(found), _doubles(values), _doubles(vectors), _int(n), _ints(support), _doubles(work), _int(work_size), _ints(iwork), _int(iwork_size), ctypes.byref(info))

    best_work, best_iwork = np.empty(1), np.empty(1, dtype=np.intc)
    syevr(best_work, -1, best_iwork, -1)  # a workspace query
    syevr(np.empty(int(best_work[0])), int(best_work[0]), np.empty(int(best_iwork[0]), dtype=np.intc), int(best_iwork[0]))
    if info.value:
        raise np.linalg.LinAlgError(f"LAPACK's dsyevr failed with info = {info.value}")
    return values[:count], vectors.T


@functools.cache
def _syevr() -> ctypes._CFuncPtr:
    # prototypes of our own, not ctypes.pythonapi's shared attributes with their types set
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", ctypes.pythonapi))
    capsule = cython_lapack.__pyx_capi__["dsyevr"]
    return ctypes.CFUNCTYPE(None, *_SYEVR_ARGUMENTS)(get_pointer(capsule, get_name(capsule)))


def _int(value: int) -> ctypes._Pointer:
    return ctypes.pointer(ctypes.c_int(value))


def _double(value: float) -> ctypes._Pointer:
    return ctypes.pointer(ctypes.c_double(value))


def _doubles(array: np.ndarray) -> ctypes._Pointer:
    return array.ctypes.data_as(_DOUBLE)


def _ints(array: np.ndarray) -> ctypes._Pointer:
    return array.ctypes.data_as(_INT)
