"""The catalogue of bad input, end to end through the `fusion_bench` command.

Each case must end with exit status 2, exactly one line on stderr that names the problem (and the
fix), and nothing written or deleted anywhere: the work folder, the pool's models and every file
around them are byte for byte as they were (Hydra's own .hydra/ folder and log file aside).
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusion_bench.reporting.report import meta
from fusion_bench.utils.model_saving import MARKER
from tests.clip_fixtures import write_clip_configs
from tests.conftest import assert_one_line_error, finetuned_copy, run_cli, tiny_bert, write_pool_config

REPO = Path(__file__).resolve().parents[1]


class Exploit:
    """A pickle that would create a file when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, bert_pool_dir):
    """A work folder with a user config dir: the good tiny BERT pool, broken pools, a folder of the
    user's notes, an earlier merged model, and files that must never be replaced."""
    root = tmp_path_factory.mktemp("bad_input")
    config = root / "config"
    write_pool_config(config, bert_pool_dir)
    pools = config / "modelpool"
    broken = root / "broken"
    broken.mkdir()
    (broken / "empty").mkdir()
    (broken / "bad_json").mkdir()
    (broken / "bad_json" / "config.json").write_text("{not json")
    (broken / "garbage.safetensors").write_bytes(b"\xff" * 64)
    tensors = {k: v.contiguous() for k, v in tiny_bert(0).state_dict().items()}
    save_file(tensors, str(broken / "whole.safetensors"))
    (broken / "cut.safetensors").write_bytes((broken / "whole.safetensors").read_bytes()[:-100])
    (broken / "model.onnx").write_bytes(b"onnx")
    with open(broken / "evil.bin", "wb") as file:
        pickle.dump(Exploit(root / "exploited"), file)
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=32)).save_pretrained(broken / "wider")  # fmt: skip
    nan_model = finetuned_copy(tiny_bert(0), seed=9)
    with torch.no_grad():
        nan_model.pooler.dense.weight[0, 0] = float("nan")
    nan_model.save_pretrained(broken / "nan")

    def pool(name: str, task_model: Path) -> None:
        (pools / f"{name}.yaml").write_text(
            f"_target_: fusion_bench.modelpool.AutoModelPool\nmodels:\n  _pretrained_: {bert_pool_dir / 'pretrained'}\n  alpha: {task_model}\n"
        )

    for name in ("empty", "bad_json", "garbage.safetensors", "cut.safetensors", "model.onnx", "evil.bin", "wider"):
        pool(name.replace(".", "_"), broken / name)
    pool("with_nan", broken / "nan")
    pool("missing", broken / "nowhere")
    (pools / "blank.yaml").write_text("# nothing here\n")
    (pools / "typo.yaml").write_text(f"_target_: fusion_bench.modelpool.AutoModelPool\nmodles:\n  _pretrained_: {bert_pool_dir / 'pretrained'}\n")
    (config / "taskpool").mkdir()
    (config / "taskpool" / "unset.yaml").write_text("_target_: fusion_bench.taskpool.CLIPVisionModelTaskPool\ntest_datasets: ???\n")

    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("my notes")
    (root / "notes.json").write_text("{}")
    (root / "link").symlink_to(root / "notes")
    earlier = root / "earlier"
    run_cli("--config-dir", str(config), "modelpool=tiny_bert", "taskpool=dummy", "method=task_arithmetic",
            f"merged_model_save_path={earlier}", f"hydra.run.dir={root / 'runs' / 'earlier'}", cwd=root)  # fmt: skip
    mixed = root / "earlier_with_notes"
    run_cli("--config-dir", str(config), "modelpool=tiny_bert", "taskpool=dummy", "method=task_arithmetic",
            f"merged_model_save_path={mixed}", f"hydra.run.dir={root / 'runs' / 'mixed'}", cwd=root)  # fmt: skip
    (mixed / "notes.txt").write_text("mine")
    return root


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under the roots with its size and modification time."""
    files = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def path_fields(world: Path, bert: Path) -> dict[str, Path]:
    """The paths a case may name, as format fields."""
    return {"w": world, "pool": bert, "pretrained": bert / "pretrained"}


# (id, overrides, a fragment the one line must hold). {w} is the work folder, {pool} the good pool.
CASES = [
    # saving: nothing the run did not write is deleted or replaced
    ("save-into-a-folder-of-notes", ["merged_model_save_path={w}/notes"], "is a folder that holds other files (notes.txt), not a merged model saved by fusion_bench"),
    ("save-over-a-model-of-the-pool", ["merged_model_save_path={pretrained}"], "the model pool's models._pretrained_; a save there would replace it"),
    ("save-over-the-folder-of-the-pool", ["merged_model_save_path={pool}"], "contains {pretrained}, the model pool's models._pretrained_"),
    ("save-inside-a-model-of-the-pool", ["merged_model_save_path={pool}/alpha/merged"], "lies inside {pool}/alpha, the model pool's models.alpha"),
    ("save-over-a-file", ["merged_model_save_path={w}/notes.json"], "is an existing file; fusion_bench replaces nothing it did not write"),
    ("save-at-the-root", ["merged_model_save_path=/"], "merged_model_save_path=/ contains"),
    ("save-through-a-link", ["merged_model_save_path={w}/link"], "is a symbolic link"),
    ("save-over-an-earlier-model", ["merged_model_save_path={w}/earlier"], "holds a merged model saved on"),
    ("save-over-an-earlier-model-with-notes", ["merged_model_save_path={w}/earlier_with_notes", "merged_model_save_overwrite=true"], "holds files fusion_bench did not write (notes.txt)"),
    ("save-where-nothing-can-be-written", ["merged_model_save_path=/proc/x"], "cannot write in /proc"),
    ("save-under-a-file", ["merged_model_save_path={w}/notes.json/merged"], "which is a file, not a folder"),
    ("save-kwargs-unknown", ["merged_model_save_path={w}/new", "merged_model_save_kwargs={{foo:1}}"], "merged_model_save_kwargs has an unknown key 'foo'; AutoModelPool.save_model takes: save_tokenizer"),
    ("save-a-tokenizer-the-pool-lacks", ["merged_model_save_path={w}/new", "merged_model_save_kwargs={{save_tokenizer:true}}"], "has no tokenizer files to save"),
    ("report-into-a-folder", ["report_save_path={w}/notes"], "report_save_path={w}/notes is a folder; give a file path"),
    ("report-over-a-file", ["report_save_path={w}/notes.json"], "exists; to replace it add report_save_overwrite=true"),
    ("report-over-a-file-not-ours", ["report_save_path={w}/notes.json", "report_save_overwrite=true"], "is not a fusion_bench report"),
    ("skip-completed-without-a-report", ["skip_completed=true", "report_save_path=null"], "skip_completed=true finds completed runs by their reports, and report_save_path is null"),
    ("skip-completed-over-a-file-not-ours", ["report_save_path={w}/notes.json", "skip_completed=true"], "is not a fusion_bench report"),
    ("skip-completed-not-a-boolean", ["skip_completed=yes"], "skip_completed='yes' must be true or false"),
    # hyper-parameters and settings
    ("threshold-not-a-number", ["method.threshold=abc"], "threshold='abc' must be a number"),
    ("threshold-null", ["method.threshold=null"], "threshold=None must be a number"),
    ("threshold-true", ["method.threshold=true"], "threshold=True must be a number"),
    ("threshold-out-of-range", ["method.threshold=0"], "threshold=0 is out of range"),
    ("scaling-factor-not-a-number", ["method.scaling_factor=abc"], "scaling_factor='abc' must be a finite number"),
    ("merge-func-unknown", ["method.merge_func=median"], "merge_func='median' is unknown"),
    ("seed-not-an-integer", ["seed=abc"], "seed='abc' must be an integer"),
    ("seed-a-float", ["seed=1.5"], "seed=1.5 must be an integer"),
    ("boolean-not-a-boolean", ["dry_run=1"], "dry_run=1 must be true or false"),
    ("dare-sparsity-ratio-1", ["method=dare/task_arithmetic", "method.sparsity_ratio=1.0"], "sparsity_ratio=1.0 must be a number in [0, 1)"),
    ("iso-cts-common-space-0", ["method=isotropic_merging/iso_cts", "method.common_space_fraction=0"], "common_space_fraction=0 must be a number in (0, 1]"),
    ("tsv-alpha-nan", ["method=task_singular_vector/TaskSingularVectorMerging", "method.alpha=nan"], "alpha=nan must be a finite number"),
    ("weights-one-per-model", ["method=linear/weighted_average"], "weights lists 2 numbers but the pool has 3 task models (alpha, beta, gamma)"),
    ("regmean-without-data", ["method=regmean/regmean"], "RegMean learns from data, which AutoModelPool does not provide"),
    ("fisher-without-data", ["method=fisher_merging/fisher_merging"], "Fisher merging learns from data, which AutoModelPool does not provide"),
    ("adamerging-without-data", ["method=adamerging/layer_wise"], "AdaMerging learns from data, which AutoModelPool does not provide"),
    ("regmean-ratio-above-1", ["method=regmean/regmean", "method.reduce_non_diagonal_ratio=1.5"], "reduce_non_diagonal_ratio=1.5"),
    ("fisher-estimate-unknown", ["method=fisher_merging/fisher_merging", "method.fisher_estimate=true_fisher"], "fisher_estimate='true_fisher' is unknown"),
    ("adamerging-steps-negative", ["method=adamerging/layer_wise", "method.max_steps=-1"], "max_steps=-1"),
    # config keys and names
    ("key-not-in-the-config", ["method.foo=1"], "method.foo: the method config has no key 'foo'; its keys are: scaling_factor, threshold"),
    ("key-not-taken-by-the-class", ["+method.foo=1"], "unknown key 'foo' for fusion_bench.method.TiesMergingAlgorithm; its keys are: scaling_factor"),
    ("key-for-a-class-without-keys", ["method=simple_average", "+method.foo=1"], "unknown key 'foo' for SimpleAverageAlgorithm; it takes no keys"),
    ("method-unknown", ["method=nope"], "method=nope is not a config; the choices are: adamerging/clip, adamerging/clip_task_wise, adamerging/layer_wise, adamerging/task_wise, breadcrumbs/task_arithmetic"),
    ("modelpool-unknown", ["modelpool=nope"], "modelpool=nope is not a config; the choices are: CLIPVisionModelPool/"),
    ("taskpool-unknown", ["taskpool=nope"], "taskpool=nope is not a config; the choices are: CLIPVisionModelTaskPool/clip-vit-classification_TA8,"),
    ("override-unparsable", ["method.threshold=[1"], "cannot parse the override"),
    ("group-given-a-number", ["method=1"], "a config group takes a config name"),
    ("interpolation-to-nothing", ["seed=${nope}"], "the config cannot be resolved: Interpolation key 'nope' not found"),
    ("modelpool-yaml-empty", ["modelpool=blank"], "the modelpool config is empty; name the class to build, e.g. _target_: fusion_bench.modelpool.AutoModelPool"),
    ("modelpool-key-misspelt", ["modelpool=typo"], "unknown key 'modles' for fusion_bench.modelpool.AutoModelPool; its keys are: models,"),
    ("taskpool-key-unset", ["taskpool=unset"], "the config leaves taskpool.test_datasets unset (???); give it a value"),
    # models
    ("model-missing", ["modelpool=missing"], "does not exist; check the path"),
    ("model-folder-empty", ["modelpool=empty"], "has no config.json"),
    ("model-config-invalid", ["modelpool=bad_json"], "is not a valid JSON file"),
    ("model-file-garbage", ["modelpool=garbage_safetensors"], "cannot read safetensors file"),
    ("model-file-truncated", ["modelpool=cut_safetensors"], "is truncated"),
    ("model-file-of-another-format", ["modelpool=model_onnx"], "is not a model file fusion_bench reads"),
    ("model-pickle-malicious", ["modelpool=evil_bin"], "torch.load(weights_only=True) refuses it"),
    ("model-of-another-shape", ["modelpool=wider"], "are they the same architecture?"),
    ("model-with-nan", ["modelpool=with_nan"], "has NaN or Inf values in 'pooler.dense.weight'"),
]


@pytest.mark.parametrize("case, overrides, fragment", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, bert_pool_dir, case, overrides, fragment):
    fields = path_fields(world, bert_pool_dir)
    run_dir = world / "runs" / case
    args = [o if "${" in o else o.format(**fields) for o in overrides]
    args = [d for d in ("modelpool=tiny_bert", "taskpool=dummy") if not any(a.startswith(d.split("=")[0] + "=") for a in args)] + args
    before = snapshot(world, bert_pool_dir)
    result = run_cli("--config-dir", str(world / "config"), *args, f"hydra.run.dir={run_dir}", cwd=world, check=False)
    assert_one_line_error(result, fragment.format(**fields))
    after = snapshot(world, bert_pool_dir)
    written = {path for path in set(after) - set(before) if not path.startswith(str(run_dir))}
    assert not written and {path: after[path] for path in before} == before
    assert not list(run_dir.glob("**/report.json")) and not (world / "new").exists() and not (world / "exploited").exists()
    assert not [p for p in world.iterdir() if ".partial-" in p.name]


def test_task_pools_refuse_their_bad_input_before_merging(tmp_path, clip_world):
    """A task pool whose CLIP model cannot be loaded, or whose test set cannot, or a Fabric that
    cannot be built, fails before the merge, so no merged model is saved and no report written."""
    config = tmp_path / "config"
    write_clip_configs(config, clip_world)
    saved = tmp_path / "merged"
    base = ["--config-dir", str(config), "modelpool=tiny_clip", "taskpool=tiny_clip", f"merged_model_save_path={saved}"]
    cases = [
        ([f"taskpool.base_model={tmp_path / 'no_clip'}"], "has no readable config"),
        ([f"taskpool.test_datasets.mnist.path={tmp_path / 'no_data'}"], "dataset 'mnist' cannot be loaded"),
        ([f"+taskpool.clip_model={{_target_: transformers.CLIPModel.from_pretrained, pretrained_model_name_or_path: {tmp_path / 'no_clip'}}}"], "has no readable config"),
        (["fabric.accelerator=foo"], "the fabric config cannot be built (ValueError: You selected an invalid accelerator name"),
    ]
    for i, (overrides, fragment) in enumerate(cases):
        result = run_cli(*base, *overrides, f"hydra.run.dir={tmp_path / 'runs' / str(i)}", cwd=tmp_path, check=False)
        assert_one_line_error(result, fragment)
        assert "merged with" not in result.stdout and not saved.exists() and not list(tmp_path.glob("runs/*/report.json"))


def test_one_bad_value_in_a_sweep_fails_only_its_run(tmp_path, bert_pool_dir):
    write_pool_config(tmp_path / "config", bert_pool_dir)
    sweep = tmp_path / "sweep"
    result = run_cli("--multirun", "--config-dir", str(tmp_path / "config"), "modelpool=tiny_bert", "taskpool=dummy", "method=task_arithmetic",
                     "method.scaling_factor=0.1,abc,0.5", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)  # fmt: skip
    assert result.returncode == 2
    reports = {run: json.loads((sweep / run / "report.json").read_text()) for run in ("0", "1", "2")}
    assert [meta(reports[run])["status"] for run in ("0", "1", "2")] == ["completed", "failed", "completed"]
    assert meta(reports["1"])["error"] == {"type": "InputError", "message": "scaling_factor='abc' must be a finite number, e.g. scaling_factor=0.3"}
    assert "method.scaling_factor=abc" in meta(reports["1"])["overrides"]
    assert meta(reports["2"])["config"]["method"]["scaling_factor"] == 0.5  # the run after the failed one ran
    assert result.stderr.splitlines()[-1] == "fusion_bench: error: 1 run(s) of the sweep failed; each left a report.json saying why, the others ran"
    listing = subprocess.run([sys.executable, "-m", "fusion_bench.reporting.cli", str(sweep)], capture_output=True, text=True, cwd=tmp_path)
    assert listing.returncode == 2
    assert f"failed run: {sweep / '1'}: " in listing.stderr and "scaling_factor='abc' must be a finite number" in listing.stderr
    assert "nothing to tabulate: 2 completed run(s) with no 'accuracy' score on any task (1 failed)" in listing.stderr


def test_the_earlier_merged_model_is_replaced_only_when_asked(world):
    """The one accepted case beside the catalogue: overwrite=true replaces our earlier model."""
    earlier = world / "earlier"
    marker_before = json.loads((earlier / MARKER).read_text())
    run_cli("--config-dir", str(world / "config"), "modelpool=tiny_bert", "taskpool=dummy", "method=simple_average",
            f"merged_model_save_path={earlier}", "merged_model_save_overwrite=true", f"hydra.run.dir={world / 'runs' / 'overwrite'}", cwd=world)  # fmt: skip
    marker = json.loads((earlier / MARKER).read_text())
    assert marker["config"]["method"]["_target_"].endswith("SimpleAverageAlgorithm") and marker_before["config"]["method"]["_target_"].endswith("TaskArithmeticAlgorithm")
    assert sorted(p.name for p in earlier.iterdir()) == sorted([*marker["files"], MARKER])
    assert not [p for p in world.iterdir() if ".partial-" in p.name]
