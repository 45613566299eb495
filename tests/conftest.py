"""Shared test setup: GPU tests skip themselves without CUDA."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Test shapes are tiny: intra-op threads only add wake-up latency on a 2-core runner.
torch.set_num_threads(1)

from helpers import DEBUG  # noqa: E402


@pytest.fixture(scope="session")
def debug_dense(tmp_path_factory):
    """A debug dense model trained for 30 steps (shared by tests that need a trained checkpoint)."""
    from moe.cli import main

    out = tmp_path_factory.mktemp("runs") / "dense"
    rc = main(["train", str(DEBUG / "dense.yaml"), f"out_dir={out}",
               "trainer.enable_progress_bar=false"])
    assert rc == 0
    return out
