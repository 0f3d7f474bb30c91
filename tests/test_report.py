"""The report: averages, the table people read, and atomic writes."""

import json

import pytest

from fusion_bench.report import SCHEMA, average_metrics, build_report, format_table, read_report, write_report


def example_report():
    return build_report(
        config={"method": {"_target_": "x"}},
        models={"_pretrained_": "base", "a": "a", "b": "b"},
        tasks={"a": {"accuracy": 0.5, "loss": 1.0}, "b": {"accuracy": 0.75}},
        model_info={"parameters": 1234, "size_bytes": 4936},
        merge_seconds=1.25,
        eval_seconds=2.5,
    )


def test_average_is_per_metric_over_the_tasks_that_have_it():
    assert average_metrics({"a": {"accuracy": 0.5, "loss": 1.0}, "b": {"accuracy": 0.75}}) == {"accuracy": 0.625, "loss": 1.0}
    assert average_metrics({}) == {}


def test_table_lists_tasks_then_the_average():
    lines = format_table(example_report()).splitlines()
    assert lines[0].split() == ["task", "accuracy", "loss"]
    assert lines[2].split() == ["a", "0.5000", "1.0000"]
    assert lines[3].split() == ["b", "0.7500"]
    assert lines[4].split() == ["average", "0.6250", "1.0000"]
    assert "1,234 parameters" in lines[5] and "merge 1.2 s" in lines[5]


def test_write_and_read_back(tmp_path):
    path = write_report(example_report(), tmp_path / "deep" / "report.json")
    report = read_report(path)
    assert report["schema"] == SCHEMA and report["average"]["accuracy"] == 0.625
    assert "torch" in report["versions"] and report["peak_memory"]["rss_bytes"] > 0
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_reading_something_else_fails_clearly(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="is not a fusion_bench report"):
        read_report(tmp_path / "x.json")
