"""TALL masks (one model per task) and Consensus merging (TA, TIES): the streaming code against
dense oracles written from the paper's equations, the per-task models through the program, and
every bad input."""

import json
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel

from fusion_bench.merging.tall_masks import PackedMasks, consensus_mask, tall_masks
from fusion_bench.method import ConsensusTaskArithmetic, ConsensusTiesMerging, TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench.method.tall_mask import TallMaskTaskArithmeticAlgorithm
from fusion_bench.models.per_task_models import PerTaskModels
from fusion_bench.programs import FusionProgram
from fusion_bench.reporting.report import meta
from fusion_bench.taskpool.base import BaseTaskPool
from fusion_bench.utils.errors import InputError
from tests import oracles
from tests.conftest import TASKS, run_cli, write_pool_config

CONFIG = Path(__file__).resolve().parents[1] / "config" / "method"


def architecture() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 16), nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 8, bias=False))


def module_pool(tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """θ₀ and `tasks` fine-tuned copies of different strengths; each task leaves about 30% of the
    entries exactly unchanged, so some entries no task changed (exact ties of the mask rule)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pretrained = architecture()
    models = {"_pretrained_": pretrained.to(dtype)}
    for task in range(tasks):
        state = {}
        for key, value in pretrained.state_dict().items():
            delta = 0.01 * (task + 1) * torch.randn(value.shape, generator=generator)
            delta[torch.rand(value.shape, generator=generator) < 0.3] = 0
            state[key] = value.float() + delta
        model = architecture()
        model.load_state_dict(state)
        models[f"task{task}"] = model.to(dtype)
    return models


# --- dense oracles: every model flattened into one vector, the equations written out ---------------------


def float_keys(model: nn.Module) -> list[str]:
    return [key for key, value in model.state_dict().items() if value.is_floating_point()]


def flatten(state_dict, keys) -> torch.Tensor:
    return torch.cat([state_dict[key].reshape(-1).float() for key in keys])


def split(vector: torch.Tensor, like, keys) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for key in keys:
        out[key] = vector[start : start + like[key].numel()].view(like[key].shape)
        start += like[key].numel()
    return out


def dense(models, keys):
    """θ₀ [n] and τ [T, n], flat."""
    theta0 = flatten(models["_pretrained_"].state_dict(), keys)
    tasks = [name for name in models if name != "_pretrained_"]
    return theta0, torch.stack([flatten(models[name].state_dict(), keys) for name in tasks]) - theta0


def dense_masks(tau, multi_task_vector, lambdas):
    """m_t = 1[|τ_t| ≥ λ_t·|τ_MTL − τ_t|], the paper's equation."""
    return tau.abs() >= torch.tensor(lambdas, dtype=torch.float32).view(-1, 1) * (multi_task_vector - tau).abs()


def oracle_tall_models(models, keys, lambdas):
    theta0, tau = dense(models, keys)
    multi_task_vector = tau.sum(dim=0)
    masks = dense_masks(tau, multi_task_vector, lambdas)
    like = models["_pretrained_"].state_dict()
    tasks = [name for name in models if name != "_pretrained_"]
    return {task: split(theta0 + masks[row] * multi_task_vector, like, keys) for row, task in enumerate(tasks)}, masks


def oracle_consensus(theta0, tau, multi_task_vector, lambdas, k, scaling_factor):
    keep = dense_masks(tau, multi_task_vector, lambdas).sum(dim=0) >= k
    return theta0 + scaling_factor * (keep * multi_task_vector)


def oracle_consensus_ta(models, keys, lambdas, k, scaling_factor):
    theta0, tau = dense(models, keys)
    return split(oracle_consensus(theta0, tau, tau.sum(dim=0), lambdas, k, scaling_factor), models["_pretrained_"].state_dict(), keys)


def oracle_consensus_ties(models, keys, lambdas, k, scaling_factor, threshold, merge_func):
    """τ_m from the TIES oracle (zeros as θ₀, the task vectors as models, scaling 1), then the masks."""
    theta0, tau = dense(models, keys)
    like = models["_pretrained_"].state_dict()
    zeros = {key: torch.zeros(like[key].shape) for key in keys}
    task_vectors = [split(row, like, keys) for row in tau]
    ties_vector = flatten(oracles.ties(zeros, task_vectors, keys, scaling_factor=1.0, threshold=threshold, merge_func=merge_func), keys)
    return split(oracle_consensus(theta0, tau, ties_vector, lambdas, k, scaling_factor), like, keys)


def assert_matches(model: nn.Module, expected: dict[str, torch.Tensor], tolerance: float = 1e-6) -> None:
    state = model.state_dict()
    for key, value in expected.items():
        assert (state[key].float() - value).abs().max().item() <= tolerance, key


# --- the math -----------------------------------------------------------------------------------------


def test_mask_rule_is_the_papers_with_ties_kept_and_consensus_counts_tasks():
    tau = torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 0.0, -1.0, 3.0]])
    multi_task_vector = tau.sum(dim=0)  # [2, 0, 1, 3]
    masks = tall_masks(tau, multi_task_vector, torch.tensor([1.0, 0.5]))
    # task 0: 1 ≥ 1·1 (a tie, kept), 0 ≥ 0 (no task changed it), 2 ≥ 1, 0 < 3
    # task 1: 1 ≥ 0.5, 0 ≥ 0, 1 ≥ 0.5·2 (a tie, kept), 3 ≥ 0
    assert masks.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert consensus_mask(masks, 2).tolist() == [True, True, True, False]
    assert consensus_mask(masks, 0).all() and not consensus_mask(masks, 3).any()


def test_packed_masks_give_back_each_tasks_mask():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(11, 50, generator=generator) < 0.4  # 11 tasks: two bytes per entry
    packed = PackedMasks(11)
    for start in range(0, 50, 16):  # stored chunk by chunk, as the streaming pass does
        packed.store("w", 50, slice(start, min(start + 16, 50)), masks[:, start : start + 16])
    for task in range(11):
        assert torch.equal(packed.mask("w", task), masks[task])
        assert packed.density(task) == pytest.approx(masks[task].float().mean().item())
    assert packed.bits["w"].shape == (2, 50) and packed.bits["w"].dtype == torch.uint8


# --- TALL masks: one model per task ------------------------------------------------------------------------


@pytest.mark.parametrize("tasks, tall_mask_lambda", [(3, 0.6), (3, [0.2, 0.5, 1.0]), (9, 0.4), (2, 0.0)])
def test_tall_mask_models_match_the_dense_oracle(tasks, tall_mask_lambda):
    models = module_pool(tasks)
    before = {name: {k: v.clone() for k, v in model.state_dict().items()} for name, model in models.items()}
    lambdas = tall_mask_lambda if isinstance(tall_mask_lambda, list) else [tall_mask_lambda] * tasks
    keys = float_keys(models["_pretrained_"])
    expected, masks = oracle_tall_models(models, keys, lambdas)
    if tall_mask_lambda:  # the masks pick differently per task: the test can tell the models apart
        assert 0.05 < masks.float().mean() < 0.95 and all(not torch.equal(masks[0], row) for row in masks[1:])
    else:  # λ = 0 keeps every entry: each model is θ₀ + Σ_t τ_t
        assert masks.all()
    method = TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=tall_mask_lambda)
    assert method.makes_per_task_models
    per_task = method.run(models)
    assert isinstance(per_task, PerTaskModels) and list(per_task) == [f"task{i}" for i in range(tasks)]
    for task in per_task:
        assert_matches(per_task[task], expected[task])
    for name, model in models.items():  # the pool's models are not modified
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before[name].items())


# --- Consensus merging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("consensus_k, tall_mask_lambda", [(1, 0.6), (2, 0.6), (3, 0.3), (2, [0.2, 0.6, 1.5])])
def test_consensus_task_arithmetic_matches_the_dense_oracle(consensus_k, tall_mask_lambda):
    models = module_pool(3)
    keys = float_keys(models["_pretrained_"])
    lambdas = tall_mask_lambda if isinstance(tall_mask_lambda, list) else [tall_mask_lambda] * 3
    merged = ConsensusTaskArithmetic(consensus_k=consensus_k, tall_mask_lambda=tall_mask_lambda, scaling_factor=0.4).run(models)
    assert_matches(merged, oracle_consensus_ta(models, keys, lambdas, consensus_k, 0.4))


@pytest.mark.parametrize(
    "consensus_k, merge_func, threshold, remove_keys",
    [(2, "sum", 20, []), (1, "mean", 50, []), (3, "max", 10, []), (2, "sum", 30, ["3.weight"])],
)
def test_consensus_ties_matches_the_ties_oracle_then_the_dense_mask(consensus_k, merge_func, threshold, remove_keys):
    models = module_pool(3)
    keys = [key for key in float_keys(models["_pretrained_"]) if key not in remove_keys]
    method = ConsensusTiesMerging(consensus_k=consensus_k, tall_mask_lambda=0.5, scaling_factor=0.7, threshold=threshold, remove_keys=remove_keys, merge_func=merge_func)
    merged = method.run(models)
    assert_matches(merged, oracle_consensus_ties(models, keys, [0.5] * 3, consensus_k, 0.7, threshold, merge_func))
    for key in remove_keys:  # left at θ₀
        assert torch.equal(merged.state_dict()[key], models["_pretrained_"].state_dict()[key])


def test_consensus_ties_on_bfloat16_models_masks_the_unrounded_ties_vector():
    models = module_pool(3, dtype=torch.bfloat16)
    keys = float_keys(models["_pretrained_"])
    merged = ConsensusTiesMerging(consensus_k=2, tall_mask_lambda=0.6, scaling_factor=0.5).run(models)
    expected = oracle_consensus_ties(models, keys, [0.6] * 3, 2, 0.5, 20, "sum")
    for key in keys:
        assert merged.state_dict()[key].dtype == torch.bfloat16
        assert torch.equal(merged.state_dict()[key], expected[key].to(torch.bfloat16)), key


def test_consensus_k_zero_is_plain_merging_and_above_the_task_count_is_the_pretrained_model(caplog):
    models = module_pool(3)
    pairs = [
        (ConsensusTaskArithmetic(consensus_k=0, scaling_factor=0.3), TaskArithmeticAlgorithm(scaling_factor=0.3)),
        (ConsensusTiesMerging(consensus_k=0, scaling_factor=0.3, threshold=20), TiesMergingAlgorithm(scaling_factor=0.3, threshold=20)),
    ]
    for consensus, plain in pairs:
        merged, expected = consensus.run(models).state_dict(), plain.run(models).state_dict()
        assert all(torch.equal(merged[key], expected[key]) for key in expected)
    pretrained = models["_pretrained_"].state_dict()
    for method in (ConsensusTaskArithmetic(consensus_k=4), ConsensusTiesMerging(consensus_k=4)):
        with caplog.at_level(logging.WARNING):
            merged = method.run(models).state_dict()
        assert all(torch.equal(merged[key], pretrained[key]) for key in pretrained)
        assert "consensus_k=4 exceeds the 3 tasks" in caplog.text


# --- per-task models through the program ------------------------------------------------------------------

SCORED: dict[str, dict[str, torch.Tensor]] = {}
EVENTS: list[str] = []


class RecordingTaskPool(BaseTaskPool):
    """Scores nothing real: records the weights of the model each task was scored with."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)

    def task_names(self) -> list[str]:
        return self.tasks

    def evaluate_tasks(self, model, fabric=None, tasks=None):
        for task in tasks or self.tasks:
            SCORED[task] = {key: value.clone() for key, value in model.state_dict().items()}
        return {task: {"accuracy": 0.5} for task in tasks or self.tasks}


class RecordingTallMask(TallMaskTaskArithmeticAlgorithm):
    def run(self, modelpool):
        EVENTS.append("run")
        return super().run(modelpool)


def tall_program(bert_pool_dir, tasks, **settings) -> FusionProgram:
    models = {"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(bert_pool_dir / task) for task in TASKS}}
    return FusionProgram(
        method=OmegaConf.create({"_target_": f"{__name__}.RecordingTallMask", "tall_mask_lambda": 0.5}),
        modelpool=OmegaConf.create({"_target_": "fusion_bench.modelpool.AutoModelPool", "models": models}),
        taskpool=OmegaConf.create({"_target_": f"{__name__}.RecordingTaskPool", "tasks": list(tasks)}),
        **settings,
    )


def test_each_task_is_scored_and_saved_with_its_own_model(bert_pool_dir, tmp_path):
    SCORED.clear()
    report = tall_program(bert_pool_dir, TASKS, merged_model_save_path=str(tmp_path / "merged"), report_save_path=str(tmp_path / "report.json")).run()
    models = {"_pretrained_": AutoModel.from_pretrained(bert_pool_dir / "pretrained"), **{task: AutoModel.from_pretrained(bert_pool_dir / task) for task in TASKS}}
    keys = float_keys(models["_pretrained_"])
    expected, _ = oracle_tall_models(models, keys, [0.5] * len(TASKS))
    assert list(SCORED) == list(TASKS)
    for task in TASKS:
        scored = {key: SCORED[task][key].float() for key in keys}
        assert all((scored[key] - expected[task][key]).abs().max() <= 1e-6 for key in keys), task
        # each model's weights identify its task: no other task's expected model matches it
        assert all(any(not torch.allclose(scored[key], expected[other][key]) for key in keys) for other in TASKS if other != task)
        saved = AutoModel.from_pretrained(tmp_path / "merged" / task).state_dict()
        assert set(saved) == set(SCORED[task]) and all(torch.equal(saved[key], SCORED[task][key]) for key in saved), task
    assert meta(report)["per_task_models"] == list(TASKS)
    assert json.loads((tmp_path / "report.json").read_text())["_fusion_bench_"]["per_task_models"] == list(TASKS)
    assert set(report) >= set(TASKS)


def test_a_task_without_a_model_fails_in_one_line_before_merging(bert_pool_dir, tmp_path):
    EVENTS.clear()
    with pytest.raises(InputError) as error:
        tall_program(bert_pool_dir, [*TASKS, "delta"], merged_model_save_path=str(tmp_path / "merged")).run()
    assert "has none for task 'delta'" in str(error.value) and "\n" not in str(error.value)
    assert EVENTS == [] and not (tmp_path / "merged").exists()


def seeded_model(task: int) -> nn.Module:
    """The same model on every call: θ₀ for task 0, a fine-tuned copy otherwise."""
    torch.manual_seed(0)
    model = architecture()
    if task:
        generator = torch.Generator().manual_seed(task)
        for parameter in model.parameters():
            parameter.data += 0.05 * torch.randn(parameter.shape, generator=generator)
    return model


def test_per_task_models_without_save_pretrained_are_saved_each_in_its_folder(tmp_path):
    SCORED.clear()
    models = {name: {"_target_": f"{__name__}.seeded_model", "task": task} for task, name in enumerate(["_pretrained_", "task1", "task2"])}
    FusionProgram(
        method=OmegaConf.create({"_target_": "fusion_bench.method.tall_mask.TallMaskTaskArithmeticAlgorithm"}),
        modelpool=OmegaConf.create({"_target_": "fusion_bench.modelpool.BaseModelPool", "models": models}),
        taskpool=OmegaConf.create({"_target_": f"{__name__}.RecordingTaskPool", "tasks": ["task1", "task2"]}),
        merged_model_save_path=str(tmp_path / "merged"),
    ).run()
    for task in ("task1", "task2"):
        saved = load_file(tmp_path / "merged" / task / "model.safetensors")
        assert all(torch.equal(saved[key], SCORED[task][key]) for key in SCORED[task])


def test_the_cli_saves_one_model_per_task(tmp_path, bert_pool_dir):
    write_pool_config(tmp_path / "config", bert_pool_dir)
    saved = tmp_path / "merged"
    run_cli("--config-dir", str(tmp_path / "config"), "modelpool=tiny_bert", "taskpool=dummy", "method=tall_mask/task_arithmetic",
            f"hydra.run.dir={tmp_path / 'run'}", f"merged_model_save_path={saved}", cwd=tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert meta(report)["per_task_models"] == list(TASKS) and sorted(p.name for p in saved.iterdir() if p.is_dir()) == sorted(TASKS)
    assert meta(report)["config"]["method"] == {"_target_": "fusion_bench.method.tall_mask.TallMaskTaskArithmeticAlgorithm", "tall_mask_lambda": 0.6, "debug": 0, "verbose": 0}


@pytest.mark.parametrize(
    "path, cls, keys",
    [
        ("tall_mask/task_arithmetic", TallMaskTaskArithmeticAlgorithm, {"tall_mask_lambda": 0.6, "debug": 0, "verbose": 0}),
        ("consensus/task_arithmetic", ConsensusTaskArithmetic, {"consensus_k": 2, "tall_mask_lambda": 0.6, "scaling_factor": 0.3}),
        ("consensus/ties_merging", ConsensusTiesMerging, {"consensus_k": 2, "tall_mask_lambda": 0.6, "scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "sum"}),
    ],
)
def test_configs_build_the_methods_with_fusionbench_keys_and_defaults(path, cls, keys):
    config = OmegaConf.load(CONFIG / f"{path}.yaml")
    assert {key: value for key, value in OmegaConf.to_container(config).items() if key != "_target_"} == keys
    method = instantiate(config)
    assert type(method) is cls and all(getattr(method, key) == value for key, value in keys.items())
    default = cls()
    assert all(getattr(default, key) == value for key, value in keys.items())
    assert cls(tall_mask_lambda=OmegaConf.create([0.3, 0.4])).tall_mask_lambda == [0.3, 0.4]  # a list from a config


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=-0.1), "tall_mask_lambda=-0.1 must be a finite number ≥ 0"),
        (lambda: TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=float("nan")), "tall_mask_lambda=nan must be a finite number ≥ 0"),
        (lambda: TallMaskTaskArithmeticAlgorithm(tall_mask_lambda="0.6"), "tall_mask_lambda='0.6' must be a finite number"),
        (lambda: TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=True), "tall_mask_lambda=True must be a finite number"),
        (lambda: TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=[0.5, float("inf")]), "tall_mask_lambda lists inf, which is not a finite number ≥ 0"),
        (lambda: TallMaskTaskArithmeticAlgorithm(verbose="loud"), "verbose='loud' must be an integer"),
        (lambda: ConsensusTaskArithmetic(tall_mask_lambda=[0.5, -1]), "tall_mask_lambda lists -1, which is not a finite number ≥ 0"),
        (lambda: ConsensusTaskArithmetic(consensus_k=-1), "consensus_k=-1 must be an integer ≥ 0"),
        (lambda: ConsensusTaskArithmetic(consensus_k=1.5), "consensus_k=1.5 must be an integer ≥ 0"),
        (lambda: ConsensusTiesMerging(consensus_k=True), "consensus_k=True must be an integer ≥ 0"),
        (lambda: ConsensusTaskArithmetic(scaling_factor=float("inf")), "scaling_factor=inf must be a finite number"),
        (lambda: ConsensusTiesMerging(scaling_factor="a"), "scaling_factor='a' must be a finite number"),
        (lambda: ConsensusTiesMerging(threshold=0), "threshold=0 is out of range"),
        (lambda: ConsensusTiesMerging(threshold="20"), "threshold='20' must be a number"),
        (lambda: ConsensusTiesMerging(merge_func="median"), "merge_func='median' is unknown"),
        (lambda: ConsensusTiesMerging(remove_keys="3.weight"), "remove_keys must be a list of keys"),
        (lambda: ConsensusTiesMerging(tall_mask_lambda=-2), "tall_mask_lambda=-2 must be a finite number ≥ 0"),
    ],
)
def test_bad_settings_fail_in_the_constructor_in_one_line(build, fragment):
    with pytest.raises(InputError) as error:
        build()
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "method, pool_change, fragment",
    [
        (TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=[0.5, 0.6]), None, "tall_mask_lambda lists 2 values, but the pool has 3 task models (task0, task1, task2)"),
        (ConsensusTaskArithmetic(tall_mask_lambda=[0.5] * 4), None, "tall_mask_lambda lists 4 values, but the pool has 3 task models"),
        (ConsensusTiesMerging(tall_mask_lambda=[0.5]), None, "tall_mask_lambda lists 1 values, but the pool has 3 task models"),
        (ConsensusTiesMerging(remove_keys=["9.weight"]), None, "remove_keys names '9.weight', which is not a key"),
        (TallMaskTaskArithmeticAlgorithm(), "drop_pretrained", "needs the base model"),
        (TallMaskTaskArithmeticAlgorithm(), "nan", "model 'task1' has NaN or Inf values in '0.weight'"),
        (ConsensusTaskArithmetic(), "nan", "model 'task1' has NaN or Inf values in '0.weight'"),
        (ConsensusTiesMerging(), "nan", "model 'task1' has NaN or Inf values"),
    ],
)
def test_bad_pools_fail_in_one_line_before_merging(method, pool_change, fragment):
    models = module_pool(3)
    if pool_change == "drop_pretrained":
        del models["_pretrained_"]
    elif pool_change == "nan":
        models["task1"][0].weight.data[2, 3] = float("nan")
    with pytest.raises(InputError) as error:
        method.run(models)
    assert fragment in str(error.value) and "\n" not in str(error.value)
