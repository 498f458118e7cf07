"""docker-compose.yml and deploy/: what the containers run is what our CLI accepts."""

import os
import shlex
import shutil
import subprocess

import pytest
import yaml

from convserve.cli import build_parser
from convserve.service.settings import Settings, from_sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compose():
    with open(os.path.join(ROOT, "docker-compose.yml")) as handle:
        return yaml.safe_load(handle)


def test_server_command_and_environment_are_real_settings(compose):
    server = compose["services"]["server"]
    args = build_parser().parse_args(server["command"])
    settings = from_sources(args, {k: str(v) for k, v in server["environment"].items()})
    assert settings.repository == "/models" and settings.poll_interval == 10
    assert settings.max_batch_size == int(server["environment"]["CONVSERVE_MAX_BATCH_SIZE"])
    known = {"CONVSERVE_" + name.upper() for name in Settings.__dataclass_fields__}
    assert set(server["environment"]) <= known
    assert {"8001:8001", "8002:8002"} <= set(server["ports"])
    # the container's grace period outlasts the server's own
    assert float(server["stop_grace_period"].rstrip("s")) > settings.grace_period


def test_trainer_command_parses(compose):
    command = compose["services"]["trainer"]["entrypoint"][-1]
    train = shlex.split(command.split("||", 1)[1])
    assert train[0] == "convserve"
    args = build_parser().parse_args(train[1:])
    assert args.repository == "/models"


def test_prometheus_scrapes_the_metrics_port(compose):
    with open(os.path.join(ROOT, "deploy", "prometheus.yml")) as handle:
        config = yaml.safe_load(handle)
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["server:8002"] and Settings().metrics_port == 8002


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian's) not installed")
def test_docker_compose_config_validates():
    result = subprocess.run(["docker-compose", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
