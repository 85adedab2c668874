#!/usr/bin/env bash
# Issue 25's GPU measurements, re-recording benchmarks/e2e, kernels, memory, fp8 and profile on
# one card in three device calls of under 10 minutes, back to back on one warm machine (its disk
# keeps /tmp/site and /tmp/parts between calls). Steps are bounded (tools/bounded_steps.sh); after
# each, OUT/results is packed into OUT/results.tar (a call brings back at most 8 files).
# Unpack in the repository with `tar -xf DIR/results.tar -C benchmarks --strip-components 1`; stage c's
# hart/profile.* are benchmarks/profile_hart.*, its graphs/kernels.* benchmarks/kernels_cuda_graphs.*.
#
#   bash tools/hopper_measurements.sh a OUT   carry .whl/a: torchao; FP8 tests; the quantising pass's sweep; bench fp8
#   bash tools/hopper_measurements.sh b OUT   carry .whl/b: FlashAttention-4; kernel, graph, policy and FA4 tests;
#                                             bench e2e, kernels
#   bash tools/hopper_measurements.sh c OUT   nothing to carry: bench memory, profile (FA4 as in b; HART's too),
#                                             bench kernels under CUDA graphs
#   bash tools/hopper_measurements.sh d OUT   carry .whl/c, after b: FlashInfer; its test
#   bash tools/hopper_measurements.sh e OUT   carry .whl/d, after d: TileLang; its test; bench kernels with FA4,
#                                             FlashInfer and TileLang (results/libraries/kernels.* are
#                                             benchmarks/kernels_libraries.*)
#
# Stage b runs FA4's tests first (CUDA-graph replay included); where they fail, the generations of
# b and c run without the wheels, so a broken capture cannot make a wrong image or a false time.
#
# The wheels come from tools/hopper_wheels.sh. A call carries at most 64 MiB with the working
# tree: move the demo's weights out of the checkout for these calls (nothing here reads them):
#   mkdir -p /tmp/aside && mv sparvar/assets/infinity_demo*.safetensors /tmp/aside/
set -uo pipefail
stage=${1:-}
out=${2:-}
case $stage in a | b | c | d | e) ;; *)
    echo "error: the stage is a, b, c, d or e, not '$stage'" >&2
    exit 2
    ;;
esac
if [ -z "$out" ]; then
    echo "error: give the output folder: tools/hopper_measurements.sh $stage OUT" >&2
    exit 2
fi
results=$out/results
mkdir -p "$results"
export PYTHONUNBUFFERED=1
. "$(dirname "$0")/bounded_steps.sh"

pack() {  # everything the steps wrote so far, as one file
    tar -cf "$out/results.tar" -C "$out" results
}

site=/tmp/site
export PYTHONPATH=$site/nvidia_cutlass_dsl/dsl_packages:$site
# TileLang's own folder goes first: its tvm-ffi (0.1.12, which it pins) serves FA4 and FlashInfer too
[ -d /tmp/tilelang ] && export PYTHONPATH=/tmp/tilelang:$PYTHONPATH
# FlashInfer's JIT runs the ninja executable, which stage d installs here
export PATH=/tmp/ninja/bin:$PATH

generations_env() {  # COMMAND...: without the wheels (FA4) where stage b found FA4's tests failing here
    if [ -f /tmp/fa4_failed ]; then PYTHONPATH= "$@"; else "$@"; fi
}
tests=(python3 -m pytest -q -o addopts= -p no:cacheprovider -p no:warnings)

case $stage in
a)
    # torchao in its own folder, on the path of bench fp8 (its one user) and of the FP8 tests alone
    mkdir -p /tmp/parts && cp .whl/a/cu13.tar.xz.part-* /tmp/parts/ \
        && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ao \
            .whl/a/torchao-*.whl || exit 1
    PYTHONPATH=/tmp/ao step 120 "${tests[@]}" tests/test_fp8.py tests/test_bench_fp8.py
    step 150 python3 -m sparvar bench kernel-variants --sections quantise --out "$results/kernel_variants_quantise.jsonl"
    # the generations' latencies come from stage c's bench memory, with FA4 and every setting
    PYTHONPATH=/tmp/ao step 300 python3 -m sparvar bench fp8 --no-scales --out "$results"
    ;;
b)
    if [ ! -f /tmp/parts/cu13.tar.xz.part-aa ]; then
        echo "error: a fresh machine: call a's part of the CuTe DSL wheel is gone; run stage a first" >&2
        exit 3
    fi
    cat /tmp/parts/cu13.tar.xz.part-* .whl/b/cu13.tar.xz.part-* \
        | python3 -c "import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$site')" \
        || exit 1
    for wheel in .whl/b/*.whl; do python3 -m zipfile -e "$wheel" $site || exit 1; done
    # the kernels, and the paths that run them inside generations: CUDA graphs, stage peaks, CS4A
    step 150 "${tests[@]}" tests/test_kernels.py tests/test_graphs.py tests/test_pipeline.py tests/test_policy.py \
        tests/test_cs4a.py
    # generations take FA4 only if its tests pass on this card, CUDA-graph replay included
    timeout 120 "${tests[@]}" tests/test_fa4.py 2>&1 | tail -15
    if [ "${PIPESTATUS[0]}" != 0 ]; then
        touch /tmp/fa4_failed
        echo "note: FlashAttention-4's tests failed here: the generations below run without it"
    fi
    generations_env step 300 python3 -m sparvar bench e2e --repeats 3 --out "$results"
    step 150 python3 -m sparvar bench kernels --out-dir "$results"
    ;;
c)
    python3 -c "import flash_attn.cute" 2> /dev/null || echo "note: FlashAttention-4 is missing: stage b did not run on this machine"
    generations_env step 360 python3 -m sparvar bench memory --out "$results"
    generations_env step 150 python3 -m sparvar bench profile --precision auto fp8 --out "$results"
    # HART's attention share of its GPU time (how far attention alone can take (d) over (b)), and
    # what FP8 in HART's own layers takes off its matrix products
    step 150 python3 -m sparvar bench profile --models hart-0.7b --attention dense default --precision auto fp8 \
        --out "$results/hart"
    # the kernels as generations run them, replayed from CUDA graphs (FA4's host launch cost left out)
    step 150 python3 -m sparvar bench kernels --cuda-graphs --out-dir "$results/graphs"
    ;;
d)
    if [ ! -d $site/tvm_ffi ]; then
        echo "error: a fresh machine: stage b's tvm-ffi is gone; run stages a and b first" >&2
        exit 3
    fi
    xz -dc .whl/c/flashinfer.tar.xz | tar -xf - -C $site || exit 1
    for wheel in .whl/c/*.whl; do
        case $(basename "$wheel") in ninja-*) ;; *) python3 -m zipfile -e "$wheel" $site || exit 1 ;; esac
    done
    # FlashInfer's JIT runs the ninja executable: pip keeps its file modes and writes bin/ninja
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ninja .whl/c/ninja-*.whl || exit 1
    step 300 "${tests[@]}" tests/test_flashinfer.py
    ;;
e)
    [ -d /tmp/ninja ] || echo "note: stages a, b and d did not run on this machine: no FA4 or FlashInfer columns"
    mkdir -p /tmp/tilelang && xz -dc .whl/d/tilelang.tar.xz | tar -xf - -C /tmp/tilelang || exit 1
    export PYTHONPATH=/tmp/tilelang:$PYTHONPATH
    step 150 "${tests[@]}" tests/test_tilelang.py
    step 400 python3 -m sparvar bench kernels --out-dir "$results/libraries"
    ;;
esac
ls -l "$out"
