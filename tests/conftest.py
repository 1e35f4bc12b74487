"""Shared pytest wiring: each fixture family lives in its own plugin module under tests/plugins/."""

pytest_plugins = [
    "tests.plugins.demo_store",
    "tests.plugins.servers",  # written by the service work
]
