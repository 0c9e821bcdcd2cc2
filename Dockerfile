# syntax=docker/dockerfile:1
#
# One image for the control plane (`nstudent serve`) and every Ray node (head and workers, started by
# KubeRay with `ray start`; jobs run `nstudent job ...`). Two flavours from the same file:
#
#   docker build -t nstudent:0.1.0 .                                  # CPU: Debian slim, CPU wheels of torch
#   docker build -t nstudent:0.1.0-cuda --build-arg FLAVOR=cuda .     # CUDA: nvidia/cuda runtime, CUDA wheels
#
# Both flavours carry the same standalone CPython build (installed by uv), so a CPU head and GPU workers
# of one Ray cluster run the same Python version, which Ray requires.

ARG FLAVOR=cpu
ARG CPU_BASE=debian:bookworm-slim
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------
# Builder: Python, a virtual environment with torch and the package, nothing else.
FROM python:3.11-slim AS builder
ARG FLAVOR
ARG PYTHON_VERSION=3.11
ARG UV_VERSION=0.13.9
# torch and torchvision as the Makefile pins them; the index decides CPU or CUDA wheels (PyPI's Linux
# wheels of torch are the CUDA build, with the CUDA libraries as wheels of their own).
ARG TORCH="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=https://pypi.org/simple

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1

RUN pip install --no-cache-dir "uv==${UV_VERSION}" \
 && uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is most of the image and changes least often.
RUN if [ "${FLAVOR}" = "cuda" ]; then index="${TORCH_INDEX_CUDA}"; else index="${TORCH_INDEX_CPU}"; fi \
 && uv pip install --index-url "${index}" ${TORCH}

WORKDIR /src
# The build context is the package and its metadata: .dockerignore leaves out everything else.
COPY . .
# The package and its dependencies (ray[data,train,default] among them); torch stays as installed above.
RUN uv pip install . \
 && nstudent --help > /dev/null

# ---------------------------------------------------------------------------------------------------
# Runtime bases. KubeRay starts Ray nodes through bash and probes them with wget.
FROM ${CPU_BASE} AS base-cpu
FROM ${CUDA_BASE} AS base-cuda

FROM base-${FLAVOR} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash ca-certificates wget \
 && rm -rf /var/lib/apt/lists/*

# A fixed, unprivileged user (uid 1000 is taken by `ubuntu` in Ubuntu-based images). The Helm chart runs
# the pods as this uid.
RUN groupadd --gid 10001 nstudent \
 && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash nstudent

COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NSTUDENT_HOST=0.0.0.0 \
    NSTUDENT_PORT=8000 \
    NSTUDENT_DATA_DIR=/var/lib/nstudent

RUN mkdir -p /var/lib/nstudent && chown nstudent:nstudent /var/lib/nstudent
USER 10001:10001
WORKDIR /home/nstudent
EXPOSE 8000

# The control plane; KubeRay replaces the command of Ray containers with its own `ray start`.
CMD ["nstudent", "serve"]
