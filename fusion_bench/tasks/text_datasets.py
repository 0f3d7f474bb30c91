"""The offline tasks' train / validation / test splits, built once as parquet datasets.

Splits are seeded and disjoint: a text in train never appears in validation or test, even where
the corpus repeats it. Test and validation are random samples (the Orange test files are sorted by
class), so their class mix is the corpus's.
"""

import random
from collections.abc import Iterator

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from fusion_bench.tasks.offline_text import TASKS, TextTask, examples
from fusion_bench.utils.cache import build_once, cache_dir

TEST_SIZE = 400
VALIDATION_SIZE = 200
SPLITS_VERSION = 1  # bump when the way splits are drawn changes


def task_splits(task: TextTask | str, seed: int = 0) -> DatasetDict:
    """{"train", "validation", "test"}: columns text and label (a ClassLabel of task.classes)."""
    task = TASKS[task] if isinstance(task, str) else task
    folder = cache_dir() / "text_tasks" / f"{task.name}-seed{seed}-v{SPLITS_VERSION}"

    def build(staging):
        features = Features({"text": Value("string"), "label": ClassLabel(names=list(task.classes))})
        for split, rows in draw_splits(task, seed).items():
            Dataset.from_dict({"text": [t for t, _ in rows], "label": [features["label"].str2int(l) for _, l in rows]}, features=features).to_parquet(staging / f"{split}.parquet")

    build_once(folder, build)
    return DatasetDict({split: Dataset.from_parquet(str(folder / f"{split}.parquet")) for split in ("train", "validation", "test")})


def draw_splits(task: TextTask, seed: int) -> dict[str, list[tuple[str, str]]]:
    """Test from the corpus's own test split where it has one, else from all examples; then
    validation and train from the rest; a text already drawn is skipped, so splits are disjoint."""
    given: dict[str, list[tuple[str, str]]] = {}
    for split, example in examples(task):
        given.setdefault(split, []).append(example)
    rng = random.Random(f"{task.name}/{seed}")
    for rows in given.values():
        rng.shuffle(rows)
    training = iter(given.get("train", given.get("all")))
    testing = iter(given["test"]) if "test" in given else training
    seen: set[str] = set()
    return {
        "test": _take(testing, TEST_SIZE, seen),
        "validation": _take(training, VALIDATION_SIZE, seen),
        "train": _take(training, None, seen),
    }


def _take(stream: Iterator[tuple[str, str]], size: int | None, seen: set[str]) -> list[tuple[str, str]]:
    kept = []
    while size is None or len(kept) < size:
        example = next(stream, None)
        if example is None:
            break
        if example[0] not in seen:
            seen.add(example[0])
            kept.append(example)
    return kept
