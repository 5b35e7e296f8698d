# Tamiyo server image.
#   docker build -t tamiyo .                                  # CPU build of torch
#   docker build --build-arg TORCH_VARIANT=cu128 -t tamiyo:cuda .
# TORCH_VARIANT selects the PyTorch wheel index (cpu, cu126, cu128, ...); TORCH_INDEX_URL
# overrides the whole index for a mirror.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The native forward (tamiyo/policy/_fused.c) is compiled at install for TAMIYO_MARCH
# (x86-64-v3 = AVX2 + FMA, so the image runs on any recent x86 host; "native" for the
# build machine's own CPU); the compiler is removed again after.
ARG TAMIYO_MARCH=x86-64-v3
COPY pyproject.toml setup.py README.md ./
COPY tamiyo ./tamiyo
COPY tamiyo_server ./tamiyo_server
COPY tamiyo_client ./tamiyo_client
COPY trainer ./trainer
COPY checkpoints ./checkpoints
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && TAMIYO_MARCH="${TAMIYO_MARCH}" pip install . \
    && python -c "from tamiyo.policy import frame_ingest, fused, telemetry_features; assert fused.available() and telemetry_features.native_available() and frame_ingest.native_available()" \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 tamiyo
USER tamiyo

EXPOSE 50051 9464
# An installed package cannot find the repo's checkpoints/ by relative path: name it
# (the bundled default, also served while a watched --checkpoint-dir is still empty).
ENV TAMIYO_HOST=0.0.0.0 TAMIYO_CHECKPOINT_DIR=/app/checkpoints/default \
    TAMIYO_DEFAULT_CHECKPOINT_DIR=/app/checkpoints/default
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc,sys;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;c=grpc.insecure_channel('127.0.0.1:50051');sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=2).status==1 else 1)"
ENTRYPOINT ["tamiyo-server"]
