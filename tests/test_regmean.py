"""RegMean: the closed-form least-squares merge of linear layers, on padding-free Gram matrices
cached across sweeps, from the command line as from Python, equal to FusionBench 0.2.33's merges."""

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn
from transformers import AutoModel, CLIPVisionConfig, CLIPVisionModel

import fusion_bench.method.regmean as regmean_module
from fusion_bench.merging.regmean import reduce_non_diagonal_elements, solve_normal_equations, token_rows
from fusion_bench.method import RegMeanAlgorithm, RegMeanAlgorithmForCLIP
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.modelpool.task_data import Batch, Batches, TaskData
from fusion_bench.reporting.report import meta
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain
from tests.clip_fixtures import CLIP_TASKS
from tests.conftest import TASKS, finetuned_copy, run_cli, tiny_bert
from tests.data_fixtures import TinyTextPool, clip_data_pool

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "reference_regmean.safetensors"


class Net(nn.Module):
    """Two linear layers on [B, L, d] inputs; the mask is taken (and ignored) as a text encoder's."""

    def __init__(self, seed: int, sizes=(5, 6, 3)):
        super().__init__()
        torch.manual_seed(seed)
        self.first, self.second = nn.Linear(sizes[0], sizes[1]), nn.Linear(sizes[1], sizes[2])

    def forward(self, x, attention_mask=None):
        return self.second(torch.tanh(self.first(x)))


class InputsPool(BaseModelPool):
    """Models with fixed train inputs per task: {task: (x [B, L, d], attention_mask [B, L] or None)}."""

    def __init__(self, models, inputs):
        super().__init__(models)
        self.inputs = inputs

    def check_task_data(self, split, what):
        pass

    def task_data(self, task, *, split, num_examples, batch_size, seed=0):
        x, mask = self.inputs[task]
        if num_examples is not None and num_examples > len(x):
            raise InputError(f"asks for {num_examples} of {len(x)}")

        def make(indices):
            return Batch({"x": x[indices], **({} if mask is None else {"attention_mask": mask[indices]})}, torch.zeros(len(indices)))

        return TaskData(task, split, Batches(list(range(len(x))), batch_size, make), nn.Identity(), f"inputs:{task}:{x.sum().item()}:{mask if mask is None else mask.tolist()}")


def net_pool(tasks=3, examples=(4, 6, 5), length=3, mask=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    models = {"_pretrained_": Net(0), **{f"t{i}": Net(i + 1) for i in range(tasks)}}
    inputs = {}
    for i in range(tasks):
        x = torch.randn(examples[i], length, 5, generator=generator)
        masks = (torch.arange(length) < torch.randint(1, length + 1, (examples[i],), generator=generator)[:, None]).long() if mask else None
        inputs[f"t{i}"] = (x, masks)
    return InputsPool(models, inputs)


def layer_inputs(pool, task, layer):
    """The rows (padding left out) that `layer` of model `task` sees on its task's inputs."""
    x, mask = pool.inputs[task]
    model = pool.load_model(task)
    rows = x if layer == "first" else torch.tanh(model.first(x))
    return rows.reshape(-1, rows.shape[-1]) if mask is None else rows[mask.bool()]


def oracle(pool, layer, ratio):
    """Wᵀ = (Σ_t G'_t)⁻¹ Σ_t G'_t W_tᵀ in float64, from the equations."""
    a = b = 0
    for task in pool.model_names:
        x = layer_inputs(pool, task, layer).double()
        gram = x.T @ x / len(x)
        reduced = ratio * gram + (1 - ratio) * torch.diag(gram.diagonal())
        a, b = a + reduced, b + reduced @ getattr(pool.load_model(task), layer).weight.double().T
    return torch.linalg.solve(a, b).T


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path / "cache"))


def test_ratio_one_is_the_least_squares_merge_of_the_stacked_inputs():
    pool = net_pool()
    merged = RegMeanAlgorithm(num_regmean_examples=4, reduce_non_diagonal_ratio=1.0).run(pool)
    for layer in ("first", "second"):
        # argmin_W Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖² / N_t: each task's rows scaled by 1/√N_t, stacked
        rows = [layer_inputs(pool, task, layer).double() for task in pool.model_names]
        scaled = torch.cat([x / math.sqrt(len(x)) for x in rows])
        targets = torch.cat([x @ getattr(pool.load_model(t), layer).weight.double().T / math.sqrt(len(x)) for t, x in zip(pool.model_names, rows)])
        least_squares = torch.linalg.lstsq(scaled, targets).solution.T
        torch.testing.assert_close(getattr(merged, layer).weight.double(), least_squares, atol=1e-5, rtol=1e-5)
        mean_bias = torch.stack([getattr(pool.load_model(t), layer).bias for t in pool.model_names]).mean(0)
        torch.testing.assert_close(getattr(merged, layer).bias, mean_bias)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.95])
def test_reduced_gram_matrices_give_the_closed_form(ratio):
    pool = net_pool(seed=1)
    merged = RegMeanAlgorithm(num_regmean_examples=4, reduce_non_diagonal_ratio=ratio).run(pool)
    for layer in ("first", "second"):
        torch.testing.assert_close(getattr(merged, layer).weight.double(), oracle(pool, layer, ratio), atol=1e-5, rtol=1e-5)


def test_off_diagonals_are_scaled_as_fusionbench_scales_them():
    gram = torch.randn(6, 6)
    reference = gram * (torch.diag(torch.ones(6) - 0.3) + torch.zeros(6, 6).fill_(0.3))  # FusionBench's expression
    torch.testing.assert_close(reduce_non_diagonal_elements(gram, 0.3), reference, rtol=0, atol=1e-7)
    assert torch.equal(reduce_non_diagonal_elements(gram, 0.3).diagonal(), gram.diagonal())


def test_padding_is_left_out_of_the_gram_matrices():
    pool = net_pool(mask=True, seed=2)
    for task, (x, mask) in pool.inputs.items():
        x[mask == 0] = 100.0  # padding that would dominate every Gram matrix
    merged = RegMeanAlgorithm(num_regmean_examples=4, reduce_non_diagonal_ratio=0.9).run(pool)
    for layer in ("first", "second"):
        torch.testing.assert_close(getattr(merged, layer).weight.double(), oracle(pool, layer, 0.9), atol=1e-5, rtol=1e-5)
    unmasked = InputsPool(pool._models, {task: (x, None) for task, (x, _) in pool.inputs.items()})
    assert not torch.allclose(RegMeanAlgorithm(num_regmean_examples=4, reduce_non_diagonal_ratio=0.9).run(unmasked).first.weight, merged.first.weight)
    rows = token_rows(torch.arange(12.0).view(2, 3, 2), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert rows.tolist() == [[0, 1], [2, 3], [6, 7]]


def test_the_gram_matrices_are_computed_once_per_sweep(monkeypatch):
    calls = []
    compute = regmean_module.task_grams
    monkeypatch.setattr(regmean_module, "task_grams", lambda pool, task, *args: calls.append(task) or compute(pool, task, *args))
    pool = net_pool(seed=3)
    first = RegMeanAlgorithm(num_regmean_examples=4, reduce_non_diagonal_ratio=0.95).run(pool)
    second = RegMeanAlgorithm(num_regmean_examples=4, reduce_non_diagonal_ratio=0.5, exclude_param_names_regex=["second"]).run(pool)
    assert calls == ["t0", "t1", "t2"]
    torch.testing.assert_close(second.first.weight.double(), oracle(pool, "first", 0.5), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first.first.weight, second.first.weight)
    with torch.no_grad():
        pool.load_model("t1").first.weight.add_(0.1)  # another model t1: its Grams again, only its
    RegMeanAlgorithm(num_regmean_examples=4).run(pool)
    assert calls == ["t0", "t1", "t2", "t1"]


def test_excluded_parameters_keep_the_pretrained_values():
    pool = net_pool(seed=4)
    merged = RegMeanAlgorithm(num_regmean_examples=4, exclude_param_names_regex=["second\\.", "first.bias"]).run(pool)
    pretrained = pool.load_model("_pretrained_")
    for key in ("second.weight", "second.bias", "first.bias"):
        assert torch.equal(merged.state_dict()[key], pretrained.state_dict()[key])
    torch.testing.assert_close(merged.first.weight.double(), oracle(pool, "first", 0.95), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="'bias', which matches no parameter of '_pretrained_'"):
        RegMeanAlgorithm(num_regmean_examples=4, exclude_param_names_regex=["bias"]).run(pool)  # re.match: from the start


def test_a_singular_system_takes_the_least_squares_solution_nearest_the_mean():
    pool = net_pool(seed=5)
    for x, _ in pool.inputs.values():
        x[..., 2] = 0  # no example activates input 2 of the first layer
    algorithm = RegMeanAlgorithm(num_regmean_examples=4, reduce_non_diagonal_ratio=0.95)
    merged = algorithm.run(pool)
    weights = torch.stack([pool.load_model(t).first.weight for t in pool.model_names])
    assert torch.isfinite(merged.first.weight).all() and algorithm.method_outputs() == {"pseudo_inverse_layers": ["first.weight"]}
    torch.testing.assert_close(merged.first.weight[:, 2], weights.mean(0)[:, 2])  # where the data say nothing: the mean
    kept = [0, 1, 3, 4]
    reduced = InputsPool(pool._models, {t: (x[..., kept], None) for t, (x, _) in pool.inputs.items()})
    for model in reduced._models.values():
        model.first.weight.data = model.first.weight.data[:, kept]
    expected = RegMeanAlgorithm(num_regmean_examples=4, reduce_non_diagonal_ratio=0.95).run(reduced)
    torch.testing.assert_close(merged.first.weight[:, kept], expected.first.weight, atol=1e-5, rtol=1e-5)


def test_too_few_tokens_at_ratio_one_give_the_pseudo_inverse_rule():
    generator = torch.Generator().manual_seed(6)
    gram_sum = sum((x.T @ x / 3) for x in torch.randn(2, 3, 8, generator=generator).double())  # rank 6 of 8
    targets, average = gram_sum @ torch.randn(8, 4, generator=generator).double(), torch.randn(8, 4, generator=generator).double()
    solution, singular = solve_normal_equations(gram_sum.float(), targets.float(), average)
    correction = torch.linalg.lstsq(gram_sum, targets - gram_sum @ average, driver="gelsd").solution  # the minimum-norm one
    assert singular and torch.isfinite(solution).all()
    torch.testing.assert_close(solution, average + correction, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gram_sum @ solution, targets, atol=1e-4, rtol=1e-4)  # still solves the normal equations
    healthy = gram_sum + torch.eye(8, dtype=torch.float64)
    solution, singular = solve_normal_equations(healthy, targets, average)
    assert not singular and torch.allclose(solution, torch.linalg.solve(healthy, targets))


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"reduce_non_diagonal_ratio": 1.5}, "reduce_non_diagonal_ratio=1.5 must be a number in [0, 1]"),
        ({"reduce_non_diagonal_ratio": True}, "reduce_non_diagonal_ratio=True must be a number in [0, 1]"),
        ({"num_regmean_examples": 0}, "num_regmean_examples=0 must be a positive number of examples"),
        ({"weight_transpose": False}, "weight_transpose=False: RegMean merges nn.Linear layers"),
        ({"exclude_param_names_regex": "first"}, "got the string 'first'; write ['first']"),
        ({"exclude_param_names_regex": ["("]}, "'(', which is not a regular expression"),
        ({"dataloader_kwargs": {"batch": 2}}, "dataloader_kwargs has an unknown key 'batch'"),
        ({"seed": "x"}, "seed='x' must be an integer"),
    ],
)
def test_bad_keys_are_refused_in_one_line(keys, message):
    with pytest.raises(InputError) as error:
        RegMeanAlgorithm(**keys)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_pools_without_enough_data_are_refused_before_any_statistics(monkeypatch):
    monkeypatch.setattr(regmean_module, "task_grams", lambda *args: pytest.fail("computed statistics"))
    with pytest.raises(InputError, match="RegMean learns from data, which BaseModelPool does not provide"):
        RegMeanAlgorithm().run({"_pretrained_": Net(0), "a": Net(1)})
    base = tiny_bert(0)
    pool = TinyTextPool({"_pretrained_": base, "alpha": finetuned_copy(base, 1), "beta": finetuned_copy(base, 2)}, examples=12)
    with pytest.raises(InputError, match="asks for 50 train examples of task 'alpha', which has 12"):
        RegMeanAlgorithm(num_regmean_examples=50).run(pool)


def recorded_pool(fixture):
    """FusionBench's tiny CLIP pool as recorded, serving the recorded pixel values."""
    config = json.loads(fixture.metadata()["config"])
    names = sorted({key.split("/")[1] for key in fixture.keys() if key.startswith("input/")})

    def model(name):
        tower = CLIPVisionModel(CLIPVisionConfig(**config))
        prefix = f"input/{name}/vision_model."  # transformers 4.x keys; 5.x's CLIPVisionModel drops the prefix
        tower.load_state_dict({key.removeprefix(prefix): fixture.get_tensor(key) for key in fixture.keys() if key.startswith(prefix)})
        return tower.eval()

    pixels = {task: fixture.get_tensor(f"data/{task}/pixel_values") for task in CLIP_TASKS}
    pool = InputsPool({name: model(name) for name in names}, {})

    def task_data(task, *, split, num_examples, batch_size, seed=0):
        make = lambda indices: Batch({"pixel_values": pixels[task][indices]}, torch.zeros(len(indices)))  # noqa: E731
        return TaskData(task, split, Batches(list(range(len(pixels[task]))), batch_size, make), nn.Identity(), f"recorded:{task}")

    pool.task_data = task_data
    return pool


def reference_cases(method):
    fixture = safe_open(REFERENCE, "pt")
    return fixture, [case for case in json.loads(fixture.metadata()["cases"]) if case["method"] == method]


def test_equals_fusionbench_on_a_tiny_clip_pool():
    fixture, cases = reference_cases("RegMeanAlgorithmForCLIP")
    worst = 0.0
    for case in cases:
        merged = RegMeanAlgorithmForCLIP(num_regmean_examples=int(fixture.metadata()["num_regmean_examples"]), **case["params"]).run(recorded_pool(fixture))
        for key, value in merged.state_dict().items():
            worst = max(worst, (value - fixture.get_tensor(f"output/{case['case']}/vision_model.{key}")).abs().max().item())
    assert len(cases) == 3 and worst < 2e-5  # measured 8.8e-6 (ratio 1: their float32 inverse, our float64 solve)


def test_the_command_saves_what_the_python_api_merges_on_text(tmp_path, bert_pool_dir):
    models = "\n".join(f"    {name}: {bert_pool_dir / name}" for name in ("pretrained", *TASKS)).replace("    pretrained:", "    _pretrained_:")
    (tmp_path / "config" / "modelpool").mkdir(parents=True)
    (tmp_path / "config" / "modelpool" / "tiny_text.yaml").write_text(f"_target_: tests.data_fixtures.TinyTextPool\nexamples: 12\nmodels:\n{models}\n")
    pool = TinyTextPool({"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(bert_pool_dir / task) for task in TASKS}}, examples=12)
    for method in ("regmean/regmean", "regmean_plusplus/regmean_plusplus"):
        run = tmp_path / method.replace("/", "_")
        run_cli(
            "--config-dir", str(tmp_path / "config"), "modelpool=tiny_text", "taskpool=dummy", f"method={method}", "method.num_regmean_examples=8",
            "method.dataloader_kwargs.batch_size=3", f"merged_model_save_path={run / 'merged'}", f"hydra.run.dir={run}", cwd=ROOT,  # tests/ importable
        )  # fmt: skip
        report = json.loads((run / "report.json").read_text())
        config = OmegaConf.merge(OmegaConf.load(ROOT / "config" / "method" / f"{method}.yaml"), {"num_regmean_examples": 8, "dataloader_kwargs": {"batch_size": 3}})
        assert plain(meta(report)["config"]["method"]) == plain(config) and meta(report)["method_outputs"] == {"pseudo_inverse_layers": []}
        expected = instantiate(config).run(pool).state_dict()
        saved = AutoModel.from_pretrained(run / "merged").state_dict()
        assert all(torch.equal(saved[key], value) for key, value in expected.items()), method


def test_the_command_saves_what_the_python_api_merges_on_clip(tmp_path, clip_world):
    towers = "\n".join(f"  {task}: {clip_world / 'towers' / task}" for task in CLIP_TASKS)
    train = "\n".join(f"  {task}:\n    _target_: datasets.load_dataset\n    path: {clip_world / 'data' / task}\n    split: train" for task in CLIP_TASKS)
    (tmp_path / "config" / "modelpool").mkdir(parents=True)
    (tmp_path / "config" / "modelpool" / "clip_data.yaml").write_text(
        f"_target_: fusion_bench.modelpool.CLIPVisionModelPool\n_recursive_: false\nprocessor: {clip_world / 'clip'}\n"
        f"models:\n  _pretrained_: {clip_world / 'clip'}\n{towers}\ntrain_datasets:\n{train}\n"
    )
    for method in ("regmean/clip_regmean", "regmean_plusplus/clip_regmean_plusplus"):
        run = tmp_path / method.replace("/", "_")
        run_cli(
            "--config-dir", str(tmp_path / "config"), "modelpool=clip_data", "taskpool=dummy", f"method={method}", "method.num_regmean_examples=4",
            f"merged_model_save_path={run / 'merged'}", f"hydra.run.dir={run}", cwd=tmp_path,
        )  # fmt: skip
        config = OmegaConf.merge(OmegaConf.load(ROOT / "config" / "method" / f"{method}.yaml"), {"num_regmean_examples": 4})
        expected = instantiate(config).run(clip_data_pool(clip_world)).state_dict()
        saved = CLIPVisionModel.from_pretrained(run / "merged").state_dict()
        assert all(torch.equal(saved[key], value) for key, value in expected.items()), method
