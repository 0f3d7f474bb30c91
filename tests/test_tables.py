"""Tables and figures from reports: rows, normalisation, the best λ, choosing λ on validation."""

import pytest

from fusion_bench.reporting.cli import main as report_main
from fusion_bench.reporting.report import build_report, meta, write_report
from fusion_bench.reporting.tables import INDIVIDUAL, ZERO_SHOT, find_reports, mark_best, render, rows_from_reports
from fusion_bench.utils.errors import InputError

TASKS = ("alpha", "beta")


def report(method: dict, scores: dict, split: str = "test", models=TASKS) -> dict:
    return build_report(
        config={"method": method, "taskpool": {"_target_": "x", "split": split}},
        models={"_pretrained_": "base", **{m: m for m in models}},
        tasks={task: {"accuracy": value} for task, value in scores.items()},
        model_info={"trainable_params": 1, "all_params": 1, "trainable_percentage": 1.0},
        timing={"merge_seconds": 0.0, "eval_seconds": 0.0},
    )


TA = "fusion_bench.method.TaskArithmeticAlgorithm"
TIES = "fusion_bench.method.TiesMergingAlgorithm"
DUMMY = "fusion_bench.method.DummyAlgorithm"


@pytest.fixture()
def reports():
    return [
        report({"_target_": DUMMY, "model_name": None}, {"alpha": 0.5, "beta": 0.25}),
        report({"_target_": DUMMY, "model_name": "alpha"}, {"alpha": 0.8}),
        report({"_target_": DUMMY, "model_name": "beta"}, {"beta": 0.5}),
        report({"_target_": TA, "scaling_factor": 0.3}, {"alpha": 0.6, "beta": 0.4}),
        report({"_target_": TA, "scaling_factor": 0.5}, {"alpha": 0.7, "beta": 0.45}),
        report({"_target_": TIES, "scaling_factor": 0.5, "threshold": 20, "merge_func": "mean", "remove_keys": [], "trim_scope": "global", "elect": True}, {"alpha": 0.72, "beta": 0.4}),
        report({"_target_": TA, "scaling_factor": 0.3}, {"alpha": 0.9, "beta": 0.9}, split="validation"),
        report({"_target_": TA, "scaling_factor": 0.5}, {"alpha": 0.1, "beta": 0.1}, split="validation"),
    ]


def test_rows_name_methods_by_what_differs_from_their_defaults(reports):
    rows = {row.label: row for row in rows_from_reports(reports) if row.split == "test"}
    assert set(rows) == {INDIVIDUAL, ZERO_SHOT, "Task Arithmetic, λ=0.3", "Task Arithmetic, λ=0.5", "TIES (merge_func=mean), λ=0.5"}
    assert rows[INDIVIDUAL].scores == {"alpha": 0.8, "beta": 0.5}  # assembled from one report per task
    assert rows["Task Arithmetic, λ=0.5"].average == pytest.approx(0.575)


def test_individual_models_may_carry_a_prefix_before_their_task():
    """FusionBench's Flan-T5 pools name the GLUE task `cola`'s model `glue-cola`."""
    reports = [
        report({"_target_": DUMMY, "model_name": "glue-cola"}, {"cola": 0.7, "rte": 0.5}, models=("glue-cola", "glue-rte")),
        report({"_target_": DUMMY, "model_name": "glue-rte"}, {"cola": 0.6, "rte": 0.8}, models=("glue-cola", "glue-rte")),
    ]
    (individual,) = rows_from_reports(reports)
    assert individual.label == INDIVIDUAL and individual.scores == {"cola": 0.7, "rte": 0.8}


def test_rows_come_in_the_papers_order_each_method_by_lambda(reports):
    shuffled = [reports[i] for i in (4, 3, 1, 5, 0, 2)]  # sweeps list runs 0, 1, 10, 11, ..., 2
    labels = [row.label for row in rows_from_reports(shuffled)]
    assert labels == [ZERO_SHOT, INDIVIDUAL, "Task Arithmetic, λ=0.3", "Task Arithmetic, λ=0.5", "TIES (merge_func=mean), λ=0.5"]


def test_a_scaling_table_names_how_many_tasks_each_row_merged():
    reports = [
        report({"_target_": TA, "scaling_factor": 0.3}, {"alpha": 0.6, "beta": 0.4}),
        report({"_target_": TA, "scaling_factor": 0.5}, {"alpha": 0.7, "beta": 0.5}),
        report({"_target_": TA, "scaling_factor": 0.3}, {"alpha": 0.9}, models=("alpha",)),
    ]
    rows = mark_best(rows_from_reports(reports))
    assert [row.best for row in rows] == [False, False, True]  # the best of the two-task rows; a lone row is not marked
    lines = render(rows).splitlines()[2:]
    assert [line.split(" | ")[0] for line in lines] == ["| Task Arithmetic, λ=0.3 [1 tasks]", "| Task Arithmetic, λ=0.3 [2 tasks]", "| **Task Arithmetic, λ=0.5 [2 tasks]**"]


def test_normalised_scores_divide_by_the_individual_models(reports):
    test_reports = [r for r in reports if meta(r)["config"]["taskpool"]["split"] == "test"]
    rows = {row.label: row for row in rows_from_reports(test_reports, normalized=True)}
    assert rows["Task Arithmetic, λ=0.5"].scores == pytest.approx({"alpha": 0.875, "beta": 0.9})
    assert rows[INDIVIDUAL].average == pytest.approx(1.0)
    with pytest.raises(InputError, match="test score on 'alpha'; run method=dummy method.model_name=alpha$"):
        rows_from_reports([r for r in test_reports if meta(r)["config"]["method"].get("model_name") != "alpha"], normalized=True)
    with pytest.raises(InputError, match="validation score on 'alpha'; .* taskpool.split=validation"):
        rows_from_reports(reports, normalized=True)


def test_best_lambda_is_marked_and_validation_can_choose_it(reports):
    marked = [row.label for row in mark_best(rows_from_reports(reports)) if row.best]
    assert "Task Arithmetic, λ=0.5" in marked and "Task Arithmetic, λ=0.3" not in marked
    chosen = {row.label: row for row in mark_best(rows_from_reports(reports), select_on="validation")}
    assert set(chosen) == {INDIVIDUAL, ZERO_SHOT, "Task Arithmetic, λ=0.3 (chosen on validation)", "TIES (merge_func=mean), λ=0.5"}
    assert chosen["Task Arithmetic, λ=0.3 (chosen on validation)"].split == "test"  # best on validation, reported on test


def test_render_markdown_csv_latex(reports):
    rows = mark_best(rows_from_reports([r for r in reports if meta(r)["config"]["taskpool"]["split"] == "test"]))
    markdown = render(rows, "markdown").splitlines()
    assert markdown[0] == "| method | alpha | beta | average |"
    assert "| **Task Arithmetic, λ=0.5** | **70.0** | **45.0** | **57.5** |" in markdown
    assert "| Pretrained (zero-shot) | 50.0 | 25.0 | 37.5 |" in markdown
    csv_lines = render(rows, "csv").splitlines()
    assert csv_lines[0] == "method,alpha,beta,average" and '"Task Arithmetic, λ=0.5 *",70.0,45.0,57.5' in csv_lines
    latex = render(rows, "latex")
    assert r"\textbf{Task Arithmetic, $\lambda$=0.5}" in latex and latex.startswith(r"\begin{tabular}{lrrr}")
    with pytest.raises(InputError, match="format 'html' is unknown"):
        render(rows, "html")


def test_the_command_writes_a_table_and_figures(tmp_path, reports, capsys):
    for i, r in enumerate(reports):
        write_report(r, tmp_path / "sweep" / str(i) / "report.json")
    report_main([str(tmp_path / "sweep"), "--select-on", "validation", "--output", str(tmp_path / "table.md"), "--figures", str(tmp_path / "figures")])
    table = (tmp_path / "table.md").read_text()
    assert "| Task Arithmetic, λ=0.3 (chosen on validation) | 60.0 | 40.0 | 50.0 |" in table and "**" not in table
    assert (tmp_path / "figures" / "lambda.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        report_main([str(tmp_path / "missing")])
    assert "missing does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        report_main([str(tmp_path / "empty")])
    assert "no report.json under" in capsys.readouterr().err


def test_find_reports_reads_nested_sweeps(tmp_path, reports):
    write_report(reports[3], tmp_path / "a" / "0" / "report.json")
    write_report(reports[4], tmp_path / "a" / "1" / "report.json")
    assert len(find_reports([tmp_path / "a"])) == 2


def test_the_command_can_keep_one_split(tmp_path, reports):
    for i, r in enumerate(reports):
        write_report(r, tmp_path / "sweep" / str(i) / "report.json")
    report_main([str(tmp_path / "sweep"), "--split", "test", "--normalized", "--output", str(tmp_path / "table.md")])
    assert "| **Task Arithmetic, λ=0.5** | **87.5** | **90.0** | **88.8** |" in (tmp_path / "table.md").read_text()


def test_failed_runs_are_listed_and_a_sweep_without_scores_says_so(tmp_path, reports, capsys):
    write_report(reports[3], tmp_path / "sweep" / "0" / "report.json")
    failure = build_report(tasks={}, model_info=None, config={"method": {"_target_": TA}}, models={}, timing={},
                           overrides=["method.scaling_factor=abc"], error=InputError("scaling_factor='abc' must be a finite number"))
    write_report(failure, tmp_path / "sweep" / "1" / "report.json")
    report_main([str(tmp_path / "sweep"), "--output", str(tmp_path / "table.md")])
    assert "Task Arithmetic, λ=0.3" in (tmp_path / "table.md").read_text()
    assert f"failed run: {tmp_path / 'sweep' / '1'}: method.scaling_factor=abc: scaling_factor='abc' must be a finite number" in capsys.readouterr().err

    unscored = build_report(tasks={}, model_info={"all_params": 1}, config={"method": {"_target_": TA, "scaling_factor": 0.3}, "taskpool": {"_target_": "fusion_bench.taskpool.DummyTaskPool"}}, models={}, timing={})
    write_report(unscored, tmp_path / "dummy" / "0" / "report.json")
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path / "dummy")])
    assert exit_info.value.code == 2
    assert "nothing to tabulate: 1 completed run(s) with no 'accuracy' score on any task (0 failed)" in capsys.readouterr().err


def test_tsv_m_s_alpha_is_its_lambda_and_a_list_of_alphas_names_the_row():
    tsv = "fusion_bench.method.TaskSingularVectorMerging"
    rows = rows_from_reports([
        report({"_target_": tsv, "alpha": 1.5, "exclude_keys": None, "return_single_task_models": False}, {"alpha": 0.6, "beta": 0.4}),
        report({"_target_": tsv, "alpha": [1.0, 2.0], "exclude_keys": None, "return_single_task_models": False}, {"alpha": 0.5, "beta": 0.5}),
    ])
    assert [row.label for row in rows] == ["TSV-M, λ=1.5", "TSV-M (alpha=[1.0,2.0])"]
