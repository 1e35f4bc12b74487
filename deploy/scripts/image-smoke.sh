#!/usr/bin/env bash
# Replays the Dockerfile (RUNTIME=cpu) on a machine without a container engine, then runs the result the
# way the image runs it. Slow (installs torch and the dependencies into a fresh venv); not part of
# `make test`, which checks the Dockerfile with hadolint and builds and imports the wheel.
#
#   deploy/scripts/image-smoke.sh MODEL_STORE [WORKDIR]
#
# Build stage: a fresh venv, torch (CPU), `pip install -c constraints.txt .`, the gRPC stubs, the wheel,
# the wheel installed over the first install, and the Dockerfile's own checks (stubs current, imports
# from the venv, no triton). Runtime stage: the venv made read-only, `onerec serve` as uid 10001 with
# HOME under the work dir, the Dockerfile's HEALTHCHECK command (read from the Dockerfile) until it
# passes, one recommendation, then SIGTERM, which must exit 0 within the drain budget.
set -euo pipefail
STORE=$(realpath "${1:?usage: $0 MODEL_STORE [WORKDIR]}")
WORK=$(realpath -m "${2:-$(mktemp -d)}")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HTTP_PORT=${HTTP_PORT:-18080}
GRPC_PORT=${GRPC_PORT:-18081}
mkdir -p "$WORK"
echo "work dir: $WORK"

# ---- build stage ----------------------------------------------------------------------------------
python3 -m venv "$WORK/venv"
export PATH="$WORK/venv/bin:$PATH" PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0 || pip install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
mkdir -p "$WORK/src"
for part in pyproject.toml constraints.txt README.md proto onerec_proto kernels model_store onerec service loadtest; do
  cp -r "$ROOT/$part" "$WORK/src/"
done
rm -rf "$WORK/src/onerec_proto/_generated"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
cd "$WORK/src"
pip install -q -c constraints.txt .
python -m onerec_proto.generate
pip wheel -q --no-deps --wheel-dir "$WORK/wheels" .
pip install -q --no-deps --force-reinstall "$WORK"/wheels/onerec_serving-*.whl
python -P -m onerec_proto.generate --check
python -P -c "import kernels, onerec, service.server; from onerec_proto import pb2, pb2_grpc"
python -P -c "import importlib.util as u; assert u.find_spec('triton') is None, 'triton in the CPU image'"
echo "build stage: ok"

# ---- runtime stage --------------------------------------------------------------------------------
chmod -R a-w "$WORK/venv"
chmod -R a+rX "$WORK/venv" "$STORE"
mkdir -p "$WORK/home"
AS_USER=()
if [ "$(id -u)" = 0 ]; then
  chown 10001:10001 "$WORK/home"
  AS_USER=(setpriv --reuid 10001 --regid 10001 --clear-groups)
fi
cd "$WORK/home"
env -i PATH="$WORK/venv/bin:/usr/bin:/bin" HOME="$WORK/home" PYTHONDONTWRITEBYTECODE=1 \
  ONEREC_MODEL_STORE="$STORE" ONEREC_HTTP_PORT="$HTTP_PORT" ONEREC_GRPC_PORT="$GRPC_PORT" ONEREC_DRAIN_TIMEOUT_S=15 \
  "${AS_USER[@]}" onerec serve > "$WORK/serve.log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true' EXIT
healthcheck=$(python3 - "$ROOT/Dockerfile" <<'PY'
import json, re, shlex, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
args = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.M).group(1))
print(shlex.join(args))
PY
)
echo "healthcheck: $healthcheck"
for i in $(seq 1 180); do
  if env ONEREC_HTTP_PORT="$HTTP_PORT" PATH="$WORK/venv/bin:$PATH" sh -c "$healthcheck" 2>/dev/null; then
    echo "healthy after ${i}s"; break
  fi
  kill -0 $pid 2>/dev/null || { tail -20 "$WORK/serve.log"; exit 1; }
  sleep 1
done
curl -sf -XPOST "localhost:$HTTP_PORT/v1/recommend" -H 'content-type: application/json' \
     -d '{"user_id": "smoke", "history": ["1", "2"], "num_items": 3}'
echo
start=$(date +%s)
kill -TERM $pid
code=0
wait $pid || code=$?
echo "SIGTERM: exit $code after $(( $(date +%s) - start )) s"
[ "$code" = 0 ]
echo "image smoke: ok"
