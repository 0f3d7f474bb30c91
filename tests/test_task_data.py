"""The data interface of methods that learn from data: each pool's batches and heads give the
logits its task pool scores with, examples are drawn reproducibly, and bad requests fail early."""

import pytest
import torch
import torch.nn.functional as F
from transformers import BertModel, CLIPVisionModel

from fusion_bench.modelpool import BaseModelPool
from fusion_bench.modelpool.offline_text import OfflineTextPool
from fusion_bench.modelpool.task_data import Batch, draw_indices
from fusion_bench.models.sentence_embedding import logits as sentence_logits
from fusion_bench.models.sentence_embedding import mean_pooled
from fusion_bench.taskpool.clip_vision.images import CLIPImageTransform
from fusion_bench.taskpool.text_classification import TextClassificationTaskPool
from fusion_bench.tasks.text_datasets import task_splits
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.statistics_cache import cached_statistics
from tests.data_fixtures import TinyTextPool, clip_data_pool


def test_draws_are_seeded_shuffled_and_nested():
    first = draw_indices(100, 10, seed=3)
    assert first == draw_indices(100, 10, seed=3) != draw_indices(100, 10, seed=4)
    assert first == draw_indices(100, 20, seed=3)[:10]  # more examples extend the same draw
    assert sorted(draw_indices(100, None, seed=3)) == list(range(100)) and first != sorted(first)


def test_offline_text_batches_give_the_task_pools_logits():
    pool = OfflineTextPool(["election_tweets", "reuters8"])
    data = pool.task_data("reuters8", split="train", num_examples=10, batch_size=4, seed=0)
    assert data.num_examples == 10 and [len(batch) for batch in data.batches] == [4, 4, 2]
    encoder = BertModel.from_pretrained(pool.base_model).eval()
    head = TextClassificationTaskPool(["reuters8"]).head("reuters8")
    train = task_splits("reuters8", 0)["train"]
    drawn = set(draw_indices(len(train), 10, 0))
    seen = []
    for batch in data.batches:
        expected = sentence_logits(mean_pooled(encoder, batch.inputs["input_ids"], batch.inputs["attention_mask"]), head)
        torch.testing.assert_close(data.logits(encoder, batch), expected)
        seen += batch.labels.tolist()
    assert sorted(seen) == sorted(train[i]["label"] for i in drawn)


def test_test_inputs_come_without_labels():
    data = OfflineTextPool(["reuters8"]).task_data("reuters8", split="test", num_examples=None, batch_size=64)
    assert data.num_examples == 400 and all(batch.labels is None for batch in data.batches)


def test_clip_batches_give_the_zero_shot_logits(clip_world):
    pool = clip_data_pool(clip_world)
    data = pool.task_data("eurosat", split="train", num_examples=3, batch_size=2, seed=1)
    clip = pool.load_clip_model("_pretrained_").eval()
    tower = CLIPVisionModel.from_pretrained(clip_world / "towers" / "eurosat").eval()
    transform = CLIPImageTransform(pool.load_processor().image_processor)
    dataset = pool.load_train_dataset("eurosat")
    indices = draw_indices(len(dataset), 3, 1)
    batch = data.batches[0]
    images = torch.stack([torch.from_numpy(transform.to_uint8(dataset[i]["image"])) for i in indices[:2]])
    torch.testing.assert_close(batch.inputs["pixel_values"], transform.normalize(images))
    assert batch.labels.tolist() == [dataset[i]["label"] for i in indices[:2]]
    with torch.no_grad():
        embeddings = F.normalize(clip.visual_projection(tower(**batch.inputs).pooler_output), dim=-1)
        logits = data.logits(tower, batch)
    head = data.head.class_embeddings
    torch.testing.assert_close(logits, clip.logit_scale.exp() * embeddings @ head.T)
    assert head.shape[0] == 10 and torch.allclose(head.norm(dim=1), torch.ones(10))


def test_fingerprints_follow_what_the_data_is_made_of(clip_world):
    pool = clip_data_pool(clip_world)
    key = lambda **kwargs: pool.task_data("mnist", **{"split": "train", "num_examples": 2, "batch_size": 2, "seed": 0, **kwargs}).fingerprint  # noqa: E731
    assert key() == key()
    assert len({key(), key(seed=1), key(num_examples=3), key(batch_size=1), key(split="test")}) == 5


def test_pools_without_the_data_say_so(clip_world):
    pool = clip_data_pool(clip_world, train_datasets={"mnist": str(clip_world / "data" / "mnist")})
    with pytest.raises(InputError, match="train_datasets lacks 'eurosat'; add it under train_datasets"):
        pool.check_task_data("train", "RegMean")
    with pytest.raises(InputError, match="RegMean learns from data, which BaseModelPool does not provide"):
        BaseModelPool({"a": torch.nn.Linear(2, 2)}).check_task_data("train", "RegMean")
    with pytest.raises(InputError, match="asks for 50 train examples of task 'gtsrb', which has 4; ask for at most 4"):
        clip_data_pool(clip_world).task_data("gtsrb", split="train", num_examples=50, batch_size=8)
    with pytest.raises(InputError, match="split='validation' is unknown"):
        clip_data_pool(clip_world).task_data("gtsrb", split="validation", num_examples=2, batch_size=8)
    with pytest.raises(InputError, match="batch_size=0 must be a positive integer"):
        OfflineTextPool(["reuters8"]).task_data("reuters8", split="train", num_examples=2, batch_size=0)


def test_model_fingerprints_follow_the_weights():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    pool = BaseModelPool({"a": a, "b": b, "a_again": a})
    assert pool.model_fingerprint("a") == pool.model_fingerprint("a_again") != pool.model_fingerprint("b")


def test_statistics_are_computed_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.arange(6.0).view(2, 3)}

    first = cached_statistics("gram", ("model", "data", 1), compute)
    again = cached_statistics("gram", ("model", "data", 1), compute)
    other = cached_statistics("gram", ("model", "data", 2), compute)
    assert len(calls) == 2 and torch.equal(first["w"], again["w"]) and torch.equal(other["w"], torch.arange(6.0).view(2, 3))
    assert list((tmp_path / "statistics" / "gram").glob("*.partial")) == []


def test_batches_move_to_a_device():
    batch = Batch({"x": torch.ones(2, 3)}, torch.zeros(2)).to("cpu")
    assert len(batch) == 2 and batch.inputs["x"].device.type == "cpu"


def test_the_tiny_text_pool_serves_padded_batches():
    from tests.conftest import tiny_bert

    pool = TinyTextPool({"_pretrained_": tiny_bert(0), "alpha": tiny_bert(1)})
    data = pool.task_data("alpha", split="train", num_examples=8, batch_size=4)
    batch = data.batches[0]
    assert batch.inputs["attention_mask"].sum() < batch.inputs["attention_mask"].numel()  # some padding
    assert data.logits(pool.load_model("alpha"), batch).shape == (4, 3)
    assert torch.equal(pool.task_data("alpha", split="train", num_examples=8, batch_size=4).batches[1].inputs["input_ids"], data.batches[1].inputs["input_ids"])
