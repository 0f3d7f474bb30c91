"""Time and peak memory of merging 1 + 4 Llama models of TinyLlama's size (1.1B parameters, bf16,
sharded), fusion_bench beside mergekit 0.1.5, and how far their outputs differ.

    python benchmarks/llm_merge.py [--runs ours-ties-global mergekit-ties ...] [--repeats 1]

Writes the models once (cached under $FUSION_BENCH_CACHE or ~/.cache/fusion_bench, 11 GB):
random weights of TinyLlama-1.1B's shapes, tasks = base + small Gaussian noise, 1 GB shards.
mergekit runs from a venv of its own (benchmarks/mergekit-venv.sh), with float32 arithmetic and
bf16 output, as ours. Each measurement is a fresh process, timed whole (imports, reading, merging,
writing the sharded model), started with the models in the page cache; the read floor is a process
that copies every tensor of the five models into memory once.

TIES keeps 20% of each task vector (mergekit: density 0.2) and averages the agreeing entries
(mergekit: normalize true; ours: merge_func mean), λ = 1. Ours trims over the whole task vector
(the paper) or per tensor (trim_scope=tensor, as mergekit); the per-tensor merge is compared with
mergekit's entry by entry.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from process_measurement import measure, warm_page_cache  # benchmarks/, the script's own folder

from fusion_bench.utils.cache import cache_dir

N_TASKS = 4
SHARD_BYTES = 1 << 30
NOISE = 2e-3  # task vectors: about 16 bf16 steps of a typical weight (0.02)
DENSITY = 0.2
REPO = Path(__file__).resolve().parents[1]
TINYLLAMA = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip

OURS = {
    "ours-ties-global": ["method=ties_merging", "method.threshold=20", "method.merge_func=mean", "method.scaling_factor=1.0"],
    "ours-ties-tensor": ["method=ties_merging", "method.threshold=20", "method.merge_func=mean", "method.scaling_factor=1.0", "method.trim_scope=tensor"],
    "ours-task-arithmetic": ["method=task_arithmetic", "method.scaling_factor=1.0"],
}
MERGEKIT = {"mergekit-ties": "ties", "mergekit-task-arithmetic": "task_arithmetic"}
SAME_MATH = {"ours-ties-tensor": "mergekit-ties", "ours-task-arithmetic": "mergekit-task-arithmetic"}
RUNS = ["read-floor", *OURS, *MERGEKIT]


def model_folders(root: Path) -> dict[str, Path]:
    return {name: root / name for name in ["base"] + [f"task{i}" for i in range(N_TASKS)]}


def write_models(root: Path) -> dict[str, Path]:
    """The base model and N_TASKS 'fine-tunes', each a folder of 1 GB bf16 shards."""
    folders = model_folders(root)
    if all((folder / "model.safetensors.index.json").exists() for folder in folders.values()):
        return folders
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINYLLAMA, dtype="bfloat16", architectures=["LlamaForCausalLM"])  # mergekit reads the architecture
    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    base = {key: (torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=generator)).to(torch.bfloat16) for key, shape in shapes.items()}
    for index, (name, folder) in enumerate(folders.items()):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        shards, current, size = [], {}, 0
        for key in shapes:
            if size + base[key].nbytes > SHARD_BYTES and current:
                shards.append(current)
                current, size = {}, 0
            current[key] = base[key] if index == 0 else (base[key].float() + NOISE * torch.randn(shapes[key], generator=generator)).to(torch.bfloat16)
            size += base[key].nbytes
        shards.append(current)
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard.clear()
        index_data = {"metadata": {"total_size": sum(t.nbytes for t in base.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))
    return folders


def checkpoint_files(folders: dict[str, Path]) -> list[Path]:
    return sorted(path for folder in folders.values() for path in folder.glob("*.safetensors"))


def read_floor(folders: dict[str, Path]) -> tuple[float, float]:
    script = (
        "import sys, torch\nfrom fusion_bench.modelpool.safetensors_file import SafetensorsFile\n"
        "buffer = torch.empty(1 << 28, dtype=torch.uint8)\n"
        "for path in sys.argv[1:]:\n    file = SafetensorsFile(path)\n    for key in file.keys():\n"
        "        data = file.read(key).reshape(-1).view(torch.uint8)\n        buffer[: data.numel()].copy_(data)\n"
    )
    return measure([sys.executable, "-c", script, *map(str, checkpoint_files(folders))])


def ours(run: str, folders: dict[str, Path], workdir: Path, output: Path) -> tuple[float, float]:
    config_dir = workdir / "config" / "modelpool"
    config_dir.mkdir(parents=True, exist_ok=True)
    models = "\n".join(f"  {'_pretrained_' if name == 'base' else name}: {folder}" for name, folder in folders.items())
    (config_dir / "bench_tinyllama.yaml").write_text(f"_target_: fusion_bench.modelpool.CausalLMPool\nmodels:\n{models}\n")
    command = [
        sys.executable, "-m", "fusion_bench", "--config-dir", str(workdir / "config"), "modelpool=bench_tinyllama", *OURS[run],
        "taskpool=dummy", f"merged_model_save_path={output}", "+merged_model_save_kwargs.max_shard_size=1GB", f"hydra.run.dir={tempfile.mkdtemp(dir=workdir, prefix='run-')}",
    ]  # fmt: skip
    return measure(command, env={"TQDM_DISABLE": "1"})


def mergekit(run: str, folders: dict[str, Path], bin_dir: Path, workdir: Path, output: Path) -> tuple[float, float]:
    tasks = [folder for name, folder in folders.items() if name != "base"]
    models = "".join(f"  - model: {folder}\n    parameters: {{weight: 1.0, density: {DENSITY}}}\n" for folder in tasks)
    parameters = "parameters: {normalize: true}\n" if MERGEKIT[run] == "ties" else "parameters: {normalize: false}\n"
    config = workdir / f"{run}.yaml"
    config.write_text(f"merge_method: {MERGEKIT[run]}\nbase_model: {folders['base']}\nmodels:\n{models}{parameters}dtype: float32\nout_dtype: bfloat16\n")
    command = [str(bin_dir / "mergekit-yaml"), str(config), str(output), "--no-copy-tokenizer", "--out-shard-size", "500M"]
    return measure(command)


def difference(ours_folder: Path, theirs_folder: Path) -> dict:
    """The largest absolute difference and the share of entries that differ, over all tensors."""

    from fusion_bench.modelpool.lazy_state_dict import SafetensorsStateDict
    from fusion_bench.modelpool.safetensors_file import SafetensorsFile

    mine, theirs = (SafetensorsStateDict([SafetensorsFile(p) for p in sorted(folder.glob("*.safetensors"))]) for folder in (ours_folder, theirs_folder))
    largest, differing, total = 0.0, 0, 0
    for key in mine:
        a, b = mine[key].float(), theirs[key].float()
        largest = max(largest, (a - b).abs().max().item())
        differing += (a != b).sum().item()
        total += a.numel()
    return {"max_diff": largest, "differing": differing / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; the median is shown")
    parser.add_argument("--write-models-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = cache_dir("benchmarks", "tinyllama-shaped-bf16")
    if args.write_models_to:
        write_models(Path(args.write_models_to))
        return
    # in a process of its own: a child's peak RSS starts from its parent's (Linux carries it over
    # fork and exec), and writing the models takes several GB
    subprocess.run([sys.executable, __file__, "--write-models-to", str(root)], check=True)
    folders = model_folders(root)
    files = checkpoint_files(folders)
    bin_dir = None
    if any(run in MERGEKIT for run in args.runs):
        bin_dir = Path(subprocess.run([str(REPO / "benchmarks" / "mergekit-venv.sh")], capture_output=True, text=True, check=True).stdout.strip())
    rows = {}
    with tempfile.TemporaryDirectory(dir=folders["base"].parent) as tmp:
        for run in args.runs:
            results = []
            for repeat in range(args.repeats):
                warm_page_cache(files)
                output = Path(tmp) / f"{run}-{repeat}"
                if run == "read-floor":
                    results.append(read_floor(folders))
                elif run in OURS:
                    results.append(ours(run, folders, Path(tmp) / run, output))
                else:
                    results.append(mergekit(run, folders, bin_dir, Path(tmp), output))
            rows[run] = {"seconds": statistics.median(r[0] for r in results), "rss": statistics.median(r[1] for r in results), "output": Path(tmp) / f"{run}-0"}
            print(json.dumps({"run": run, "seconds": rows[run]["seconds"], "rss_gib": rows[run]["rss"]}), file=sys.stderr)
        for run, other in SAME_MATH.items():
            if run in rows and other in rows:
                rows[run].update(difference(rows[run]["output"], rows[other]["output"]))
    parameters = json.loads((folders["base"] / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2  # bf16
    print(f"\n1 + {N_TASKS} Llama models of TinyLlama-1.1B's shapes, bf16, 1 GB shards; whole process incl. writing the merged model; "
          f"{os.cpu_count()} cores, median of {args.repeats} run(s)\n")
    print("| run | time | peak RSS | ns per parameter · task | max abs difference from mergekit's same math | entries that differ |")
    print("|---|---|---|---|---|---|")
    for run, row in rows.items():
        rate = row["seconds"] * 1e9 / (parameters * N_TASKS)
        diff = (f"{row['max_diff']:.1e} | {100 * row['differing']:.4f}%") if "max_diff" in row else "– | –"
        print(f"| {run} | {row['seconds']:.1f} s | {row['rss']:.2f} GiB | {rate:.1f} | {diff} |")


if __name__ == "__main__":
    main()
