"""FusionBench drop-in, its root configs: root keys with FusionBench's meaning (print_config,
print_function_call, save kwargs, dry runs), a user's FusionBench-style root config, --help.
Formats are those FusionBench 0.2.33 documents; the files below are written out in our own words,
and FusionBench itself is never imported. CLI runs are the expensive part (a few seconds each):
those that several tests read run once per module, in fixtures.
"""

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoModel, AutoTokenizer

from fusion_bench.method import SimpleAverageAlgorithm
from tests.conftest import TASKS, assert_one_line_error, run_cli
from tests.fusionbench_worlds import VOCAB, assert_same_weights, bert_args, bert_pool, write_bert_world


@pytest.fixture(scope="module")
def bert_world(tmp_path_factory, bert_pool_dir) -> Path:
    return write_bert_world(tmp_path_factory.mktemp("fusionbench_bert"), bert_pool_dir)


@pytest.fixture(scope="module")
def printed_run(tmp_path_factory, bert_world):
    """One run with print_config, print_function_call and merged_model_save_kwargs={save_tokenizer: true}."""
    work = tmp_path_factory.mktemp("printed_run")
    result = run_cli(
        *bert_args(bert_world, work / "run", "method=ties_merging", "print_config=true", "print_function_call=true",
                   f"merged_model_save_path={work / 'merged'}", "merged_model_save_kwargs={save_tokenizer: true}"),
        cwd=work,
    )  # fmt: skip
    return result, work


# --- root keys with FusionBench's meaning --------------------------------------------------------


def test_print_config_prints_the_composed_method_modelpool_and_taskpool(printed_run, bert_world):
    result, _ = printed_run
    printed = OmegaConf.to_container(OmegaConf.create(result.stdout.split("\n\n", 1)[0]))  # printed first, before any log line
    assert printed["method"]["_target_"] == "fusion_bench.method.TiesMergingAlgorithm" and printed["method"]["threshold"] == 20
    assert printed["modelpool"]["_target_"] == "fusion_bench.modelpool.AutoModelPool"
    assert printed["modelpool"]["models"] == {"_pretrained_": str(bert_world / "pool" / "pretrained"), **{t: str(bert_world / "pool" / t) for t in TASKS}}
    assert printed["taskpool"] == {"_target_": "fusion_bench.taskpool.DummyTaskPool"}


def test_print_function_call_logs_each_object_built(printed_run):
    result, _ = printed_run
    output = result.stdout + result.stderr
    for target in ("fusion_bench.method.TiesMergingAlgorithm(scaling_factor=0.3, threshold=20", "fusion_bench.modelpool.AutoModelPool(models=",
                   "fusion_bench.taskpool.DummyTaskPool()"):  # fmt: skip
        assert f"instantiating {target}" in output
    assert output.index("instantiating fusion_bench.method.") < output.index("merged with TiesMergingAlgorithm")


def test_save_tokenizer_saves_the_pools_tokenizer_beside_the_model(printed_run, bert_world):
    _, work = printed_run
    saved = work / "merged"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    assert tokenizer.get_vocab() == {token: i for i, token in enumerate(VOCAB)}
    assert tokenizer("hello world merge")["input_ids"] == [2, 5, 6, 7, 3]  # [CLS] hello world merge [SEP]
    assert AutoModel.from_pretrained(saved).config.hidden_size == 16
    listed = json.loads((saved / "fusion_bench_merged_model.json").read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(listed)


def test_an_unknown_save_kwarg_is_refused_naming_save_tokenizer(tmp_path, bert_world):
    saved = tmp_path / "merged"
    result = run_cli(*bert_args(bert_world, tmp_path / "run", "merged_model_save_kwargs={save_tokenizr: true}", f"merged_model_save_path={saved}"),
                     cwd=tmp_path, check=False)  # fmt: skip
    line = assert_one_line_error(result, "merged_model_save_kwargs has an unknown key 'save_tokenizr'")
    assert line.endswith("save_model takes: save_tokenizer")
    assert not saved.exists() and not (tmp_path / "run" / "report.json").exists()


def test_dry_run_checks_everything_and_merges_and_writes_nothing(tmp_path, bert_world):
    saved = tmp_path / "merged"
    result = run_cli(*bert_args(bert_world, tmp_path / "run", "dry_run=true", f"merged_model_save_path={saved}"), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "dry run:" in result.stdout and "nothing was merged or written" in result.stdout
    assert "merged with" not in output and "report:" not in output
    assert not saved.exists() and not (tmp_path / "run" / "report.json").exists()


def test_dry_run_still_refuses_bad_input(tmp_path, bert_world):
    saved = tmp_path / "merged"
    result = run_cli(*bert_args(bert_world, tmp_path / "run", "dry_run=true", "method=ties_merging", "method.threshold=0", f"merged_model_save_path={saved}"),
                     cwd=tmp_path, check=False)  # fmt: skip
    assert_one_line_error(result, "threshold=0 is out of range")
    assert "dry run" not in result.stdout and not saved.exists()

# --- a user's FusionBench-style root config ------------------------------------------------------


def test_a_fusion_bench_style_root_config_composes_and_runs(tmp_path, bert_world):
    config = tmp_path / "config"
    shutil.copytree(bert_world / "config", config)
    (config / "my_fusion.yaml").write_text(textwrap.dedent("""\
        defaults:
          - hydra: default
          - fabric: auto
          - path: default
          - modelpool: tiny_bert
          - method: simple_average
          - taskpool: dummy
          - _self_
        _target_: fusion_bench.programs.FabricModelFusionProgram
        _recursive_: false
        seed: 0
        fast_dev_run: false
        dry_run: false
        print_config: false
        print_function_call: false
        merged_model_save_path: "{log_dir}/merged_model"
        merged_model_save_kwargs: null
        report_save_path: "{log_dir}/program_report.json"
        """))
    log_dir = tmp_path / "logs"
    run_cli("--config-dir", str(config), "--config-name", "my_fusion", f"path.log_dir={log_dir}", cwd=tmp_path)
    report = json.loads((log_dir / "program_report.json").read_text())
    assert report["_fusion_bench_"]["status"] == "completed" and report["_fusion_bench_"]["config"]["seed"] == 0
    assert report["_fusion_bench_"]["config"]["method"]["_target_"] == "fusion_bench.method.SimpleAverageAlgorithm"
    assert_same_weights(SimpleAverageAlgorithm().run(bert_pool(bert_world)), AutoModel.from_pretrained(log_dir / "merged_model"))

# --- --help ---------------------------------------------------------------------------------------------


def test_help_says_what_fusion_bench_is_and_lists_the_choices(tmp_path, bert_world):
    config_root = Path(__file__).resolve().parents[1] / "config"
    for args in ([], ["--config-name", "fabric_model_fusion"]):
        text = run_cli(*args, "--help", "--config-dir", str(bert_world / "config"), cwd=tmp_path).stdout
        assert text.splitlines()[0].startswith("fusion_bench: merge fine-tuned models into one multi-task model")
        assert "hydra" not in text.splitlines()[0].lower() and "powered by hydra" not in text.lower()
        assert "_template" not in text
        listed = {group: [line for line in text.splitlines() if line.lstrip().startswith(f"{group}:")] for group in ("method", "modelpool", "taskpool")}
        assert all(len(lines) == 1 for lines in listed.values()), listed
        choices = set(text.replace(",", " ").split())
        for group in ("method", "modelpool", "taskpool"):
            shipped = [path.relative_to(config_root / group).with_suffix("").as_posix() for path in (config_root / group).rglob("*.yaml")]
            expected = {name for name in shipped if not any(part.startswith("_") for part in name.split("/"))}
            assert expected and expected <= choices, (group, expected - choices)
        assert "tiny_bert" in choices  # the user's --config-dir too

