"""AdaMerging, task-wise and layer-wise: the entropy falls, λ's gradient is the finite differences',
given weights merge as θ₀ + Σ λ τ, the learned λ reach the report and the saved file, the
reference's recorded runs are reproduced, and the command runs on a text and a CLIP pool.

The reference's runs are in tests/data/reference_adamerging.safetensors
(scripts/make_reference_adamerging_fixtures.py): 5 steps of FusionBench 0.2.33's CLIP AdaMerging
classes on a tiny CLIP vision pool, each task's test images one batch. One exception, by the
math: attention's key bias k_proj.bias cannot change any output (q·(k + b) shifts every key's
score by the same q·b, which the softmax ignores), so its λ's gradient is float rounding noise in
both implementations, which Adam's normalisation turns into steps of up to lr; those λ (and
tensors) are left out of the comparison.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file
from torch.func import functional_call
from transformers import AutoModel, CLIPVisionConfig, CLIPVisionModel

from fusion_bench.merging.adamerging import entropy_loss, loss_and_gradient, stack_task_vectors
from fusion_bench.method import (
    CLIPLayerWiseAdaMergingAlgorithm,
    CLIPTaskWiseAdaMergingAlgorithm,
    LayerWiseAdaMergingAlgorithm,
    TaskArithmeticAlgorithm,
    TaskWiseAdaMergingAlgorithm,
)
from fusion_bench.method.adamerging import clip_adamerging
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.modelpool.task_data import Batch, Batches, TaskData
from fusion_bench.models.task_heads import CLIPZeroShotHead
from fusion_bench.reporting.report import meta
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import instantiate_checked
from tests.clip_fixtures import CLIP_TASKS
from tests.conftest import TASKS, finetuned_copy, run_cli, tiny_bert, write_pool_config
from tests.data_fixtures import TinyTextPool

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "reference_adamerging.safetensors"
QUIET = dict(num_workers=0)


def text_models(scale: float = 0.2) -> dict:
    base = tiny_bert(0).eval()
    return {"_pretrained_": base, **{task: finetuned_copy(base, i + 1, scale=scale).eval() for i, task in enumerate(TASKS)}}


def summed_entropy(model, pool: TinyTextPool) -> float:
    with torch.no_grad():
        return sum(
            entropy_loss(data.logits(model, batch)).item()
            for data in (pool.task_data(task, split="test", num_examples=None, batch_size=pool.examples) for task in TASKS)
            for batch in data.batches
        )


def dense_merge(models: dict, weights: torch.Tensor) -> dict:
    """θ₀ + Σ_t λ_t τ_t (λ [T] or [T, L] over the named parameters), in float64."""
    base = dict(models["_pretrained_"].named_parameters())
    merged = {}
    for layer, (name, value) in enumerate(base.items()):
        column = weights if weights.dim() == 1 else weights[:, layer]
        merged[name] = value.double() + sum(column[t].double() * (dict(models[task].named_parameters())[name].double() - value.double()) for t, task in enumerate(TASKS))
    return merged


@pytest.mark.parametrize("cls", [TaskWiseAdaMergingAlgorithm, LayerWiseAdaMergingAlgorithm])
def test_adaptation_lowers_the_entropy_of_the_test_predictions(cls):
    models = text_models()
    pool = TinyTextPool(models, examples=8)  # one batch per task: every step sees the same inputs
    method = cls(max_steps=12, lr=0.02, batch_size=8, **QUIET)
    merged = method.run(pool)
    start = summed_entropy(TaskArithmeticAlgorithm(scaling_factor=0.3).run(models), pool)
    assert method.losses[0] == pytest.approx(start, rel=1e-5)  # step 0 sees θ₀ + 0.3 Σ τ
    assert summed_entropy(merged, pool) < 0.8 * start and method.losses[-1] < method.losses[0]
    assert merged is not models["_pretrained_"] and all(not p.requires_grad for p in merged.parameters())


def float64_problem():
    """A float64 tiny BERT pool, its task vectors, and Σ_tasks entropy of a linear head on the mean state."""
    models = {name: model.double().eval() for name, model in text_models(scale=0.3).items()}
    base = models["_pretrained_"]
    names = [name for name, _ in base.named_parameters()]
    pretrained = {name: tensor.detach() for name, tensor in base.named_parameters()}
    task_vectors = {name: stack_task_vectors(pretrained[name], [dict(models[t].named_parameters())[name].detach() for t in TASKS]) for name in names}
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(1, 64, (5, 6), generator=generator) for _ in TASKS]
    heads = [torch.randn(16, 4, generator=generator, dtype=torch.float64) for _ in TASKS]

    def task_losses(parameters):
        for ids, head in zip(inputs, heads):
            hidden = functional_call(base, parameters, kwargs={"input_ids": ids}).last_hidden_state
            yield entropy_loss(hidden.mean(1) @ head)

    return pretrained, task_vectors, names, task_losses


@pytest.mark.parametrize("layer_wise", [False, True])
@pytest.mark.parametrize("clamp", [False, True])
def test_the_gradient_of_lambda_is_the_finite_differences(layer_wise, clamp):
    pretrained, task_vectors, names, task_losses = float64_problem()
    generator = torch.Generator().manual_seed(1)
    shape = (len(TASKS), len(names)) if layer_wise else (len(TASKS),)
    # with clamp, some λ lie outside [0, 1] (zero gradient) and none near the kinks
    weights = torch.rand(shape, generator=generator, dtype=torch.float64) * 0.6 + 0.2
    if clamp:
        weights.view(-1)[::4] += 1.0
    loss, gradient = loss_and_gradient(weights, pretrained, task_vectors, names, task_losses, clamp=clamp)

    def value(w):
        return loss_and_gradient(w, pretrained, task_vectors, names, task_losses, clamp=clamp)[0].item()

    assert loss.item() == pytest.approx(value(weights), rel=1e-12)
    entries = range(weights.numel()) if not layer_wise else torch.randperm(weights.numel(), generator=generator)[:16].tolist()
    step = 1e-6
    for entry in entries:
        up, down = weights.clone(), weights.clone()
        up.view(-1)[entry] += step
        down.view(-1)[entry] -= step
        numeric = (value(up) - value(down)) / (2 * step)
        assert gradient.view(-1)[entry].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9), entry
        if clamp and weights.view(-1)[entry] > 1:
            assert gradient.view(-1)[entry].item() == 0.0


def test_layer_wise_with_equal_weights_is_task_arithmetic():
    models = text_models()
    layers = len(list(models["_pretrained_"].parameters()))
    merged = LayerWiseAdaMergingAlgorithm(weights=[[0.3] * layers] * len(TASKS)).run(models)
    task_wise = TaskWiseAdaMergingAlgorithm(weights=[0.3] * len(TASKS)).run(models)
    arithmetic = TaskArithmeticAlgorithm(scaling_factor=0.3).run(models).state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, arithmetic[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(task_wise.state_dict()[key], arithmetic[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("clamp", [False, True])
def test_given_weights_skip_adaptation_and_merge_as_theta0_plus_the_weighted_task_vectors(clamp):
    models = text_models()
    layers = len(list(models["_pretrained_"].parameters()))
    given = torch.linspace(-0.4, 1.5, len(TASKS) * layers).view(len(TASKS), layers)
    method = LayerWiseAdaMergingAlgorithm(weights=given.tolist(), clamp_weights=clamp)
    merged = method.run(models)  # a dict of modules: a pool without data, so no adaptation
    oracle = dense_merge(models, given.clamp(0, 1) if clamp else given)
    for name, tensor in merged.named_parameters():
        torch.testing.assert_close(tensor.double(), oracle[name], rtol=0, atol=1e-6)
    outputs = method.method_outputs()
    assert outputs["steps"] == 0 and outputs["merging_weights"][TASKS[1]]["embeddings.word_embeddings.weight"] == pytest.approx(given[1, 0].item())
    assert ("clamped_merging_weights" in outputs) == clamp
    if clamp:
        assert all(0 <= w <= 1 for row in outputs["clamped_merging_weights"].values() for w in row.values())


def test_learned_weights_reach_the_report_and_a_file_that_merges_the_same(tmp_path):
    models = text_models()
    path = tmp_path / "lambda.pt"
    method = TaskWiseAdaMergingAlgorithm(max_steps=3, lr=0.05, batch_size=4, save_merging_weights=str(path), **QUIET)
    merged = method.run(TinyTextPool(models))
    saved = torch.load(path, weights_only=True)
    outputs = method.method_outputs()
    assert saved.shape == (len(TASKS),) and outputs["steps"] == 3 and len(outputs["entropy"]) == 3
    assert outputs["merging_weights"] == dict(zip(TASKS, saved.tolist())) and not torch.allclose(saved, torch.full_like(saved, 0.3))
    json.dumps(outputs)
    again = TaskWiseAdaMergingAlgorithm(weights=str(path), save_merging_weights=str(path)).run(models)  # given λ are not saved again
    for key, value in merged.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    with pytest.raises(InputError, match="exists and this run did not write it"):  # before any work
        TaskWiseAdaMergingAlgorithm(save_merging_weights=str(path)).run(TinyTextPool(models))
    assert torch.equal(torch.load(path, weights_only=True), saved) and sorted(p.name for p in tmp_path.iterdir()) == ["lambda.pt"]


def test_bfloat16_task_vectors_merge_within_their_rounding_and_fast_dev_run_takes_one_step():
    models = text_models()
    given = [0.2, 0.5, 0.9]
    full = TaskWiseAdaMergingAlgorithm(weights=given).run(models).state_dict()
    half = TaskWiseAdaMergingAlgorithm(weights=given, task_vector_dtype="bfloat16").run(models).state_dict()
    for name, tensor in models["_pretrained_"].named_parameters():
        bound = sum(given) * max((dict(models[t].named_parameters())[name] - tensor).abs().max().item() for t in TASKS) * 2**-8
        assert (half[name] - full[name]).abs().max() <= bound + 1e-6, name
        assert half[name].dtype == torch.float32
    method = TaskWiseAdaMergingAlgorithm(max_steps=100, fast_dev_run=True, batch_size=4, **QUIET)
    method.run(TinyTextPool(models))
    assert method.method_outputs()["steps"] == 1


def test_fusion_bench_s_positional_config_and_name_selector():
    models = text_models()
    keys = {"name": "clip_task_wise_adamerging", "weights": [0.1, 0.2, 0.3], "max_steps": 5}
    by_config = CLIPTaskWiseAdaMergingAlgorithm(DictConfig(keys)).run(models)
    by_name = clip_adamerging(**keys)
    assert type(by_name) is CLIPTaskWiseAdaMergingAlgorithm and type(clip_adamerging()) is CLIPLayerWiseAdaMergingAlgorithm
    for key, value in by_name.run(models).state_dict().items():
        assert torch.equal(value, by_config.state_dict()[key])


@pytest.mark.parametrize(
    "config, cls",
    [
        ("clip", CLIPLayerWiseAdaMergingAlgorithm),
        ("clip_task_wise", CLIPTaskWiseAdaMergingAlgorithm),
        ("layer_wise", LayerWiseAdaMergingAlgorithm),
        ("task_wise", TaskWiseAdaMergingAlgorithm),
    ],
)
def test_the_shipped_configs_build_their_class_with_fusion_bench_s_keys(config, cls):
    keys = OmegaConf.load(ROOT / "config" / "method" / "adamerging" / f"{config}.yaml")
    keys.fast_dev_run = False  # ${fast_dev_run} names the root config's key
    method = instantiate_checked(keys, "method")
    assert type(method) is cls and method.lr == 1e-3 and method.init_values == 0.3 and method.steps == 1000 and method.batch_size == 16
    assert method.save_merging_weights == "merging_weights.pt" and method.weights is None and not method.clamp_weights


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: LayerWiseAdaMergingAlgorithm(DictConfig({"lr": 0.1, "max_step": 3})), "unknown key 'max_step'"),
        (lambda: LayerWiseAdaMergingAlgorithm(DictConfig({"lr": 0.1}), lr=0.2), "not both"),
        (lambda: clip_adamerging(name="clip_adamerging"), "name='clip_adamerging' is unknown"),
        (lambda: clip_adamerging(lr=0.1, steps=3), "unknown key 'steps'"),
        (lambda: instantiate_checked(OmegaConf.create({"_target_": "fusion_bench.method.CLIPLayerWiseAdaMergingAlgorithm", "max_step": 3}), "method"), "unknown key 'max_step'"),
        (lambda: CLIPLayerWiseAdaMergingAlgorithm(name="clip_task_wise_adamerging"), "use name=clip_layer_wise_adamerging"),
        (lambda: TaskWiseAdaMergingAlgorithm(optimizer="sgd"), "optimizer='sgd'"),
        (lambda: TaskWiseAdaMergingAlgorithm(lr=0), "lr=0 must be a finite positive number"),
        (lambda: TaskWiseAdaMergingAlgorithm(max_steps=-1), "max_steps=-1"),
        (lambda: TaskWiseAdaMergingAlgorithm(batch_size=0), "batch_size=0"),
        (lambda: TaskWiseAdaMergingAlgorithm(clamp_weights="yes"), "clamp_weights='yes' must be true or false"),
        (lambda: TaskWiseAdaMergingAlgorithm(weights="missing.pt"), "weights=missing.pt is not a file"),
        (lambda: TaskWiseAdaMergingAlgorithm(weights=[0.3, "a"]), "must be a list of numbers"),
        (lambda: TaskWiseAdaMergingAlgorithm(task_vector_dtype="int8"), "task_vector_dtype='int8' is unknown"),
        (lambda: TaskWiseAdaMergingAlgorithm(weights=[0.3, 0.3]).run(text_models()), "weights holds 2 rows"),
        (lambda: LayerWiseAdaMergingAlgorithm(weights=[[0.3, 0.3]] * 3).run(text_models()), "needs [3, 39]"),
        (lambda: TaskWiseAdaMergingAlgorithm().run(text_models()), "AdaMerging learns from data, which BaseModelPool does not provide"),
    ],
)
def test_bad_keys_fail_with_one_line(make, fragment):
    with pytest.raises(InputError) as error:
        make()
    assert fragment in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------ the reference's recorded runs


class RecordedCLIPPool(BaseModelPool):
    """The fixture's tiny CLIP towers; each task's test images one batch, with the given head."""

    def __init__(self, tensors: dict, vision: dict, tasks: list[str]):
        self.tensors = tensors
        models = {name: self._tower(name, vision) for name in ["_pretrained_", *tasks]}
        super().__init__(models)

    def _tower(self, name: str, vision: dict) -> CLIPVisionModel:
        tower = CLIPVisionModel(CLIPVisionConfig(**vision)).eval()
        prefix = f"input/{name}/vision_model."  # the 4.x keys; 5.x drops the prefix
        tower.load_state_dict({k.removeprefix(prefix): v for k, v in self.tensors.items() if k.startswith(prefix)})
        return tower

    def check_task_data(self, split, what):
        pass

    def task_data(self, task, *, split, num_examples, batch_size, seed=0):
        pixels = self.tensors[f"data/{task}"]
        weight = self.tensors["head/visual_projection.weight"]
        projection = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        projection.weight.data = weight.clone()
        head = CLIPZeroShotHead(projection, float(self.tensors["head/logit_scale"].exp()), self.tensors[f"head/class_embeddings/{task}"])
        return TaskData(task, split, Batches(list(range(len(pixels))), batch_size, lambda idx: Batch({"pixel_values": pixels[idx]})), head, task)


def recorded_cases():
    with safe_open(str(FIXTURES), "pt") as file:
        return json.loads(file.metadata()["cases"])


@pytest.mark.parametrize("case", recorded_cases(), ids=lambda case: case["case"])
def test_matches_the_reference_s_learned_weights_and_merged_model(case):
    tensors = load_file(str(FIXTURES))
    with safe_open(str(FIXTURES), "pt") as file:
        metadata = file.metadata()
    pool = RecordedCLIPPool(tensors, json.loads(metadata["vision_config"]), json.loads(metadata["tasks"]))
    cls = CLIPTaskWiseAdaMergingAlgorithm if case["kind"] == "task_wise" else CLIPLayerWiseAdaMergingAlgorithm
    method = cls(max_steps=case["steps"], batch_size=len(tensors["data/t0"]), **case["params"], **QUIET)
    merged = method.run(pool).state_dict()
    reference = tensors[f"output/{case['case']}/merging_weights"]
    assert method.names == [name.removeprefix("vision_model.") for name in json.loads(metadata["parameter_names"])]
    assert (reference - case["params"]["init_values"]).abs().max() > 0.2  # λ moved
    kept = [i for i, name in enumerate(method.names) if not name.endswith("k_proj.bias")]
    learned = method.learned if reference.dim() == 1 else method.learned[:, kept]
    torch.testing.assert_close(learned, reference if reference.dim() == 1 else reference[:, kept], rtol=0, atol=5e-6)
    prefix = f"output/{case['case']}/merged/vision_model."
    for key, value in tensors.items():
        if key.startswith(prefix) and not key.endswith("k_proj.bias"):
            torch.testing.assert_close(merged[key.removeprefix(prefix)], value, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the command


def test_the_command_learns_on_a_text_pool_as_the_python_api_does(tmp_path, bert_pool_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    write_pool_config(tmp_path / "config", bert_pool_dir)
    pool_file = tmp_path / "config" / "modelpool" / "tiny_text.yaml"
    pool_file.write_text((tmp_path / "config" / "modelpool" / "tiny_bert.yaml").read_text().replace("fusion_bench.modelpool.AutoModelPool", "tests.data_fixtures.TinyTextPool"))
    run = tmp_path / "run"
    keys = dict(max_steps=3, lr=0.05, batch_size=4, num_workers=1)
    run_cli(
        "--config-dir", str(tmp_path / "config"), "modelpool=tiny_text", "taskpool=dummy", "method=adamerging/layer_wise",
        *[f"method.{k}={v}" for k, v in keys.items()], f"hydra.run.dir={run}", f"merged_model_save_path={run / 'merged'}", cwd=tmp_path,
    )  # fmt: skip
    report = json.loads((run / "report.json").read_text())
    outputs = meta(report)["method_outputs"]
    saved = torch.load(run / "merging_weights.pt", weights_only=True)
    pool = TinyTextPool({"_pretrained_": str(bert_pool_dir / "pretrained"), **{t: str(bert_pool_dir / t) for t in TASKS}})
    method = LayerWiseAdaMergingAlgorithm(**keys)
    merged = method.run(pool)
    assert torch.equal(saved, method.learned) and outputs["merging_weights"] == method.method_outputs()["merging_weights"]
    assert meta(report)["config"]["method"]["fast_dev_run"] is False and outputs["steps"] == 3
    loaded = AutoModel.from_pretrained(run / "merged").state_dict()
    for key, value in merged.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_the_command_runs_both_of_fusion_bench_s_clip_adamergings(tmp_path, clip_world):
    config = tmp_path / "config"
    (config / "modelpool").mkdir(parents=True)
    models = "\n".join(f"  {task}: {clip_world / 'towers' / task}" for task in CLIP_TASKS)
    datasets = "\n".join(f"  {task}:\n    _target_: datasets.load_dataset\n    path: {clip_world / 'data' / task}\n    split: test" for task in CLIP_TASKS)
    (config / "modelpool" / "tiny_clip_data.yaml").write_text(
        f"_target_: fusion_bench.modelpool.CLIPVisionModelPool\n_recursive_: false\nprocessor: {clip_world / 'clip'}\n"
        f"models:\n  _pretrained_: {clip_world / 'clip'}\n{models}\ntest_datasets:\n{datasets}\n"
    )
    run_cli(
        "--multirun", "--config-dir", str(config), "modelpool=tiny_clip_data", "taskpool=dummy", "method=adamerging/clip",
        "method.name=clip_task_wise_adamerging,clip_layer_wise_adamerging", "method.max_steps=2", "method.batch_size=8",
        "method.num_workers=0", "method.lr=0.05", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    kinds = {}
    for path in (tmp_path / "sweep").glob("*/report.json"):
        outputs = meta(json.loads(path.read_text()))["method_outputs"]
        assert outputs["steps"] == 2 and (path.parent / "merging_weights.pt").is_file()
        kinds[meta(json.loads(path.read_text()))["config"]["method"]["name"]] = outputs["merging_weights"]
    assert sorted(kinds["clip_task_wise_adamerging"]) == sorted(CLIP_TASKS)
    assert all(isinstance(value, float) for value in kinds["clip_task_wise_adamerging"].values())
    assert all(len(row) == 39 for row in kinds["clip_layer_wise_adamerging"].values())  # every parameter tensor of the tower
