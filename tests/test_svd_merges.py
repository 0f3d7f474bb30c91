"""The SVD-based data-free merges, TSV-M, Iso-C and Iso-CTS: the reference's recorded merges
replayed, the math against dense float64 oracles written from the papers' equations, and every
bad-input error.

The recorded cases are in tests/data/reference_data_free_merges.safetensors
(scripts/make_reference_data_free_fixtures.py). In its "lowrank" pool each task vector is rank 3
plus a little full-rank noise, so every singular value stands well apart from float32 rounding and
the outputs are the same on any CPU (without the noise, Σ_t τ_t had null directions whose singular
vectors LAPACK picks from rounding noise: the reference itself then differed by 0.12-0.27 between
two machines). Both pools match to 2.4e-7.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fusion_bench.merging.isotropic import iso_c_merge, iso_cts_dimensions, iso_cts_merge
from fusion_bench.merging.svd import leading_subspace, polar_decomposition, polar_factor, thin_svd, top_singular_triplets
from fusion_bench.merging.task_singular_vectors import task_singular_vectors, tsv_merge
from fusion_bench.method import (
    ISO_C_Merge,
    ISO_CTS_Merge,
    IsotropicMergingInCommonAndTaskSubspace,
    IsotropicMergingInCommonSubspace,
    TaskSingularVectorMerging,
)
from fusion_bench.models.per_task_models import PerTaskModels
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import instantiate_checked
from tests.recorded_merges import RecordedMerges, data_free_fixture_module

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"TaskSingularVectorMerging": TaskSingularVectorMerging, "ISO_C_Merge": ISO_C_Merge, "ISO_CTS_Merge": ISO_CTS_Merge}
TOLERANCE = 1e-5


RECORDED = RecordedMerges("reference_data_free_merges.safetensors", data_free_fixture_module, METHODS)
CASES = RECORDED.cases


def assert_matches(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    assert set(model.state_dict()) == set(expected)
    for key, value in model.state_dict().items():
        assert (value - expected[key]).abs().max().item() <= TOLERANCE, key


# ---------------------------------------------------------------- the reference's recorded merges


def test_fixtures_hold_every_case_of_these_methods():
    assert len(CASES) == 20 and {case["pool"] for case in CASES} == {"normal", "lowrank"}
    assert sum(case["params"].get("return_single_task_models", False) for case in CASES) == 2
    assert len(PLAIN_LOW_RANK_CASES) == 5


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_matches_reference(case):
    params = dict(case["params"])
    if params.pop("return_single_task_models", False):
        # the reference returns the task models and "merged"; ours returns the task models, and the
        # merged model comes from return_single_task_models=false
        models = METHODS[case["method"]](**params, return_single_task_models=True).run(RECORDED.pool(case["pool"]))
        assert isinstance(models, PerTaskModels) and list(models) == ["task0", "task1", "task2", "task3"]
        for name in models:
            assert_matches(models[name], RECORDED.output(case, name))
        assert_matches(METHODS[case["method"]](**params).run(RECORDED.pool(case["pool"])), RECORDED.output(case, "merged"))
    else:
        assert_matches(METHODS[case["method"]](**params).run(RECORDED.pool(case["pool"])), RECORDED.output(case))


def float64_merge(case: dict, task_vectors: torch.Tensor) -> torch.Tensor:
    """Δ of one matrix of a recorded case, by the float64 oracles below."""
    params = case["params"]
    if case["method"] == "TaskSingularVectorMerging":
        return params["alpha"] * oracle_tsv(task_vectors)[0]
    if case["method"] == "ISO_C_Merge":
        return params["scaling_factor"] * oracle_iso_c(task_vectors)
    common, per_task = iso_cts_dimensions(min(task_vectors.shape[1:]), len(task_vectors), params["common_space_fraction"])
    return params["scaling_factor"] * oracle_iso_cts(task_vectors, common, per_task)


PLAIN_LOW_RANK_CASES = [
    case
    for case in CASES
    if case["pool"] == "lowrank" and set(case["params"]) <= {"alpha", "scaling_factor", "common_space_fraction"} and not isinstance(case["params"].get("alpha", 1), list)
]


@pytest.mark.parametrize("case", PLAIN_LOW_RANK_CASES, ids=[c["case"] for c in PLAIN_LOW_RANK_CASES])
def test_is_at_least_as_near_the_float64_merge_as_the_reference(case):
    """TSV-M's and Iso-CTS's top singular triplets (and Iso-CTS's split of the common subspace)
    come from float64 Gram matrices here (fusion_bench.merging.svd), the reference's from float32
    SVDs: on the low-rank pool, whose small singular values float32 resolves least well, ours is
    the nearer of the two to the merge computed in float64. Iso-C takes the same float32 SVD as
    the reference, so there the two are as near, up to rounding that varies with the CPU."""
    state_dicts = RECORDED.state_dicts("lowrank")
    theta0 = state_dicts.pop("_pretrained_")
    ours = METHODS[case["method"]](**case["params"]).run(RECORDED.pool("lowrank")).state_dict()
    reference = RECORDED.output(case)
    ours_error = reference_error = 0.0
    for key in ("0.weight", "2.weight", "3.weight"):  # the matrices; the rest is a plain mean
        task_vectors = torch.stack([state_dict[key] - theta0[key] for state_dict in state_dicts.values()]).double()
        truth = theta0[key].double() + float64_merge(case, task_vectors)
        ours_error = max(ours_error, (ours[key].double() - truth).abs().max().item())
        reference_error = max(reference_error, (reference[key].double() - truth).abs().max().item())
    if case["method"] == "ISO_C_Merge":
        assert ours_error <= 2 * reference_error
    else:
        assert ours_error <= reference_error


# ---------------------------------------------------------------- dense oracles (float64)


def oracle_polar(matrix: torch.Tensor) -> torch.Tensor:
    """A(AᵀA)^(-1/2) for a tall A of full column rank (transposed for a wide one)."""
    if matrix.shape[0] < matrix.shape[1]:
        return oracle_polar(matrix.T).T
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.T @ matrix)
    return matrix @ eigenvectors @ torch.diag(eigenvalues.rsqrt()) @ eigenvectors.T


def oracle_tsv(task_vectors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """TSV-M as FusionBench lays it out: k = min(m, n) slots, task t's top ⌊k/T⌋ singular triplets
    in slots t·r …, the leftover slots zero; U and V orthogonalised by SVD. (Δ, pieces)."""
    tvs = task_vectors.double()
    n_tasks, rows, cols = tvs.shape
    k = min(rows, cols)
    r = k // n_tasks
    u, s, v = torch.zeros(rows, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), torch.zeros(cols, k, dtype=torch.float64)
    for t in range(n_tasks):
        u_t, s_t, vh_t = torch.linalg.svd(tvs[t], full_matrices=False)
        u[:, t * r : (t + 1) * r], s[t * r : (t + 1) * r], v[:, t * r : (t + 1) * r] = u_t[:, :r], s_t[:r], vh_t[:r].T
    left_u, _, right_u = torch.linalg.svd(u, full_matrices=False)
    left_v, _, right_v = torch.linalg.svd(v, full_matrices=False)
    u_orth, v_orth = left_u @ right_u, left_v @ right_v
    pieces = [u_orth[:, t * r : (t + 1) * r] @ torch.diag(s[t * r : (t + 1) * r]) @ v_orth[:, t * r : (t + 1) * r].T for t in range(n_tasks)]
    return u_orth @ torch.diag(s) @ v_orth.T, pieces


def oracle_iso_c(task_vectors: torch.Tensor) -> torch.Tensor:
    total = task_vectors.double().sum(dim=0)
    return torch.linalg.svdvals(total).mean() * oracle_polar(total)


def oracle_iso_cts(task_vectors: torch.Tensor, common: int, per_task: int) -> torch.Tensor:
    tvs = task_vectors.double()
    u, s, vh = torch.linalg.svd(tvs.sum(dim=0), full_matrices=False)
    columns, values, rows = [u[:, :common]], [s[:common]], [vh[:common]]
    projector = u[:, :common] @ u[:, :common].T
    for tau in tvs:
        u_t, s_t, vh_t = torch.linalg.svd(tau - projector @ tau, full_matrices=False)
        columns.append(u_t[:, :per_task])
        values.append(s_t[:per_task])
        rows.append(vh_t[:per_task])
    return torch.cat(values).mean() * oracle_polar(torch.cat(columns, dim=1)) @ oracle_polar(torch.cat(rows).T).T


def random_task_vectors(n_tasks: int, rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(n_tasks, rows, cols, generator=torch.Generator().manual_seed(seed))


SHAPES = [(3, 12, 12), (3, 14, 9), (3, 9, 14), (4, 20, 6), (2, 7, 30), (5, 16, 16)]  # tall, wide, k divisible by T or not


def close(ours: torch.Tensor, oracle: torch.Tensor) -> bool:
    return (ours.double() - oracle).abs().max().item() <= 1e-4 * oracle.abs().max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tsv_matches_oracle_and_its_pieces_sum_to_the_merge(shape):
    task_vectors = random_task_vectors(*shape, seed=sum(shape))
    merged, pieces = oracle_tsv(task_vectors)
    factors = task_singular_vectors(task_vectors)
    assert factors.rank_per_task == min(shape[1:]) // shape[0]
    assert close(tsv_merge(task_vectors), merged)
    for task, piece in enumerate(pieces):
        assert close(factors.of_task(task), piece)


# a rank up to a sixth of n comes from syevr's top eigenpairs, a larger one from all of them
@pytest.mark.parametrize("shape, rank", [((3, 30, 12), 4), ((3, 12, 30), 4), ((2, 16, 16), 5), ((2, 40, 24), 3), ((2, 24, 40), 4)], ids=str)
def test_top_singular_triplets_and_thin_svd_match_a_float64_svd(shape, rank):
    matrices = random_task_vectors(*shape, seed=sum(shape) + 3)
    expected_u, expected_s, expected_vh = torch.linalg.svd(matrices.double(), full_matrices=False)
    u, s, vh = top_singular_triplets(matrices, rank)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    assert (u.shape, s.shape, vh.shape) == ((shape[0], shape[1], rank), (shape[0], rank), (shape[0], rank, shape[2]))
    assert torch.allclose(s.double(), expected_s[:, :rank], rtol=1e-6, atol=0)
    # each pair of singular vectors up to its sign: the rank-1 pieces u_i σ_i v_iᵀ are unique
    for task in range(shape[0]):
        for i in range(rank):
            piece = torch.outer(u[task, :, i], vh[task, i]).double()
            assert (piece - torch.outer(expected_u[task, :, i], expected_vh[task, i])).abs().max() < 1e-5
    thin = thin_svd(matrices)
    assert torch.allclose(thin[1].double(), expected_s, rtol=1e-5, atol=1e-6)
    assert torch.allclose((thin[0] * thin[1].unsqueeze(1)) @ thin[2], matrices, atol=1e-5)


def test_top_singular_triplets_of_rank_deficient_matrices_come_from_lapack():
    """σ_r at rounding level (a rank-2 matrix asked for 3 triplets, and a zero one): the Gram
    matrix cannot give the r-th pair, so those matrices are decomposed by gesdd, not NaN."""
    generator = torch.Generator().manual_seed(4)
    low_rank = torch.randn(12, 2, generator=generator) @ torch.randn(2, 9, generator=generator)
    matrices = torch.stack([low_rank, torch.zeros(12, 9), torch.randn(12, 9, generator=generator)])
    u, s, vh = top_singular_triplets(matrices, 3)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    expected_u, expected_s, expected_vh = torch.linalg.svd(matrices, full_matrices=False)
    assert torch.equal(u[:2], expected_u[:2, :, :3]) and torch.equal(s[:2], expected_s[:2, :3]) and torch.equal(vh[:2], expected_vh[:2, :3])
    assert torch.allclose(s[2], expected_s[2, :3], rtol=1e-5)


@pytest.mark.parametrize("shape", [(12, 30), (16, 16), (30, 12)], ids=str)
def test_leading_subspace_matches_a_float64_svd_and_completes_the_basis(shape):
    matrix = random_task_vectors(1, *shape, seed=sum(shape))[0]
    expected_u, expected_s, expected_vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    u, s, vh, complement = leading_subspace(matrix, 5)
    assert torch.allclose(s.double(), expected_s[:5], rtol=1e-6, atol=0)
    assert ((u * s) @ vh - (expected_u[:, :5] * expected_s[:5]) @ expected_vh[:5]).abs().max() < 1e-5
    if shape[0] > shape[1]:
        assert complement is None
        return
    basis = torch.cat([u, complement], dim=1).double()  # [m, m], orthonormal: the projectors are exact
    assert complement.shape == (shape[0], shape[0] - 5)
    assert (basis.T @ basis - torch.eye(shape[0], dtype=torch.float64)).abs().max() < 1e-6
    low_rank = random_task_vectors(1, shape[0], 2, seed=1)[0] @ random_task_vectors(1, 2, shape[1], seed=2)[0]
    u, s, vh, complement = leading_subspace(low_rank, 3)  # σ_3 at rounding level: from gesdd, of Aᵀ = V S Uᵀ
    _, expected_s, expected_uh = torch.linalg.svd(low_rank.T, full_matrices=False)
    assert torch.equal(u, expected_uh[:3].T) and torch.equal(complement, expected_uh[3:].T) and torch.equal(s, expected_s[:3])


def test_tsv_of_more_tasks_than_the_rank_is_zero():
    task_vectors = random_task_vectors(5, 4, 9, seed=1)  # k = 4 < T = 5: ⌊k/T⌋ = 0
    assert torch.equal(tsv_merge(task_vectors), torch.zeros(4, 9))
    assert torch.equal(task_singular_vectors(task_vectors).of_task(2), torch.zeros(4, 9))


def test_polar_factor_is_orthonormal_and_matches_the_oracle():
    """Of an [11, 4] matrix (and its transpose) from the float64 Gram matrix, of a [5, 4] one, and
    of a rank-deficient [12, 4] one (σ_min at rounding level) from gesdd."""
    generator = torch.Generator().manual_seed(2)
    tall, near_square = torch.randn(11, 4, generator=generator), torch.randn(5, 4, generator=generator)
    rank_deficient = torch.randn(12, 3, generator=generator) @ torch.randn(3, 4, generator=generator)
    for matrix in (tall, tall.T, near_square, near_square.T):
        polar, singular = polar_decomposition(matrix)
        assert torch.equal(polar, polar_factor(matrix))
        small = min(matrix.shape)
        gram = polar.T @ polar if matrix.shape[0] > matrix.shape[1] else polar @ polar.T
        assert (gram - torch.eye(small)).abs().max() < 1e-5
        assert close(polar, oracle_polar(matrix.double()))
        assert torch.allclose(singular.sort().values.double(), torch.linalg.svdvals(matrix.double()).sort().values, rtol=1e-6)
    expected_u, _, expected_vh = torch.linalg.svd(rank_deficient, full_matrices=False)
    assert torch.equal(polar_factor(rank_deficient), expected_u @ expected_vh)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_iso_c_matches_oracle_with_a_flat_spectrum(shape):
    task_vectors = random_task_vectors(*shape, seed=sum(shape) + 1)
    merged = iso_c_merge(task_vectors)
    assert close(merged, oracle_iso_c(task_vectors))
    spectrum = torch.linalg.svdvals(merged)
    assert (spectrum - torch.linalg.svdvals(task_vectors.sum(dim=0)).mean()).abs().max() < 1e-4 * spectrum.max()


@pytest.mark.parametrize(
    ("rank", "n_tasks", "fraction", "expected"),
    [
        (16, 4, 0.8, (12, 1)),  # ⌊12.8⌋ = 12 common, 4 left: 1 each
        (768, 8, 0.8, (616, 19)),  # 154 left, 154/8 = 19.25 rounds to 19: c = 768 − 152
        (8, 4, 0.8, (8, 0)),  # 2 left, 0.5 rounds half to even: 0, all common
        (10, 4, 0.4, (2, 2)),  # 6 left, 1.5 rounds to 2: c = 10 − 8
        (10, 4, 0.5, (6, 1)),
        (3, 2, 0.1, (1, 1)),  # 1.5 would round to 2, 4 > 3 directions: rounded down instead
        (20, 3, 1.0, (20, 0)),  # everything common: Iso-C
    ],
)
def test_iso_cts_dimensions_follow_the_reference_rounding(rank, n_tasks, fraction, expected):
    common, per_task = iso_cts_dimensions(rank, n_tasks, fraction)
    assert (common, per_task) == expected and common + n_tasks * per_task == rank


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.2])
def test_iso_cts_matches_oracle(shape, fraction):
    task_vectors = random_task_vectors(*shape, seed=sum(shape) + 2)
    common, per_task = iso_cts_dimensions(min(shape[1:]), shape[0], fraction)
    assert close(iso_cts_merge(task_vectors, fraction), oracle_iso_cts(task_vectors, common, per_task))


def test_iso_cts_with_everything_common_is_iso_c():
    task_vectors = random_task_vectors(3, 10, 7, seed=3)
    assert (iso_cts_merge(task_vectors, 1.0) - iso_c_merge(task_vectors)).abs().max() < 1e-5


# ---------------------------------------------------------------- the methods


def small_pool(n_tasks: int = 3, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"_pretrained_": data_free_fixture_module(), **{f"task{t}": data_free_fixture_module() for t in range(n_tasks)}}


def task_vectors_of(pool, key):
    theta0 = pool["_pretrained_"].state_dict()[key]
    return theta0, torch.stack([pool[name].state_dict()[key] - theta0 for name in pool if name != "_pretrained_"])


@pytest.mark.parametrize(
    ("method", "merge_matrix", "scale"),
    [
        (TaskSingularVectorMerging(alpha=0.7, exclude_keys=["2.weight"]), tsv_merge, 0.7),
        (ISO_C_Merge(scaling_factor=1.5, exclude_keys=["2.weight"]), iso_c_merge, 1.5),
        (ISO_CTS_Merge(scaling_factor=0.5, common_space_fraction=0.5, exclude_keys=["2.weight"]), lambda tvs: iso_cts_merge(tvs, 0.5), 0.5),
    ],
    ids=["tsv", "iso_c", "iso_cts"],
)
def test_matrices_are_decomposed_and_the_rest_averaged(method, merge_matrix, scale):
    pool = small_pool()
    merged = method.run(pool).state_dict()
    for key, value in merged.items():
        theta0, task_vectors = task_vectors_of(pool, key)
        delta = merge_matrix(task_vectors) if task_vectors.dim() == 3 and key != "2.weight" else task_vectors.mean(dim=0)
        assert (value - (theta0 + scale * delta)).abs().max() < 1e-6, key


def test_an_alpha_list_scales_each_task_vector_before_the_svds():
    pool = small_pool()
    weights = [0.5, 1.0, 2.0]
    merged = TaskSingularVectorMerging(alpha=weights).run(pool).state_dict()
    for key, value in merged.items():
        theta0, task_vectors = task_vectors_of(pool, key)
        scaled = task_vectors * torch.tensor(weights).view(-1, *[1] * (task_vectors.dim() - 1))
        delta = tsv_merge(scaled) if scaled.dim() == 3 else scaled.mean(dim=0)
        assert (value - (theta0 + delta)).abs().max() < 1e-6, key
    uniform = TaskSingularVectorMerging(alpha=[0.6] * 3).run(pool).state_dict()
    scalar = TaskSingularVectorMerging(alpha=0.6).run(pool).state_dict()
    assert all((uniform[key] - scalar[key]).abs().max() < 1e-5 for key in scalar)


def test_per_task_models_are_theta0_plus_alpha_times_each_tasks_piece():
    pool = small_pool()
    method = TaskSingularVectorMerging(alpha=0.5, return_single_task_models=True)
    assert method.makes_per_task_models and not TaskSingularVectorMerging().makes_per_task_models
    models = method.run(pool)
    merged = TaskSingularVectorMerging(alpha=0.5).run(pool).state_dict()
    assert list(models) == ["task0", "task1", "task2"]
    pieces_sum = {key: torch.zeros_like(value) for key, value in merged.items()}
    for task, name in enumerate(models):
        state_dict = models[name].state_dict()
        for key, value in state_dict.items():
            theta0, task_vectors = task_vectors_of(pool, key)
            piece = task_singular_vectors(task_vectors).of_task(task) if task_vectors.dim() == 3 else task_vectors.mean(dim=0)
            assert (value - (theta0 + 0.5 * piece)).abs().max() < 1e-6, (name, key)
            pieces_sum[key] += value - theta0
    for key in ("0.weight", "2.weight", "3.weight"):  # Σ_t pieces = Δ
        assert (pieces_sum[key] - (merged[key] - pool["_pretrained_"].state_dict()[key])).abs().max() < 1e-6
    assert pool["_pretrained_"].state_dict()["0.weight"].data_ptr() != models["task0"].state_dict()["0.weight"].data_ptr()


@pytest.mark.parametrize("method", [TaskSingularVectorMerging(), ISO_C_Merge(), ISO_CTS_Merge()], ids=["tsv", "iso_c", "iso_cts"])
def test_half_precision_models_are_merged_in_float32_and_cast_back(method):
    pool = {name: model.to(torch.bfloat16) for name, model in small_pool().items()}
    as_float32 = {name: model.float() for name, model in small_pool().items()}
    for model in as_float32.values():  # the same bfloat16 values, widened
        model.load_state_dict({key: value.to(torch.bfloat16).float() for key, value in model.state_dict().items()})
    merged, expected = method.run(pool).state_dict(), method.run(as_float32).state_dict()
    assert all(merged[key].dtype == torch.bfloat16 and torch.equal(merged[key], expected[key].to(torch.bfloat16)) for key in expected)


@pytest.mark.parametrize(
    ("path", "cls", "keys"),
    [
        ("task_singular_vector/TaskSingularVectorMerging", TaskSingularVectorMerging, {"alpha": 1.0, "exclude_keys": [], "return_single_task_models": False}),
        ("isotropic_merging/iso_c", IsotropicMergingInCommonSubspace, {"scaling_factor": 1.0, "exclude_keys": []}),
        ("isotropic_merging/iso_cts", IsotropicMergingInCommonAndTaskSubspace, {"scaling_factor": 1.0, "common_space_fraction": 0.8, "exclude_keys": []}),
    ],
)
def test_configs_build_the_method_with_fusion_bench_defaults(path, cls, keys):
    method = instantiate_checked(OmegaConf.load(ROOT / "config" / "method" / f"{path}.yaml"), "method")
    assert type(method) is cls and {key: getattr(method, key) for key in keys} == keys


def test_an_alpha_list_from_a_config_is_accepted():
    config = OmegaConf.create({"_target_": "fusion_bench.method.TaskSingularVectorMerging", "alpha": [0.5, 1.0, 2.0]})
    assert instantiate_checked(config, "method").alpha == [0.5, 1.0, 2.0]


# ---------------------------------------------------------------- bad input


def refused(call, *names: str) -> str:
    with pytest.raises(InputError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in names), message
    return message


@pytest.mark.parametrize("alpha", ["1", float("nan"), float("inf"), True, [], [1.0, float("nan")], [1, "2"], {"a": 1}])
def test_a_bad_alpha_is_refused(alpha):
    refused(lambda: TaskSingularVectorMerging(alpha=alpha), "alpha")


def test_an_alpha_list_of_the_wrong_length_is_refused_before_any_svd(monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("an SVD ran before the check")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    refused(lambda: TaskSingularVectorMerging(alpha=[1.0, 0.5]).run(small_pool(3)), "alpha", "3 task models")


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), True, "0.8"])
def test_a_common_space_fraction_outside_0_1_is_refused(fraction):
    refused(lambda: ISO_CTS_Merge(common_space_fraction=fraction), "common_space_fraction")


@pytest.mark.parametrize("cls", [ISO_C_Merge, ISO_CTS_Merge])
@pytest.mark.parametrize("scaling_factor", [float("nan"), float("inf"), "1.0", None])
def test_a_bad_scaling_factor_is_refused(cls, scaling_factor):
    refused(lambda: cls(scaling_factor=scaling_factor), "scaling_factor")


@pytest.mark.parametrize("cls", [TaskSingularVectorMerging, ISO_C_Merge, ISO_CTS_Merge])
def test_bad_exclude_keys_are_refused(cls):
    refused(lambda: cls(exclude_keys="0.weight"), "exclude_keys", "0.weight")
    refused(lambda: cls(exclude_keys=["0.weight", "head.weight"]).run(small_pool()), "exclude_keys", "head.weight")


@pytest.mark.parametrize("cls", [TaskSingularVectorMerging, ISO_C_Merge, ISO_CTS_Merge])
def test_a_pool_without_matrices_to_decompose_is_refused_naming_simple_average(cls):
    torch.manual_seed(0)
    norms = {name: nn.Sequential(nn.LayerNorm(8)) for name in ("_pretrained_", "task0", "task1")}
    refused(lambda: cls().run(norms), "2-D", "simple_average")
    everything = ["0.weight", "2.weight", "3.weight"]
    refused(lambda: cls(exclude_keys=everything).run(small_pool()), "exclude_keys", "simple_average")


def test_a_non_boolean_return_single_task_models_is_refused():
    refused(lambda: TaskSingularVectorMerging(return_single_task_models="yes"), "return_single_task_models")
