# The worker image: `baerase worker`, with the CUDA build of torch. The torch wheels from the
# PyTorch index bring their own CUDA libraries (nvidia-* wheels), so a slim Python base is enough;
# the host needs only the NVIDIA driver and the NVIDIA Container Toolkit. The same image runs on
# the CPU when no GPU is given to it. The pins are pyproject.toml's dependencies, torch at the
# version pyproject.toml pins; tests/deploy/test_docker_files.py checks that they agree.
# Build from the repository root: docker build -f docker/worker.Dockerfile -t baerase-worker .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# The CUDA flavour of the torch wheel (cu126, cu128, ...): pick one the hosts' driver supports.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url ${TORCH_INDEX_URL} --extra-index-url https://pypi.org/simple \
        "torch==2.13.0"
RUN pip install \
        "numpy==2.4.6" \
        "pillow==13.0.0" \
        "safetensors==0.8.0" \
        "pydantic==2.13.4" \
        "pydantic-settings==2.14.1" \
        "fastapi==0.165.0" \
        "uvicorn==0.54.0" \
        "python-multipart==0.0.34" \
        "sqlalchemy==2.1.9" \
        "alembic==1.20.1" \
        "psycopg[binary]==3.3.9" \
        "celery==5.7.0" \
        "redis==8.1.0" \
        "httpx==0.28.1" \
        "jinja2==3.1.6" \
        "prometheus-client==0.26.0" \
        "fastapi-offline==1.7.7" \
        "s3fs==2026.9.0"

WORKDIR /opt/baerase
COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY worker worker
COPY bench bench
COPY migrations migrations
# Editable (--no-deps: only the pins above): app/core/db.py finds migrations/ beside the code.
RUN pip install --no-deps --editable . \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin baerase \
    && mkdir -p /var/lib/baerase/artifacts && chown -R baerase:baerase /var/lib/baerase

USER baerase
ENV BAERASE_DATA_DIR=/var/lib/baerase BAERASE_ARTIFACT_DIR=/var/lib/baerase/artifacts \
    BAERASE_LOG_FORMAT=json BAERASE_WORKER_METRICS_PORT=9100
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"]
CMD ["baerase", "worker"]
