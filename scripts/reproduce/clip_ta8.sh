#!/usr/bin/env bash
# The TA8 table (docs/reproducing.md): CLIP ViT-B/32 and ViT-L/14 towers fine-tuned on eight image
# tasks, merged and scored zero-shot on the eight test sets. Needs the Hugging Face hub (models and
# datasets, ~40 GB for both sizes) and a GPU (hours on a CPU). For each size: the pretrained model,
# each fine-tuned model, simple averaging, and λ sweeps of task arithmetic and TIES; then the table
# (every λ, the best marked; FusionBench reports λ = 0.3) and the figures.
# Two lineages: b32, l14 are the Hugging Face re-trainings FusionBench uses (CLIPVisionModelPool);
# tv-b32, tv-b16, tv-l14 are the task_vectors checkpoints of the TIES and task-arithmetic papers
# (OpenCLIPVisionModelPool; download them first: docs/modelpools/open_clip_vision.md).
#   scripts/reproduce/clip_ta8.sh [output directory] [sizes: b32 l14 tv-b32 tv-b16 tv-l14]
set -euo pipefail
out=${1:-outputs/reproduce/clip_ta8}
shift || true
sizes=${*:-b32 l14}
report=${FUSION_BENCH_REPORT:-fusion_bench_report}
lambdas=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0
tasks=sun397,stanford-cars,resisc45,eurosat,svhn,gtsrb,mnist,dtd

# shellcheck source=scripts/reproduce/sweep.sh
source "$(dirname "$0")/sweep.sh"

for size in $sizes; do
  case $size in
    b32) pools=(modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8) ;;
    l14) pools=(modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8_model_only taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14) ;;
    tv-b32) pools=(modelpool=OpenCLIPVisionModelPool/ViT-B-32_TA8 taskpool=OpenCLIPVisionModelTaskPool/ViT-B-32_TA8) ;;
    tv-b16) pools=(modelpool=OpenCLIPVisionModelPool/ViT-B-16_TA8 taskpool=OpenCLIPVisionModelTaskPool/ViT-B-16_TA8) ;;
    tv-l14) pools=(modelpool=OpenCLIPVisionModelPool/ViT-L-14_TA8 taskpool=OpenCLIPVisionModelTaskPool/ViT-L-14_TA8) ;;
    *) echo "unknown size '$size': use b32, l14, tv-b32, tv-b16 or tv-l14" >&2; exit 2 ;;
  esac
  s="$out/$size"
  sweep "$s/zero_shot" "${pools[@]}" method=dummy
  sweep "$s/individual" "${pools[@]}" method=dummy "method.model_name=$tasks"
  sweep "$s/simple_average" "${pools[@]}" method=simple_average
  sweep "$s/task_arithmetic" "${pools[@]}" method=task_arithmetic "method.scaling_factor=$lambdas"
  sweep "$s/ties_merging" "${pools[@]}" method=ties_merging "method.scaling_factor=$lambdas"
  "$report" "$s"/* --output "$out/table_$size.md" --figures "$out/figures_$size"
done
echo "tables and figures in $out"
