import pytest


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The default training run (digits, alexnet_small), exported: (TrainResult, version folder).

    Trained once per test session and shared: the models tests read its export, the end-to-end
    tests serve it.
    """
    from convserve.models.config import TrainConfig
    from convserve.models.export import export_checkpoint
    from convserve.models.train import train

    root = tmp_path_factory.mktemp("trained")
    result = train(TrainConfig(output=str(root / "run"), progress=False))
    return result, export_checkpoint(result.checkpoint, repository=str(root / "repository"), name="digits")
