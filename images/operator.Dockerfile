# syntax=docker/dockerfile:1
# The operator: kopf, the Kubernetes client, prometheus-client; no torch. From the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/kleinstyle/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim

# Build in a venv at its final path, then copy only the venv: no pip cache or sources in the image.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package is built from, so edits to tests or docs keep the cache.
COPY pyproject.toml README.md ./
COPY contract/ contract/
COPY operator/ operator/
COPY runtime/ runtime/
COPY cli/ cli/
RUN python -m venv /opt/kleinstyle \
 && /opt/kleinstyle/bin/pip install ".[operator]" \
 && /opt/kleinstyle/bin/python -c "import kleinstyle.operator.main" \
 && /opt/kleinstyle/bin/kleinstyle operator --help > /dev/null \
 && ! /opt/kleinstyle/bin/python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE}
# The chart runs it as 1000 on a read-only root filesystem with /tmp as an emptyDir.
RUN groupadd --gid 1000 kleinstyle \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kleinstyle
COPY --from=build /opt/kleinstyle /opt/kleinstyle
ENV PATH=/opt/kleinstyle/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
# 8080: metrics, 8081: liveness (/healthz).
EXPOSE 8080 8081
ENTRYPOINT ["kleinstyle"]
CMD ["operator"]
