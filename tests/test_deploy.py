"""docker-compose.yml and deploy/: what the containers run is what our CLI accepts."""

import ast
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import tomllib
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
    # replicas publish nothing themselves (--scale): the load balancer takes the gRPC port
    assert "ports" not in server and {"8000", "8001", "8002"} <= set(server["expose"])
    publish = "${CONVSERVE_PUBLISH_ADDRESS:-0.0.0.0}:"
    lb_ports = [publish + "${CONVSERVE_HTTP_PORT:-8000}:8000", publish + "${CONVSERVE_GRPC_PORT:-8001}:8001"]
    assert compose["services"]["lb"]["ports"] == lb_ports
    assert "models:/models:ro" in server["volumes"]  # the server only reads the repository
    assert server["read_only"] is True and server["tmpfs"] == ["/tmp"] and server["restart"] == "unless-stopped"
    assert build_parser().parse_args(server["healthcheck"]["test"][4:]).command == "health"
    # the container's grace period outlasts the server's own
    assert float(server["stop_grace_period"].rstrip("s")) > settings.grace_period


def test_trainer_command_parses(compose):
    command = compose["services"]["trainer"]["entrypoint"][-1]
    command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", command)  # compose's defaults, as `config` fills them in
    train = shlex.split(command.split("||", 1)[1])
    assert train[0] == "convserve"
    args = build_parser().parse_args(train[1:])
    assert args.repository == "/models" and args.epochs == 15


def test_prometheus_finds_every_replica_and_loads_the_alerts():
    with open(os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")) as handle:
        config = yaml.safe_load(handle)
    (job,) = config["scrape_configs"]
    assert job["dns_sd_configs"] == [{"names": ["server"], "type": "A", "port": 8002, "refresh_interval": "15s"}]
    assert Settings().metrics_port == 8002 and config["rule_files"] == ["alerts.yml"]


def test_the_gpu_variant_reserves_a_gpu_on_the_cuda_image():
    with open(os.path.join(ROOT, "docker-compose.gpu.yml")) as handle:
        server = yaml.safe_load(handle)["services"]["server"]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert server["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    with open(os.path.join(ROOT, "deploy", "Dockerfile.gpu")) as handle:
        assert re.search(r"^ARG BASE=nvidia/cuda:13\.\S*cudnn-runtime", handle.read(), re.M)
    assert server["build"]["args"]["BASE"].startswith("${CONVSERVE_GPU_BASE:-nvidia/cuda:13.")


def _dockerfile(name: str) -> str:
    with open(os.path.join(ROOT, "deploy", name)) as handle:
        return handle.read()


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu", "Dockerfile.train"])
def test_images_run_as_a_user_that_is_not_root(name):
    lines = [line.split() for line in _dockerfile(name).splitlines() if line and not line.startswith("#")]
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_run = max(i for i, words in enumerate(lines) if words[0] == "RUN")
    assert any(words[0] == "USER" for words in lines[last_run:])


def test_the_training_image_pins_the_torch_the_tests_use():
    with open(os.path.join(ROOT, ".ci", "run")) as handle:
        tested = re.search(r"torch==([\d.]+)", handle.read()).group(1)
    assert f"ARG TORCH_VERSION={tested}" in _dockerfile("Dockerfile.train")


def _image_requirements(extras: list[str]) -> list[str]:
    """What deploy/requirements.py lists for an image (onnxruntime for the CPU)."""
    spec = importlib.util.spec_from_file_location("requirements", os.path.join(ROOT, "deploy", "requirements.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return module.requirements(tomllib.load(handle), extras, "onnxruntime")


def _pins(path: str) -> dict:
    """{canonical name: version} of a lock's `name==version[ ; marker]` lines."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    with open(os.path.join(ROOT, path)) as handle:
        for line in handle:
            if line.strip() and not line.lstrip().startswith("#"):
                requirement = Requirement(line.strip())
                (specifier,) = requirement.specifier
                assert specifier.operator == "==", line
                pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def test_the_lock_pins_every_requirement_of_the_images_within_pyprojects_ranges():
    """deploy/requirements.lock (pip -c in every image) pins each package the images install,
    at a version pyproject.toml admits, so no build meets a conflict or an unpinned package."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _pins("deploy/requirements.lock")
    assert "torch" not in pins  # the Dockerfiles pin torch, by its own index
    for line in _image_requirements(["train"]):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in deploy/requirements.lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {line!r}"


def test_the_images_lock_agrees_with_the_development_lock():
    """What the images install is what `make test` ran: every package both locks name at one version
    (the CPU image's onnxruntime at the version of the dev lock's onnxruntime-gpu)."""
    dev = _pins("requirements.lock")
    dev.setdefault("onnxruntime", dev.get("onnxruntime-gpu"))
    images = _pins("deploy/requirements.lock")
    assert "torch" not in dev  # the Makefile installs torch first, from a build that suits the machine
    disagree = {name: (version, dev.get(name)) for name, version in images.items() if dev.get(name) != version}
    assert not disagree, f"(image, dev) versions differ: {disagree}; run `make lock`"


def test_the_development_lock_pins_pyprojects_every_requirement():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    dev = _pins("requirements.lock")
    extras = project["optional-dependencies"]
    listed = project["dependencies"] + extras["train"] + extras["dev"]
    for line in listed:
        requirement = Requirement(line.split("#", 1)[0])
        name = canonicalize_name(requirement.name)
        if name == "torch" or (requirement.marker and not requirement.marker.evaluate()):
            continue
        assert name in dev, f"{name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(dev[name]), f"{name}=={dev[name]} is outside {line!r}: run `make lock`"


def _third_party_imports(folders) -> set:
    names = set()
    for folder in folders:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if "proto" in dirpath.split(os.sep):
                continue
            for file in files:
                if file.endswith(".py"):
                    with open(os.path.join(dirpath, file)) as handle:
                        tree = ast.parse(handle.read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            names.update(alias.name.split(".")[0] for alias in node.names)
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "convserve"}


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_the_serving_image_installs_every_package_the_serving_half_imports(name):
    """The images install pyproject's dependencies (nothing by hand that a fresh build would miss);
    every third-party module the serving half and the CLI import comes from one of them."""
    text = _dockerfile(name)
    assert "python3 requirements.py --onnxruntime" in text
    assert "pip install --no-cache-dir --disable-pip-version-check -r requirements.txt -c requirements.lock" in text
    listed = _image_requirements([])
    installed = {re.split(r"[<>=;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in listed if d}
    installed |= {"onnxruntime-gpu"}  # one package, either build
    providers = importlib.metadata.packages_distributions()
    # the CLI's training commands import the training half only when they run (tested elsewhere)
    lazily_training = {"torch", "onnx", "sklearn", "tqdm", "matplotlib", "onnxscript"}
    imported = _third_party_imports(["service", "convserve"]) - lazily_training
    missing = {}
    for module in sorted(imported):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not dists & installed:
            missing[module] = sorted(dists)
    assert not missing, f"imported by the serving half, not installed by the image: {missing}"


def _yaml_documents(*parts):
    with open(os.path.join(ROOT, *parts)) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def test_kubernetes_manifests_validate():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _yaml_documents("deploy", "kubernetes", "convserve.yaml")
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    deployment = docs[0]["spec"]["template"]
    (container,) = deployment["spec"]["containers"]
    build_parser().parse_args(container["args"])  # a real `convserve serve` command line
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert container["livenessProbe"]["grpc"]["port"] == 8001
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert deployment["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert container["volumeMounts"][0]["readOnly"] is True
    assert docs[2]["spec"]["scaleTargetRef"]["name"] == docs[0]["metadata"]["name"]


def test_kserve_serving_runtime_runs_convserve_for_onnx():
    runtime, service = _yaml_documents("deploy", "kubernetes", "kserve-servingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    assert {"name": "onnx", "version": "1", "autoSelect": False, "priority": 1} in runtime["spec"][
        "supportedModelFormats"
    ]
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.repository == "/mnt/models" and args.grpc_port == container["ports"][0]["containerPort"]
    assert service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] == "onnx"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (.ci/run installs it from Debian)")
    return path


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_docker_compose_config_validates(files):
    command = [_tool("docker-compose"), *[arg for f in files for arg in ("-f", f)], "config", "-q"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args",
    [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]],
)
def test_promtool(args):
    result = subprocess.run(
        [_tool("promtool"), *args], cwd=os.path.join(ROOT, "deploy", "prometheus"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_nginx_accepts_the_load_balancer_configuration(tmp_path):
    """Syntax, as nginx itself reads it (the e2e test runs it in front of real servers)."""
    config = tmp_path / "nginx.conf"
    config.write_text(render_nginx(["127.0.0.1:1", "127.0.0.1:2"], 0))
    result = subprocess.run(
        [_tool("nginx"), "-t", "-p", str(tmp_path), "-c", str(config), "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def render_nginx(upstreams, port: int, http_upstreams=None, http_port: int = 0) -> str:
    """deploy/nginx/nginx.conf for loopback: the compose service name replaced by real addresses
    (gRPC's, and HTTP's: the gRPC ones again when none are given, for a syntax check), each with the
    file's own server parameters."""
    with open(os.path.join(ROOT, "deploy", "nginx", "nginx.conf")) as handle:
        text = handle.read()
    for line in ("listen 8001 http2;", "listen 8000;"):
        assert line in text, line

    def servers(port_: str, addresses) -> str:
        (params,) = re.findall(rf"^        server server:{port_}([^;]*);\n", text, re.M)
        text_ = "".join(f"        server {a}{params};\n" for a in addresses)
        return re.sub(rf"^        server server:{port_}[^;]*;\n", lambda _: text_, text, flags=re.M)

    text = servers("8001", upstreams)
    text = servers("8000", http_upstreams or upstreams)
    text = text.replace("listen 8000;", f"listen 127.0.0.1:{http_port or 18000};")
    return text.replace("listen 8001 http2;", f"listen 127.0.0.1:{port or 18001} http2;")
