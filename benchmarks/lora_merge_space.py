"""Time and peak memory of merging 8 LoRA adapters of Flan-T5, in the dense and the delta merge space.

    python benchmarks/lora_merge_space.py [--size base|large] [--methods ties_merging ...]

Writes once (under $FUSION_BENCH_CACHE or ~/.cache/fusion_bench) a random T5 of Flan-T5-base's (or
-large's) shape and 8 random LoRA adapters shaped as tanganke's GLUE adapters (r=16, α=32, on every
attention's q and v). Each merge is a fresh `fusion_bench` process (taskpool=dummy) saving its
merged model, timed whole (imports included) and by its report's merge time (loading the task
models included); peak RSS is the child's ru_maxrss. The last column is the largest difference
between the dense and the delta merge of each method.

dense: each adapter merged into a copy of the base (peft merge_and_unload), as FusionBench does.
delta: task vectors from the adapters' factors, one weight at a time, the unadapted weights skipped.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_TASKS = 8
METHODS = ("simple_average", "task_arithmetic", "ties_merging")
SIZES = {  # Flan-T5's shapes
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16),
}


def cache_dir() -> Path:
    return Path(os.environ.get("FUSION_BENCH_CACHE") or Path.home() / ".cache" / "fusion_bench") / "benchmarks"


def write_pool(root: Path, size: str) -> dict[str, Path]:
    """The base model and N_TASKS adapters, written once."""
    folders = {"_pretrained_": root / "base", **{f"task{i}": root / f"lora-{i}" for i in range(N_TASKS)}}
    if all(folder.exists() for folder in folders.values()):
        return folders
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **SIZES[size])  # fmt: skip
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model) * config.d_model**-0.5)  # Flan-T5's own
    model.save_pretrained(folders["_pretrained_"])
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    for i in range(N_TASKS):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
        peft_model.save_pretrained(folders[f"task{i}"])
    return folders


def measure(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (GiB) of one fresh process (os.wait4 reports that
    child alone; CPU time tells more than wall time on a machine that others share)."""
    with tempfile.TemporaryFile("w+") as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if status != 0:
            output.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{output.read()[-5000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20


def merge(method: str, merge_space: str, folders: dict[str, Path], workdir: Path) -> dict[str, float]:
    """The process's wall and CPU seconds and peak RSS, and the merge's own seconds (its report's)."""
    config_dir = workdir / "config"
    (config_dir / "modelpool").mkdir(parents=True, exist_ok=True)
    models = "\n".join(f"  {name}: {folder}" for name, folder in folders.items())
    (config_dir / "modelpool" / "bench_flan_t5_lora.yaml").write_text(f"_target_: fusion_bench.modelpool.Seq2SeqLMPool\nmerge_space: dense\nmodels:\n{models}\n")
    run_dir = workdir / f"run-{method}-{merge_space}"
    seconds, cpu, rss = measure([
        sys.executable, "-m", "fusion_bench", "--config-dir", str(config_dir), "modelpool=bench_flan_t5_lora",
        f"modelpool.merge_space={merge_space}", f"method={method}", "taskpool=dummy",
        f"merged_model_save_path={workdir / f'{method}-{merge_space}'}", f"hydra.run.dir={run_dir}",
    ])  # fmt: skip
    merge_seconds = json.loads((run_dir / "report.json").read_text())["_fusion_bench_"]["timing"]["merge_seconds"]
    return {"s": seconds, "cpu": cpu, "rss": rss, "merge_s": merge_seconds}


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max((first[key] - second[key]).abs().max().item() for key in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", choices=SIZES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--spaces", nargs="+", default=["dense", "delta"], choices=["dense", "delta"],
                        help="e.g. only delta where n dense models do not fit in memory")  # fmt: skip
    args = parser.parse_args()
    folders = write_pool(cache_dir() / f"flan-t5-{args.size}-random-lora16", args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in args.methods:
            row = {"method": method}
            for space in args.spaces:
                row.update({f"{space}_{k}": v for k, v in merge(method, space, folders, tmp).items()})
            if len(args.spaces) == 2:
                row["max_diff"] = max_difference(tmp / f"{method}-dense", tmp / f"{method}-delta")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"\n{N_TASKS} LoRA adapters (r=16, q and v) of a Flan-T5-{args.size}-shaped T5, whole process, {os.cpu_count()} cores\n")
    print("| method | space | merge | process: wall, CPU | peak RSS | max abs difference, dense vs delta |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for space in args.spaces:
            difference = f"{r['max_diff']:.1e}" if space == "delta" and "max_diff" in r else ""
            print(f"| {r['method']} | {space} | {r[f'{space}_merge_s']:.1f} s | {r[f'{space}_s']:.0f} s, {r[f'{space}_cpu']:.0f} s "
                  f"| {r[f'{space}_rss']:.2f} GiB | {difference} |")  # fmt: skip


if __name__ == "__main__":
    main()
