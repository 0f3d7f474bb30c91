"""State-dict arithmetic against hand-computed results on tiny tensors: a float32 weight, a float16
bias and an int64 buffer, whose dtypes the functions keep or promote as FusionBench does."""

from collections import OrderedDict

import pytest
import torch

from fusion_bench.utils.state_dict_arithmetic import (
    num_params_of_state_dict,
    state_dict_add,
    state_dict_add_scalar,
    state_dict_avg,
    state_dict_binary_mask,
    state_dict_diff_abs,
    state_dict_div,
    state_dict_flatten,
    state_dict_hadamard_product,
    state_dict_interpolation,
    state_dict_max,
    state_dict_max_abs,
    state_dict_mul,
    state_dict_power,
    state_dict_sub,
    state_dict_sum,
    state_dict_to_device,
    state_dict_weighted_sum,
    state_dicts_check_keys,
)

KEYS = ["w", "b", "n"]


def make(w, b, n):
    """A state dict in KEYS order: float32 "w" (2×2), float16 "b" (2), int64 "n" (2)."""
    return {
        "w": torch.tensor(w, dtype=torch.float32),
        "b": torch.tensor(b, dtype=torch.float16),
        "n": torch.tensor(n, dtype=torch.int64),
    }


A = make([[1.0, -2.0], [3.0, 0.5]], [0.5, -1.5], [2, 0])
B = make([[0.5, 1.0], [-1.0, 2.0]], [1.0, 0.25], [1, 3])
C = make([[2.0, 0.0], [1.0, -4.0]], [-0.5, 2.0], [0, 0])


def floats(state_dict):
    """The state dict without its integer buffer."""
    return {key: state_dict[key] for key in ("w", "b")}


def assert_state_dict(result, expected):
    """An OrderedDict with expected's keys in expected's order, each tensor equal in value and dtype."""
    assert isinstance(result, OrderedDict)
    assert list(result) == list(expected)
    for key, tensor in expected.items():
        assert result[key].dtype == tensor.dtype, key
        assert torch.equal(result[key], tensor), key


def test_sub_and_add_keep_each_dtype():
    assert_state_dict(state_dict_sub(A, B), make([[0.5, -3.0], [4.0, -1.5]], [-0.5, -1.75], [1, -3]))
    assert_state_dict(state_dict_add(A, B), make([[1.5, -1.0], [2.0, 2.5]], [1.5, -1.25], [3, 3]))
    assert_state_dict(state_dict_add(A, B, show_pbar=True), state_dict_add(A, B))


def test_non_strict_keeps_the_shared_keys_in_the_first_order():
    extra = {"z": torch.ones(1), **B}
    assert list(state_dict_sub(A, extra, strict=False)) == KEYS
    assert list(state_dict_add(floats(A), extra, strict=False)) == ["w", "b"]
    assert list(state_dict_binary_mask(extra, A, strict=False)) == KEYS


def test_device_moves_the_results():
    for result in (state_dict_sub(A, B, device="meta"), state_dict_add(A, B, device="meta"), state_dict_weighted_sum([A, B], [1.0, 1.0], device="meta")):
        assert [tensor.device.type for tensor in result.values()] == ["meta"] * 3
        assert [tensor.dtype for tensor in result.values()] == [torch.float32, torch.float16, torch.int64]


def test_add_scalar_follows_torch_promotion():
    assert_state_dict(state_dict_add_scalar(A, 1), make([[2.0, -1.0], [4.0, 1.5]], [1.5, -0.5], [3, 1]))
    assert state_dict_add_scalar(A, 0.5)["n"].dtype == torch.float32


def test_mul():
    assert_state_dict(state_dict_mul(A, 2), make([[2.0, -4.0], [6.0, 1.0]], [1.0, -3.0], [4, 0]))
    halved = state_dict_mul(A, 0.5)
    assert halved["b"].dtype == torch.float16 and torch.equal(halved["n"], torch.tensor([1.0, 0.0]))
    assert_state_dict(state_dict_mul(A, 2, show_pbar=True), state_dict_mul(A, 2))


def test_mul_keeps_integer_tensors_when_zero():
    """keep_dtype_when_zero copies an integer tensor unchanged when the scalar is 0 or it is all 0."""
    by_zero = state_dict_mul(A, 0.0)
    assert torch.equal(by_zero["w"], torch.zeros(2, 2)) and by_zero["n"].dtype == torch.int64
    assert torch.equal(by_zero["n"], A["n"]) and by_zero["n"] is not A["n"]
    assert state_dict_mul(C, 0.5)["n"].dtype == torch.int64
    assert torch.equal(state_dict_mul(A, 0.0, keep_dtype_when_zero=False)["n"], torch.tensor([0.0, 0.0]))
    assert state_dict_mul(C, 0.5, keep_dtype_when_zero=False)["n"].dtype == torch.float32


def test_div():
    assert_state_dict(state_dict_div(A, 2), {"w": A["w"] / 2, "b": A["b"] / 2, "n": torch.tensor([1.0, 0.0])})
    assert state_dict_div(C, 2)["n"].dtype == torch.int64  # all zeros: kept
    assert state_dict_div(C, 2, keep_dtype_when_zero=False)["n"].dtype == torch.float32
    assert_state_dict(state_dict_div(A, 4, show_pbar=True), state_dict_div(A, 4))
    for zero in (0, 0.0):
        with pytest.raises(ZeroDivisionError):
            state_dict_div(A, zero)


def test_power():
    assert_state_dict(state_dict_power(A, 2), make([[1.0, 4.0], [9.0, 0.25]], [0.25, 2.25], [4, 0]))
    assert torch.allclose(state_dict_power(floats(B), 0.5)["w"][0], torch.tensor([0.5**0.5, 1.0]))


def test_sum_and_avg():
    assert_state_dict(state_dict_sum([A, B, C]), make([[3.5, -1.0], [3.0, -1.5]], [1.0, 0.75], [3, 3]))
    assert_state_dict(state_dict_avg([floats(A), floats(B)]), floats(make([[0.75, -0.5], [1.0, 1.25]], [0.75, -0.625], [0, 0])))
    assert_state_dict(state_dict_avg([floats(C)]), floats(C))
    assert_state_dict(OrderedDict(A), make([[1.0, -2.0], [3.0, 0.5]], [0.5, -1.5], [2, 0]))  # inputs untouched


def test_avg_of_an_integer_tensor_fails_as_in_fusion_bench():
    with pytest.raises(RuntimeError):
        state_dict_avg([A, B])


def test_interpolation():
    expected = {key: 0.25 * A[key] + 0.75 * B[key] for key in ("w", "b")}
    assert_state_dict(state_dict_interpolation([floats(A), floats(B)], [0.25, 0.75]), expected)
    assert torch.equal(state_dict_interpolation([A, B], [1, 2])["n"], torch.tensor([4, 6]))


def test_weighted_sum():
    weights = [0.5, 2.0, -1.0]
    dense = {key: sum((w * sd[key] for sd, w in zip((A, B, C), weights)), torch.zeros_like(A[key])) for key in ("w", "b")}
    assert_state_dict(state_dict_weighted_sum([floats(A), floats(B), floats(C)], weights), dense)
    # weights 1 and 0 add a tensor as it is or leave it out, so the int64 buffer stays int64
    assert_state_dict(state_dict_weighted_sum([A, B, C], [1.0, 0.0, 1.0]), make([[3.0, -2.0], [4.0, -3.5]], [0.0, 0.5], [2, 0]))
    nan = {"w": torch.full((2, 2), float("nan")), "b": torch.zeros(2, dtype=torch.float16)}
    assert_state_dict(state_dict_weighted_sum([floats(A), nan], [1.0, 0.0]), floats(A))


def test_diff_abs_and_hadamard():
    assert_state_dict(state_dict_diff_abs(A, B), make([[0.5, 3.0], [4.0, 1.5]], [0.5, 1.75], [1, 3]))
    assert_state_dict(state_dict_hadamard_product(A, B), make([[0.5, -2.0], [-3.0, 1.0]], [0.5, -0.375], [2, 0]))


def test_binary_mask():
    masks = {
        "greater": [[True, False], [True, False]],
        "less": [[False, True], [False, True]],
        "equal": [[False, False], [False, False]],
        "not_equal": [[True, True], [True, True]],
    }
    for name, expected in masks.items():
        result = state_dict_binary_mask(A, B, name, show_pbar=True)
        assert list(result) == KEYS and result["w"].dtype == torch.bool
        assert torch.equal(result["w"], torch.tensor(expected))
    assert torch.equal(state_dict_binary_mask(A, B)["n"], torch.tensor([True, False]))
    closer = state_dict_binary_mask(A, B, lambda x, y: (x - y).abs() < 1)
    assert torch.equal(closer["w"], torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="compare_fn='gt' is unknown"):
        state_dict_binary_mask(A, B, "gt")
    with pytest.raises(ValueError, match="compare_fn must be"):
        state_dict_binary_mask(A, B, 3)


def test_max_and_max_abs():
    assert_state_dict(state_dict_max([A, B, C]), make([[2.0, 1.0], [3.0, 2.0]], [1.0, 2.0], [2, 3]))
    assert_state_dict(state_dict_max_abs([A, B, C]), make([[2.0, 2.0], [3.0, 4.0]], [1.0, 2.0], [2, 3]))
    alone = state_dict_max([A])
    assert_state_dict(alone, A)
    assert alone["w"] is not A["w"]
    assert_state_dict(state_dict_max_abs([A]), {key: tensor.abs() for key, tensor in A.items()})


def test_flatten_and_count():
    flat = state_dict_flatten(A)
    assert flat.dtype == torch.float32  # torch.cat promotes float16 and int64 to float32
    assert torch.equal(flat, torch.tensor([1.0, -2.0, 3.0, 0.5, 0.5, -1.5, 2.0, 0.0]))
    assert num_params_of_state_dict(A) == 8
    assert num_params_of_state_dict({}) == 0


def test_to_device():
    moved = state_dict_to_device(A, "meta")
    assert isinstance(moved, OrderedDict) and list(moved) == KEYS
    assert all(tensor.device.type == "meta" for tensor in moved.values())
    assert A["w"].device.type == "cpu"
    assert state_dict_to_device(A, "cpu")["w"] is A["w"]
    copied = state_dict_to_device(A, "cpu", copy=True)["w"]
    assert torch.equal(copied, A["w"]) and copied.data_ptr() != A["w"].data_ptr()
    target = dict(A)
    assert state_dict_to_device(target, "meta", inplace=True) is target and target["n"].device.type == "meta"


def test_check_keys_accepts_matching_state_dicts():
    assert state_dicts_check_keys([A, B, C]) is None
    assert state_dicts_check_keys((A,)) is None


LISTS = [
    state_dict_sum,
    state_dict_avg,
    state_dict_max,
    state_dict_max_abs,
    state_dicts_check_keys,
    lambda sds: state_dict_weighted_sum(sds, [1.0] * len(sds)),
    lambda sds: state_dict_interpolation(sds, [1.0] * len(sds)),
]


@pytest.mark.parametrize("function", LISTS)
def test_lists_of_state_dicts_are_checked(function):
    with pytest.raises(ValueError, match="state_dicts is empty"):
        function([])
    with pytest.raises(ValueError, match="state dict 1 is empty"):
        function([A, {}])
    with pytest.raises(ValueError, match="state dict 2 lacks keys that state dict 0 has: 'n'"):
        function([A, B, floats(C)])
    with pytest.raises(ValueError, match="state dict 1 has keys that state dict 0 lacks: 'z'"):
        function([A, {**B, "z": torch.ones(1)}])
    with pytest.raises(ValueError, match=r"'w' has shape \[2, 2\] in state dict 0 but \[4\] in state dict 1"):
        function([A, {**B, "w": torch.zeros(4)}])
    with pytest.raises(ValueError, match="'b' is torch.float16 in state dict 0 but torch.float32 in state dict 1"):
        function([A, {**B, "b": torch.zeros(2)}])
    with pytest.raises(TypeError, match="must be a list or tuple"):
        function(A)


@pytest.mark.parametrize("function", [state_dict_sub, state_dict_add, state_dict_diff_abs, state_dict_binary_mask, state_dict_hadamard_product])
def test_pairs_of_state_dicts_are_checked(function):
    with pytest.raises(ValueError, match="state dict 1 lacks keys that state dict 0 has: 'n'"):
        function(A, floats(B))
    with pytest.raises(ValueError, match="state dict 1 has keys that state dict 0 lacks: 'n'"):
        function(floats(A), B)
    with pytest.raises(ValueError, match="state dict 0 has no keys"):
        function({}, {})


def test_weights_must_pair_up_with_the_state_dicts():
    with pytest.raises(ValueError, match="2 state dicts but 1 weights"):
        state_dict_weighted_sum([A, B], [1.0])
    with pytest.raises(ValueError, match="2 state dicts but 3 scalars"):
        state_dict_interpolation([A, B], [1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="weights must be a list or tuple"):
        state_dict_weighted_sum([A, B], torch.ones(2))


def test_messages_are_one_line_and_name_few_keys():
    many = {f"k{i:02d}": torch.zeros(1) for i in range(12)}
    with pytest.raises(ValueError) as error:
        state_dict_sub(many, {"k00": torch.zeros(1)})
    message = str(error.value)
    assert "\n" not in message and "'k05'" in message and "'k06'" not in message and "(11 in all)" in message
