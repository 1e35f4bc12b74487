"""Generate the Python gRPC stubs of proto/onerec/v1/recommender.proto into onerec_proto/_generated/.

Why generated and not checked in: the stubs depend on the installed grpcio-tools/protobuf pair, so
they are made at install time (`make proto` runs `python -m onerec_proto.generate`) and again on
first use whenever they are missing or stale (a stamp file holds the sha256 of the .proto and the
tool versions), so a fresh clone works without a build step. onerec_proto/_generated/ is gitignored.

protoc writes `from onerec.v1 import recommender_pb2` into the _grpc module, which would resolve to
this project's `onerec` package; the import is rewritten to a relative one, and the files are
written flat into onerec_proto/_generated/. The descriptor keeps its proto path
(onerec/v1/recommender.proto), which is what reflection clients see.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = PROTO_ROOT / "onerec" / "v1" / "recommender.proto"
OUT_DIR = Path(__file__).resolve().parent / "_generated"
STAMP_FILE = OUT_DIR / "STAMP"
GENERATED = ("recommender_pb2.py", "recommender_pb2.pyi", "recommender_pb2_grpc.py")


def _tool_versions() -> str:
    """Versions that change the generated code: a change of either regenerates."""
    parts = []
    for dist in ("grpcio-tools", "protobuf"):
        try:
            parts.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist}=missing")
    return ";".join(parts)


def expected_stamp() -> str:
    """Stamp that up-to-date stubs carry: sha256 of the .proto plus the tool versions."""
    digest = hashlib.sha256(PROTO_FILE.read_bytes()).hexdigest()
    return f"{digest} {_tool_versions()}\n"


def stubs_current() -> bool:
    """True when every generated file exists and the stamp matches the .proto and tools."""
    if not all((OUT_DIR / name).is_file() for name in GENERATED):
        return False
    if not PROTO_FILE.is_file():
        return True  # installed without the proto/ sources: the generated stubs are all there is
    try:
        return STAMP_FILE.read_text() == expected_stamp()
    except OSError:
        return False


def generate() -> Path:
    """Run protoc (from grpc_tools) and install the stubs atomically; returns the output dir."""
    from grpc_tools import protoc  # imported here: only needed when regenerating

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=OUT_DIR, prefix=".gen-") as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_FILE.relative_to(PROTO_ROOT)),
        ]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code} on {PROTO_FILE}")
        produced = Path(tmp) / "onerec" / "v1"
        grpc_module = produced / "recommender_pb2_grpc.py"
        grpc_module.write_text(
            grpc_module.read_text().replace("from onerec.v1 import recommender_pb2", "from . import recommender_pb2")
        )
        init = OUT_DIR / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC stubs (see onerec_proto/generate.py). Do not edit."""\n')
        for name in GENERATED:
            # rename is atomic: a concurrent importer sees the old or the new file, never half.
            os.replace(produced / name, OUT_DIR / name)
    stamp_tmp = OUT_DIR / f".STAMP.{os.getpid()}"
    stamp_tmp.write_text(expected_stamp())
    os.replace(stamp_tmp, STAMP_FILE)
    return OUT_DIR


def ensure_stubs() -> None:
    """Regenerate the stubs if missing or stale; cheap (one hash) when they are current."""
    if not stubs_current():
        generate()


def main() -> int:
    """`python -m onerec_proto.generate [--check]`: generate, or only report staleness (exit 1)."""
    if "--check" in sys.argv[1:]:
        current = stubs_current()
        print("stubs current" if current else "stubs missing or stale")
        return 0 if current else 1
    out = generate()
    print(f"generated {', '.join(GENERATED)} in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
