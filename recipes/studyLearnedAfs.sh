#!/usr/bin/env bash
# The learned-AF study: fixed ReLU², GELU and SwiGLU against phase-II splines from four phase-I recipes (the default
# start; a start at ReLU²; a start at ReLU² with the smoothness prior, strong and weak), with controls: each start
# frozen as it is (no phase I), phase I with a single model, the ReLU² start with a knot at 0 (--afNAnchors 65) and
# its frozen control, and the default start with a spline in the MLP only (att-linear, as the fixed rows) and its
# frozen control; 3 seeds (phase I of seed s on seed 1234 + s); a table of paired per-seed differences (against the
# best fixed AF, and each recipe against its controls) and a plot.
#
#   bash recipes/studyLearnedAfs.sh CORPUS [OUTDIR] [--preset medium] [--vocabSize N] [--contiguousData]
#                                   [--rows fixed] [more compareAfs.py / trainLmAf.py flags]
#
# CORPUS: text files (a glob in quotes works), cut into documents of about 2,000 characters (at blank lines), put in
# an order drawn with seed 0 and tokenized into OUTDIR/data, the first 50,000 tokens the validation shard: so the
# validation shard and every training shard sample the whole corpus (--contiguousData: the files in order, uncut, as
# the first study). --vocabSize N: a BPE of N ids trained on the corpus instead of GPT-2's (4096: 5-8x faster on a
# CPU). Results: OUTDIR/compare-study.md and OUTDIR/compare-study.png (and every run's log, metrics and plots in
# OUTDIR). Flags given after OUTDIR override the ones below (later flags win), e.g. --nSteps 1200 --seeds 0,1;
# --jobs 2 trains two runs side by side (one core each on a 2-core CPU). --preset medium: 4 layers x 128, seqLength
# 512 (see the README for its cost). --rows fixed: only the three fixed rows; the rows of a smaller or follow-up
# study come as --variant flags after OUTDIR (with the recipe's labels, finished runs of the full study are reused).
# Stopped? Run the same command again: finished runs are kept.
set -euo pipefail
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n 2,22p "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
corpus=$1
out=${2:-study}
shift $(( $# >= 2 ? 2 : 1 ))
repo=$(cd "$(dirname "$0")/.." && pwd)

# The model size and schedule; a preset replaces them, and flags after OUTDIR still win over both.
size=(--nLayers 2 --dimEmb 64 --nHeads 2 --seqLength 256 --contextSize 256
      --nSteps 600 --nStepsWarmup 60 --nStepsCooldown 300 --valEvery 100 --plotEvery 100)
rest=()
layout=(--txtDocChars 2000 --shuffleDocs 0)
vocab=()
rowSet=all
while (( $# )); do
    case $1 in
        --vocabSize|--vocabSize=*)
            if [[ $1 == --vocabSize ]]; then vocab=(--vocabSize "${2:-}"); shift; else vocab=("$1"); fi ;;
        --contiguousData) layout=() ;;
        --rows|--rows=*)
            if [[ $1 == --rows ]]; then rowSet=${2:-}; shift; else rowSet=${1#--rows=}; fi
            [[ $rowSet == all || $rowSet == fixed ]] || { echo "error: --rows must be all or fixed, got '$rowSet'" >&2; exit 2; } ;;
        --preset|--preset=*)
            if [[ $1 == --preset ]]; then preset=${2:-}; shift; else preset=${1#--preset=}; fi
            case $preset in
                small) ;;
                medium) size=(--nLayers 4 --dimEmb 128 --nHeads 4 --seqLength 512 --contextSize 512
                              --nSteps 1000 --nStepsWarmup 100 --nStepsCooldown 500
                              --valEvery 100 --plotEvery 250) ;;
                *) echo "error: --preset must be small or medium, got '$preset'" >&2; exit 2 ;;
            esac ;;
        *) rest+=("$1") ;;
    esac
    shift
done

python "$repo/preprocessFineweb.py" "$out/data" --input "$corpus" --shard_size 50000 ${layout[@]+"${layout[@]}"} ${vocab[@]+"${vocab[@]}"}
rows=()
if [[ $rowSet == all ]]; then
    rows=(--variant "spline=spline;att-spline"
    --variant "spline-frozen=spline;att-spline --afLr 0"
    --variant "spline-1model=spline;att-spline --nModels 1"
    --variant "spline-relu2=spline;att-spline --afInit relu2;att-linear"
    --variant "spline-relu2-frozen=spline;att-spline --afInit relu2;att-linear --afLr 0"
    --variant "spline-relu2-1model=spline;att-spline --afInit relu2;att-linear --nModels 1"
    --variant "spline-relu2-smooth=spline;att-spline --afInit relu2;att-linear --afSmoothness 0.001"
    --variant "spline-relu2-smooth1e-5=spline;att-spline --afInit relu2;att-linear --afSmoothness 0.00001"
    --variant "spline-relu2-knot0=spline;att-spline --afInit relu2;att-linear --afNAnchors 65"
    --variant "spline-relu2-knot0-frozen=spline;att-spline --afInit relu2;att-linear --afNAnchors 65 --afLr 0"
    --variant "spline-mlp=spline;att-linear"
    --variant "spline-mlp-frozen=spline;att-linear --afLr 0"
    --pairs spline:spline-frozen --pairs spline:spline-1model
    --pairs spline-relu2:spline-relu2-frozen --pairs spline-relu2:spline-relu2-1model
    --pairs spline-relu2-smooth:spline-relu2-frozen --pairs spline-relu2-smooth1e-5:spline-relu2-frozen
    --pairs spline-relu2-knot0:spline-relu2-knot0-frozen --pairs spline-relu2-knot0:spline-relu2
    --pairs spline-relu2-knot0-frozen:spline-relu2-frozen
    --pairs spline-relu2-frozen:relu2 --pairs spline-relu2-knot0-frozen:relu2
    --pairs spline-mlp:spline-mlp-frozen --pairs spline:spline-mlp)
fi
python "$repo/compareAfs.py" --name study --seeds 0,1,2 --splinePhases 2 --splineModels 8 \
    --afTypes "relu2,gelu,swiglu" ${rows[@]+"${rows[@]}"} --baseline best-fixed \
    --filesTokensTr "$out/data/fineweb_train_*.bin" --filesTokensVa "$out/data/fineweb_val_*.bin" --dirResults "$out" \
    "${size[@]}" --afLayerSpecific 0 --lr 0.002 --nTokensVa 16384 --plottingLevel 1 ${rest[@]+"${rest[@]}"}
