#!/usr/bin/env bash
# The GPU measurements of the shipped demo model (docs/demo_model.md, "Measurements"), in two
# device calls of under 10 minutes each. Every step is bounded by `timeout` and by the call's
# budget (BUDGET seconds, default 540), so that one slow step cannot cost the call the others;
# after each, the files the steps changed in the tree are packed into OUT/measurements.tar.part-*
# (15 MiB parts: a call brings back at most 8 files of 16 MiB). Unpack them in the repository:
# `cat DIR/measurements.tar.part-* | tar -x`.
#
#   bash tools/demo_measurements.sh calibrate OUT   score, default's calibration, skip thresholds, FP8
#   bash tools/demo_measurements.sh evaluate OUT    every preset on 130 held-out images
#
# `score` reads runs/emoji.npz (`sparvar train-demo prepare`): carry it to the device.
# `calibrate` comes first: `default`'s rules are chosen from its calibration table (and committed)
# before `evaluate` measures them on the held-out prompts.
set -uo pipefail
stage=${1:-}
out=${2:-}
if [ "$stage" != calibrate ] && [ "$stage" != evaluate ]; then
    echo "error: the stage is calibrate or evaluate, not '$stage'" >&2
    exit 2
fi
if [ -z "$out" ]; then
    echo "error: give the output folder: tools/demo_measurements.sh $stage OUT" >&2
    exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
. "$(dirname "$0")/bounded_steps.sh"

pack() {  # the files the steps changed so far, in parts a device call brings back
    rm -f "$out"/measurements.tar.part-*
    git status --porcelain --untracked-files=all -- benchmarks docs sparvar | cut -c4- \
        | tar -cf - -T - | split -b 15M - "$out/measurements.tar.part-"
}

case $stage in
calibrate)
    step 160 python3 -m sparvar train-demo score --device cuda --score-batch 64
    step 150 python3 -m tools.calibrate_default --prompts benchmarks/default_calibration_prompts.txt \
        --candidates tools/default_candidates.json --device cuda --batch 32 --name default_calibration
    step 100 python3 -m sparvar calibrate-skip --model infinity-demo --device cuda --batch 32 --quiet \
        --prompts benchmarks/default_calibration_prompts.txt --out benchmarks/adaptive_skip
    step 150 python3 -m sparvar bench fp8-fidelity --samples 50 --device cuda
    ;;
evaluate)
    # the held-out prompts' every third one (65) x 2 seeds: 130 images a preset
    eval_demo=(python3 -m sparvar eval --model infinity-demo --prompts benchmarks/demo_eval_prompts.txt --seeds 2
               --batch 32 --device cuda --quiet)
    step 270 "${eval_demo[@]}" --out benchmarks/quality \
        --presets dense,paper,default,default+skip2,fastvar+skip2,default+adaptive
    step 270 "${eval_demo[@]}" --out benchmarks/quality_ablations --presets dense,paper-remap,cs4a,cs4a-nores,csla,mass
    ;;
esac

ls -l "$out"
