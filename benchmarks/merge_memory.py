"""Time and peak memory of merging 8 ViT-B/32 vision towers with each method, beside the reference FusionBench.

    python benchmarks/merge_memory.py [--methods ties_merging ...] [--repeats 3] [--no-reference] [--size l14]

--size l14 merges ViT-L/14 towers instead (304M parameters each, 11 GB of checkpoints), where the
reference does not fit in memory: run it with --no-reference.

Writes 9 random CLIPVisionModel checkpoints of ViT-B/32 size once (cached under
$FUSION_BENCH_CACHE or ~/.cache/fusion_bench), in the transformers 4.x layout of the hub models so
the reference (which needs transformers<5) reads the same files. Each measurement is a fresh
process, timed whole (imports included); peak RSS is the child's ru_maxrss. The reference runs in
its own venv, made by ../shared/tools/reference-venv.sh, with the merged weights saved so the
table can show the largest difference from ours. Each number is the median of --repeats runs, each
started with the checkpoints in the page cache: the reference's TIES takes ~21 GB and evicts them,
which would otherwise slow whichever run comes next.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from process_measurement import measure, warm_page_cache  # benchmarks/, the script's own folder

from fusion_bench.utils.cache import cache_dir

N_TASKS = 8
WUDI_ITERATIONS = 3  # of its 400 by default: the reference's autograd takes about 75 s a step here
NO_DROP = "sparsity_ratio=0.0, only_on_linear_weights=False, rescale=True"


@dataclass(frozen=True)
class Method:
    """A method as run here: our config and overrides, and the reference's call (None: it has none)."""

    overrides: tuple[str, ...]
    reference: str | None
    compare: bool = True  # whether the merged weights must equal the reference's


METHODS = {
    "simple_average": Method((), "SimpleAverageAlgorithm()"),
    "task_arithmetic": Method((), "TaskArithmeticAlgorithm(scaling_factor=0.3)"),
    "ties_merging": Method((), "TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func='sum')"),
    "linear/weighted_average": Method((f"method.weights=[{','.join(['1'] * N_TASKS)}]",), f"WeightedAverageAlgorithm(normalize=True, weights=[1.0] * {N_TASKS})"),
    "magmax/magmax": Method((), "MagMaxAlgorithm(scaling_factor=0.5)"),
    "task_singular_vector/TaskSingularVectorMerging": Method((), "TaskSingularVectorMerging(alpha=1)"),
    "isotropic_merging/iso_c": Method((), "ISO_C_Merge(scaling_factor=1.0)"),
    "isotropic_merging/iso_cts": Method((), "ISO_CTS_Merge(scaling_factor=1.0, common_space_fraction=0.8)"),
    "wudi/wudi": Method((f"method.iter_num={WUDI_ITERATIONS}",), f"WUDIMerging(iter_num={WUDI_ITERATIONS})"),
    # DARE draws its masks at random (the reference from the global RNG): timed with p = 0.5, while
    # the weights are compared without dropping, where both are deterministic.
    "dare/simple_average": Method((), "DareSimpleAverage(sparsity_ratio=0.5, only_on_linear_weights=False)", compare=False),
    "dare/task_arithmetic": Method((), "DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.5, only_on_linear_weights=False)", compare=False),
    "dare/ties_merging": Method((), "DareTiesMerging(sparsity_ratio=0.5, only_on_linear_weights=False, rescale=True, scaling_factor=0.5, threshold=20, remove_keys=[], merge_func='sum')", compare=False),
    # one model per task: the reference's fails on pools of nn.Modules (a TypeError), so it is run to show that
    "tall_mask/task_arithmetic": Method((), "TallMaskTaskArithmeticAlgorithm(tall_mask_lambda=0.6)", compare=False),
    "consensus/task_arithmetic": Method((), None),
    "consensus/ties_merging": Method((), None),
    "breadcrumbs/task_arithmetic": Method((), None),
}
REPO = Path(__file__).resolve().parents[1]


SIZES = {  # CLIPVisionConfig keys: the defaults are ViT-B/32
    "b32": ("ViT-B/32", 88, {}),
    "l14": ("ViT-L/14", 304, dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14, image_size=224)),
}


def write_pool(root: Path, size: str = "b32") -> dict[str, Path]:
    """The pretrained tower and 8 'fine-tuned' ones (pretrained + small Gaussian task vectors)."""
    names = ["_pretrained_"] + [f"task{i}" for i in range(N_TASKS)]
    folders = {name: root / name for name in names}
    if all((folder / "model.safetensors").exists() for folder in folders.values()):
        return folders
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**SIZES[size][2])
    torch.manual_seed(0)
    pretrained = {f"vision_model.{k}": v.contiguous() for k, v in CLIPVisionModel(config).state_dict().items()}
    for i, (name, folder) in enumerate(folders.items()):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        generator = torch.Generator().manual_seed(i)
        weights = pretrained if i == 0 else {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in pretrained.items()}
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folders


def median_of(repeats: int, folders: dict[str, Path], run) -> tuple[float, float]:
    """Median seconds and median peak RSS of `repeats` calls of run(), each from a warm page cache."""
    results = []
    for _ in range(repeats):
        warm_page_cache(folder / "model.safetensors" for folder in folders.values())
        results.append(run())
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


def ours(method: str, folders: dict[str, Path], workdir: Path, save_to: Path | None = None) -> tuple[float, float]:
    config_dir = workdir / "config"
    (config_dir / "modelpool").mkdir(parents=True, exist_ok=True)
    models = "\n".join(f"  {name}: {folder}" for name, folder in folders.items())
    (config_dir / "modelpool" / "bench_vit_b32.yaml").write_text(
        f"_target_: fusion_bench.modelpool.AutoModelPool\nmodel_class: transformers.CLIPVisionModel\nmodels:\n{models}\n"
    )
    command = [sys.executable, "-m", "fusion_bench", "--config-dir", str(config_dir), "modelpool=bench_vit_b32",
               f"method={method}", *METHODS[method].overrides, "taskpool=dummy", f"hydra.run.dir={tempfile.mkdtemp(dir=workdir, prefix='run-')}"]
    if save_to:
        command.append(f"merged_model_save_path={save_to}")
    return measure(command, env={"TQDM_DISABLE": "1"})


def reference(python: str, method: str, folders: dict[str, Path], save_to: Path | None) -> tuple[float, float]:
    call = METHODS[method].reference
    script = textwrap.dedent(f"""
        import json, torch
        from safetensors.torch import save_file
        import fusion_bench.method as methods
        from fusion_bench.method.dare import DareTiesMerging
        from fusion_bench.method.tall_mask import TallMaskTaskArithmeticAlgorithm
        from fusion_bench.modelpool import BaseModelPool
        folders = json.loads({json.dumps(json.dumps({k: str(v) for k, v in folders.items()}))})
        pool = BaseModelPool({{name: {{"_target_": "transformers.CLIPVisionModel.from_pretrained",
                                     "pretrained_model_name_or_path": folder}} for name, folder in folders.items()}})
        name = {call.split("(")[0]!r}
        algorithm = eval({call!r}, {{name: globals().get(name) or getattr(methods, name)}})
        merged = algorithm.run(pool)
        if {str(save_to) if save_to else ""!r}:
            save_file({{k: v.contiguous() for k, v in merged.state_dict().items()}}, {str(save_to)!r})
    """)
    # -I: with -c, Python puts the working directory first on sys.path, and from this repository
    # `import fusion_bench` would then load ours instead of the reference.
    return measure([python, "-I", "-c", script])


def max_difference(ours_folder: Path, reference_file: Path) -> float:
    from safetensors.torch import load_file

    ours_weights = {k.removeprefix("vision_model."): v for k, v in load_file(str(ours_folder / "model.safetensors")).items()}
    theirs = {k.removeprefix("vision_model."): v for k, v in load_file(str(reference_file)).items()}
    return max((ours_weights[k].float() - theirs[k].float()).abs().max().item() for k in ours_weights)


def measure_method(method: str, folders: dict[str, Path], tmp: Path, python: str | None, repeats: int) -> dict:
    seconds, rss = median_of(repeats, folders, lambda: ours(method, folders, tmp / method))
    row = {"method": method, "ours_s": seconds, "ours_rss": rss}
    spec = METHODS[method]
    if not python or spec.reference is None:
        return row
    saved = tmp / f"{method}-ref.safetensors" if spec.compare else None
    try:
        row["ref_s"], row["ref_rss"] = median_of(repeats, folders, lambda: reference(python, method, folders, saved))
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        row["ref_error"] = next((line for line in reversed(lines) if "Error" in line), lines[-1])  # stdout may end after the traceback
        return row
    if spec.compare:
        ours(method, folders, tmp / f"{method}-saved", save_to=tmp / f"{method}-merged")
        # in a process of its own, like writing the pool: loading both models here would raise the
        # peak RSS that every later child starts from
        compared = subprocess.run([sys.executable, __file__, "--max-difference", str(tmp / f"{method}-merged"), str(saved)], capture_output=True, text=True, check=True)
        row["max_diff"] = float(compared.stdout)
    return row


def format_row(row: dict) -> str:
    mine = f"| {row['method']} | {row['ours_s']:.1f} s | {row['ours_rss']:.2f} GiB |"
    if "ref_error" in row:
        return f"{mine} fails: {row['ref_error'][:80]} | | | | |"
    if "ref_s" not in row:
        return f"{mine} – | – | – | – | – |"
    difference = f"{row['max_diff']:.1e}" if "max_diff" in row else "random (DARE) / per-task"
    return (f"{mine} {row['ref_s']:.1f} s | {row['ref_rss']:.2f} GiB | {row['ours_s'] / row['ref_s']:.2f}× | "
            f"{row['ours_rss'] / row['ref_rss']:.2f}× | {difference} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference FusionBench")
    parser.add_argument("--size", choices=SIZES, default="b32", help="the towers' size: ViT-B/32 or ViT-L/14")
    parser.add_argument("--write-pool-to", help=argparse.SUPPRESS)
    parser.add_argument("--max-difference", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.max_difference:
        print(max_difference(Path(args.max_difference[0]), Path(args.max_difference[1])))
        return
    root = cache_dir("benchmarks", "clip-vit-base-patch32-random" if args.size == "b32" else f"clip-vit-{args.size}-random")
    if args.write_pool_to:
        write_pool(Path(args.write_pool_to), args.size)
        return
    # in a process of its own: a child's peak RSS starts from its parent's (Linux carries it over
    # fork and exec), and writing the pool takes GBs
    subprocess.run([sys.executable, __file__, "--write-pool-to", str(root), "--size", args.size], check=True)
    folders = write_pool(root, args.size)  # written: only the folders
    python = None
    if not args.no_reference:
        python = subprocess.run([str(REPO.parent / "shared" / "tools" / "reference-venv.sh")], capture_output=True, text=True, check=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows.append(measure_method(method, folders, Path(tmp), python, args.repeats))
            print(json.dumps(rows[-1]), file=sys.stderr)
    name, millions, _ = SIZES[args.size]
    print(f"\n{N_TASKS} × {name} vision towers ({millions}M parameters each), whole process, {os.cpu_count()} cores, median of {args.repeats} runs; "
          f"WUDI with {WUDI_ITERATIONS} Adam steps\n")
    print("| method | fusion_bench time | fusion_bench peak RSS | reference time | reference peak RSS | time ratio | memory ratio | max abs difference |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(format_row(row))


if __name__ == "__main__":
    main()
