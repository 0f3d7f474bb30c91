#!/usr/bin/env bash
# The Flan-T5 GLUE table (docs/reproducing.md): LoRA adapters (r=16) of Flan-T5-base and -large
# fine-tuned on eight GLUE tasks, merged and scored by generation on the GLUE validation sets (GLUE
# has no public test labels, so there is no separate split to choose λ on; FusionBench reports
# λ = 0.3). Needs the Hugging Face hub; a GPU makes it minutes instead of hours. For each size: the
# pretrained model, each fine-tuned model, simple averaging, and λ sweeps of task arithmetic and
# TIES, merged in delta space (the same models as FusionBench's dense merge, with less memory);
# then the table (metric `score`: accuracy, Spearman's ρ for STS-B) and the figures.
#   scripts/reproduce/flan_t5_glue.sh [output directory] [sizes: base large]
set -euo pipefail
out=${1:-outputs/reproduce/flan_t5_glue}
shift || true
sizes=${*:-base large}
report=${FUSION_BENCH_REPORT:-fusion_bench_report}
lambdas=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0
models=glue-cola,glue-mnli,glue-mrpc,glue-qnli,glue-qqp,glue-rte,glue-sst2,glue-stsb

# shellcheck source=scripts/reproduce/sweep.sh
source "$(dirname "$0")/sweep.sh"

for size in $sizes; do
  case $size in
    base|large) pools=("modelpool=Seq2SeqLMPool/flan-t5-${size}_glue_lora16" modelpool.merge_space=delta taskpool=flan-t5_glue_text_generation) ;;
    *) echo "unknown size '$size': use base or large" >&2; exit 2 ;;
  esac
  s="$out/$size"
  sweep "$s/zero_shot" "${pools[@]}" method=dummy
  sweep "$s/individual" "${pools[@]}" method=dummy "method.model_name=$models"
  sweep "$s/simple_average" "${pools[@]}" method=simple_average
  sweep "$s/task_arithmetic" "${pools[@]}" method=task_arithmetic "method.scaling_factor=$lambdas"
  sweep "$s/ties_merging" "${pools[@]}" method=ties_merging "method.scaling_factor=$lambdas"
  "$report" "$s"/* --metric score --output "$out/table_$size.md" --figures "$out/figures_$size"
done
echo "tables and figures in $out"
