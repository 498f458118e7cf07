import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The default training run (digits, alexnet_small), exported: (TrainResult, version folder).

    Trained once per test session and shared: the models tests read its export, the end-to-end
    tests serve it.
    """
    from models.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    result = train(TrainConfig(output=str(root / "run"), repository=str(root / "repository"), progress=False))
    return result, result.export_dir
