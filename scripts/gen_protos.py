"""Generate convserve/proto/*_pb2*.py (and .pyi stubs) from protos/ (`make protos`; committed, checked by a test).

protoc writes absolute imports (`from inference import model_config_pb2`); they are rewritten to
package-relative ones so the modules live inside `convserve.proto`. The messages are registered in a
descriptor pool of their own (`convserve.proto.POOL`), not protobuf's default pool: tritonclient
registers the same `inference.*` names there, and one process may hold both (our tests do).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOS = [
    "inference/model_config.proto",
    "inference/grpc_service.proto",
    "convserve/v1/introspection.proto",
    "convserve/v1/onnx_files.proto",
]


def generate(out_dir: str) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(
            [
                "protoc",
                f"-I{os.path.join(ROOT, 'protos')}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",  # type stubs, so mypy sees the messages
                f"--grpc_python_out={tmp}",
                *PROTOS,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with {code}")
        os.makedirs(out_dir, exist_ok=True)
        for folder, _, files in os.walk(tmp):
            for name in files:
                if not name.endswith((".py", ".pyi")):
                    continue
                with open(os.path.join(folder, name)) as handle:
                    text = handle.read()
                text = re.sub(r"^from (inference|convserve\.v1) import (\w+)", r"from . import \2", text, flags=re.M)
                if "_descriptor_pool.Default()" in text:
                    text = text.replace("_descriptor_pool.Default()", "_POOL")
                    text = text.replace(
                        "from google.protobuf.internal import builder as _builder\n",
                        "from google.protobuf.internal import builder as _builder\nfrom . import POOL as _POOL\n",
                        1,
                    )
                with open(os.path.join(out_dir, name), "w") as handle:
                    handle.write(text)
        with open(os.path.join(out_dir, "__init__.py"), "w") as handle:
            handle.write(INIT)


INIT = '''"""Generated from protos/ by scripts/gen_protos.py (`make protos`); do not edit."""

from google.protobuf import descriptor_pool

# Our own pool: tritonclient puts the same inference.* names into the default one.
POOL = descriptor_pool.DescriptorPool()
'''


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "convserve", "proto"))
