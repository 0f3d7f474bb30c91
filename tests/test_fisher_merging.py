"""Fisher merging: the merge against a dense oracle, each Fisher estimate against the closed form of
softmax regression, per-example against batch estimates, the cache, exclusion, bad keys, the
command line, and FusionBench 0.2.33's recorded merge of a tiny CLIP pool
(scripts/make_reference_fisher_fixtures.py)."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn

from fusion_bench.merging.fisher import fisher_coefficients, fisher_weighted_average, merged_fisher_norms
from fusion_bench.method import FisherMergingAlgorithm, FisherMergingForCLIPVisionModel
from fusion_bench.method import fisher_merging as fisher_module
from fusion_bench.method.data_settings import DataloaderSettings, excluded_keys
from fusion_bench.modelpool import BaseModelPool, CLIPVisionModelPool
from fusion_bench.modelpool.lazy_state_dict import ModuleStateDict
from fusion_bench.modelpool.task_data import Batch, Batches, TaskData, check_enough_examples, draw_indices
from fusion_bench.utils.cache import fingerprint
from fusion_bench.utils.errors import InputError
from tests.conftest import TASKS, assert_one_line_error, finetuned_copy, run_cli, tiny_bert
from tests.data_fixtures import TinyTextPool, clip_data_pool

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# ------------------------------------------------------------------ the merge against an oracle
def oracle_merge(thetas, fishers, normalize, eps):
    """θ = Σ c_t (F_t+ε) θ_t / Σ c_t (F_t+ε), c_t ∝ 1/(‖F_t‖+ε) over all keys, in float64 loops."""
    n = len(thetas)
    norms = [sum(float((f.double() ** 2).sum()) for f in fisher.values()) ** 0.5 for fisher in fishers]
    c = [1.0 / n] * n
    if normalize:
        inverse = [1.0 / (norm + eps) for norm in norms]
        c = [c[t] * inverse[t] / sum(inverse) for t in range(n)]
    merged = {}
    for key in thetas[0]:
        numerator = sum(c[t] * (fishers[t][key].double() + eps) * thetas[t][key].double() for t in range(n))
        merged[key] = numerator / sum(c[t] * (fishers[t][key].double() + eps) for t in range(n))
    return merged


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_the_merge_is_the_fisher_weighted_average(normalize, eps):
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (4,), "scalar": ()}
    thetas = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(3)]
    # Fishers of very different scales, one zero somewhere: normalisation and ε both matter
    fishers = [{k: scale * torch.rand(s, generator=g) for k, s in shapes.items()} for scale in (1.0, 50.0, 1e-3)]
    fishers[0]["b"][1] = 0.0
    norms = merged_fisher_norms({str(t): fisher for t, fisher in enumerate(fishers)}, list(shapes))
    c = fisher_coefficients(norms, normalize, eps)
    expected = oracle_merge(thetas, fishers, normalize, eps)
    for key in shapes:
        merged = fisher_weighted_average([theta[key] for theta in thetas], [fisher[key] for fisher in fishers], c, eps)
        torch.testing.assert_close(merged.double(), expected[key], rtol=1e-5, atol=1e-6)


def test_without_fisher_mass_the_merge_is_the_coefficient_weighted_mean():
    thetas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    c = torch.tensor([0.1, 0.3])
    merged = fisher_weighted_average(thetas, [None, torch.zeros(2)], c, 1e-6)
    torch.testing.assert_close(merged, (0.1 * thetas[0] + 0.3 * thetas[1]) / 0.4)


# ------------------------------------------------------------------ softmax regression: known Fisher
D, CLASSES, EXAMPLES = 5, 4, 10


class SoftmaxRegression(nn.Module):
    """logits = W x + b; with a parameter the logits do not use and a floating buffer."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(D, CLASSES)
        self.unused = nn.Parameter(torch.randn(3))
        self.register_buffer("running", torch.randn(2))

    def forward(self, input):
        return self.linear(input)


class LogitsHead(nn.Module):
    def forward(self, outputs, batch):
        return outputs


class SoftmaxPool(BaseModelPool):
    """Each task: EXAMPLES random inputs with random labels; the model's output is the logits."""

    def check_task_data(self, split, what):
        pass

    def rows(self, task):
        g = torch.Generator().manual_seed(int(fingerprint(task), 16) % 2**31)
        return 2 * torch.randn(EXAMPLES, D, generator=g), torch.randint(0, CLASSES, (EXAMPLES,), generator=g)

    def task_data(self, task, *, split, num_examples, batch_size, seed=0):
        check_enough_examples(task, split, EXAMPLES, num_examples, "the method")
        x, y = self.rows(task)
        drawn = draw_indices(EXAMPLES, num_examples, seed)
        batches = Batches(drawn, batch_size, lambda indices: Batch({"input": x[indices]}, y[indices]))
        return TaskData(task, split, batches, LogitsHead(), fingerprint(task, drawn, batch_size))


def softmax_pool():
    return SoftmaxPool({"_pretrained_": SoftmaxRegression(0), "a": SoftmaxRegression(1), "b": SoftmaxRegression(2)})


def closed_form(model, x, y, estimate, batch_size):
    """∇_W log p_k(x) = (e_k − p) xᵀ and ∇_b log p_k = e_k − p, so each estimate in closed form."""
    W, b = model.linear.weight.detach().double(), model.linear.bias.detach().double()
    x = x.double()
    p = torch.softmax(x @ W.T + b, dim=-1)
    eye = torch.eye(CLASSES, dtype=torch.float64)
    # residuals r[i, k] = e_k − p_i: [examples, k, classes]
    r = eye[None] - p[:, None, :]
    grad_w = r[..., None] * x[:, None, None, :]  # [examples, k, classes, D]
    if estimate == "empirical":
        pick = torch.arange(len(x))
        return (grad_w[pick, y] ** 2).mean(0), (r[pick, y] ** 2).mean(0)
    if estimate == "exact":
        weight = p[:, :, None]
        return (weight[..., None] * grad_w**2).sum(1).mean(0), (weight * r**2).sum(1).mean(0)
    root = p.sqrt()
    fw, fb = torch.zeros(CLASSES, D, dtype=torch.float64), torch.zeros(CLASSES, dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        fw += ((root[rows, :, None, None] * grad_w[rows]).sum((0, 1))) ** 2
        fb += ((root[rows, :, None] * r[rows]).sum((0, 1))) ** 2
    return fw / len(x), fb / len(x)


@pytest.mark.parametrize("estimate", ["empirical", "exact", "fusionbench"])
def test_each_estimate_is_its_closed_form(estimate):
    pool = softmax_pool()
    data = pool.task_data("a", split="train", num_examples=8, batch_size=3, seed=1)
    model = pool.load_model("a")
    fisher = fisher_module.fisher_diagonal(model, data, estimate, DataloaderSettings(3, 0), CPU)
    x, y = pool.rows("a")
    drawn = data.batches.indices
    fw, fb = closed_form(model, x[drawn], y[drawn], estimate, batch_size=3)
    torch.testing.assert_close(fisher["linear.weight"].double(), fw, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(fisher["linear.bias"].double(), fb, rtol=1e-5, atol=1e-9)
    assert torch.equal(fisher["unused"], torch.zeros(3)) and "running" not in fisher  # no gradient there; buffers have none


def test_per_example_estimates_do_not_depend_on_the_batch_size_fusionbenchs_does():
    pool = softmax_pool()
    model = pool.load_model("b")

    def fisher(estimate, batch_size):
        data = pool.task_data("b", split="train", num_examples=EXAMPLES, batch_size=batch_size, seed=0)
        return fisher_module.fisher_diagonal(model, data, estimate, DataloaderSettings(batch_size, 0), CPU)["linear.weight"]

    for estimate in ("empirical", "exact"):
        torch.testing.assert_close(fisher(estimate, 1), fisher(estimate, EXAMPLES), rtol=1e-5, atol=1e-8)
    one, all_at_once = fisher("fusionbench", 1), fisher("fusionbench", EXAMPLES)
    assert (one - all_at_once).abs().max() > 0.1 * one.abs().max()  # a squared batch sum: batching changes it
    # FusionBench's estimate is not the paper's even per example: (Σ_y √p_y ∇log p_y)² ≠ Σ_y p_y (∇log p_y)²
    assert (one - fisher("exact", 1)).abs().max() > 0.1 * one.abs().max()


def test_the_merge_of_softmax_regressions_streams_the_closed_form_fisher():
    pool = softmax_pool()
    method = FisherMergingAlgorithm(num_fisher_examples=EXAMPLES, dataloader_kwargs={"batch_size": 4}, normalize_fisher_weight=True)
    merged = method.run(pool)
    thetas, fishers = [], []
    for task in ("a", "b"):
        model = pool.load_model(task)
        x, y = pool.rows(task)
        drawn = draw_indices(EXAMPLES, EXAMPLES, 0)
        fw, fb = closed_form(model, x[drawn], y[drawn], "empirical", 4)
        thetas.append({k: v.detach() for k, v in model.state_dict().items()})
        fishers.append({"linear.weight": fw, "linear.bias": fb, "unused": torch.zeros(3), "running": torch.zeros(2)})
    expected = oracle_merge(thetas, fishers, True, 1e-6)
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-4, atol=1e-6)
    c = method.method_outputs()["fisher_coefficients"]
    assert set(c) == {"a", "b"} and abs(sum(c.values()) - 1 / 2) < 1e-6  # (1/T)·normalised
    assert pool.load_model("a").training  # the task models are left as they were given


# ------------------------------------------------------------------ cache, exclusion, bad input
@pytest.fixture
def counted(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path))
    calls = []
    original = fisher_module.fisher_diagonal

    def counting(model, data, *args):
        calls.append(data.task)
        return original(model, data, *args)

    monkeypatch.setattr(fisher_module, "fisher_diagonal", counting)
    return calls


def test_fisher_diagonals_are_computed_once_per_model_data_and_estimate(counted):
    pool = softmax_pool()
    keys = {"num_fisher_examples": 6, "dataloader_kwargs": {"batch_size": 2}}
    first = FisherMergingAlgorithm(**keys, normalize_fisher_weight=True, minimal_fisher_weight=1e-6).run(pool)
    second = FisherMergingAlgorithm(**keys, normalize_fisher_weight=False, minimal_fisher_weight=1e-2).run(pool)
    FisherMergingAlgorithm(**keys, exclude_param_names_regex=["linear\\.b"]).run(pool)
    assert sorted(counted) == ["a", "b"]  # one computation per task for three merges
    assert not torch.equal(first.linear.weight, second.linear.weight)
    FisherMergingAlgorithm(**keys, fisher_estimate="exact").run(pool)
    FisherMergingAlgorithm(**keys, seed=1).run(pool)  # other examples
    assert len(counted) == 6


def test_excluded_parameters_keep_the_pretrained_value(counted):
    pool = softmax_pool()
    merged = FisherMergingAlgorithm(num_fisher_examples=6, exclude_param_names_regex=[".*bias", "unused"]).run(pool)
    assert torch.equal(merged.linear.bias, pool.load_model("_pretrained_").linear.bias)
    assert torch.equal(merged.unused, pool.load_model("_pretrained_").unused)
    assert not torch.equal(merged.linear.weight, pool.load_model("_pretrained_").linear.weight)
    with pytest.raises(InputError, match="'bias', which matches no parameter of '_pretrained_' \\(re.match"):
        FisherMergingAlgorithm(num_fisher_examples=6, exclude_param_names_regex=["bias"]).run(pool)  # re.match: from the start


@pytest.mark.parametrize(
    "keys, fragment",
    [
        ({"fisher_estimate": "sampled"}, "fisher_estimate='sampled' is unknown; use empirical"),
        ({"minimal_fisher_weight": 0}, "minimal_fisher_weight=0 must be a positive number"),
        ({"minimal_fisher_weight": float("nan")}, "minimal_fisher_weight=nan must be a positive number"),
        ({"normalize_fisher_weight": "yes"}, "normalize_fisher_weight='yes' must be true or false"),
        ({"exclude_param_names_regex": ".*bias"}, "exclude_param_names_regex must be a list of regular expressions"),
        ({"exclude_param_names_regex": ["(unclosed"]}, "'(unclosed', which is not a regular expression"),
        ({"num_fisher_examples": 0}, "num_fisher_examples=0 must be a positive number of examples"),
        ({"dataloader_kwargs": {"batch_size": 4, "shuffle": True}}, "dataloader_kwargs has an unknown key 'shuffle'"),
        ({"seed": 1.5}, "seed=1.5 must be an integer"),
        ({"num_fisher_example": 3}, "num_fisher_example"),
    ],
)
def test_bad_keys_are_one_line_errors(keys, fragment):
    with pytest.raises(InputError) as error:
        FisherMergingAlgorithm(**keys)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_pools_without_enough_data_fail_before_any_fisher(counted):
    with pytest.raises(InputError, match="Fisher merging learns from data, which BaseModelPool does not provide"):
        FisherMergingAlgorithm().run({"_pretrained_": SoftmaxRegression(0), "a": SoftmaxRegression(1)})
    with pytest.raises(InputError, match="asks for 11 train examples of task 'a', which has 10"):
        FisherMergingAlgorithm(num_fisher_examples=11).run(softmax_pool())
    assert counted == []


# ------------------------------------------------------------------ the command line
def test_the_command_on_a_text_pool_saves_what_the_python_api_merges(tmp_path, bert_pool_dir, monkeypatch):
    from transformers import BertModel

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    models = {"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(bert_pool_dir / task) for task in TASKS}}
    (tmp_path / "config" / "modelpool").mkdir(parents=True)
    (tmp_path / "config" / "modelpool" / "tiny_text.yaml").write_text(OmegaConf.to_yaml({"_target_": "tests.data_fixtures.TinyTextPool", "models": models}))
    overrides = ["method.num_fisher_examples=8", "method.dataloader_kwargs.batch_size=4", "method.minimal_fisher_weight=1e-4"]
    run_cli("--config-dir", str(tmp_path / "config"), "modelpool=tiny_text", "taskpool=dummy", "method=fisher_merging/fisher_merging", *overrides,
            f"merged_model_save_path={tmp_path / 'merged'}", f"report_save_path={tmp_path / 'report.json'}", cwd=tmp_path)  # fmt: skip
    config = OmegaConf.merge(OmegaConf.load(ROOT / "config/method/fisher_merging/fisher_merging.yaml"), OmegaConf.from_dotlist([o.removeprefix("method.") for o in overrides]))
    keys = {key: value for key, value in OmegaConf.to_container(config).items() if key != "_target_"}
    merged = FisherMergingAlgorithm(**keys).run(TinyTextPool(models))
    saved = BertModel.from_pretrained(tmp_path / "merged").state_dict()
    assert all(torch.equal(saved[key], value) for key, value in merged.state_dict().items())
    outputs = json.loads((tmp_path / "report.json").read_text())["_fusion_bench_"]["method_outputs"]
    assert set(outputs["fisher_coefficients"]) == set(TASKS)
    # BERT's pooler is not on the path to the mean-pooled head: F = 0 there, so the merge is the
    # coefficient-weighted mean of the task models
    c = torch.tensor([outputs["fisher_coefficients"][task] for task in TASKS])
    pooler = torch.stack([BertModel.from_pretrained(bert_pool_dir / task).pooler.dense.weight for task in TASKS])
    torch.testing.assert_close(saved["pooler.dense.weight"], (c[:, None, None] * pooler).sum(0) / c.sum())


def test_the_command_on_the_tiny_clip_world_saves_what_the_python_api_merges(tmp_path, clip_world):
    from transformers import CLIPVisionModel

    pool = clip_data_pool(clip_world)
    spec = {"_target_": "fusion_bench.modelpool.CLIPVisionModelPool", "_recursive_": False, "processor": str(clip_world / "clip"), "models": pool._models,
            "train_datasets": pool._train_datasets}  # fmt: skip
    (tmp_path / "config" / "modelpool").mkdir(parents=True)
    (tmp_path / "config" / "modelpool" / "tiny_clip_train.yaml").write_text(OmegaConf.to_yaml(spec))
    run_cli("--config-dir", str(tmp_path / "config"), "modelpool=tiny_clip_train", "taskpool=dummy", "method=fisher_merging/clip_fisher_merging",
            "method.num_fisher_examples=4", "method.dataloader_kwargs.batch_size=2", f"merged_model_save_path={tmp_path / 'merged'}", cwd=tmp_path)  # fmt: skip
    merged = FisherMergingForCLIPVisionModel(num_fisher_examples=4, dataloader_kwargs={"batch_size": 2}).run(pool)
    saved = CLIPVisionModel.from_pretrained(tmp_path / "merged").state_dict()
    pretrained = pool.load_model("_pretrained_").state_dict()
    assert all(torch.equal(saved[key], value) for key, value in merged.state_dict().items())
    assert not torch.equal(saved["encoder.layers.0.mlp.fc1.weight"], pretrained["encoder.layers.0.mlp.fc1.weight"])


def test_a_pool_without_train_images_is_refused_before_any_work(tmp_path, clip_world):
    pool = clip_data_pool(clip_world, train_datasets={"mnist": str(clip_world / "data" / "mnist")})
    with pytest.raises(InputError, match="Fisher merging needs the train images of every task, but the model pool's train_datasets lacks 'eurosat'"):
        FisherMergingForCLIPVisionModel().run(pool)
    result = run_cli("method=fisher_merging/clip_fisher_merging", "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only",
                     "taskpool=dummy", cwd=tmp_path, check=False)  # fmt: skip
    assert_one_line_error(result, "Fisher merging needs the train images of every task")


# ------------------------------------------------------------------ FusionBench 0.2.33's merge
REFERENCE = ROOT / "tests" / "data" / "reference_fisher.safetensors"
WORLD = ROOT / "tests" / "data" / "reference_fisher_world"
REFERENCE_TASKS = ("mnist", "eurosat", "dtd")
TRAIN_IMAGES = 6


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REFERENCE), "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        cases = json.loads(file.metadata()["cases"])
    # the reference ran transformers 4.x, whose CLIPVisionModel names start with `vision_model.`
    return {key.replace("vision_model.", ""): value for key, value in tensors.items()}, cases


def reference_pool():
    models = {"_pretrained_": str(WORLD / "clip"), **{task: str(WORLD / "towers" / task) for task in REFERENCE_TASKS}}
    return CLIPVisionModelPool(models, processor=str(WORLD / "clip"), train_datasets={task: str(WORLD / "data" / task) for task in REFERENCE_TASKS})


def test_the_reference_sees_the_same_heads_and_logits(reference):
    tensors, _ = reference
    pool = reference_pool()
    for task in REFERENCE_TASKS:
        data = pool.task_data(task, split="train", num_examples=TRAIN_IMAGES, batch_size=TRAIN_IMAGES)
        torch.testing.assert_close(data.head.class_embeddings, tensors[f"head/{task}"], atol=1e-6, rtol=0)
        with torch.no_grad():
            logits = data.logits(pool.load_model(task), Batch({"pixel_values": tensors[f"pixels/{task}"]}))
        torch.testing.assert_close(logits, tensors[f"logits/{task}"], atol=1e-4, rtol=0)  # logit scale 100


def test_the_fusionbench_estimate_is_the_references_fisher(reference):
    """Equal up to the two transformers versions' float32 rounding (~4e-5 of each tensor's largest
    entry), except where the true gradient is 0 (attention key biases: softmax ignores a shift of
    every score) and both hold only rounding noise (~1e-17)."""
    tensors, _ = reference
    pool = reference_pool()
    for task in REFERENCE_TASKS:
        data = pool.task_data(task, split="train", num_examples=TRAIN_IMAGES, batch_size=TRAIN_IMAGES)
        fisher = fisher_module.fisher_diagonal(pool.load_model(task), data, "fusionbench", DataloaderSettings(TRAIN_IMAGES, 0), CPU)
        assert {key for key in tensors if key.startswith(f"fisher/{task}/")} == {f"fisher/{task}/{key}" for key in fisher}
        for key, value in fisher.items():
            expected = tensors[f"fisher/{task}/{key}"]
            if key.endswith("k_proj.bias"):
                assert value.abs().max() < 1e-12 and expected.abs().max() < 1e-12
                continue
            assert (value - expected).abs().max() <= 1e-3 * expected.abs().max(), (task, key)


def test_the_merge_of_the_references_fishers_is_the_references_merge(reference):
    """The pure merge (normalisation, ε, exclusion) on the reference's own Fisher weights."""
    tensors, cases = reference
    pool = reference_pool()
    models = {task: pool.load_model(task).state_dict() for task in REFERENCE_TASKS}
    pretrained = pool.load_model("_pretrained_").state_dict()
    for case in cases:
        method = FisherMergingForCLIPVisionModel(**{key: value for key, value in case.items() if key != "case"})
        excluded = excluded_keys(ModuleStateDict(pool.load_model("_pretrained_")), method.exclude_param_names_regex)
        keys = [key for key in pretrained if key not in excluded]
        fishers = {task: {key: tensors[f"fisher/{task}/{key}"] for key in keys} for task in REFERENCE_TASKS}
        c = fisher_coefficients(merged_fisher_norms(fishers, keys), method.normalize_fisher_weight, method.minimal_fisher_weight)
        for key in pretrained:
            expected = tensors[f"output/{case['case']}/{key}"]
            if key not in keys:
                assert torch.equal(expected, pretrained[key])
                continue
            merged = fisher_weighted_average([models[task][key] for task in REFERENCE_TASKS], [fishers[task][key] for task in REFERENCE_TASKS], c, method.minimal_fisher_weight)
            torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)


def test_fisher_merging_with_the_fusionbench_estimate_equals_the_reference(reference, tmp_path, monkeypatch):
    tensors, cases = reference
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path))
    worst = 0.0
    for case in cases:
        keys = {key: value for key, value in case.items() if key != "case"}
        method = FisherMergingForCLIPVisionModel(num_fisher_examples=TRAIN_IMAGES, dataloader_kwargs={"batch_size": TRAIN_IMAGES}, fisher_estimate="fusionbench", **keys)
        for key, value in method.run(reference_pool()).state_dict().items():
            worst = max(worst, float((value - tensors[f"output/{case['case']}/{key}"]).abs().max()))
    assert worst < 1e-4, worst  # measured 3.5e-5: the Fisher's rounding differences move the coefficients c_t


def test_the_tiny_text_pool_merge_uses_every_task(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path))
    base = tiny_bert(0)
    pool = TinyTextPool({"_pretrained_": base, "alpha": finetuned_copy(base, 1), "beta": finetuned_copy(base, 2)})
    method = FisherMergingAlgorithm(num_fisher_examples=8, dataloader_kwargs={"batch_size": 4}, normalize_fisher_weight=False)
    merged = method.run(pool).state_dict()
    alpha, beta = pool.load_model("alpha").state_dict(), pool.load_model("beta").state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    low, high = torch.minimum(alpha[key], beta[key]), torch.maximum(alpha[key], beta[key])
    assert bool(((merged[key] >= low - 1e-6) & (merged[key] <= high + 1e-6)).all())  # a convex combination per entry
    assert not torch.allclose(merged[key], (alpha[key] + beta[key]) / 2, atol=1e-5)  # and not the plain mean
    assert F.cosine_similarity(merged[key].flatten(), alpha[key].flatten(), dim=0) > 0.5
