"""Records the reference FusionBench's merges of tiny Flan-T5-like pools, tied embeddings and all.

Run it with the reference's own python (it needs transformers<5, so it lives in its own venv):

    $(../shared/tools/reference-venv.sh) scripts/make_reference_t5_fixtures.py

The models are built here from a seed, in transformers 4.x, as Flan-T5 is: `shared`,
`encoder.embed_tokens` and `decoder.embed_tokens` are one tensor under three state-dict names, and
`lm_head` is a tensor of its own. Two pools: full fine-tunes, and LoRA adapters (peft) over the
base, which the reference loads with its load_lora_model (merge_and_unload). It writes
tests/data/reference_t5_merges.safetensors: the inputs ("input/full/<model>/<key>", each tensor
under its first name as save_pretrained stores it; "adapter/<model>/<key>" for the adapters'
files), the reference's merged state dicts ("output/<case>/<key>", likewise; its merged embeddings
are checked to stay tied), and in the metadata the T5 and LoRA configs, the cases (with the error
where the reference refuses one), and FusionBench's GLUE prompt templates.
tests/test_reference_equality_t5.py checks that fusion_bench reproduces every case.
"""

import copy
import json
import tempfile
from pathlib import Path

import torch
from fusion_bench.modelpool.seq2seq_lm.modelpool import load_lora_model
from fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates import glue_prompt_templates
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "reference_t5_merges.safetensors"
N_TASKS = 3
CONFIG = dict(
    vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
    relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)  # Flan-T5's layout (gated-GELU, untied lm_head), tiny
LORA = dict(r=4, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")


def unique_state_dict(model):
    """Each tensor under its first state-dict name, as save_pretrained stores them."""
    seen, tensors = set(), {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            tensors[key] = value.detach().clone().contiguous()
    return tensors


def full_pool(pretrained, generator):
    """Fine-tunes of every tensor; the embeddings move more than the rest, so the global cut needs
    their three names to come out right."""
    pool = {"_pretrained_": pretrained}
    for t in range(N_TASKS):
        model = copy.deepcopy(pretrained)
        with torch.no_grad():
            for key, value in unique_state_dict(model).items():
                scale = 0.05 if key == "shared.weight" else 0.01
                model.get_parameter(key).add_(scale * torch.randn(value.shape, generator=generator))
        pool[f"task{t}"] = model
    return pool


def lora_adapters(base_dir: Path, root: Path, generator) -> dict[str, Path]:
    adapters = {}
    for t in range(N_TASKS):
        model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(base_dir), LoraConfig(**LORA))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        adapters[f"task{t}"] = root / f"task{t}"
        model.save_pretrained(adapters[f"task{t}"])
    return adapters


def runs():
    yield "simple_average", {}, lambda pool: SimpleAverageAlgorithm().run(pool)
    yield "task_arithmetic", {"scaling_factor": 0.3}, lambda pool: TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)
    for merge_func, threshold in [("sum", 5), ("sum", 20), ("sum", 60), ("mean", 20), ("max", 20)]:
        params = {"scaling_factor": 0.7, "threshold": threshold, "merge_func": merge_func, "remove_keys": []}
        yield "ties_merging", params, lambda pool, params=params: TiesMergingAlgorithm(**params).run(pool)
    # FusionBench's habit for its older T5 wrapper: leave the embeddings' extra names out of the vector
    params = {"scaling_factor": 0.7, "threshold": 20, "merge_func": "sum", "remove_keys": ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]}
    yield "ties_merging", params, lambda pool: TiesMergingAlgorithm(**params).run(pool)


def main():
    generator = torch.Generator().manual_seed(20240522)
    torch.manual_seed(0)
    pretrained = T5ForConditionalGeneration(T5Config(**CONFIG)).eval()
    full_models = full_pool(pretrained, generator)
    tensors, cases = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        pretrained.save_pretrained(base_dir)
        adapters = lora_adapters(base_dir, Path(tmp) / "adapters", generator)
        adapter_config = (adapters["task0"] / "adapter_config.json").read_text()
        for name, folder in adapters.items():
            for key, value in load_file(folder / "adapter_model.safetensors").items():
                tensors[f"adapter/{name}/{key}"] = value
        pools = {
            "full": lambda: copy.deepcopy(full_models),
            "lora": lambda: {
                "_pretrained_": AutoModelForSeq2SeqLM.from_pretrained(base_dir),
                **{name: load_lora_model(str(base_dir), str(folder)) for name, folder in adapters.items()},
            },
        }
        for name, model in full_models.items():
            for key, value in unique_state_dict(model).items():
                tensors[f"input/full/{name}/{key}"] = value
        for pool_name, make_pool in pools.items():
            for method, params, run in runs():
                case = f"{pool_name}/{method}/" + ",".join(f"{k}={v}" for k, v in params.items())
                record = {"case": case, "pool": pool_name, "method": method, "params": params}
                try:
                    merged = run(make_pool())
                except Exception as error:  # the reference may refuse a configuration: record why
                    cases.append({**record, "error": f"{type(error).__name__}: {error}"[:300]})
                    continue
                cases.append(record)
                assert merged.encoder.embed_tokens.weight is merged.shared.weight is merged.decoder.embed_tokens.weight
                for key, value in unique_state_dict(merged).items():
                    tensors[f"output/{case}/{key}"] = value
    metadata = {
        "fusion_bench": "0.2.33",
        "torch": torch.__version__,
        "t5_config": json.dumps(CONFIG),
        "adapter_config": adapter_config,
        "cases": json.dumps(cases),
        "glue_prompt_templates": json.dumps(glue_prompt_templates),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {len(cases)} cases ({sum('error' in c for c in cases)} refused by the reference) to {OUT}")
    for case in cases:
        if "error" in case:
            print("  refused:", case["case"], "->", case["error"])


if __name__ == "__main__":
    main()
