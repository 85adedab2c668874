#!/usr/bin/env bash
# The wheels that issue 25's device runs carry (benchmarks/kernels_notes.md, "Next GPU session"),
# for the device's Python 3.12 on x86-64: torchao for `sparvar bench fp8`; flash-attn-4 with its
# CuTe DSL for `sparvar bench kernels`. The DSL's CUDA 13 wheel (90 MB) is more than one call
# carries, so its files travel as an xz tarball (61 MiB) in two parts: the first with torchao in
# OUT/a (call A), the second with the other wheels in OUT/b (call B, on the same warm machine).
# Usage, from the repository root: tools/hopper_wheels.sh [OUT]   (default .whl, which git ignores)
set -euo pipefail
out=${1:-.whl}
cache=$out/cache
rm -rf "$out/a" "$out/b"
mkdir -p "$cache" "$out/a" "$out/b"
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
du -sh "$out/a" "$out/b"
