"""The committed generated code matches protos/, and protos/ matches Triton's wire format.

What matters in the generated modules is the wire: each file's descriptor (messages, fields, numbers,
services) and the methods each gRPC stub registers. The generator's own version lines change with every
grpcio-tools patch release and are not compared; the floors they impose on the runtime are checked
against pyproject.toml instead.
"""

import ast
import importlib
import os
import re
import sys

import pytest
import tomllib
from google.protobuf import descriptor_pb2
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMITTED = os.path.join(ROOT, "convserve", "proto")
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def _modules(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith((".py", ".pyi")) and f != "__init__.py")


def _read(folder, name):
    with open(os.path.join(folder, name)) as handle:
        return handle.read()


def _descriptor(source: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a generated *_pb2.py registers (its serialized bytes literal)."""
    literal = re.search(r"AddSerializedFile\((b'.*?')\)\n", source, flags=re.S)
    assert literal, "no serialized descriptor in a generated module"
    proto = descriptor_pb2.FileDescriptorProto()
    proto.ParseFromString(ast.literal_eval(literal.group(1)))
    return proto


def _stub_methods(source: str) -> list[str]:
    return sorted(set(re.findall(r"'(/[\w.]+/\w+)'", source)))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("protos")
    importlib.import_module("gen_protos").generate(str(out))
    return out


def test_generated_modules_match_the_protos(generated):
    assert _modules(generated) == _modules(COMMITTED)
    for name in _modules(COMMITTED):
        fresh, old = _read(generated, name), _read(COMMITTED, name)
        stale = f"convserve/proto/{name} is stale: run `make protos`"
        if name.endswith("_pb2.py"):
            assert _descriptor(fresh) == _descriptor(old), stale
        elif name.endswith("_grpc.py"):
            assert _stub_methods(fresh) == _stub_methods(old), stale
        else:  # .pyi stubs: the message classes and their fields, one per line
            assert _class_lines(fresh) == _class_lines(old), stale


def _class_lines(source: str) -> list[str]:
    return [line.strip() for line in source.splitlines() if re.match(r"\s*(class |\w+: )", line)]


def _floor(pyproject: dict, package: str) -> Version:
    """The lower bound pyproject.toml's dependencies give a package."""
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line.split("#", 1)[0])
        if requirement.name == package:
            floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
            assert floors, f"{package} has no lower bound in pyproject.toml"
            return max(floors)
    raise AssertionError(f"{package} is not among pyproject.toml's dependencies")


def test_pyprojects_floors_admit_no_runtime_the_generated_code_refuses():
    """The generated modules refuse, at import, a grpcio older than the grpcio-tools that wrote them
    and a protobuf runtime older than their gencode: pyproject's floors must not allow either."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        pyproject = tomllib.load(handle)
    sources = [_read(COMMITTED, name) for name in _modules(COMMITTED)]
    grpc_versions = {Version(v) for text in sources for v in re.findall(r"GRPC_GENERATED_VERSION = '([\d.]+)'", text)}
    gencode = r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),"
    protobuf_versions = {Version(".".join(m)) for text in sources for m in re.findall(gencode, text)}
    assert grpc_versions and protobuf_versions
    for package in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert _floor(pyproject, package) >= max(grpc_versions), f"{package}'s floor is below the generated code's"
    assert _floor(pyproject, "protobuf") >= max(protobuf_versions)
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    tools = next(Requirement(r) for r in dev if r.startswith("grpcio-tools"))
    assert tools.specifier.contains(str(max(grpc_versions))), "`make protos` could not rewrite what is committed"


def _fields(message):
    return {f.name: (f.number, f.type, f.message_type.full_name if f.message_type else None) for f in message.fields}


def _walk(message, prefix=""):
    yield prefix + message.name, message
    for nested in message.nested_types:
        yield from _walk(nested, prefix + message.name + ".")


# What Triton 2.51 sends that the tritonclient pip installs here (2.41) does not know yet; their numbers
# were checked against tritonclient 2.73's descriptors (`InferResponseStatistics` fields 1-6,
# `ModelStatistics.response_stats` = 9, `is_non_linear_format_io` = 9 in ModelInput, 7 in ModelOutput,
# `ModelConfig.runtime` = 25)
NEWER_THAN_TRITONCLIENT_2_41 = {
    "ModelStatistics.response_stats",
    "ModelStatistics.ResponseStatsEntry",
    "InferResponseStatistics",
    "ModelInput.is_non_linear_format_io",
    "ModelOutput.is_non_linear_format_io",
    "ModelConfig.runtime",
}


def test_wire_compatible_with_tritonclient():
    from tritonclient.grpc import model_config_pb2 as triton_mc
    from tritonclient.grpc import service_pb2 as triton_pb

    from convserve.proto import grpc_service_pb2 as ours
    from convserve.proto import model_config_pb2 as ours_mc

    assert ours.DESCRIPTOR.package == triton_pb.DESCRIPTOR.package == "inference"
    our_service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in our_service.methods:
        theirs = their_service.methods_by_name[method.name]
        assert (
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ) == (
            theirs.input_type.full_name,
            theirs.output_type.full_name,
            theirs.client_streaming,
            theirs.server_streaming,
        ), method.name
    checked = 0
    for our_file, their_file in ((ours.DESCRIPTOR, triton_pb.DESCRIPTOR), (ours_mc.DESCRIPTOR, triton_mc.DESCRIPTOR)):
        theirs_by_name = dict(m for top in their_file.message_types_by_name.values() for m in _walk(top))
        for top in our_file.message_types_by_name.values():
            for name, message in _walk(top):
                if name in NEWER_THAN_TRITONCLIENT_2_41:
                    continue
                their_fields = _fields(theirs_by_name[name])
                for field, signature in _fields(message).items():
                    if f"{name}.{field}" in NEWER_THAN_TRITONCLIENT_2_41:
                        continue
                    assert their_fields[field] == signature, f"{name}.{field}"
                    checked += 1
    assert checked > 100
    their_types = {v.name: v.number for v in triton_mc.DESCRIPTOR.enum_types_by_name["DataType"].values}
    our_types = {v.name: v.number for v in ours_mc.DESCRIPTOR.enum_types_by_name["DataType"].values}
    assert our_types == their_types
