"""A real convserve server on free ports, serving the session's trained model: in a subprocess
(`RunningServer`: `convserve serve` itself, supervisor and all), or in this process
(`InProcessServer`: the same engine and front-end, on threads) for tests that need no process
boundary: no signals, no restarts, no supervisor's /metrics, no second front-end."""

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest

from convserve.ports import free_port, free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
__all__ = ["ROOT", "InProcessServer", "RunningServer", "free_port"]  # the tests import free_port from here too


class RunningServer:
    def __init__(self, repository, *extra, env=None, wait=True, tls=None):
        self.tls = tls  # a convserve.client.Tls for waiting on a TLS server
        self.repository = str(repository)
        self.port, self.metrics_port, self.http_port = free_ports(3)
        self.url = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(os.path.dirname(self.repository), f"server-{self.port}.log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "convserve",
                "serve",
                "--repository",
                self.repository,
                "--host",
                "127.0.0.1",
                "--grpc-port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                "--http-port",
                str(self.http_port),
                *extra,
            ],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop(signal.SIGKILL)  # a server that never got ready must not outlive the test
                raise

    def wait_ready(self, timeout=60):
        from convserve.client import wait_until_ready

        try:
            wait_until_ready(self.url, self.process, timeout, tls=self.tls)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.output()}") from None

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as handle:
            return handle.read()[-4000:]

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


class InProcessServer:
    """`RunningServer`'s interface over service/loopback.py: the flags are `convserve serve`'s (with
    CONVSERVE_* variables from `env` only), the log is what the server's loggers said. It starts in
    well under a second; `stop` drains as SIGTERM would and returns 0."""

    def __init__(self, repository, *extra, env=None, wait=True, tls=None):
        from convserve.cli.base import add_flags
        from convserve.service.loopback import Loopback
        from convserve.service.settings import Settings, from_sources

        self.tls = tls
        self.repository = str(repository)
        self.port, self.http_port = free_ports(2)
        self.url = f"127.0.0.1:{self.port}"
        parser = argparse.ArgumentParser()
        add_flags(parser, Settings)
        flags = ["--repository", self.repository, "--host", "127.0.0.1", "--http-port", str(self.http_port), *extra]
        settings = from_sources(parser.parse_args(flags), environ=env or {})
        self._lines: list[str] = []
        self._handler = _Lines(self._lines)
        logger = logging.getLogger("convserve")
        self._level = logger.level
        logger.setLevel(logging.getLevelName(settings.log_level.upper()))  # as `convserve serve` sets it
        logger.addHandler(self._handler)
        self.loopback = Loopback(settings, self.port)
        try:
            self.loopback.start()
            if wait:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout=60):
        from convserve.client import wait_until_ready

        wait_until_ready(self.url, None, timeout, tls=self.tls)

    def output(self) -> str:
        return "\n".join(self._lines)[-4000:]

    def stop(self) -> int:
        try:
            self.loopback.stop()
        finally:
            logger = logging.getLogger("convserve")
            logger.removeHandler(self._handler)
            logger.setLevel(self._level)
        return 0


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="session")
def served_repository(trained, tmp_path_factory):
    """A copy of the trained repository, so tests may add versions without touching other fixtures."""
    _, folder = trained
    root = tmp_path_factory.mktemp("served")
    repository = root / "repository"
    shutil.copytree(os.path.dirname(os.path.dirname(folder)), repository)
    return repository


@pytest.fixture(scope="session")
def server(served_repository):
    running = RunningServer(served_repository, "--poll-interval", "0.5")
    yield running
    assert running.stop() == 0, running.output()


@pytest.fixture
def own_repository(trained, tmp_path):
    """A fresh copy of the trained repository for one test, which may add, break or remove versions."""
    _, folder = trained
    repository = tmp_path / "repository"
    shutil.copytree(os.path.dirname(os.path.dirname(folder)), repository)
    return repository


def repository_index(client) -> dict:
    """(name, version) -> (state, reason), from RepositoryIndex."""
    from convserve.proto import grpc_service_pb2 as pb

    return {
        (m.name, m.version): (m.state, m.reason)
        for m in client.stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
    }
