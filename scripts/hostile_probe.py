"""Issue 17's hostile cases against a real `convserve serve`, each with what it cost the server.

    .venv/bin/python scripts/hostile_probe.py MODEL_REPOSITORY

Starts a server on free ports, then runs each case in turn while a thread checks health every 20 ms
and samples the server's process tree (RSS, open file descriptors) every 50 ms. Prints one table
row per case: the answer, the worst health latency, RSS and descriptors before / at peak / after,
and what was left behind (files under /dev/shm and the run folder, processes).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
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
    def __init__(self, repository: str, *flags: str) -> None:
        self.port, self.metrics_port = free_ports(2)
        self.url = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115 (kept: the log)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "convserve", "serve", "--repository", repository, "--host", "127.0.0.1",
             "--grpc-port", str(self.port), "--metrics-port", str(self.metrics_port), "--http-port", "0", *flags],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until_ready(self.url, self.process, 120)

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


def files() -> set[str]:
    return set(glob.glob("/dev/shm/*")) | set(glob.glob(os.path.join(tempfile.gettempdir(), "convserve-run-*")))


def leftovers(before: set[str]) -> str:
    return ", ".join(sorted(files() - before)) or "nothing"


def main() -> None:
    repository = sys.argv[1]
    server = Server(repository, "--max-health-watches", "64")
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
    ]
    print("| case | answer | worst health | RSS MB before / peak / after | fds before / peak / after | left behind |")
    print("|---|---|---|---|---|---|")
    for title, case in cases:
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
