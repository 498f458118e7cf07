#!/usr/bin/env bash
# On the device machine, after .gpu1/ .. .gpuN/ were carried there (scripts/gpu-prepare.sh made them)
# and with .gpu0/ carried by this call: install onnxruntime-gpu beside the machine's torch, check that
# sessions really get CUDA and agree with the CPU, then measure AlexNet in-process (plain runs and IO
# binding) and the server under the benchmark's load, and print one table to paste into the issue note.
# GPU_CHECK_SECONDS / GPU_CHECK_CLIENTS shorten it, GPU_CHECK_DRY=1 skips the install: a dry run on a CPU machine.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu-check-out}
SITE=/tmp/site
SECONDS_EACH=${GPU_CHECK_SECONDS:-4}
CLIENTS=${GPU_CHECK_CLIENTS:-1,16,64}
mkdir -p "$SITE" "$OUT"
step() { echo "== $(date +%T) $*"; }

step "install onnxruntime-gpu and the wheels in .gpu0 into $SITE"
if [ -z "${GPU_CHECK_DRY:-}" ]; then  # GPU_CHECK_DRY=1: use the installed packages (a dry run elsewhere)
    if [ ! -d "$SITE/onnxruntime" ]; then
        mkdir -p /tmp/gpu-parts && cp "$REPO"/.gpu[1-9]*/part.* /tmp/gpu-parts/ 2>/dev/null
        cat /tmp/gpu-parts/part.* | xz -d | tar -x -C "$SITE" || exit 1
    fi
    python3 -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$REPO"/.gpu0/*.whl || exit 1
    export PYTHONPATH="$SITE"
fi
export PYTHONUNBUFFERED=1
cd /tmp  # not the repository root: its convserve/ folder would shadow the wheel's package
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step "providers"
python3 - <<'PY'
import onnxruntime as ort
ort.preload_dlls()
print("onnxruntime", ort.__version__, ort.__file__)
print("available:", ort.get_available_providers())
PY

step "export alexnet (random init)"
rm -rf /tmp/bench
python3 -m convserve export --arch alexnet --random-init --repository /tmp/bench --name alexnet || exit 1

step "in-process: CUDA vs CPU parity, plain runs vs IO binding"
python3 - "$OUT" <<'PY' | tee "$OUT/in_process.txt"
import glob, json, sys, time
import numpy as np, onnxruntime as ort
ort.preload_dlls()
path = glob.glob("/tmp/bench/alexnet/*/model.onnx")[0]
cuda = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
cpu = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
print("session got:", cuda.get_providers())
outputs = [o.name for o in cuda.get_outputs()]
plain_outputs = ["logits", "probabilities"]
x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
a, b = cuda.run(outputs, {"input": x}), cpu.run(outputs, {"input": x})
for name, u, v in zip(outputs, a, b):
    print(f"parity {name:<14} max |cuda - cpu| {np.abs(u - v).max():.2e} (max |cpu| {np.abs(v).max():.2e})")
rows = []
def timed(fn, n):
    for _ in range(3): fn()
    t = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t) / n
for names, label in ((plain_outputs, "logits"), (outputs, "all fmaps")):
    for batch in (1, 8, 32):
        xb = np.ascontiguousarray(np.repeat(x[:1], batch, axis=0))
        plain = timed(lambda: cuda.run(names, {"input": xb}), 30)
        io = cuda.io_binding()
        io.bind_cpu_input("input", xb)
        for n in names: io.bind_output(n)
        def bound():
            cuda.run_with_iobinding(io); io.copy_outputs_to_cpu()
        b_ms = timed(bound, 30)
        try:
            dev = ort.OrtValue.ortvalue_from_numpy(xb, "cuda", 0)
            io2 = cuda.io_binding()
            io2.bind_ortvalue_input("input", dev)
            for n in names: io2.bind_output(n, "cuda")
            on_gpu = timed(lambda: cuda.run_with_iobinding(io2), 30)
        except RuntimeError as exc:  # no CUDA provider (a dry run)
            print("GPU-resident run failed:", str(exc)[:200]); on_gpu = float("nan")
        rows.append(dict(outputs=label, batch=batch, run_ms=plain * 1e3, iobinding_ms=b_ms * 1e3, gpu_resident_ms=on_gpu * 1e3))
        print(f"{label:<9} batch {batch:>2}: run {plain*1e3:7.2f} ms ({batch/plain:7.0f} img/s)  io_binding {b_ms*1e3:7.2f} ms"
              f"  input+outputs on GPU {on_gpu*1e3:7.2f} ms ({batch/on_gpu:7.0f} img/s)")
json.dump(rows, open(sys.argv[1] + "/in_process.json", "w"), indent=1)
PY

step "server over gRPC agrees with in-process CUDA"
python3 - <<'PY'
import glob, os, subprocess, sys, numpy as np, onnxruntime as ort
from convserve.service.client import Client, wait_until_ready
ort.preload_dlls()
path = glob.glob("/tmp/bench/alexnet/*/model.onnx")[0]
server = subprocess.Popen([sys.executable, "-m", "convserve", "serve", "--repository", "/tmp/bench", "--host", "127.0.0.1",
                           "--grpc-port", "8701", "--metrics-port", "0", "--http-port", "0", "--log-level", "INFO"])
try:
    wait_until_ready("127.0.0.1:8701", server)
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with Client("127.0.0.1:8701") as client:
        response = client.infer("alexnet", array=x, outputs=["logits"])
        print("server parameters:", client.parameters(response))
        got = {"logits": client.output(response, "logits")}
    want = ort.InferenceSession(path, providers=["CUDAExecutionProvider"]).run(["logits"], {"input": x})[0]
    print(f"server vs in-process CUDA: max |diff| {np.abs(got['logits'] - want).max():.2e}")
    import statistics, time
    one = x[:1]
    with Client("127.0.0.1:8701") as client:
        rows = []
        for _ in range(60):
            t = time.perf_counter()
            p = client.parameters(client.infer("alexnet", array=one, outputs=["logits"]))
            rows.append(((time.perf_counter() - t) * 1e6, p["server_us"], p["compute_us"], p["queue_us"]))
    med = [statistics.median(r[i] for r in rows[10:]) for i in range(4)]
    print("one client, batch 1, sequential (median us): client %.0f  server %.0f  compute %.0f  queue %.0f" % tuple(med))
finally:
    server.terminate(); server.wait(30)
PY

if [ -z "${GPU_CHECK_QUICK:-}" ]; then  # GPU_CHECK_QUICK=1: only the server configurations below
step "benchmark: server vs in-process, $CLIENTS clients, ${SECONDS_EACH}s each"
python3 -m convserve bench --repository /tmp/bench --model alexnet --clients "$CLIENTS" --seconds "$SECONDS_EACH" \
    --cases input,image,fmaps,fmaps-fp16,shm,shm-fmaps --json-out "$OUT/bench.json" | tee "$OUT/bench.txt"

step "benchmark: cuDNN EXHAUSTIVE algorithm search instead of HEURISTIC"
python3 -m convserve bench --repository /tmp/bench --model alexnet --clients "$CLIENTS" --seconds "$SECONDS_EACH" \
    --cases input,fmaps --server-arg=--cudnn-conv-algo-search=EXHAUSTIVE --json-out "$OUT/bench_exhaustive.json" \
    | tee "$OUT/bench_exhaustive.txt"
fi

# the server's own CPU threads: onnxruntime's intra-op pool (spinning by default with a GPU provider)
# competes with gRPC and the event loop; front-end processes (one engine, one model copy) lift the
# one-event-loop ceiling
config() {
    local label=$1 cases=$2; shift 2
    step "server configuration: $label"
    python3 -m convserve bench --repository /tmp/bench --model alexnet --clients "$CLIENTS" --seconds 3 \
        --cases "$cases" "${@/#/--server-arg=}" --json-out "$OUT/config_$label.json" 2>/dev/null
}
config defaults input,shm
config intra1-nospin input,shm --intra-op-threads=1 --intra-op-spinning=off
# regions are the engine's: any front-end serves them
for fe in 1 2 4 8; do
    config "intra1-nospin-frontends$fe" input,shm --intra-op-threads=1 --intra-op-spinning=off --frontends=$fe
done
step done
