"""Shared pytest wiring: each fixture family lives in its own plugin module under tests/plugins/."""

import pytest

pytest_plugins = [
    "tests.plugins.demo_store",
    "tests.plugins.servers",  # written by the service work
]


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread for every test: the models here are tiny, and on a loaded host two threads wait
    on each other (a 2 s training test took over 300 s beside two busy builds)."""
    import torch

    torch.set_num_threads(1)
