"""The committed generated code matches protos/, and protos/ matches Triton's wire format."""

import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def test_generated_modules_match_the_protos(tmp_path):
    gen_protos = importlib.import_module("gen_protos")
    gen_protos.generate(str(tmp_path))
    committed = os.path.join(ROOT, "service", "proto")
    generated = sorted(f for f in os.listdir(tmp_path) if f.endswith((".py", ".pyi")))
    assert generated == sorted(f for f in os.listdir(committed) if f.endswith((".py", ".pyi")))
    for name in generated:
        with open(tmp_path / name) as fresh, open(os.path.join(committed, name)) as old:
            assert fresh.read() == old.read(), f"service/proto/{name} is stale: run `make protos`"


def _fields(message):
    return {f.name: (f.number, f.type, f.message_type.full_name if f.message_type else None) for f in message.fields}


def _walk(message, prefix=""):
    yield prefix + message.name, message
    for nested in message.nested_types:
        yield from _walk(nested, prefix + message.name + ".")


def test_wire_compatible_with_tritonclient():
    from tritonclient.grpc import model_config_pb2 as triton_mc
    from tritonclient.grpc import service_pb2 as triton_pb

    from convserve.service.proto import grpc_service_pb2 as ours
    from convserve.service.proto import model_config_pb2 as ours_mc

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
                their_fields = _fields(theirs_by_name[name])
                for field, signature in _fields(message).items():
                    assert their_fields[field] == signature, f"{name}.{field}"
                    checked += 1
    assert checked > 100
    their_types = {v.name: v.number for v in triton_mc.DESCRIPTOR.enum_types_by_name["DataType"].values}
    our_types = {v.name: v.number for v in ours_mc.DESCRIPTOR.enum_types_by_name["DataType"].values}
    assert our_types == their_types
