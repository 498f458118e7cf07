"""The serving half, the contract and the command line import in a process where torch cannot."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BLOCK_TORCH = """
import importlib.abc, pkgutil, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")

sys.meta_path.insert(0, NoTorch())
"""

IMPORT_SERVING_HALF = (
    BLOCK_TORCH
    + """
import convserve.service
names = ["convserve.contract", "convserve.cpus", "convserve.cli"] + [
    m.name for m in pkgutil.walk_packages(convserve.service.__path__, "convserve.service.")]
for name in names:
    __import__(name)
assert "torch" not in sys.modules, "torch was imported"
assert not any(m.startswith("convserve.models") for m in sys.modules), "the training half was imported"
print(len(names))
"""
)


def test_every_serving_module_imports_without_torch_or_the_training_half():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_SERVING_HALF], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 15


def test_the_cli_help_runs_without_torch():
    # `convserve --help` (the serving container's entry point) must work with torch blocked too
    code = BLOCK_TORCH + "from convserve.cli import main\nsys.exit(main(['--help']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "arithmetic" in result.stdout
