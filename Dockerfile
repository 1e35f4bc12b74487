# OneRec serving image: the `onerec` command line (serve, build, features load, replay).
#
#   docker build -t onerec-serving:0.1.0-cpu .                                  # CPU: torch CPU build, no triton
#   docker build --build-arg RUNTIME=cuda -t onerec-serving:0.1.0-cuda .        # CUDA: torch CUDA build + triton
#   docker run -p 8000:8000 -p 50051:50051 -v "$PWD/model-store:/models:ro" onerec-serving:0.1.0-cpu
#
# Two stages. `build` makes a virtual environment in /opt/venv: torch for the chosen runtime, then the
# project's wheel (built here, with the gRPC stubs generated inside it by the same grpcio-tools and
# protobuf that will load them). `runtime` is a clean slim image that receives only /opt/venv: no
# compiler, no source tree, no pip cache. The CUDA variant needs no CUDA base image: PyPI's torch
# wheel carries its CUDA libraries; the host (or the Kubernetes node) provides only the driver.

FROM python:3.11.11-slim-bookworm AS build

# cpu or cuda
ARG RUNTIME=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv
# torch first, in its own layer (the largest, and the one that changes least).
RUN case "${RUNTIME}" in \
      cpu)  pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "RUNTIME must be cpu or cuda, got '${RUNTIME}'" >&2; exit 1 ;; \
    esac

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY proto ./proto
COPY onerec_proto ./onerec_proto
COPY kernels ./kernels
COPY model_store ./model_store
COPY onerec ./onerec
COPY service ./service
COPY loadtest ./loadtest

# 1. the dependencies (and the package, replaced below); 2. the gRPC stubs into onerec_proto/_generated, so
# the wheel carries them: the root filesystem is read-only at run time; 3. the wheel, installed in
# place of the first install; 4. checks that fail the build: stubs current, the package imports from
# the venv (python -P: not from the source tree here), triton present only in the CUDA variant.
RUN extras=""; if [ "${RUNTIME}" = "cuda" ]; then extras="[gpu]"; fi \
 && pip install -c constraints.txt ".${extras}" \
 && python -m onerec_proto.generate \
 && pip wheel --no-deps --wheel-dir /wheels . \
 && pip install --no-deps --force-reinstall /wheels/onerec_serving-*.whl \
 && python -P -m onerec_proto.generate --check \
 && python -P -c "import kernels, onerec, service.server; from onerec_proto import pb2, pb2_grpc" \
 && if [ "${RUNTIME}" = "cpu" ]; then python -P -c "import importlib.util as u; assert u.find_spec('triton') is None, 'triton in the CPU image'"; \
    else python -P -c "import triton"; fi


FROM python:3.11.11-slim-bookworm AS runtime

ARG RUNTIME=cpu
LABEL org.opencontainers.image.title="onerec-serving" \
      org.opencontainers.image.description="OneRec generative recommender: online inference service" \
      org.opencontainers.image.version="0.1.0" \
      io.onerec.runtime="${RUNTIME}"

# Caches that torch and triton write go under /tmp (an emptyDir in Kubernetes): the root filesystem
# is read-only there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    ONEREC_MODEL_STORE=/models \
    ONEREC_RUNTIME=${RUNTIME}

RUN groupadd --gid 10001 onerec \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin onerec \
 && mkdir -p /models \
 && chown 10001:10001 /models

COPY --from=build /opt/venv /opt/venv

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 50051

# Ready = a model is loaded and warmed and the process is not draining. The start period covers the
# first model load; `onerec build` (the one-shot model-init container) is not checked.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('ONEREC_HTTP_PORT', '8000'), timeout=2)"]

ENTRYPOINT ["onerec"]
CMD ["serve"]
