#!/usr/bin/env bash
# The learned-AF study: fixed ReLU², GELU and SwiGLU against phase-II splines from four phase-I recipes (the default
# start; a start at ReLU²; a start at ReLU² with the smoothness prior, strong and weak), 3 seeds, one compareAfs.py
# table and plot.
#
#   bash recipes/studyLearnedAfs.sh CORPUS [OUTDIR] [more compareAfs.py / trainLmAf.py flags]
#
# CORPUS: text files (a glob in quotes works), tokenized into OUTDIR/data with the first 50,000 tokens as the
# validation shard. Results: OUTDIR/compare-study.md and OUTDIR/compare-study.png (and every run's log, metrics and
# plots in OUTDIR). Flags given after OUTDIR override the ones below (later flags win), e.g. --nSteps 300 --seeds 0,1.
# Stopped? Run the same command again: finished runs are kept.
set -euo pipefail
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n 2,11p "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
corpus=$1
out=${2:-study}
shift $(( $# >= 2 ? 2 : 1 ))
repo=$(cd "$(dirname "$0")/.." && pwd)

python "$repo/preprocessFineweb.py" "$out/data" --input "$corpus" --shard_size 50000
python "$repo/compareAfs.py" --name study --seeds 0,1,2 --splinePhases 2 --splineModels 8 \
    --afTypes "relu2,gelu,swiglu" \
    --variant "spline=spline;att-spline" \
    --variant "spline-relu2=spline;att-spline --afInit relu2;att-linear" \
    --variant "spline-relu2-smooth=spline;att-spline --afInit relu2;att-linear --afSmoothness 0.001" \
    --variant "spline-relu2-smooth1e-5=spline;att-spline --afInit relu2;att-linear --afSmoothness 0.00001" \
    --filesTokensTr "$out/data/fineweb_train_*.bin" --filesTokensVa "$out/data/fineweb_val_*.bin" --dirResults "$out" \
    --nLayers 2 --dimEmb 64 --nHeads 2 --seqLength 256 --contextSize 256 --afLayerSpecific 0 \
    --nSteps 600 --nStepsWarmup 60 --nStepsCooldown 300 --lr 0.002 \
    --valEvery 100 --plotEvery 100 --nTokensVa 16384 --plottingLevel 1 "$@"
