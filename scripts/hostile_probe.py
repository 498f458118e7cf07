"""Issues 17's and 27's hostile cases against a real `convserve serve`, each with what it cost the server.

    .venv/bin/python scripts/hostile_probe.py MODEL_REPOSITORY [WORDS]

(WORDS: only the cases whose title holds them, e.g. "SIGSTOP")

Starts a server on free ports, then runs each case in turn while a thread checks health every 20 ms
and samples the server's process tree (RSS, open file descriptors) every 50 ms. Prints one table
row per case: the answer, the worst health latency, RSS and descriptors before / at peak / after,
and what was left behind (files under /dev/shm and the run folder, processes). The cases of one
process at a time (a stopped front-end, a frozen engine, a second server on the port) start servers
of their own and watch those.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convserve.client import build_request, wait_until_ready
from convserve.ports import free_ports
from convserve.proto import grpc_service_pb2 as pb
from convserve.proto import grpc_service_pb2_grpc as pb_grpc
from convserve.wire import ShmRef

X = np.zeros((1, 1, 32, 32), np.float32)


def tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def usage(pid: int) -> tuple[float, int]:
    """(RSS in MB, open descriptors) summed over the process tree."""
    rss, fds = 0, 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/statm") as handle:
                rss += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return rss / 1e6, fds


class Watch:
    """Health latency and resource samples while a case runs."""

    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid
        self.worst = 0.0
        self.failed = 0
        self.peak = (0.0, 0)
        self._stop = threading.Event()

    def __enter__(self) -> Watch:
        self.before = usage(self.pid)
        self.peak = self.before
        self._threads = [threading.Thread(target=self._health), threading.Thread(target=self._sample)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        time.sleep(1.0)
        self.after = usage(self.pid)

    def _health(self) -> None:
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                except grpc.RpcError:
                    self.failed += 1
                self.worst = max(self.worst, time.perf_counter() - started)
                time.sleep(0.02)

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, fds = usage(self.pid)
            self.peak = (max(self.peak[0], rss), max(self.peak[1], fds))
            time.sleep(0.05)


def codes(calls) -> str:
    counted: Counter = Counter()
    for call in calls:
        try:
            call()
            counted["OK"] += 1
        except grpc.RpcError as exc:
            counted[exc.code().name] += 1
    return ", ".join(f"{n} {c}" for c, n in counted.most_common())


class Server:
    def __init__(self, repository: str, *flags: str, port: int = 0, wait: bool = True) -> None:
        self.port, self.metrics_port, self.http_port = free_ports(3)
        self.port = port or self.port
        self.url = f"127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.http_port}"
        self.log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115 (kept: the log)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "convserve", "serve", "--repository", repository, "--host", "127.0.0.1",
             "--grpc-port", str(self.port), "--metrics-port", str(self.metrics_port),
             "--http-port", str(self.http_port), *flags],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if wait:
            wait_until_ready(self.url, self.process, 120)

    def output(self) -> str:
        with open(self.log.name) as handle:
            return handle.read()

    def pids(self) -> dict[str, int]:
        """The engine's and each front-end's pid, as the log names them (the latest of each)."""
        text = self.output()
        found = {"engine": int(re.findall(r"engine pid (\d+) ready", text)[-1])}
        for index, pid in re.findall(r"front-end (\d+) \(pid (\d+)\) connected", text):
            found[f"frontend-{index}"] = int(pid)
        return found

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def case_truncated(server: Server, stub) -> str:
    block = shared_memory.SharedMemory(create=True, size=1 << 20)
    try:
        stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="t", key=block.name, byte_size=1 << 20)
        )
        os.truncate(f"/dev/shm/{block.name}", 0)
        request = build_request("digits", input_shm=(ShmRef("t", X.nbytes), X.shape), outputs=["logits"])
        answer = codes([lambda: stub.ModelInfer(request, timeout=10)])
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="t"))
        return answer + f"; engine alive: {codes([lambda: stub.ModelInfer(build_request('digits', array=X))])}"
    finally:
        block.close()
        block.unlink()


def case_sparse_regions(server: Server, stub) -> str:
    name = f"hostile_sparse_{os.getpid()}"
    with open(f"/dev/shm/{name}", "wb") as handle:
        handle.truncate(1 << 40)  # a sparse 1 TiB object
    try:
        calls = [
            lambda i=i: stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name=f"s{i}", key=name, offset=(i % 64) << 12, byte_size=4096),
                timeout=10,
            )
            for i in range(1004)
        ]
        answer = codes(calls)
        answer += f"; then infer: {codes([lambda: stub.ModelInfer(build_request('digits', array=X), timeout=10)])}"
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
        return answer
    finally:
        os.unlink(f"/dev/shm/{name}")


def case_other_user(server: Server, stub) -> str:
    name = f"hostile_other_{os.getpid()}"
    path = f"/dev/shm/{name}"
    with open(path, "wb") as handle:
        handle.truncate(1 << 16)
    os.chmod(path, 0o600)
    try:
        os.chown(path, 65534, 65534)  # nobody's object
    except PermissionError:
        os.unlink(path)
        return "skipped: not root"
    try:
        return codes(
            [lambda: stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="o", key=name, byte_size=1 << 16), timeout=10)]
        )  # fmt: skip
    finally:
        os.unlink(path)


def _watch(health, request: health_pb2.HealthCheckRequest, count: int) -> tuple[list, str]:
    """`count` Watch streams at once; each one's first answer, counted by code."""
    streams = [health.Watch(request) for _ in range(count)]
    return streams, codes([lambda s=s: next(s) for s in streams])


def case_health_names(server: Server, stub) -> str:
    with grpc.insecure_channel(server.url, options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        big = health_pb2.HealthCheckRequest(service="x" * (4 << 20))
        return _watch(health_pb2_grpc.HealthStub(channel), big, 120)[1]


def case_health_watches(server: Server, stub) -> str:
    with grpc.insecure_channel(server.url) as channel:
        streams, answer = _watch(health_pb2_grpc.HealthStub(channel), health_pb2.HealthCheckRequest(), 200)
        live = codes([lambda: pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)])
        for stream in streams:
            stream.cancel()
        return f"{answer}; ServerLive meanwhile: {live}"


def case_metrics_sockets(server: Server, stub) -> str:
    held = []
    for _ in range(1011):
        try:
            held.append(socket.create_connection(("127.0.0.1", server.metrics_port), timeout=5))
        except OSError:
            break
    time.sleep(0.5)
    live = codes([lambda: stub.ServerLive(pb.ServerLiveRequest(), timeout=5)])
    fresh = codes([lambda: pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.url)).ServerLive(
        pb.ServerLiveRequest(), timeout=5)])  # fmt: skip
    time.sleep(11)  # past the idle timeout
    closed = 0
    for sock in held:
        sock.settimeout(0.2)
        with contextlib.suppress(OSError):
            closed += sock.recv(1) == b""
        sock.close()
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).status
    return (
        f"{len(held)} sockets opened, {closed} closed by the server within 11 s; gRPC meanwhile {live}, "
        f"new channel {fresh}; scrape after: {scrape}"
    )


def case_filters_bomb(server: Server, stub, repository: str) -> str:
    from convserve.proto import introspection_pb2 as ipb
    from convserve.proto import introspection_pb2_grpc as ipb_grpc

    folder = sorted(glob.glob(os.path.join(repository, "digits", "*")))[-1]
    path = os.path.join(folder, "filters.npz")
    saved = path + ".saved"
    shutil.copy(path, saved)
    try:
        import zipfile

        header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1, 1, 1), np.float32))
        header["shape"] = (4096, 4096, 2, 4)  # 512 MiB declared
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("conv1.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, header)
            for _ in range(512):
                member.write(bytes(1 << 20))
        size = os.path.getsize(path)
        stub_i = ipb_grpc.IntrospectionStub(grpc.insecure_channel(server.url))
        request = ipb.LayerFiltersRequest(name="digits", feature_map="conv1")
        return f"{size // 1000} KB archive: " + codes([lambda: stub_i.LayerFilters(request, timeout=30)] * 5)
    finally:
        os.replace(saved, path)


def case_load_unload(server: Server, stub) -> str:
    failures: Counter = Counter()

    def toggle() -> None:
        with grpc.insecure_channel(server.url) as channel:
            s = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(10):
                for call, request in (
                    (s.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="digits")),
                    (s.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="digits")),
                ):
                    try:
                        call(request, timeout=60)
                        failures["OK"] += 1
                    except grpc.RpcError as exc:
                        failures[exc.code().name] += 1

    threads = [threading.Thread(target=toggle) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"), timeout=60)
    return ", ".join(f"{n} {c}" for c, n in failures.items()) + " (60 calls)"


# ---- issue 27: the HTTP door, the arenas, and one process at a time ------------------------------


def _http(base: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30) -> int:
    request = urllib.request.Request(base + path, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:  # reset, refused, timed out
        return {"timed out": 0}.get(str(getattr(exc, "reason", exc)), -1)


def _statuses(values) -> str:
    return ", ".join(f"{n} × {c}" for c, n in Counter(values).most_common())


def case_cancel_storm(server: Server, stub) -> str:
    """500 requests for every feature map with 1-30 ms deadlines on an 8 MiB arena, then 3 images."""
    every = ["logits", "probabilities", "conv1", "conv2", "conv3", "conv4"]
    x = np.random.default_rng(0).standard_normal((8, 1, 32, 32)).astype(np.float32)
    request = build_request("digits", array=x, outputs=every)

    def one(i: int) -> str:
        try:
            stub.ModelInfer(request, timeout=0.001 + (i % 30) / 1000)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    with ThreadPoolExecutor(16) as pool:
        storm = _statuses(pool.map(one, range(500)))
    time.sleep(0.5)
    three = build_request("digits", array=x[:3], outputs=every)
    after = codes([lambda: stub.ModelInfer(three, timeout=30)])
    return f"{storm}; then 3 images, every map: {after}"


def case_idle_http(server: Server, stub) -> str:
    held = []
    for _ in range(1000):
        try:
            held.append(socket.create_connection(("127.0.0.1", server.http_port), timeout=5))
        except OSError:
            break
    for sock in held[::2]:  # half of them start a request head and never end it
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    closed = 0
    for sock in held:
        sock.settimeout(max(0.1, started + 15 - time.monotonic()))
        with contextlib.suppress(OSError):
            closed += sock.recv(1) == b""
        sock.close()
    took = time.monotonic() - started
    live = _http(server.http, "/v2/health/live")
    return f"{len(held)} opened, {closed} closed by the server in {took:.1f} s; then GET live: {live}"


def case_gzip_bombs(server: Server, stub) -> str:
    bomb = gzip.compress(bytes(1 << 30), compresslevel=9)  # 1 GiB of zeros, about 1 MiB

    def send(_: int) -> int:
        return _http(server.http, "/v2/models/digits/infer", bomb, {"Content-Encoding": "gzip"}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    return f"{len(bomb) // 1024} KiB each: {_statuses(answers)}"


def case_malformed_bodies(server: Server, stub) -> str:
    deep = b"[" * 100_000 + b"]" * 100_000
    good = {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}
    infer = "/v2/models/digits/infer"
    big = {"inputs": [good], "outputs": [{"name": "logits", "parameters": {"classification": 2**64}}]}
    cases = [
        (infer, deep, {}),
        (infer, json.dumps({"inputs": [{**good, "data": "D"}]}).encode().replace(b'"D"', deep), {}),
        ("/v2/repository/index", deep, {}),
        (infer, json.dumps({"inputs": [good]}).encode(), {"Inference-Header-Content-Length": "²"}),
        (infer, json.dumps(big).encode(), {}),
        (infer, json.dumps({"inputs": [good], "parameters": {"priority": 2**63}}).encode(), {}),
    ]
    return _statuses(_http(server.http, path, body, headers) for path, body, headers in cases) + " (6 cases)"


def case_large_json(server: Server, stub) -> str:
    """Bodies of numbers, which the JSON parser reads one by one (an unknown key: still parsed)."""
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.123456789] * 1024}
    body = json.dumps({"inputs": [tensor], "pad": [0.123456789] * 450_000}).encode()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _http(server.http, "/v2/models/digits/infer", body), range(4)))
    return f"{len(body) >> 20} MB each: {_statuses(answers)}"


def _fresh_health(url: str, timeout: float = 0.5) -> str:
    try:
        # a new connection each time, as a probe makes (a local pool: gRPC would otherwise reuse a
        # connection another channel of this process holds to the same address)
        with grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    except grpc.RpcError as exc:
        return exc.code().name


def _within(seconds: float, condition) -> float | None:
    """Seconds until condition() holds, or None."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    return None


def process_cases(repository: str) -> list:
    """Cases that stop or kill one process of a server of their own (each row watches that server)."""

    def stopped_frontend(server: Server) -> str:
        stopped = server.pids()["frontend-0"]
        os.kill(stopped, signal.SIGSTOP)
        took = _within(15, lambda: all(_fresh_health(server.url) == "SERVING" for _ in range(10)))
        restarted = _within(30, lambda: server.pids().get("frontend-0") not in (None, stopped))
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
        return (
            f"10 fresh connections in a row SERVING {took:.2f} s after the SIGSTOP; "
            f"the stopped one killed and a new front-end connected {restarted:.1f} s later"
            if took is not None and restarted is not None
            else f"not served again within 15 s (restart: {restarted})"
        )

    def frozen_engine(server: Server) -> str:
        engine = server.pids()["engine"]
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                                       "data": [0.0] * 1024}]}).encode()  # fmt: skip
        os.kill(engine, signal.SIGSTOP)
        try:
            not_serving = _within(5, lambda: _fresh_health(server.url) == "NOT_SERVING")
            started = time.monotonic()
            http = _http(server.http, "/v2/models/digits/infer", body)
            waited = time.monotonic() - started
        finally:
            os.kill(engine, signal.SIGCONT)
        serving = _within(5, lambda: _fresh_health(server.url) == "SERVING")
        return (
            f"NOT_SERVING {not_serving:.2f} s after the SIGSTOP; HTTP infer {http} after {waited:.1f} s "
            f"(--http-request-timeout 2); SERVING {serving:.2f} s after SIGCONT"
        )

    def killed_in_start(server: Server) -> str:
        deadline = time.monotonic() + 60
        while not (loaded := re.search(r"engine pid (\d+) ready", server.output())):
            if time.monotonic() > deadline or server.process.poll() is not None:
                return "the engine never came up"
            time.sleep(0.01)
        os.kill(int(loaded.group(1)), signal.SIGKILL)
        killed = time.monotonic()
        wait_until_ready(server.url, server.process, 60)
        return f"kill -9 of the engine before the front-ends connected: serving {time.monotonic() - killed:.1f} s later"

    def second_server(server: Server) -> str:
        second = Server(repository, port=server.port, wait=False)
        code = second.process.wait(60)
        lines = [line for line in second.output().splitlines() if line.strip()]
        return f"the second exits {code}: {lines[-1][:120] if lines else '(no output)'}"

    return [
        ("SIGSTOP one of 2 front-ends", lambda: Server(repository, "--frontends", "2"), stopped_frontend),
        ("SIGSTOP the engine", lambda: Server(repository, "--http-request-timeout", "2"), frozen_engine),
        (
            "engine killed while 2 front-ends start",
            lambda: Server(repository, "--frontends", "2", wait=False),
            killed_in_start,
        ),
        ("a second server on the same port", lambda: Server(repository), second_server),
    ]


def files() -> set[str]:
    return set(glob.glob("/dev/shm/*")) | set(glob.glob(os.path.join(tempfile.gettempdir(), "convserve-run-*")))


def leftovers(before: set[str]) -> str:
    return ", ".join(sorted(files() - before)) or "nothing"


def main() -> None:
    repository = sys.argv[1]
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    server = Server(
        repository, "--max-health-watches", "64", "--arena-mib", "8",
        "--http-head-timeout", "5", "--http-max-connections", "1024",
    )  # fmt: skip
    channel = grpc.insecure_channel(server.url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    cases = [
        ("registered object truncated to 0, then infer", case_truncated),
        ("1,004 regions on a sparse 1 TiB object", case_sparse_regions),
        ("another user's 0600 object", case_other_user),
        ("120 Watch streams with 4 MB service names", case_health_names),
        ("200 Watch streams", case_health_watches),
        ("1,011 idle sockets to /metrics", case_metrics_sockets),
        ("filters.npz declaring 512 MiB", lambda s, st: case_filters_bomb(s, st, repository)),
        ("3 clients toggling load/unload", case_load_unload),
        ("500 requests, every map, 1-30 ms deadlines, arena 8 MiB", case_cancel_storm),
        ("1,000 idle / half-head HTTP connections (head timeout 5 s)", case_idle_http),
        ("8 gzip bombs at once (1 GiB of zeros each)", case_gzip_bombs),
        ("malformed HTTP bodies (deep JSON, '²', > int64)", case_malformed_bodies),
        ("4 × 5 MB JSON bodies at once", case_large_json),
    ]
    print("| case | answer | worst health | RSS MB before / peak / after | fds before / peak / after | left behind |")
    print("|---|---|---|---|---|---|")
    for title, case in cases:
        if only not in title:
            continue
        before = files()
        with Watch(server.url, server.process.pid) as watch:
            answer = case(server, stub)
        (b_rss, b_fd), (p_rss, p_fd), (a_rss, a_fd) = watch.before, watch.peak, watch.after
        print(
            f"| {title} | {answer} | {watch.worst * 1000:.0f} ms{f' ({watch.failed} failed)' if watch.failed else ''} "
            f"| {b_rss:.0f} / {p_rss:.0f} / {a_rss:.0f} | {b_fd} / {p_fd} / {a_fd} | {leftovers(before)} |",
            flush=True,
        )
    channel.close()
    for title, start, case in process_cases(repository):
        if only not in title:
            continue
        before = files()
        own = start()
        try:
            with Watch(own.url, own.process.pid) as watch:
                answer = case(own)
        finally:
            own.stop()
        (b_rss, b_fd), (p_rss, p_fd), (a_rss, a_fd) = watch.before, watch.peak, watch.after
        print(
            f"| {title} | {answer} | {watch.worst * 1000:.0f} ms{f' ({watch.failed} failed)' if watch.failed else ''} "
            f"| {b_rss:.0f} / {p_rss:.0f} / {a_rss:.0f} | {b_fd} / {p_fd} / {a_fd} | {leftovers(before)} |",
            flush=True,
        )
    if only:
        server.stop()
        return
    # supervisor signals
    pids = tree(server.process.pid)
    server.process.send_signal(signal.SIGHUP)
    time.sleep(2)
    alive = server.process.poll() is None and all(os.path.exists(f"/proc/{p}") for p in pids)
    print(f"| SIGHUP to the supervisor | rescans; supervisor and children alive: {alive} | | | | |")
    mine = glob.glob(os.path.join(tempfile.gettempdir(), f"convserve-run-{server.process.pid}-*"))
    server.process.kill()
    server.process.wait()
    time.sleep(3)
    orphans = [p for p in pids[1:] if _running(p)]
    left = [path for path in mine if os.path.exists(path)]
    Server(repository).stop()
    cleaned = not any(os.path.exists(path) for path in mine)
    print(
        f"| kill -9 of the supervisor | children left running: {len(orphans)}; its run folder left: {len(left)}, "
        f"removed by the next start: {cleaned} | | | | |"
    )


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    main()
