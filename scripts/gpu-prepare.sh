#!/usr/bin/env bash
# Here (no GPU): fetch what the device machine lacks and split it into parts that fit one `run` call
# (64 MiB a call, the working tree included), in folders .gpu0/ .. .gpuN/ that git ignores (.git/info/exclude).
# Then, per ../shared/DEVICE.md: one `run` per part, back to back, each carrying one folder, and a
# last call `bash scripts/gpu-check.sh`. NOT YET TRIED ON A DEVICE: record what happens.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/python -m pip"
fetch=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64)
rm -rf .gpu .gpu[0-9]*
mkdir -p .gpu/big .gpu0
$PIP download -q "${fetch[@]}" -d .gpu/big onnxruntime-gpu==1.31.1
# small wheels the device lacks: exporter, health, reflection, a protobuf new enough for service/proto
$PIP download -q "${fetch[@]}" -d .gpu0 onnxscript onnx-ir ml_dtypes grpcio-health-checking \
    grpcio-reflection "protobuf>=7" typing_extensions
# convserve itself, as the wheel (the device has no editable install to map convserve.models/.service)
$PIP wheel -q --no-deps -w .gpu0 .
wheel=$(ls .gpu/big/onnxruntime_gpu-*.whl)
split -b 56M -d "$wheel" .gpu/part.
i=1
for part in .gpu/part.*; do
    mkdir -p ".gpu$i"
    mv "$part" ".gpu$i/"
    i=$((i + 1))
done
basename "$wheel" > .gpu0/ORT_WHEEL_NAME
rm -rf .gpu
for d in .gpu[0-9]*; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
du -sh .gpu[0-9]*
