# The API image: `baerase serve`, `baerase db upgrade`, `baerase keys create`. No torch, no CUDA:
# the API stores uploads and reads results, it never loads a model (see app/main.py). The pins
# below are the project's dependencies (pyproject.toml) minus the engine's (torch, safetensors);
# numpy and pillow stay: the upload checks read .npy headers and image sizes before a job is queued
# (worker/sanitize/sample_sizes.py). tests/deploy/test_docker_files.py checks them against pyproject.toml.
# Build from the repository root: docker build -f docker/api.Dockerfile -t baerase-api .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install \
        "numpy==2.4.6" \
        "pillow==13.0.0" \
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
# alembic.ini lives here: `baerase db upgrade` runs from this directory.
ENV BAERASE_DATA_DIR=/var/lib/baerase BAERASE_ARTIFACT_DIR=/var/lib/baerase/artifacts BAERASE_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["baerase", "serve", "--host", "0.0.0.0", "--port", "8000"]
