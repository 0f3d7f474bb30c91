"""Images/s of the CLIP task pool on CPU beside the reference FusionBench's, and the cost of a λ sweep.

    python benchmarks/clip_eval.py [--images-per-task 80] [--batch-size 128] [--num-workers 2] [--no-reference]

Writes once (cached under $FUSION_BENCH_CACHE or ~/.cache/fusion_bench/benchmarks) a random CLIP of
ViT-B/32 size (text tower included, with a CLIP BPE tokenizer learnt from the tasks' prompts) and
four generated image datasets in the hub's parquet layout, with the classes of EuroSAT, GTSRB, DTD
and RESISC45 and JPEG images of those datasets' sizes. Each measurement is a fresh process that
scores the pretrained vision tower:

- ours, cold: an empty head cache, so the zero-shot heads are computed;
- ours, sweep: ten evaluations of towers θ₀ + λ·δ (λ = 0.1 … 1.0) by one task pool, heads on disk;
  its cost is compared with ten times the image work of one evaluation (the median of evaluations
  2-10, which only score images);
- the reference FusionBench 0.2.33 task pool (its own venv, see ../shared/tools/reference-venv.sh),
  evaluated twice per process: the first includes its setup, the second is its steady state (it
  recomputes the heads at every evaluation). It runs before and after our sweep, and its faster
  run counts, so that a change of load on a shared machine does not favour us.

Both task pools get the same batch size and DataLoader workers. Evaluation time includes loading
the CLIP model and the datasets where the task pool does that inside `evaluate`. Each is reported
as wall time and as CPU time (the process and its DataLoader workers): on a shared machine wall
time moves with other people's work, CPU time much less.
"""

import argparse
import inspect
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fusion_bench.utils.cache import cache_dir  # noqa: E402

TASKS = ("eurosat", "gtsrb", "dtd", "resisc45")
LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]


def image_size(task: str, rng) -> tuple[int, int]:
    """(width, height) as in the real test sets."""
    if task == "eurosat":
        return 64, 64
    if task == "resisc45":
        return 256, 256
    if task == "gtsrb":
        side = int(rng.integers(25, 150))
        return side, side + int(rng.integers(-3, 4))
    return int(rng.integers(300, 641)), int(rng.integers(300, 641))  # dtd


def write_world(root: Path, images_per_task: int) -> Path:
    """root/clip (CLIPModel + processor) and root/data/<task> (parquet); kept between runs."""
    marker = root / "complete"
    if marker.exists():
        return root
    import numpy as np
    import torch
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from fusion_bench.tasks.clip_classification import classification_task
    from tests.clip_fixtures import build_clip_tokenizer, task_corpus

    tokenizer = build_clip_tokenizer(task_corpus(TASKS), vocab_size=2000)
    torch.manual_seed(0)
    config = CLIPConfig()  # ViT-B/32 and CLIP's text tower (12 layers, 512 wide)
    config.text_config.eos_token_id, config.text_config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    CLIPModel(config).save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(root / "clip")

    rng = np.random.default_rng(0)
    for task in TASKS:
        classnames = list(classification_task(task).classnames)
        images = []
        for _ in range(images_per_task):
            # smooth colour fields plus noise: JPEGs that decode like photographs, not like static
            small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(image_size(task, rng), Image.Resampling.BILINEAR)
            noisy = np.clip(np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (small.height, small.width, 3)), 0, 255)
            buffer = io.BytesIO()
            Image.fromarray(noisy.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            images.append({"bytes": buffer.getvalue(), "path": None})
        rows = {"image": images, "label": [int(rng.integers(len(classnames))) for _ in range(images_per_task)]}
        features = Features({"image": ImageFeature(), "label": ClassLabel(names=classnames)})
        path = root / "data" / task / "data" / "test-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(rows, features=features).to_parquet(str(path))
    marker.touch()
    return root


def clock() -> tuple[float, float]:
    """Wall seconds, and CPU seconds of this process and its finished children (DataLoader workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function):
    """function()'s result, and its {"wall": s, "cpu": s}. CPU time barely moves with the load of a
    shared machine; wall time does."""
    wall, cpu = clock()
    result = function()
    wall_end, cpu_end = clock()
    return result, {"wall": wall_end - wall, "cpu": cpu_end - cpu}


def run_json(command: list[str], env: dict | None = None) -> dict:
    """Run a measuring process; its last stdout line is its JSON result."""
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_ours(world: Path, mode: str, batch_size: int, num_workers: int) -> None:
    """In a fresh process: 'cold' evaluates once; 'sweep' evaluates ten towers θ₀ + λ·δ."""
    import torch
    from transformers import CLIPVisionModel

    from fusion_bench.taskpool import CLIPVisionModelTaskPool

    datasets = {task: {"_target_": "datasets.load_dataset", "path": str(world / "data" / task), "split": "test"} for task in TASKS}
    pool = CLIPVisionModelTaskPool(
        datasets, base_model=str(world / "clip"), dataloader_kwargs={"batch_size": batch_size, "num_workers": num_workers}
    )
    tower = CLIPVisionModel.from_pretrained(world / "clip")
    if mode == "cold":
        metrics, run = timed(lambda: pool.evaluate(tower))
        print(json.dumps({"runs": [run], "metrics": metrics}))
        return
    pretrained = {k: v.clone() for k, v in tower.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    direction = {k: 1e-3 * torch.randn(v.shape, generator=generator) for k, v in pretrained.items()}
    runs = []
    for scale in LAMBDAS:
        tower.load_state_dict({k: pretrained[k] + scale * direction[k] for k in pretrained})
        runs.append(timed(lambda: pool.evaluate(tower))[1])
    print(json.dumps({"runs": runs}))


def measure_reference(python: str, world: Path, batch_size: int, num_workers: int) -> dict:
    script = "import json, time\n" + inspect.getsource(clock) + inspect.getsource(timed) + textwrap.dedent(f"""
        import fusion_bench
        from datasets import load_dataset
        from transformers import CLIPVisionModel
        from fusion_bench.taskpool import CLIPVisionModelTaskPool
        world = {str(world)!r}
        tasks = {list(TASKS)!r}
        pool = CLIPVisionModelTaskPool(
            test_datasets={{t: load_dataset(f"{{world}}/data/{{t}}", split="test") for t in tasks}},
            processor=f"{{world}}/clip", clip_model=f"{{world}}/clip",
            dataloader_kwargs=dict(batch_size={batch_size}, num_workers={num_workers}, pin_memory=False, drop_last=False, shuffle=False),
        )
        tower = CLIPVisionModel.from_pretrained(f"{{world}}/clip")
        runs = []
        for _ in range(2):
            report, run = timed(lambda: pool.evaluate(tower))
            runs.append(run)
        print(json.dumps({{"runs": runs, "metrics": {{t: report[t] for t in tasks}}, "module": fusion_bench.__file__}}))
    """)
    # -I: with -c, Python puts the working directory first on sys.path, and from this repository
    # `import fusion_bench` would then load ours instead of the reference.
    result = run_json([python, "-I", "-c", script])
    if Path(result["module"]).is_relative_to(REPO):
        raise RuntimeError(f"the reference run imported {result['module']}, not the reference FusionBench")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-task", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference FusionBench")
    parser.add_argument("--measure", choices=["cold", "sweep"], help=argparse.SUPPRESS)  # a measuring child process
    parser.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure_ours(args.world, args.measure, args.batch_size, args.num_workers)
        return

    world = write_world(cache_dir("benchmarks", f"clip-eval-vit-b32-random-{args.images_per_task}"), args.images_per_task)
    images = args.images_per_task * len(TASKS)
    child = [sys.executable, __file__, "--world", str(world), "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
    python = None
    if not args.no_reference:
        python = subprocess.run([str(REPO.parent / "shared" / "tools" / "reference-venv.sh")], capture_output=True, text=True, check=True).stdout.strip()
    loads = []

    def logged(name, function):
        loads.append(os.getloadavg()[0])
        result = function()
        loads.append(os.getloadavg()[0])
        print(f"{name}: {result['runs']}", file=sys.stderr)
        return result

    # The reference runs before and after our sweep and its faster run counts: on a shared machine
    # the load changes during a run, and this way both sides see the same conditions.
    references = []
    with tempfile.TemporaryDirectory() as heads:  # a head cache of its own: the first run computes them
        env = {"FUSION_BENCH_CACHE": heads}
        cold = logged("ours, cold", lambda: run_json(child + ["--measure", "cold"], env))
        if python:
            references.append(logged("reference", lambda: measure_reference(python, world, args.batch_size, args.num_workers)))
        sweep = logged("ours, sweep", lambda: run_json(child + ["--measure", "sweep"], env))
        if python:
            references.append(logged("reference", lambda: measure_reference(python, world, args.batch_size, args.num_workers)))

    def best(runs, key):  # the run least disturbed by other work
        return min(runs, key=lambda run: run[key])

    steady = {key: statistics.median(run[key] for run in sweep["runs"][1:]) for key in ("wall", "cpu")}  # the first loads model, data, heads
    rows = [
        ("fusion_bench, first run (heads computed)", cold["runs"][0]),
        ("fusion_bench, fresh process (heads from disk)", sweep["runs"][0]),
        ("fusion_bench, steady state (heads in memory)", steady),
    ]
    if references:
        first = {key: best([r["runs"][0] for r in references], key)[key] for key in ("wall", "cpu")}
        again = {key: best([r["runs"][1] for r in references], key)[key] for key in ("wall", "cpu")}
        rows += [("reference, first evaluation (setup, heads)", first), ("reference, steady state (heads rebuilt)", again)]
    print(f"\n{images} images ({args.images_per_task} per task: {', '.join(TASKS)}), random CLIP ViT-B/32, CPU, "
          f"{os.cpu_count()} cores, batch {args.batch_size}, {args.num_workers} DataLoader workers; "
          f"load average {min(loads):.1f}-{max(loads):.1f} during the runs\n")
    print("| evaluation | wall s | images/s | CPU s | images per CPU s |")
    print("|---|---|---|---|---|")
    for name, run in rows:
        print(f"| {name} | {run['wall']:.1f} | {images / run['wall']:.1f} | {run['cpu']:.1f} | {images / run['cpu']:.2f} |")
    total = {key: sum(run[key] for run in sweep["runs"]) for key in ("wall", "cpu")}
    print(f"\nλ sweep of {len(LAMBDAS)} evaluations, one task pool, heads on disk: {total['wall']:.0f} s wall, {total['cpu']:.0f} CPU s = "
          f"{total['wall'] / (len(LAMBDAS) * steady['wall']):.2f} × (wall), {total['cpu'] / (len(LAMBDAS) * steady['cpu']):.2f} × (CPU) "
          "ten evaluations' image work")
    if references:
        for key in ("wall", "cpu"):
            print(f"speed-up over the reference ({key}): fresh process {first[key] / sweep['runs'][0][key]:.2f}×, "
                  f"steady state {again[key] / steady[key]:.2f}×, λ sweep {len(LAMBDAS) * again[key] / total[key]:.2f}×")
        worst = max(abs(cold["metrics"][t]["accuracy"] - r["metrics"][t]["accuracy"]) for t in TASKS for r in references)
        print(f"largest accuracy difference from the reference: {worst:.2e}")


if __name__ == "__main__":
    main()
