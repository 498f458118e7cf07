"""The house's shape: one import name, no import cycles, halves that meet only at the contract,
and a serving image that runs without the training half."""

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the package's folders in the repository, and the import names they carry (pyproject.toml maps them)
FOLDERS = {"convserve": "convserve", "models": "convserve.models", "service": "convserve.service"}


def _modules() -> dict[str, str]:
    """Import name -> file, for every module of the package (generated protobuf code left out)."""
    found = {}
    for folder, prefix in FOLDERS.items():
        for directory, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py") or "_pb2" in name:
                    continue
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, os.path.join(ROOT, folder))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                module = ".".join([prefix, *parts])
                if module.startswith("convserve.models") and folder == "convserve":
                    continue
                found[module] = path
    return found


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at any depth (imports inside functions count)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        with open(path) as handle:
            tree = ast.parse(handle.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                # a package's __init__ is not an edge for its own submodules
                if name and name != module and not module.startswith(name + "."):
                    edges[module].add(name)
    return edges


def test_no_import_cycles():
    edges = _imports(_modules())
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module, path):
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_halves_meet_only_at_the_contract():
    edges = _imports(_modules())

    def reaches(module, prefix):
        return sorted(t for t in edges[module] if t == prefix or t.startswith(prefix + "."))

    for module in edges:
        if module.startswith("convserve.service"):
            assert not reaches(module, "convserve.models") and not reaches(module, "convserve.cli"), module
        if module.startswith("convserve.models"):
            assert not reaches(module, "convserve.service") and not reaches(module, "convserve.cli"), module
    for leaf in (
        "convserve.contract",
        "convserve.wire",
        "convserve.ports",
        "convserve.cpus",
        "convserve.cli.base",
        "convserve",
    ):
        assert not edges[leaf], f"{leaf} imports {edges[leaf]}"
    # both halves do use the contract
    assert reaches("convserve.service.engine.registry", "convserve.contract")
    assert reaches("convserve.models.export", "convserve.contract")


def _reached(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in edges[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_client_and_the_benchmark_never_import_the_server():
    """The Python client and the benchmark speak the wire (convserve.wire, convserve.proto) and the
    contract; the benchmark opens its in-process session with convserve.sessions, as the engine does.
    Nothing of convserve.service, at any depth."""
    edges = _imports(_modules())
    for start in ("convserve.client", "convserve.bench"):
        served = sorted(m for m in _reached(edges, start) if m.startswith("convserve.service"))
        assert not served, (start, served)
    assert "convserve.sessions" in edges["convserve.bench"]
    assert "convserve.sessions" in _reached(edges, "convserve.service.engine.runtime")


def _library_imports(path: str) -> set[str]:
    """The top-level names of what a file imports from outside the package (grpc, aiohttp, google ...)."""
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return {n.split(".")[0] if not n.startswith("convserve.proto") else "convserve.proto" for n in names}


def test_each_door_calls_the_core_and_neither_knows_the_other():
    """frontend/grpc and frontend/http are adapters over frontend/core: the HTTP door never imports the
    gRPC door, gRPC's library or its generated messages; the gRPC door never imports the HTTP door or
    aiohttp; the front-end's own modules (the core, the data plane, the request types ...) import
    neither door nor either library: only server.py, which starts both, and tls.py, which configures
    both, know them."""
    modules = _modules()
    edges = _imports(modules)
    frontend = "convserve.service.frontend"
    grpc_door, http_door = frontend + ".grpc", frontend + ".http"

    def inside(module, package):
        return module == package or module.startswith(package + ".")

    doors = {grpc_door: ({"grpc", "grpc_health", "grpc_reflection", "google", "convserve.proto"}, http_door)}
    doors[http_door] = ({"aiohttp"}, grpc_door)
    for module in edges:
        if inside(module, http_door):
            assert not any(inside(t, grpc_door) for t in edges[module]), module
            assert not _library_imports(modules[module]) & doors[grpc_door][0], module
        if inside(module, grpc_door):
            assert not any(inside(t, http_door) for t in edges[module]), module
            assert not _library_imports(modules[module]) & doors[http_door][0], module
        if inside(module, frontend) and not inside(module, grpc_door) and not inside(module, http_door):
            if module in (frontend + ".server", frontend + ".tls"):
                continue
            assert not any(inside(t, grpc_door) or inside(t, http_door) for t in edges[module]), module
            libraries = doors[grpc_door][0] | doors[http_door][0]
            assert not _library_imports(modules[module]) & libraries, (module, _library_imports(modules[module]))
    # and both doors do go through the core
    assert frontend + ".core" in edges[grpc_door + ".servicer"]
    assert frontend + ".core" in edges[http_door + ".door"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("convserve-*.whl")
    with zipfile.ZipFile(path) as archive:
        return archive.namelist()


def test_the_wheel_has_one_top_level_name(wheel):
    tops = {name.split("/")[0] for name in wheel if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"convserve"}
    for module, path in _modules().items():  # every module is in it, where its import name says
        expected = module.replace(".", "/") + ("/__init__.py" if path.endswith("__init__.py") else ".py")
        assert expected in wheel, expected
    assert "convserve/proto/grpc_service_pb2.py" in wheel


def _dockerfile_copies(dockerfile: str) -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, "deploy", dockerfile)) as handle:
        lines = re.findall(r"^COPY ((?:\S+ )+)(\S+)$", handle.read(), re.M)
    return [(src, dst) for sources, dst in lines for src in sources.split()]


def test_the_serving_image_runs_without_the_training_half(tmp_path):
    """Lay out the files as deploy/Dockerfile copies them, then run the CLI from there alone."""
    copies = _dockerfile_copies("Dockerfile")
    assert not any(src.startswith("models") for src, _ in copies), copies
    app = tmp_path / "app"
    for src, dst in copies:
        target = app / dst / os.path.basename(src) if dst.endswith("/") else app / dst
        if os.path.isdir(os.path.join(ROOT, src)):
            shutil.copytree(os.path.join(ROOT, src), target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(ROOT, src), target)
    # The dev install's import hook (the editable finder) would find models/ anyway: drop it.
    run = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                    and "editable" not in getattr(f, "__name__", "")]
sys.path.insert(0, sys.argv.pop(1))
try:
    import convserve.models
    sys.exit("the training half is importable")
except ImportError:
    pass
sys.argv[0] = "convserve"
runpy.run_module("convserve", run_name="__main__")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def convserve(*args):
        return subprocess.run(
            [sys.executable, "-c", run, str(app), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=120,
        )

    result = convserve("serve", "--help")
    assert result.returncode == 0 and "--max-batch-size" in result.stdout, result.stderr
    trained = convserve("train")
    assert trained.returncode == 2 and "needs the training half" in trained.stderr, trained.stderr
    missing = convserve("serve", "--repository", str(tmp_path / "app" / "pyproject.toml"))
    assert missing.returncode == 2 and "is a file" in missing.stderr


def test_python_dash_m_convserve_is_the_convserve_command():
    result = subprocess.run([sys.executable, "-m", "convserve", "--help"], capture_output=True, text=True, timeout=60)
    script = os.path.join(os.path.dirname(sys.executable), "convserve")
    assert result.returncode == 0 and "arithmetic" in result.stdout
    assert subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60).stdout == result.stdout


def test_the_folders_show_the_processes():
    """A front-end never reaches onnxruntime or the engine; the engine never reaches a front-end (nor
    gRPC's servicers); what both share is the messages-and-arenas module and the plain common ones."""
    modules = _modules()
    edges = _imports(modules)

    def imports_text(module):
        with open(modules[module]) as handle:
            return handle.read()

    for module in edges:
        if module.startswith("convserve.service.frontend"):
            assert not any(t.startswith("convserve.service.engine") for t in edges[module]), module
            assert not re.search(r"^\s*(import|from) onnxruntime", imports_text(module), re.M), module
        if module.startswith("convserve.service.engine"):
            assert not any(t.startswith("convserve.service.frontend") for t in edges[module]), module
            assert "grpc_service_pb2_grpc" not in imports_text(module) and "grpc.aio" not in imports_text(module)
    # the one shared module of messages and arenas
    assert "convserve.service.ipc" in edges["convserve.service.engine.core"]
    assert "convserve.service.ipc" in edges["convserve.service.frontend.engine_link"]


def test_every_message_kind_is_handled_on_its_receiving_side():
    """ipc.py lists the messages (TO_ENGINE, TO_FRONTEND); the engine's connection to a front-end and
    the front-end's link to the engine each take every kind sent to them, with a handler whose
    parameters are the message's fields, and nothing else."""
    import inspect

    from convserve.service import ipc
    from convserve.service.engine.core import FrontendConnection
    from convserve.service.frontend.engine_link import EngineLink

    engine_side = FrontendConnection(None, None, None, {}).handlers
    frontend_side = EngineLink("", None, 0, lambda table: None, lambda up: None).handlers
    for handlers, listed in ((engine_side, ipc.TO_ENGINE), (frontend_side, ipc.TO_FRONTEND)):
        assert set(handlers) == set(listed)
        for kind, handler in handlers.items():
            parameters = list(inspect.signature(handler).parameters)
            assert parameters == list(listed[kind]._fields), (kind, parameters)
    assert set(ipc.TO_ENGINE).isdisjoint(ipc.TO_FRONTEND)
    assert set(ipc.KIND_OF) == {*ipc.TO_ENGINE.values(), *ipc.TO_FRONTEND.values()}


def test_a_message_travels_as_a_plain_tuple_and_arrives_at_its_handler():
    import pickle

    from convserve.service import ipc

    message = ipc.Done(rid=7, queue_ns=10, compute_ns=20, batch_size=3)
    wire = pickle.loads(pickle.dumps(ipc.on_wire(message)))
    assert type(wire) is tuple and type(wire[0]) is int  # no class travels, not even the enum's
    got = []
    assert ipc.dispatch({ipc.Kind.DONE: lambda *fields: got.append(ipc.Done(*fields))}, wire)
    assert got == [message]
    assert not ipc.dispatch({}, wire)  # a kind this side does not take: logged, not raised


def test_the_readmes_layout_names_every_module():
    """README's Layout is one line per module: a module added or moved without it fails here."""
    import fnmatch

    with open(os.path.join(ROOT, "README.md")) as handle:
        text = handle.read()
    layout = text[text.index("## Layout") : text.index("\n## ", text.index("## Layout") + 1)]
    listed = set(re.findall(r"[\w*]+\.py", layout))
    missing = [
        os.path.relpath(path, ROOT)
        for module, path in _modules().items()
        if not path.endswith("__init__.py") and not any(fnmatch.fnmatch(os.path.basename(path), t) for t in listed)
    ]
    assert not missing, missing
    for folder in ("frontend/grpc/", "frontend/http/", "engine/", "cli/", "zoo/"):
        assert folder.rsplit("/", 2)[-2] + "/" in layout, folder
