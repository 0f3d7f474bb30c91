"""RegMean++: RegMean layer by layer on the merged model's own activations, equal to a hand-written
sequential oracle and to FusionBench 0.2.33's merges."""

import pytest
import torch
from torch import nn

from fusion_bench.method import RegMeanAlgorithmForCLIPPlusPlus, RegMeanAlgorithmPlusPlus
from fusion_bench.utils.errors import InputError
from tests.test_regmean import InputsPool, Net, own_cache, recorded_pool, reference_cases  # noqa: F401 (own_cache: a fixture)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in, self.fc_out, self.scale = nn.Linear(4, 6), nn.Linear(6, 4), nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, h):
        return self.scale * (h + self.fc_out(torch.tanh(self.fc_in(h))))


class Stack(nn.Module):
    """A stem, two blocks, a head; the mask is taken (and ignored) as a text encoder's."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.stem, self.layers, self.head = nn.Linear(3, 4), nn.ModuleList([Block(), Block()]), nn.Linear(4, 2)

    def forward(self, x, attention_mask=None):
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def stack_pool(seed=0):
    generator = torch.Generator().manual_seed(seed)
    models = {"_pretrained_": Stack(0), **{f"t{i}": Stack(i + 1) for i in range(3)}}
    inputs = {}
    for i, examples in enumerate((4, 6, 5)):
        lengths = torch.randint(1, 4, (examples,), generator=generator)
        inputs[f"t{i}"] = (torch.randn(examples, 3, 3, generator=generator), (torch.arange(3) < lengths[:, None]).long())
    return InputsPool(models, inputs)


def sequential_oracle(pool: InputsPool, ratio: float) -> dict[str, torch.Tensor]:
    """RegMean++ from its definition, in float64: stem and head averaged; for each block, each task's
    own block on the inputs the merged earlier blocks made, Grams over unpadded tokens."""
    tasks = pool.model_names
    models = {t: pool.load_model(t).double() for t in tasks}
    masks = {t: pool.inputs[t][1].bool() for t in tasks}
    merged = {}

    def mean(key):
        merged[key] = torch.stack([models[t].state_dict()[key] for t in tasks]).mean(0)

    def regmean(key, rows):  # rows: task -> [N, in]
        a = b = 0
        for t in tasks:
            gram = rows[t].T @ rows[t] / len(rows[t])
            reduced = ratio * gram + (1 - ratio) * torch.diag(gram.diagonal())
            a, b = a + reduced, b + reduced @ models[t].state_dict()[key].T
        merged[key] = torch.linalg.solve(a, b).T

    for key in ("stem.weight", "stem.bias", "head.weight", "head.bias"):
        mean(key)
    h = {t: pool.inputs[t][0].double() @ merged["stem.weight"].T + merged["stem.bias"] for t in tasks}
    for index in range(2):
        prefix = f"layers.{index}."
        own = {t: models[t].layers[index] for t in tasks}
        regmean(prefix + "fc_in.weight", {t: h[t][masks[t]] for t in tasks})
        regmean(prefix + "fc_out.weight", {t: torch.tanh(own[t].fc_in(h[t]))[masks[t]] for t in tasks})
        for key in ("fc_in.bias", "fc_out.bias", "scale"):
            mean(prefix + key)
        block = Block().double()
        block.load_state_dict({key.removeprefix(prefix): value for key, value in merged.items() if key.startswith(prefix)})
        h = {t: block(h[t]) for t in tasks}
    return merged


@pytest.mark.parametrize("ratio", [0.95, 0.6])
def test_equals_the_sequential_oracle(ratio):
    pool = stack_pool()
    for x, mask in pool.inputs.values():
        x[mask == 0] = 50.0  # padding that would change every Gram
    merged = RegMeanAlgorithmPlusPlus(num_regmean_examples=4, reduce_non_diagonal_ratio=ratio).run(pool).state_dict()
    expected = sequential_oracle(pool, ratio)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key].double(), value, atol=2e-5, rtol=2e-5, msg=key)


def test_it_differs_from_regmean_after_the_first_merged_layer():
    from fusion_bench.method import RegMeanAlgorithm

    pool = stack_pool(seed=1)
    plus = RegMeanAlgorithmPlusPlus(num_regmean_examples=4).run(pool).state_dict()
    plain = RegMeanAlgorithm(num_regmean_examples=4).run(pool).state_dict()
    assert not torch.allclose(plus["layers.1.fc_in.weight"], plain["layers.1.fc_in.weight"], atol=1e-4)
    assert torch.equal(plus["layers.0.scale"], plain["layers.0.scale"])  # both the mean


def test_excluded_parameters_keep_the_pretrained_values_and_feed_the_next_layer():
    pool = stack_pool(seed=2)
    merged = RegMeanAlgorithmPlusPlus(num_regmean_examples=4, exclude_param_names_regex=["layers.0.fc_out", "stem.bias"]).run(pool).state_dict()
    pretrained = pool.load_model("_pretrained_").state_dict()
    for key in ("layers.0.fc_out.weight", "layers.0.fc_out.bias", "stem.bias"):
        assert torch.equal(merged[key], pretrained[key])


def test_a_model_without_a_list_of_layers_is_refused():
    pool = InputsPool({"_pretrained_": Net(0), "t0": Net(1)}, {"t0": (torch.randn(2, 3, 5), None)})
    with pytest.raises(InputError, match="Net has no list of layers"):
        RegMeanAlgorithmPlusPlus(num_regmean_examples=2).run(pool)


def test_equals_fusionbench_on_a_tiny_clip_pool_but_for_the_post_layernorm():
    """FusionBench leaves post_layernorm (after the layers, outside its embedding merge) at the
    pretrained value; we average it with every other parameter outside the layers."""
    fixture, cases = reference_cases("RegMeanAlgorithmForCLIPPlusPlus")
    worst = 0.0
    for case in cases:
        pool = recorded_pool(fixture)
        merged = RegMeanAlgorithmForCLIPPlusPlus(num_regmean_examples=int(fixture.metadata()["num_regmean_examples"]), **case["params"]).run(pool)
        for key, value in merged.state_dict().items():
            theirs = fixture.get_tensor(f"output/{case['case']}/vision_model.{key}")
            if key.startswith("post_layernorm."):
                assert torch.equal(theirs, fixture.get_tensor(f"input/_pretrained_/vision_model.{key}"))
                torch.testing.assert_close(value, torch.stack([pool.load_model(t).state_dict()[key] for t in pool.model_names]).mean(0))
            else:
                worst = max(worst, (value - theirs).abs().max().item())
    assert len(cases) == 2 and worst < 1e-5  # measured 3.6e-6
