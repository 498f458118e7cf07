"""docker-compose.yml for real: the stack under a Docker engine, with faults, from images made here.

deploy/local/build-images.sh builds every image from Debian's packages (no registry reaches this
machine); compose then trains the default model into the shared volume, runs two server replicas
behind the nginx load balancer and Prometheus scraping both. Traffic goes to the published ports on
127.0.0.1 only. Grafana has no Debian package: the stack starts without it (its dashboard is
checked by tests/test_deploy.py). Skipped, with the reason, where no Docker engine answers; .ci/run
starts dockerd. The tests run in file order, on one stack, and the last one takes it down.

Numbers (image sizes, the time from `up` to the first answer, the faults' counts) go to
build/deploy-report.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from convserve.ports import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORT = os.path.join(ROOT, "build", "deploy-report.json")
SERVICES = ["trainer", "server", "lb", "prometheus"]  # all but grafana
REPLICAS = 2
CLIENTS = 8
RETRY_SECONDS = 60
PACE_SECONDS = 0.05  # between one client's requests: steady traffic that leaves the 2 cores room to train

report: dict = {}


def _docker_cli() -> str | None:
    """A docker client that reaches the engine (`docker info`), or None. Builds go through
    build-images.sh, which picks its own client (one that builds with BuildKit)."""
    for name in ("docker", "/usr/bin/docker"):
        path = shutil.which(name)
        if path and subprocess.run([path, "info"], capture_output=True, timeout=30).returncode == 0:
            return path
    return None


def _run(*command: str, timeout: float = 600, env=None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


class Stack:
    """One compose project on free ports, driven with docker-compose."""

    def __init__(self, docker: str, base: str) -> None:
        self.docker = docker
        self.project = f"convservetest{os.getpid()}"
        self.http_port, self.grpc_port, self.prometheus_port, grafana_port = free_ports(4)
        self.env = {
            "CONVSERVE_BASE": base,
            "CONVSERVE_PUBLISH_ADDRESS": "127.0.0.1",  # nothing of the test's stack beyond this machine
            "CONVSERVE_HTTP_PORT": str(self.http_port),
            "CONVSERVE_GRPC_PORT": str(self.grpc_port),
            "CONVSERVE_PROMETHEUS_PORT": str(self.prometheus_port),
            "CONVSERVE_GRAFANA_PORT": str(grafana_port),
            "CONVSERVE_TRAIN_EPOCHS": "3",  # the model is trained for real, only shorter
        }
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.http_url = f"127.0.0.1:{self.http_port}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True, env=None) -> subprocess.CompletedProcess:
        return _run(
            "docker-compose", "-p", self.project, *args, timeout=timeout, env={**self.env, **(env or {})}, check=check
        )

    def containers(self, service: str, everything: bool = False) -> list[str]:
        args = ["ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}"]
        args += ["--filter", f"label=com.docker.compose.service={service}"]
        return _run(self.docker, *args, *(["-a"] if everything else [])).stdout.split()

    def inspect(self, container: str, template: str) -> str:
        return _run(self.docker, "inspect", "-f", template, container).stdout.strip()

    def wait_healthy(self, container: str, timeout: float = 120) -> None:
        _wait(lambda: self.inspect(container, "{{.State.Health.Status}}") == "healthy", timeout, f"{container} healthy")

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout[-8000:]

    def leftovers(self) -> dict:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            kind: _run(self.docker, *command, "--filter", label).stdout.split()
            for kind, command in (
                ("containers", ["ps", "-aq"]),
                ("volumes", ["volume", "ls", "-q"]),
                ("networks", ["network", "ls", "-q"]),
            )
        }


def _held_out_digits() -> np.ndarray:
    """The digits the trainer held out (359), preprocessed as the trained model takes them."""
    from convserve.models.data import load_dataset

    return load_dataset("digits").test_inputs()


class Expected:
    """The logits each version should give, from its model.onnx copied out of the shared volume and
    run in-process by onnxruntime."""

    def __init__(self, stack: Stack, images: np.ndarray, workdir) -> None:
        self.stack, self.images, self.workdir = stack, images, workdir
        self.logits: dict[int, np.ndarray] = {}

    def of(self, version: int) -> np.ndarray:
        if version not in self.logits:
            import onnxruntime as ort

            (server, *_) = self.stack.containers("server")
            path = os.path.join(str(self.workdir), f"v{version}.onnx")
            _run(self.stack.docker, "cp", f"{server}:/models/digits/{version}/model.onnx", path)
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            self.logits[version] = session.run(["logits"], {"input": self.images})[0]
        return self.logits[version]

    def right(self, version: int, first: int, logits: np.ndarray) -> bool:
        want = self.of(version)[first : first + len(logits)]
        return logits.shape == want.shape and bool(np.allclose(logits, want, atol=1e-4))


def _grpc_infer(client, images: np.ndarray, first: int, batch: int):
    import tritonclient.grpc as grpcclient

    x = images[first : first + batch]
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("digits", [tensor], outputs=[grpcclient.InferRequestedOutput("logits")], client_timeout=20)
    return int(result.get_response().model_version), result.as_numpy("logits")


def _http_infer(client, images: np.ndarray, first: int, batch: int):
    import tritonclient.http as httpclient

    x = images[first : first + batch]
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    result = client.infer("digits", [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
    return int(result.get_response()["model_version"]), result.as_numpy("logits")


class Load:
    """CLIENTS threads sending all the time through the load balancer, each as a client that retries
    UNAVAILABLE would (every 0.25 s, for a minute at most). Counts: requests sent, answered right
    (after retries), attempts answered UNAVAILABLE, attempts answered CANCELLED, anything else
    (another code, a wrong answer), and requests lost (no right answer within the minute).

    CANCELLED is counted apart, and retried: gRPC's server cancels the calls that reach a replica in
    the instant it stops (a handful under this load, none of them cancelled by the client), so
    restarts may show some, and so may a kill (the supervisor's death sends its front-ends SIGTERM,
    and they may begin that same stop before the kernel kills them); every other fault must show none."""

    def __init__(self, stack: Stack, expected: Expected) -> None:
        self.stack, self.expected = stack, expected
        self.lock = threading.Lock()
        self.counts = {"sent": 0, "ok": 0, "unavailable": 0, "cancelled": 0, "other": 0, "lost": 0}
        self.answers: list[tuple[int, int, np.ndarray]] = []
        self.unavailable_at: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _count(self, key: str, error: str = "") -> None:
        with self.lock:
            self.counts[key] += 1
            if key == "unavailable":
                self.unavailable_at.append(time.monotonic())
            if error and len(self.errors) < 20:
                self.errors.append(error)

    def _client(self, index: int) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.stack.grpc_url)
        rng = np.random.default_rng(index)
        while not self.stop.is_set():
            batch = int(rng.integers(1, 5))
            first = int(rng.integers(0, len(self.expected.images) - batch))
            self._count("sent")
            give_up = time.monotonic() + RETRY_SECONDS
            while True:
                try:
                    version, logits = _grpc_infer(client, self.expected.images, first, batch)
                except InferenceServerException as exc:
                    if exc.status() in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"):
                        self._count("unavailable" if exc.status() == "StatusCode.UNAVAILABLE" else "cancelled")
                        if time.monotonic() < give_up:
                            time.sleep(0.25)
                            continue
                        self._count("lost", f"no answer in {RETRY_SECONDS} s: {exc.message()}")
                        break
                    self._count("other", f"{exc.status()}: {exc.message()}")
                    break
                with self.lock:
                    self.answers.append((version, first, logits))
                self._count("ok")
                break
            time.sleep(PACE_SECONDS)
        client.close()

    def settle(self) -> dict:
        """Checks every answer against its version's expected logits; the counts, wrong ones moved
        from ok to other."""
        wrong = [a for a in self.answers if not self.expected.right(a[0], a[1], a[2])]
        counts = dict(self.counts)
        counts["ok"] -= len(wrong)
        counts["other"] += len(wrong)
        counts["versions"] = sorted({a[0] for a in self.answers})
        return counts


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:  # not listening yet
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _prometheus(stack: Stack, path: str, **params) -> dict:
    import urllib.parse
    import urllib.request

    url = f"http://127.0.0.1:{stack.prometheus_port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())["data"]


def _save_report() -> None:
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT + ".part", "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    os.replace(REPORT + ".part", REPORT)


@pytest.fixture(scope="module")
def docker() -> str:
    docker = _docker_cli()
    if docker is None:
        pytest.skip("no Docker engine answers `docker info` (start dockerd as root; .ci/run does)")
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose not installed (.ci/run installs Debian's)")
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap not installed (.ci/run installs Debian's): the base image is made with it")
    return docker


@pytest.fixture(scope="module")
def base(docker) -> str:
    """Every image built (minutes the first time, seconds once cached); the base's tag."""
    started = time.monotonic()
    built = _run("deploy/local/build-images.sh", timeout=2400)
    report["build_seconds"] = round(time.monotonic() - started, 1)
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def stack(docker, base):
    stack = Stack(docker, base)
    try:
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        _save_report()


@pytest.fixture(scope="module")
def expected(stack, tmp_path_factory):
    return Expected(stack, _held_out_digits(), tmp_path_factory.mktemp("expected"))


def test_the_serving_image_is_small_runs_as_a_user_and_holds_no_torch_or_compiler(docker, base):
    sizes = {}
    for image in ("convserve:cpu", "convserve-train:cpu"):
        sizes[image] = round(int(_run(docker, "image", "inspect", "-f", "{{.Size}}", image).stdout) / 1e6)
    report["image_mb"] = sizes
    assert sizes["convserve:cpu"] < 600, sizes
    user = _run(docker, "image", "inspect", "-f", "{{.Config.User}}", "convserve:cpu").stdout.strip()
    assert user and user not in ("root", "0")
    probe = _run(
        docker, "run", "--rm", "--read-only", "--entrypoint", "sh", "convserve:cpu", "-c",
        "id -u; python -c 'import torch' 2>/dev/null && echo torch; for c in gcc cc g++ clang; do command -v $c; done; "
        "python -m convserve health --url 127.0.0.1:1 --timeout 1; echo health=$?",
        check=False,
    )  # fmt: skip
    lines = probe.stdout.split()
    assert lines[0] != "0" and "torch" not in lines and "health=1" in lines, probe.stdout + probe.stderr
    assert not any("gcc" in line or "clang" in line or line.endswith("/cc") for line in lines), probe.stdout


def test_up_trains_serves_both_replicas_and_prometheus_counts_every_request(stack, expected):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    started = time.monotonic()
    up = stack.compose("up", "-d", "--no-build", "--scale", f"server={REPLICAS}", *SERVICES, timeout=900, check=False)
    assert up.returncode == 0, up.stderr[-3000:] + stack.logs()
    client = grpcclient.InferenceServerClient(stack.grpc_url)

    def answered():
        try:
            return _grpc_infer(client, expected.images, 0, 1)
        except Exception:
            return None

    _wait(answered, 300, "the first answer through the load balancer")
    report["up_to_first_answer_seconds"] = round(time.monotonic() - started, 1)
    (trainer,) = stack.containers("trainer", everything=True)
    assert stack.inspect(trainer, "{{.State.ExitCode}}") == "0"
    servers = stack.containers("server")
    assert len(servers) == REPLICAS
    for server in servers:
        assert stack.inspect(server, "{{.Config.User}}") not in ("", "root", "0")
        assert stack.inspect(server, "{{.HostConfig.ReadonlyRootfs}}") == "true"
        assert stack.inspect(server, "{{.HostConfig.RestartPolicy.Name}}") == "unless-stopped"
        stack.wait_healthy(server, 60)

    wrong = 0
    for i in range(200):
        version, logits = _grpc_infer(client, expected.images, i, 1 + i % 4)
        wrong += not expected.right(version, i, logits)
    http = httpclient.InferenceServerClient(stack.http_url)
    for i in range(50):
        version, logits = _http_infer(http, expected.images, i, 1 + i % 4)
        wrong += not expected.right(version, i, logits)
    assert wrong == 0
    sent = 1 + 200 + 50

    def targets():
        active = _prometheus(stack, "/api/v1/targets")["activeTargets"]
        up_ = [t for t in active if t["labels"]["job"] == "convserve" and t["health"] == "up"]
        return len(up_) == REPLICAS and up_

    _wait(targets, 60, "Prometheus to find both replicas up")

    def counted():
        rows = _prometheus(
            stack, "/api/v1/query", query='sum by (instance) (convserve_requests_total{method="ModelInfer",code="OK"})'
        )["result"]
        per_replica = {row["metric"]["instance"]: float(row["value"][1]) for row in rows}
        return sum(per_replica.values()) >= sent and per_replica

    per_replica = _wait(counted, 60, f"Prometheus to count {sent} requests")
    report["requests_per_replica"] = per_replica
    assert sum(per_replica.values()) == sent and len(per_replica) == REPLICAS
    assert all(count > 0 for count in per_replica.values()), per_replica  # both replicas served some
    client.close()
    http.close()


def _fault(name: str, stack: Stack, expected: Expected, act, after: float = 5.0, stops: bool = False) -> dict:
    with Load(stack, expected) as load:
        _wait(lambda: load.counts["ok"] >= 20, 60, "the clients' first answers")
        started = time.monotonic()
        act()
        time.sleep(after)
    counts = load.settle()
    if load.unavailable_at:
        counts["last_unavailable_after_s"] = round(max(load.unavailable_at) - started, 1)
    counts["errors"] = load.errors[:5]
    report.setdefault("faults", {})[name] = counts
    _save_report()
    assert counts["other"] == 0 and counts["lost"] == 0, (counts, stack.logs())
    if not stops:  # no replica stopped: nothing may be cancelled
        assert counts["cancelled"] == 0, counts
    return counts


def test_a_replica_killed_under_load_fails_only_with_unavailable_and_comes_back(stack, expected):
    """SIGKILL to one replica's process, as a crash: `docker kill` itself counts as a stop by hand,
    for which Docker 20.10 applies no restart policy, so the process is killed from outside."""
    victim = stack.containers("server")[0]
    restarts = int(stack.inspect(victim, "{{.RestartCount}}"))

    def kill():
        os.kill(int(stack.inspect(victim, "{{.State.Pid}}")), 9)

    counts = _fault("replica killed", stack, expected, kill, after=5, stops=True)
    # the load balancer stopped sending to it within seconds
    assert counts.get("last_unavailable_after_s", 0) < 5, counts
    _wait(lambda: int(stack.inspect(victim, "{{.RestartCount}}")) > restarts, 60, "Docker to restart the replica")
    stack.wait_healthy(victim)


def test_a_rolling_restart_loses_nothing_a_retrying_client_would_not_retry(stack, expected):
    """docker-compose 1.29 restarts the replicas at once (its COMPOSE_PARALLEL_LIMIT cannot go below
    2): each drains what it holds and stops; while none is up, the load balancer answers UNAVAILABLE
    and the clients retry until the replicas are back."""

    def restart():
        stack.compose("restart", "server")

    counts = _fault("docker-compose restart server", stack, expected, restart, stops=True)
    assert counts["ok"] > 0
    for server in stack.containers("server"):
        stack.wait_healthy(server)


def test_replicas_restarted_one_at_a_time_keep_answering(stack, expected):
    """The rolling restart compose does not do: `docker restart` one replica, wait until it is
    healthy, then the next. The other replica answers meanwhile."""

    def roll():
        for server in stack.containers("server"):
            _run(stack.docker, "restart", "--time", "30", server)
            stack.wait_healthy(server)

    counts = _fault("one replica at a time (docker restart)", stack, expected, roll, stops=True)
    assert counts["ok"] > 0


def test_a_new_training_run_publishes_version_2_and_no_request_fails(stack, expected):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(stack.grpc_url)

    def served():
        index = client.get_model_repository_index(as_json=True).get("models", [])
        return any(m.get("version") == "2" and m.get("state") == "READY" for m in index)

    def publish():
        stack.compose(
            "run", "--rm", "-T", "--entrypoint", "convserve", "trainer",
            "train", "--repository", "/models", "--output", "/tmp/run", "--no-progress", "--epochs", "2",
            timeout=600,
        )  # fmt: skip
        _wait(served, 60, "RepositoryIndex to show version 2 READY")
        time.sleep(12)  # every replica polls (10 s) and moves its traffic to version 2

    counts = _fault("new version published", stack, expected, publish)
    assert counts["unavailable"] == 0 and 2 in counts["versions"], counts
    client.close()


def test_prometheus_killed_and_restarted_goes_unnoticed_by_the_servers(stack, expected):
    (prometheus,) = stack.containers("prometheus")

    def kill_and_restart():
        _run(stack.docker, "kill", prometheus)
        time.sleep(2)
        _run(stack.docker, "start", prometheus)
        stack.wait_healthy(prometheus, 60)

    counts = _fault("prometheus killed and restarted", stack, expected, kill_and_restart)
    assert counts["unavailable"] == 0, counts
    _wait(lambda: len(_prometheus(stack, "/api/v1/targets")["activeTargets"]) == REPLICAS, 60, "targets again")


def test_down_leaves_no_container_volume_or_network(stack):
    stack.compose("down", "-v", "--remove-orphans", "--timeout", "30")
    left = stack.leftovers()
    assert left == {"containers": [], "volumes": [], "networks": []}, left
