#!/usr/bin/env bash
# On the device machine, after every .gpuN/ folder has been carried there (see gpu-prepare.sh):
# install onnxruntime-gpu beside the machine's torch, check that sessions really get CUDA, then
# measure in-process onnxruntime (IO binding on and off) and the server under load on AlexNet, and
# print one table to paste into the issue note. NOT YET TRIED ON A DEVICE.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site
mkdir -p "$SITE" /tmp/wheel
cat .gpu[1-9]*/part.* > "/tmp/wheel/$(cat .gpu0/ORT_WHEEL_NAME)"
python -m pip install -q --no-deps --no-index --target "$SITE" /tmp/wheel/*.whl .gpu0/*.whl
export PYTHONPATH="$SITE"   # convserve comes from its wheel in .gpu0
python - <<'PY'
import onnxruntime as ort
ort.preload_dlls()
print("onnxruntime", ort.__version__, "available:", ort.get_available_providers())
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

python -m convserve export --arch alexnet --random-init --repository /tmp/bench --name alexnet || exit 1

python - <<'PY'
import glob, time, numpy as np, onnxruntime as ort
ort.preload_dlls()
path = glob.glob("/tmp/bench/alexnet/*/model.onnx")[0]
s = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("session got:", s.get_providers())
for batch in (1, 16, 32):
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    for _ in range(5): s.run(["logits", "probabilities"], {"input": x})
    t = time.perf_counter(); n = 50
    for _ in range(n): s.run(["logits", "probabilities"], {"input": x})
    plain = (time.perf_counter() - t) / n
    io = s.io_binding()
    io.bind_cpu_input("input", x); io.bind_output("logits"); io.bind_output("probabilities")
    for _ in range(5): s.run_with_iobinding(io)
    t = time.perf_counter()
    for _ in range(n): s.run_with_iobinding(io); io.copy_outputs_to_cpu()
    bound = (time.perf_counter() - t) / n
    print(f"in-process batch {batch:>3}: run {plain*1000:7.2f} ms ({batch/plain:8.1f} img/s)  "
          f"io_binding {bound*1000:7.2f} ms ({batch/bound:8.1f} img/s)")
PY

B="python -m convserve bench --repository /tmp/bench --model alexnet --clients 1,16 --seconds 8"
FM="--feature-map conv1 --feature-map conv2 --feature-map conv3 --feature-map conv4 --feature-map conv5"
echo "== input FP32";            $B
echo "== image PNG";             $B --input-kind image
echo "== + feature maps FP32";   $B $FM
echo "== + feature maps FP16";   $B $FM --fp16
