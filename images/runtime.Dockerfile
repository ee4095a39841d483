# syntax=docker/dockerfile:1
# What runs inside the Jobs: kleinstyle's runtime (prepare, train, evaluate, generate, fuse) with torch on CUDA 12,
# and ai-toolkit at a pinned commit as the default training backend. From the repository root:
#   docker build -f images/runtime.Dockerfile -t ghcr.io/kleinstyle/runtime:0.1.0 .
#
# Two virtual environments share one torch: ai-toolkit pins its own diffusers (a git commit), transformers, peft and
# huggingface_hub, which must not decide the versions kleinstyle's runtime was verified with. torch lives in a third
# venv that both see through a .pth file, so its ~5 GB is in the image once; a constraints file keeps either
# install from replacing it.

# CUDA 12.6: torch 2.13 (the version ai-toolkit's manager pins at this commit) ships cu126 wheels, which bundle the
# CUDA libraries; the base image brings the driver-facing setup (NVIDIA_* variables) and a matching userland.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive
# Python 3.11 from the deadsnakes PPA (Ubuntu 22.04 ships 3.10). libgl1 and libglib2.0-0: ai-toolkit imports cv2
# (opencv-python) at module level.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
 && curl -fsSL "https://keyserver.ubuntu.com/pks/lookup?op=get&search=0xF23C5A6CF475977595C89F51BA6932366A755776" \
    | gpg --dearmor -o /usr/share/keyrings/deadsnakes.gpg \
 && echo "deb [signed-by=/usr/share/keyrings/deadsnakes.gpg] https://ppa.launchpadcontent.net/deadsnakes/ppa/ubuntu jammy main" \
    > /etc/apt/sources.list.d/deadsnakes.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgl1 libglib2.0-0 \
 && apt-get purge -y --auto-remove curl gnupg \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 1000 kleinstyle \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kleinstyle

FROM base AS build
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
# ai-toolkit imports torchaudio at start-up (toolkit/config_modules.py) though its requirements.txt does not name
# it; its README installs torchaudio 2.11.0 beside torch 2.13.0 (there is no 2.13 torchaudio), without its torch pin.
ARG TORCHAUDIO_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# ai-toolkit commit the facts in docs/facts.md#ai-toolkit were verified at (27a03a91); a full hash, so it can be
# fetched alone.
ARG AI_TOOLKIT_COMMIT=27a03a91f23eb1b757d5ec2e80ee3e129cfcc350
ARG AI_TOOLKIT_REPO=https://github.com/ostris/ai-toolkit.git
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*

# torch first: the largest layer, rebuilt only when its version changes.
RUN python3.11 -m venv /opt/torch \
 && /opt/torch/bin/pip install --index-url "${TORCH_INDEX_URL}" \
    "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /opt/torch/constraints.txt

# A venv that sees the shared torch: `new_venv DIR`.
RUN printf '%s\n' \
    'set -eu' \
    'python3.11 -m venv "$1"' \
    'echo /opt/torch/lib/python3.11/site-packages > "$1/lib/python3.11/site-packages/zz-shared-torch.pth"' \
    > /usr/local/bin/new_venv && chmod +x /usr/local/bin/new_venv

# ai-toolkit before kleinstyle's sources, so code changes here do not reinstall it. Compiled at build time because
# the root filesystem is read-only in a Job.
RUN git init -q /opt/ai-toolkit \
 && git -C /opt/ai-toolkit fetch -q --depth 1 "${AI_TOOLKIT_REPO}" "${AI_TOOLKIT_COMMIT}" \
 && git -C /opt/ai-toolkit checkout -q FETCH_HEAD \
 && echo "${AI_TOOLKIT_COMMIT}" > /opt/ai-toolkit/COMMIT \
 && rm -rf /opt/ai-toolkit/.git \
 && new_venv /opt/ai-toolkit/venv \
 && /opt/ai-toolkit/venv/bin/pip install -c /opt/torch/constraints.txt -r /opt/ai-toolkit/requirements.txt \
 && /opt/ai-toolkit/venv/bin/pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torchaudio==${TORCHAUDIO_VERSION}" \
 && /opt/ai-toolkit/venv/bin/python -m compileall -q -x '/venv/' /opt/ai-toolkit \
 && cd /opt/ai-toolkit && /opt/ai-toolkit/venv/bin/python -c "import toolkit.config_modules, toolkit.job"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract/ contract/
COPY operator/ operator/
COPY runtime/ runtime/
COPY cli/ cli/
RUN new_venv /opt/kleinstyle \
 && /opt/kleinstyle/bin/pip install -c /opt/torch/constraints.txt ".[runtime,cloud]" \
 && /opt/kleinstyle/bin/python -c "import torch, kleinstyle.runtime.train; print('torch', torch.__version__)"

FROM base
COPY --from=build /opt/torch /opt/torch
COPY --from=build /opt/ai-toolkit /opt/ai-toolkit
COPY --from=build /opt/kleinstyle /opt/kleinstyle
ENV PATH=/opt/kleinstyle/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AI_TOOLKIT_DIR=/opt/ai-toolkit \
    AI_TOOLKIT_PYTHON=/opt/ai-toolkit/venv/bin/python
USER 1000:1000
WORKDIR /tmp
# The operator's Jobs set the command (`kleinstyle STEP --spec FILE`); run bare, it lists the steps.
ENTRYPOINT ["kleinstyle"]
CMD ["--help"]
