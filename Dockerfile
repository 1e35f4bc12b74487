# OneRec serving image: `onerec` command line (serve, build, features load, replay).
#   docker build -t onerec-serving .
#   docker run -p 8000:8000 -p 50051:50051 -v $PWD/model-store:/models onerec-serving serve
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ONEREC_MODEL_STORE=/models

WORKDIR /app
# torch first, as its own layer: the CPU wheel from the PyTorch CPU index (pinned like
# constraints.txt), so the image does not carry several GB of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml constraints.txt README.md ./
COPY proto ./proto
COPY kernels ./kernels
COPY model_store ./model_store
COPY onerec ./onerec
COPY service ./service
COPY loadtest ./loadtest
# Editable install: service/proto_gen.py reads proto/ beside the packages. The gRPC stubs are
# generated at build time because the root filesystem is read-only at run time.
RUN pip install -c constraints.txt -e . \
 && python -m service.proto_gen && python -m service.proto_gen --check \
 && useradd --uid 10001 --create-home onerec && mkdir -p /models && chown onerec /models

USER 10001
EXPOSE 8000 50051
ENTRYPOINT ["onerec"]
CMD ["serve"]
