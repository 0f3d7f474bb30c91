"""The report: FusionBench's layout, our record beside it, old reports, atomic and refused writes."""

import errno
import json
from pathlib import Path

import pytest

from fusion_bench.reporting.report import (
    META,
    SCHEMA,
    average_metrics,
    build_report,
    check_report_path,
    format_table,
    meta,
    read_report,
    task_metrics,
    write_report,
)
from fusion_bench.utils.errors import InputError


def example_report():
    return build_report(
        config={"method": {"_target_": "x"}},
        models={"_pretrained_": "base", "a": "a", "b": "b"},
        tasks={"a": {"accuracy": 0.5, "loss": 1.0}, "b": {"accuracy": 0.75}},
        model_info={"trainable_params": 1234, "all_params": 1234, "trainable_percentage": 1.0, "size_bytes": 4936},
        timing={"prepare_seconds": 0.5, "merge_seconds": 1.25, "eval_seconds": 2.5},
        overrides=["method=x"],
    )


def test_average_is_per_metric_over_the_tasks_that_have_it():
    assert average_metrics({"a": {"accuracy": 0.5, "loss": 1.0}, "b": {"accuracy": 0.75}}) == {"accuracy": 0.625, "loss": 1.0}
    assert average_metrics({}) == {}


def test_the_layout_is_fusionbenchs_with_our_record_under_one_key():
    report = json.loads(json.dumps(example_report()))  # as a script reads the file
    assert report["a"] == {"accuracy": 0.5, "loss": 1.0} and report["b"]["accuracy"] == 0.75
    assert report["average"] == {"accuracy": 0.625, "loss": 1.0}
    assert report["model_info"] == {"trainable_params": 1234, "all_params": 1234, "trainable_percentage": 1.0, "size_bytes": 4936}
    assert set(report) == {"a", "b", "average", "model_info", META}
    record = report[META]
    assert record["schema"] == SCHEMA and record["status"] == "completed" and record["error"] is None
    assert record["tasks"] == ["a", "b"] and record["overrides"] == ["method=x"] and record["timing"]["merge_seconds"] == 1.25
    assert "torch" in record["versions"] and record["peak_memory"]["rss_bytes"] > 0


def test_a_task_named_like_a_report_key_is_refused():
    with pytest.raises(InputError, match="a task is named 'average'"):
        build_report(tasks={"average": {"accuracy": 1.0}}, model_info=None, config={}, models={}, timing={})


def test_a_failed_run_says_why():
    report = build_report(tasks={}, model_info=None, config={"method": {}}, models={}, timing={}, error=InputError("threshold='abc' must be a number"))
    assert set(report) == {META} and meta(report)["status"] == "failed"
    assert meta(report)["error"] == {"type": "InputError", "message": "threshold='abc' must be a number"}


def test_table_lists_tasks_then_the_average():
    lines = format_table(example_report()).splitlines()
    assert lines[0].split() == ["task", "accuracy", "loss"]
    assert lines[2].split() == ["a", "0.5000", "1.0000"]
    assert lines[3].split() == ["b", "0.7500"]
    assert lines[4].split() == ["average", "0.6250", "1.0000"]
    assert "1,234 parameters" in lines[5] and "prepare 0.5 s | merge 1.2 s | eval 2.5 s" in lines[5]


def test_write_and_read_back(tmp_path):
    path = write_report(example_report(), tmp_path / "deep" / "report.json")
    report = read_report(path)
    assert meta(report)["schema"] == SCHEMA and task_metrics(report) == {"a": {"accuracy": 0.5, "loss": 1.0}, "b": {"accuracy": 0.75}}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_schema_1_reports_are_read_in_the_new_layout(tmp_path):
    old = {
        "schema": "fusion_bench.report/1",
        "created": "2026-11-20T10:00:00+00:00",
        "config": {"method": {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}},
        "models": {"_pretrained_": "base", "a": "a"},
        "versions": {"torch": "2.13.0"},
        "tasks": {"a": {"accuracy": 0.5}},
        "average": {"accuracy": 0.5},
        "model_info": {"parameters": 10, "size_bytes": 40},
        "timing": {"merge_seconds": 1.0, "eval_seconds": 2.0},
        "peak_memory": {"rss_bytes": 100, "cuda_bytes": None},
    }
    (tmp_path / "report.json").write_text(json.dumps(old))
    report = read_report(tmp_path / "report.json")
    assert report["a"] == {"accuracy": 0.5} and report["average"] == {"accuracy": 0.5} and report["model_info"]["all_params"] == 10
    assert meta(report)["config"] == old["config"] and meta(report)["created"] == old["created"] and meta(report)["timing"] == old["timing"]
    assert meta(report)["upgraded_from"] == "fusion_bench.report/1" and meta(report)["peak_memory"]["rss_bytes"] == 100


def test_reading_something_else_fails_clearly(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="is not a fusion_bench report"):
        read_report(tmp_path / "x.json")


def test_report_paths_that_would_replace_something_are_refused(tmp_path):
    with pytest.raises(InputError, match=r"is a folder; give a file path, e.g. report_save_path=.*report.json"):
        check_report_path(tmp_path, overwrite=False)
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    with pytest.raises(InputError, match="exists; to replace it add report_save_overwrite=true"):
        check_report_path(notes, overwrite=False)
    with pytest.raises(InputError, match="is not a fusion_bench report; fusion_bench replaces only its own reports"):
        check_report_path(notes, overwrite=True)
    earlier = write_report(example_report(), tmp_path / "earlier.json")
    assert check_report_path(earlier, overwrite=True) == earlier
    assert check_report_path(tmp_path / "new" / "report.json", overwrite=False) == tmp_path / "new" / "report.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert notes.read_text() == "{}"


def test_a_full_disk_leaves_the_earlier_report_and_no_temporary_file(tmp_path, monkeypatch):
    path = write_report(example_report(), tmp_path / "report.json")
    before = path.read_text()

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(InputError, match=r"writing the report to .* failed \(No space left on device\)"):
        write_report(example_report(), path)
    monkeypatch.undo()
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["report.json"]
