#!/usr/bin/env bash
# The wheels that issue 25's device runs carry (benchmarks/kernels_notes.md, "Next GPU session"),
# for the device's Python 3.12 on x86-64: torchao for `sparvar bench fp8`; flash-attn-4 with its
# CuTe DSL for `sparvar bench kernels`. The DSL's CUDA 13 wheel (90 MB) is more than one call
# carries, so its files travel as an xz tarball (61 MiB) in two parts: the first with torchao in
# OUT/a (call A), the second with the other wheels in OUT/b (call B, on the same warm machine).
# FlashInfer for the same bench goes in OUT/c (call D, after B, whose tvm-ffi it imports): its 101 MB
# wheel holds 717 MB of sources, 26 MB as an xz tarball, with the wheels its import and its JIT
# build need beyond the device's torch (nvidia-ml-py, ninja, requests and its own). TileLang for the
# same bench goes in OUT/d (call E, after D): its wheel, z3 (whose library its compiler links) and
# the tvm-ffi it pins (0.1.12; FA4 and FlashInfer accept it), unpacked and packed as one xz tarball
# (45 MB).
# Usage, from the repository root: tools/hopper_wheels.sh [OUT]   (default .whl, which git ignores)
set -euo pipefail
out=${1:-.whl}
cache=$out/cache
rm -rf "$out/a" "$out/b" "$out/c" "$out/d"
mkdir -p "$cache" "$out/a" "$out/b" "$out/c" "$out/d"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$cache" \
    torchao==0.18.0 flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
    torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
if [ ! -f "$cache/cu13.tar.xz" ]; then
    files=$(mktemp -d)
    python3 -m zipfile -e "$cache"/nvidia_cutlass_dsl_libs_cu13-4.8.1-*.whl "$files"
    tar -C "$files" -cf - . | xz -9 -T0 > "$cache/cu13.tar.xz.tmp"
    mv "$cache/cu13.tar.xz.tmp" "$cache/cu13.tar.xz"
    rm -rf "$files"
fi
split -b 40M "$cache/cu13.tar.xz" "$out/b/cu13.tar.xz.part-"
mv "$out/b/cu13.tar.xz.part-aa" "$out/a/"
cp "$cache"/torchao-0.18.0-*.whl "$out/a/"
for wheel in "$cache"/*.whl; do
    case $(basename "$wheel") in
        torchao-* | nvidia_cutlass_dsl_libs_cu13-*) ;;
        *) cp "$wheel" "$out/b/" ;;
    esac
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$cache/c" \
    flashinfer-python==0.7.4 nvidia-ml-py==13.615.71 ninja==1.13.2 requests==2.34.2 charset-normalizer==3.5.3 \
    idna==3.21 urllib3==2.8.0 certifi==2026.10.19.post1
if [ ! -f "$cache/flashinfer.tar.xz" ]; then
    files=$(mktemp -d)
    python3 -m zipfile -e "$cache"/c/flashinfer_python-0.7.4-*.whl "$files"
    tar -C "$files" -cf - . | xz -6 -T0 > "$cache/flashinfer.tar.xz.tmp"
    mv "$cache/flashinfer.tar.xz.tmp" "$cache/flashinfer.tar.xz"
    rm -rf "$files"
fi
cp "$cache/flashinfer.tar.xz" "$out/c/"
for wheel in "$cache"/c/*.whl; do
    case $(basename "$wheel") in flashinfer_python-*) ;; *) cp "$wheel" "$out/c/" ;; esac
done
if [ ! -f "$cache/tilelang.tar.xz" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 -d "$cache/d" \
        tilelang==0.1.15 z3-solver==4.15.4.0 apache-tvm-ffi==0.1.12 ml-dtypes==0.7.0 cloudpickle==3.1.3 \
        psutil==7.2.2 tqdm==4.70.1
    files=$(mktemp -d)
    for wheel in "$cache"/d/*.whl; do python3 -m zipfile -e "$wheel" "$files"; done
    tar -C "$files" -cf - --exclude=__pycache__ . | xz -9 -T0 > "$cache/tilelang.tar.xz.tmp"
    mv "$cache/tilelang.tar.xz.tmp" "$cache/tilelang.tar.xz"
    rm -rf "$files"
fi
cp "$cache/tilelang.tar.xz" "$out/d/"
du -sh "$out/a" "$out/b" "$out/c" "$out/d"
