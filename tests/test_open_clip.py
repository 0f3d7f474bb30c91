"""The task_vectors checkpoints (open_clip): the safe loader on pickles saved as task_vectors saves
them, the model pool, the task pool, and the CLI through both, on tests/open_clip_fixtures.py's world."""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from datasets import load_dataset

from fusion_bench.modelpool.pickled_modules import read_module
from fusion_bench.reporting.report import task_metrics
from fusion_bench.utils.errors import InputError
from tests import open_clip_fixtures
from tests.conftest import assert_one_line_error, run_cli
from tests.open_clip_fixtures import OPEN_CLIP_TASKS, model_name_of, write_open_clip_configs

open_clip = pytest.importorskip("open_clip")
open_clip_world = open_clip_fixtures.open_clip_world  # the fixture, for this module

from fusion_bench.method import TiesMergingAlgorithm  # noqa: E402
from fusion_bench.modelpool import OpenCLIPVisionModelPool  # noqa: E402
from fusion_bench.modelpool.lazy_state_dict import SafetensorsStateDict  # noqa: E402
from fusion_bench.models.open_clip import ClassificationHead, ImageEncoder  # noqa: E402
from fusion_bench.taskpool import OpenCLIPVisionModelTaskPool  # noqa: E402
from fusion_bench.taskpool.open_clip_vision import OpenCLIPImageTransform  # noqa: E402


def pool_of(world, **options) -> OpenCLIPVisionModelPool:
    name = model_name_of(world)
    checkpoints = world / "checkpoints" / "tiny"
    models = {"_pretrained_": {"model_name": name, "pickle_path": str(checkpoints / "zeroshot.pt")}}
    models |= {task: {"model_name": name, "pickle_path": str(checkpoints / folder / "finetuned.pt")} for task, folder in OPEN_CLIP_TASKS.items()}
    heads = {task: str(checkpoints / f"head_{folder}.pt") for task, folder in OPEN_CLIP_TASKS.items()}
    return OpenCLIPVisionModelPool(models, model_dir=str(world / "checkpoints"), classification_heads=heads, **options)


def taskpool_of(world, heads: bool = True, **options) -> OpenCLIPVisionModelTaskPool:
    checkpoints = world / "checkpoints" / "tiny"
    datasets = {task: {"_target_": "datasets.load_dataset", "path": str(world / "data" / task), "split": "test"} for task in OPEN_CLIP_TASKS}
    head_files = {task: str(checkpoints / f"head_{folder}.pt") for task, folder in OPEN_CLIP_TASKS.items()} if heads else None
    return OpenCLIPVisionModelTaskPool(
        datasets, classification_heads=head_files, model_name=f"local-dir:{world / 'clip'}", dataloader_kwargs={"batch_size": 8, "num_workers": 0}, **options
    )


@torch.no_grad()
def reference_metrics(encoder, heads, world) -> dict:
    """Accuracy and mean loss as task_vectors evaluates: open_clip's own transform, one image at a time."""
    metrics = {}
    for task in OPEN_CLIP_TASKS:
        dataset = load_dataset(str(world / "data" / task), split="test")
        images = torch.stack([encoder.val_preprocess(row["image"]) for row in dataset])
        labels = torch.tensor(dataset["label"])
        logits = heads[task](encoder(images))
        metrics[task] = {"accuracy": (logits.argmax(-1) == labels).sum().item() / len(labels), "loss": torch.nn.functional.cross_entropy(logits, labels).item()}
    return metrics


def test_the_safe_loader_reads_task_vectors_pickles_without_their_code(open_clip_world):
    expected = torch.load(open_clip_world / "expected.pt")
    checkpoints = open_clip_world / "checkpoints" / "tiny"
    encoder = read_module(checkpoints / "MNIST" / "finetuned.pt")
    assert "src" not in sys.modules  # the saving code is gone; nothing imported it again
    assert encoder.classes[""] == "src.modeling.ImageEncoder" and encoder.classes["model"] == "open_clip.model.CLIP"
    assert encoder.classes["model.visual.transformer.resblocks.0.mlp.gelu"] == "open_clip.transformer.QuickGELU"
    assert list(encoder.state_dict) == list(expected["mnist"])
    for key, tensor in expected["mnist"].items():
        assert torch.equal(encoder.state_dict[key], tensor), key
    head = read_module(checkpoints / "head_MNIST.pt")
    assert head.attributes["normalize"] is True and head.classes[""] == "src.modeling.ClassificationHead"
    assert torch.equal(head.state_dict["weight"], expected["head_mnist"]["weight"])


def malicious_checkpoint(path, marker) -> None:
    """A torch.save zip whose pickle, when loaded, calls os.system to create `marker`."""

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    pickle_name = next(name for name in entries if name.endswith("data.pkl"))
    entries[pickle_name] = pickle.dumps(Exploit(), protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def test_a_malicious_checkpoint_is_refused_in_one_line_and_runs_nothing(open_clip_world, tmp_path):
    bad, marker = tmp_path / "finetuned.pt", tmp_path / "pwned"
    malicious_checkpoint(bad, marker)
    pool = OpenCLIPVisionModelPool({"_pretrained_": {"model_name": model_name_of(open_clip_world), "pickle_path": str(bad)}})
    with pytest.raises(InputError, match="is a pickle that calls posix.system, which fusion_bench does not run") as error:
        pool.state_dict("_pretrained_")
    assert "\n" not in str(error.value) and not marker.exists()

    config_dir = tmp_path / "configs"
    write_open_clip_configs(config_dir, open_clip_world)
    result = run_cli(
        "--config-dir", str(config_dir), "method=ties_merging", "modelpool=tiny_open_clip", "taskpool=tiny_open_clip",
        f"modelpool.models._pretrained_.pickle_path={bad}", f"report_save_path={tmp_path / 'report.json'}",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert_one_line_error(result, "calls posix.system, which fusion_bench does not run")
    assert not marker.exists() and not (tmp_path / "report.json").exists()


def test_the_pool_streams_the_converted_checkpoints_and_builds_image_encoders(open_clip_world):
    expected = torch.load(open_clip_world / "expected.pt")
    pool = pool_of(open_clip_world)
    assert pool.model_names == list(OPEN_CLIP_TASKS) and pool.architecture() == (model_name_of(open_clip_world), True)
    lazy = pool.state_dict("eurosat")
    assert isinstance(lazy, SafetensorsStateDict) and sorted(lazy) == sorted(expected["eurosat"])
    assert lazy.shape("model.visual.proj") == (32, 16) and torch.equal(lazy["model.visual.proj"], expected["eurosat"]["model.visual.proj"])
    converted = lazy._entries["model.visual.proj"][0].path
    assert converted.parent.name == "open_clip_checkpoints" and converted.suffix == ".safetensors"

    again = pool_of(open_clip_world)  # a later run: the cache's conversion, not a second one
    mtime = converted.stat().st_mtime_ns
    assert again.state_dict("eurosat")._entries["model.visual.proj"][0].path == converted and converted.stat().st_mtime_ns == mtime

    encoder = pool.load_model("eurosat")
    assert isinstance(encoder, ImageEncoder) and not hasattr(encoder.model, "transformer")
    assert type(encoder.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    for key, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, expected["eurosat"][key]), key
    head = pool.load_classification_head("eurosat")
    assert isinstance(head, ClassificationHead) and head.normalize and torch.equal(head.weight, expected["head_eurosat"]["weight"])
    assert set(pool.local_paths()) >= {"the model pool's model_dir", "the model pool's classification_heads.mnist", "the model pool's models.mnist.pickle_path"}


def test_a_bare_checkpoint_path_finds_its_open_clip_model_from_the_shapes(open_clip_world):
    """FusionBench's ViT-B-16 / ViT-L-14 configs give bare paths: the model is the built-in open_clip
    config with the checkpoint's ViT shapes."""
    checkpoints = open_clip_world / "checkpoints" / "tiny"
    registered = open_clip_world.parent / "registered_configs"
    registered.mkdir(exist_ok=True)
    config = json.loads((open_clip_world / "model" / "open_clip_config.json").read_text())["model_cfg"]
    (registered / "tiny-ViT.json").write_text(json.dumps({**config, "quick_gelu": False}))  # the activation comes from the pickle
    open_clip.add_model_config(registered)
    pool = OpenCLIPVisionModelPool({"_pretrained_": str(checkpoints / "zeroshot.pt"), "mnist": str(checkpoints / "MNIST" / "finetuned.pt")})
    assert pool.architecture() == ("tiny-ViT", True)
    assert type(pool.load_model("mnist").model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_an_open_clip_vit_in_hugging_face_layout_gives_the_same_features_both_ways(quick_gelu, open_clip_world):
    from transformers import CLIPVisionModelWithProjection

    from fusion_bench.models.open_clip_hf import hf_to_open_clip_visual, hf_vision_config, open_clip_visual_to_hf

    encoder = ImageEncoder(model_name_of(open_clip_world), quick_gelu=quick_gelu)
    encoder.load_state_dict(torch.load(open_clip_world / "expected.pt")["mnist"])
    visual = encoder.model.visual.eval()
    hf = CLIPVisionModelWithProjection(hf_vision_config(visual)).eval()
    assert hf.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    converted = open_clip_visual_to_hf(visual.state_dict())
    assert sorted(converted) == sorted(hf.state_dict())
    hf.load_state_dict(converted)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images).image_embeds, visual(images), atol=1e-5, rtol=0)

    back = hf_to_open_clip_visual(hf.state_dict())
    assert sorted(back) == sorted(visual.state_dict())
    assert all(torch.equal(back[key], tensor) for key, tensor in visual.state_dict().items())
    # a CLIPVisionModel (no projection) with the base CLIP's projection; an ImageEncoder's prefix
    tower = {key: value for key, value in hf.state_dict().items() if key != "visual_projection.weight"}
    prefixed = hf_to_open_clip_visual(tower, prefix="model.visual.", projection=hf.visual_projection.weight)
    assert sorted(prefixed) == sorted(f"model.visual.{key}" for key in visual.state_dict())
    assert open_clip_visual_to_hf(prefixed, prefix="model.visual.").keys() == converted.keys()
    with pytest.raises(InputError, match="no visual_projection.weight; give the base CLIPModel's as `projection`"):
        hf_to_open_clip_visual(tower)


def test_the_image_transform_in_two_halves_equals_open_clip_s(open_clip_world):
    from PIL import Image

    preprocess = ImageEncoder(model_name_of(open_clip_world)).val_preprocess
    transform = OpenCLIPImageTransform(preprocess)
    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (28, 28), generator=generator, dtype=torch.uint8).numpy(), mode="L"),
        Image.fromarray(torch.randint(0, 256, (61, 40, 3), generator=generator, dtype=torch.uint8).numpy()),
        Image.fromarray(torch.randint(0, 256, (37, 301, 3), generator=generator, dtype=torch.uint8).numpy()),
        Image.fromarray(torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()),  # smaller than the crop
    ]
    ours = transform.normalize(torch.stack([torch.from_numpy(transform.to_uint8(image)) for image in images]))
    torch.testing.assert_close(ours, torch.stack([preprocess(image) for image in images]), atol=1e-6, rtol=0)


def test_the_task_pool_scores_as_task_vectors_with_heads_or_zero_shot(open_clip_world):
    pool = pool_of(open_clip_world)
    encoder = pool.load_model("_pretrained_")
    heads = {task: pool.load_classification_head(task) for task in OPEN_CLIP_TASKS}
    expected = reference_metrics(encoder, heads, open_clip_world)

    with_heads = taskpool_of(open_clip_world)
    with_heads.check_modelpool(pool)
    with_heads.prepare()
    report = with_heads.evaluate(encoder)
    zero_shot = taskpool_of(open_clip_world, heads=False).evaluate(encoder)  # the heads were built from this text tower
    for task in OPEN_CLIP_TASKS:
        for metrics in (report[task], zero_shot[task]):
            assert metrics["accuracy"] == pytest.approx(expected[task]["accuracy"], abs=1e-9)
            assert metrics["loss"] == pytest.approx(expected[task]["loss"], abs=1e-5)
    assert set(report) == {*OPEN_CLIP_TASKS, "average", "model_info"}
    assert taskpool_of(open_clip_world, fast_dev_run=True).evaluate(encoder)["mnist"]["accuracy"] >= 0


def test_head_and_model_mismatches_are_refused_before_merging(open_clip_world, tmp_path):
    checkpoints = open_clip_world / "checkpoints" / "tiny"
    swapped = taskpool_of(open_clip_world)
    swapped._head_specs["mnist"] = str(checkpoints / "head_GTSRB.pt")  # 43 classes, MNIST has 10
    with pytest.raises(InputError, match="the classification head of 'mnist' has 43 classes, but task 'mnist' has 10; is it that task's head"):
        swapped.prepare()
    with pytest.raises(InputError, match="task 'mnist' has no classification head; add its head_<Task>.pt"):
        OpenCLIPVisionModelTaskPool({"mnist": str(open_clip_world / "data" / "mnist")})
    with pytest.raises(InputError, match=r"model '_pretrained_': .*missing.pt does not exist; download the task_vectors checkpoints"):
        OpenCLIPVisionModelPool({"_pretrained_": {"model_name": "ViT-B-32", "pickle_path": str(tmp_path / "missing.pt")}}).prepare()
    with pytest.raises(InputError, match="model_name='ViT-Z-99' is not an open_clip model"):
        ImageEncoder("ViT-Z-99")
    mixed = pool_of(open_clip_world)
    mixed._models["mnist"] = {"model_name": "ViT-B-32", "pickle_path": str(checkpoints / "MNIST" / "finetuned.pt")}
    with pytest.raises(InputError, match="model 'mnist' is a ViT-B-32 but the pool's base model is a local-dir:"):
        mixed.prepare()

    from safetensors.torch import save_file

    from fusion_bench.modelpool.open_clip_vision import load_classification_head

    expected = torch.load(open_clip_world / "expected.pt")
    truncated = tmp_path / "truncated.safetensors"
    save_file({key: value.contiguous() for key, value in expected["mnist"].items() if key != "model.visual.proj"}, str(truncated))
    pool = OpenCLIPVisionModelPool({"_pretrained_": {"model_name": model_name_of(open_clip_world), "state_dict_path": str(truncated)}})
    with pytest.raises(InputError, match=r"lacks 'model.visual.proj', which open_clip's local-dir:.* has; is it an ImageEncoder of that model\?"):
        pool.load_model("_pretrained_")
    torch.save(expected["head_mnist"], tmp_path / "head_state_dict.pt")  # a head saved as its state dict: taken as normalising
    head = load_classification_head(str(tmp_path / "head_state_dict.pt"), "the head")
    assert head.normalize and torch.equal(head.weight, expected["head_mnist"]["weight"])


def test_ties_through_the_cli_on_both_pools_equals_ties_on_the_modules(open_clip_world, tmp_path):
    config_dir = tmp_path / "configs"
    write_open_clip_configs(config_dir, open_clip_world)
    saved = tmp_path / "merged"
    run_cli(
        "--config-dir", str(config_dir), "method=ties_merging", "modelpool=tiny_open_clip", "taskpool=tiny_open_clip",
        f"merged_model_save_path={saved}", f"report_save_path={tmp_path / 'report.json'}", cwd=tmp_path,
    )  # fmt: skip
    tasks = task_metrics(json.loads((tmp_path / "report.json").read_text()))
    assert list(tasks) == list(OPEN_CLIP_TASKS) and all(0 <= values["accuracy"] <= 1 and values["loss"] > 0 for values in tasks.values())

    from safetensors.torch import load_file

    pool = pool_of(open_clip_world)
    modules = {name: pool.load_model(name) for name in pool.all_model_names}  # FusionBench's API: a dict of modules
    expected = TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum").run(modules).state_dict()
    merged = load_file(str(saved / "model.safetensors"))
    assert merged.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, atol=1e-6, rtol=0, msg=key)

    # the saved merge reads back as a state_dict_path, and scores as the run scored it
    reread = OpenCLIPVisionModelPool({"_pretrained_": {"model_name": model_name_of(open_clip_world), "state_dict_path": str(saved / "model.safetensors")}})
    scored = taskpool_of(open_clip_world).evaluate(reread.load_model("_pretrained_"))
    for task in OPEN_CLIP_TASKS:
        assert scored[task]["accuracy"] == pytest.approx(tasks[task]["accuracy"]) and scored[task]["loss"] == pytest.approx(tasks[task]["loss"], abs=1e-5)


def test_open_clip_transformers_and_lightning_import_together():
    code = "import fusion_bench, open_clip, lightning, peft; from transformers import CLIPVisionModel, AutoModelForCausalLM; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
