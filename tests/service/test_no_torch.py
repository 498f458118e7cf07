"""The serving half imports in a process where torch cannot be imported."""

import os
import pkgutil
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
import service
names = [m.name for m in pkgutil.walk_packages(service.__path__, "service.") if not m.name.endswith("__main__")]
for name in names:
    __import__(name)
assert "torch" not in sys.modules
print(len(names))
"""


def test_every_service_module_imports_without_torch():
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert result.returncode == 0, result.stderr
    import service
    expected = [m for m in pkgutil.walk_packages(service.__path__, "service.") if not m.name.endswith("__main__")]
    assert int(result.stdout.strip()) == len(expected) > 0


def test_the_cli_runs_arithmetic_on_onnx_without_torch(tmp_path):
    # `convserve --help` (the serving container's entry point) must work with torch blocked too
    code = BLOCK_TORCH.split("import service")[0] + "from service.cli import main\nimport sys\nsys.exit(main(['--help']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "arithmetic" in result.stdout
