#!/usr/bin/env bash
# The offline MiniLM benchmark's table and figures (docs/reproducing.md), on CPU: on 2 cores about
# 80 min per seed, then 20 min. For each seed, the fine-tuned models (built once), the baselines,
# λ sweeps of task arithmetic and TIES on validation and test, and the data-free methods past TIES
# (TSV-M, Iso-C/CTS, WUDI, DARE, Consensus, TALL masks, ...) and the methods that learn from data
# (Fisher, RegMean, RegMean++, AdaMerging); then TIES ablations and the
# scaling with the number of merged tasks (seed 0); then one table per seed (λ chosen on
# validation) and the figures.
#   scripts/reproduce/offline_minilm.sh [output directory] [seeds...]
set -euo pipefail
out=${1:-outputs/reproduce/offline_minilm}
shift || true
seeds=${*:-0 1}
fb=${FUSION_BENCH:-fusion_bench}
lambdas=0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0
tasks=newsgroups,newsgroup_hierarchies,reuters8,reuters52,election_tweets,movie_review_sentiment,movie_plot_or_review,debate_party

# shellcheck source=scripts/reproduce/sweep.sh
source "$(dirname "$0")/sweep.sh"

# The data-free methods past TIES (docs/reproducing.md): λ swept on validation over a grid
# around the papers' choice (up to α = 3 for the SVD methods, as they do), then that λ scored on
# test; about 40 min per seed.
data_free_runs=(weighted_average magmax tsv_m iso_c iso_cts wudi dare_simple_average dare_task_arithmetic dare_ties consensus_ta consensus_ties breadcrumbs tall_mask)
# `chosen_on_validation <directory> <λ key> <λs> <overrides...>`: the sweep on validation into
# <directory>/validation, then the best λ on test into <directory>/test.
chosen_on_validation() {
  local dir=$1 key=$2 grid=$3; shift 3
  sweep "$dir/validation" "$@" "method.$key=$grid" taskpool.split=validation
  sweep "$dir/test" "$@" "method.$key=$(best_lambda "$dir/validation")" taskpool.split=test
}
data_free() {
  local s=$1; shift
  local both=taskpool.split=validation,test
  sweep "$s/weighted_average" "$@" method=linear/weighted_average "method.weights=[1,1,1,1,1,1,1,1]" $both
  chosen_on_validation "$s/magmax" scaling_factor 0.3,0.5,0.7,0.9,1.1,1.3,1.5 "$@" method=magmax/magmax
  chosen_on_validation "$s/tsv_m" alpha 0.5,1.0,1.5,2.0,2.5 "$@" method=task_singular_vector/TaskSingularVectorMerging
  chosen_on_validation "$s/iso_c" scaling_factor 1.0,1.5,2.0,2.5,3.0 "$@" method=isotropic_merging/iso_c
  chosen_on_validation "$s/iso_cts" scaling_factor 1.0,1.5,2.0,2.5,3.0 "$@" method=isotropic_merging/iso_cts
  sweep "$s/wudi" "$@" method=wudi/wudi $both
  sweep "$s/dare_simple_average" "$@" method=dare/simple_average $both
  chosen_on_validation "$s/dare_task_arithmetic" scaling_factor 0.5,0.7,0.9 "$@" method=dare/task_arithmetic
  chosen_on_validation "$s/dare_ties" scaling_factor 0.3,0.5,0.7,0.9 "$@" method=dare/ties_merging
  # Consensus keeps a part of the task vector only, so its best λ lies higher
  chosen_on_validation "$s/consensus_ta" scaling_factor 0.5,0.7,0.9,1.2,1.5,2.0,2.5 "$@" method=consensus/task_arithmetic
  chosen_on_validation "$s/consensus_ties" scaling_factor 0.5,0.7,0.9,1.2,1.5,2.0,2.5 "$@" method=consensus/ties_merging
  chosen_on_validation "$s/breadcrumbs" scaling_factor 0.5,0.7,0.9 "$@" method=breadcrumbs/task_arithmetic
  sweep "$s/tall_mask" "$@" method=tall_mask/task_arithmetic $both
}

# The methods that learn from data (docs/modelpools/task_data.md): Fisher merging, RegMean and
# RegMean++ on 256 train texts per task, AdaMerging on the unlabeled test texts; their keys are
# fixed (FusionBench's), so they are scored on test only. AdaMerging takes 100 steps at lr 1e-2
# instead of 1000 at 1e-3: on 2 CPU cores a step over the eight tasks takes about 6 s.
data_dependent_runs=(fisher regmean regmean_plusplus adamerging)
data_dependent() {
  local s=$1; shift
  sweep "$s/fisher" "$@" method=fisher_merging/fisher_merging
  sweep "$s/regmean" "$@" method=regmean/regmean method.reduce_non_diagonal_ratio=0.1,0.95
  sweep "$s/regmean_plusplus" "$@" method=regmean_plusplus/regmean_plusplus
  sweep "$s/adamerging" "$@" method=adamerging/layer_wise method.max_steps=100 method.lr=1e-2
}

for seed in $seeds; do
  s="$out/seed$seed"
  "$fb" --config-name finetune "modelpool.seed=$seed" "hydra.run.dir=$s/finetune"
  common=("modelpool.seed=$seed")
  sweep "$s/zero_shot" "${common[@]}" method=dummy
  sweep "$s/individual" "${common[@]}" method=dummy "method.model_name=$tasks" 'taskpool.tasks=[${method.model_name}]' taskpool.split=validation,test
  sweep "$s/simple_average" "${common[@]}" method=simple_average taskpool.split=validation,test
  sweep "$s/task_arithmetic" "${common[@]}" method=task_arithmetic "method.scaling_factor=$lambdas" taskpool.split=validation,test
  sweep "$s/ties_sum" "${common[@]}" method=ties_merging "method.scaling_factor=$lambdas" taskpool.split=validation,test
  sweep "$s/ties_mean" "${common[@]}" method=ties_merging method.merge_func=mean "method.scaling_factor=0.5,0.75,1.0,1.25,1.5,1.75,2.0" taskpool.split=validation,test
  data_free "$s" "${common[@]}"
  data_dependent "$s" "${common[@]}"
done

s="$out/seed0"
sweep "$s/ablations" method=ties_merging method.scaling_factor=0.2,0.4,0.6,0.8,1.0 "method.threshold=20,100" "method.elect=true,false"
subsets="choice([newsgroups,reuters8],[newsgroups,reuters8,election_tweets,debate_party],[newsgroups,reuters8,election_tweets,debate_party,movie_review_sentiment,reuters52])"
sweep "$s/scaling_average" method=simple_average "modelpool.tasks=$subsets" 'taskpool.tasks=${modelpool.tasks}'
sweep "$s/scaling" method=task_arithmetic,ties_merging "method.scaling_factor=0.3,0.5,0.7,1.0" "modelpool.tasks=$subsets" 'taskpool.tasks=${modelpool.tasks}'

report=${FUSION_BENCH_REPORT:-fusion_bench_report}
for seed in $seeds; do
  s="$out/seed$seed"
  "$report" "$s/zero_shot" "$s/individual" "$s/simple_average" "$s/task_arithmetic" "$s/ties_sum" "$s/ties_mean" --select-on validation --output "$out/table_seed$seed.md"
  "$report" "$s/zero_shot" "$s/individual" "${data_free_runs[@]/#/$s/}" --select-on validation --output "$out/table_data_free_seed$seed.md"
  "$report" "$s/zero_shot" "$s/individual" "${data_dependent_runs[@]/#/$s/}" --select-on validation --output "$out/table_data_dependent_seed$seed.md"
  "$report" "$s/zero_shot" "$s/individual" "$s/simple_average" "$s/task_arithmetic" "$s/ties_sum" "$s/ties_mean" --output "$out/lambda_grid_seed$seed.md" --figures "$out/figures_seed$seed"
done
"$report" "$out/seed0/individual" "$out/seed0/ablations" --output "$out/ablations.md" --figures "$out/figures_ablations"
"$report" "$out/seed0/individual" "$out/seed0/scaling_average" "$out/seed0/scaling" "$out/seed0/simple_average" "$out/seed0/task_arithmetic" "$out/seed0/ties_sum" --split test --normalized --output "$out/scaling.md" --figures "$out/figures_scaling"
echo "tables and figures in $out"
