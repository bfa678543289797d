# promptcast on a CUDA host:
#   docker build -t promptcast .
#   docker run --gpus all -p 127.0.0.1:8080:8080 -v $PWD/weights:/app/weights -v $PWD/out:/app/out \
#     -e PROMPTCAST_API_TOKEN=... -e TWITCH_RTMP_URL=... promptcast run --config /app/config/twitch.yaml
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential ffmpeg curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# On Linux x86_64 this torch release is a CUDA build; pinned so it matches what was tested.
RUN pip install --upgrade pip && pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY broadcaster ./broadcaster
COPY engine ./engine
COPY chat ./chat
COPY config ./config
# flash-attn is optional: the engine falls back to SDPA when its wheel cannot be built.
RUN pip install ".[gpu]" || pip install .

RUN useradd --create-home --uid 10001 promptcast && mkdir -p /app/out /app/weights && \
    chown -R promptcast /app/out /app/weights
USER promptcast

EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["promptcast"]
CMD ["run", "--config", "/app/config/docker.yaml"]
