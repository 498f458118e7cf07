#!/usr/bin/env bash
# Here (no GPU): fetch what the device machine lacks and pack it into folders that fit one `run` call
# each (64 MiB a call, the working tree included): .gpu0/ (small wheels, convserve's own) and
# .gpu1/ .. .gpuN/ (onnxruntime-gpu, unpacked, without its TensorRT provider, as one xz tarball split
# into parts: xz makes the CUDA provider 186 MB where the wheel's deflate makes it 231 MB, one call less).
# Then, per ../shared/DEVICE.md: one `run` per part, back to back, each carrying one folder, the last
# carrying .gpu0 too and running `bash scripts/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/python -m pip"
fetch=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf .gpu .gpu[0-9]*
mkdir -p .gpu/wheel .gpu/tree .gpu0
$PIP download -q "${fetch[@]}" -d .gpu/wheel onnxruntime-gpu==1.31.1
# the grpcio and protobuf our generated modules were made with (they refuse older runtimes), at the
# versions this venv runs
pinned=$(.venv/bin/python -m pip list --format=freeze | grep -iE '^(grpcio|grpcio-health-checking|grpcio-reflection|protobuf)==')
$PIP download -q "${fetch[@]}" -d .gpu0 $pinned
# convserve itself, as the wheel (the device has no editable install to map convserve.models/.service)
$PIP wheel -q --no-deps -w .gpu0 .
(cd .gpu/tree && unzip -q ../wheel/onnxruntime_gpu-*.whl && rm onnxruntime/capi/libonnxruntime_providers_tensorrt.so)
tar -C .gpu/tree -cf - . | xz -T0 -6 > .gpu/ort.tar.xz
split -b 58M -d .gpu/ort.tar.xz .gpu/part.
i=1
for part in .gpu/part.*; do
    mkdir -p ".gpu$i"
    mv "$part" ".gpu$i/"
    i=$((i + 1))
done
rm -rf .gpu
for d in .gpu[0-9]*; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
du -sh .gpu[0-9]*
