# streamsink: the worker and the CLI in one image.
#   docker build -t streamsink .
#   docker run --rm -e REDIS_URL=redis://host:6379/0 streamsink --help
#   docker run --rm -v "$PWD/streamsink.toml:/etc/streamsink/streamsink.toml:ro" \
#       -e STREAMSINK_CONFIG=/etc/streamsink/streamsink.toml streamsink check
# The examples are in /app/examples (examples/orders.toml, examples/orders.jsonl).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Everything .dockerignore lets through: the package, its pyproject, examples/ configs.
COPY . /app
# All dependencies ship wheels (psycopg2-binary, hiredis), so no compiler is needed.
RUN pip install /app \
    && useradd --system --no-create-home --home-dir /app streamsink

USER streamsink
# The worker's endpoint with `worker --http 0.0.0.0:9464`: /healthz, /readyz, /metrics.
EXPOSE 9464
ENTRYPOINT ["streamsink"]
CMD ["--help"]
