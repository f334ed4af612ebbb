# The one image that every edgeface KFP component and the `edgeface` command run in.
#
#   docker build -t edgeface:dev .            # or scripts/build-image.sh, see docs/image.md
#   docker run --rm edgeface:dev edgeface --version
#
# Build arguments:
#   BASE_IMAGE       Python 3.11 on Debian bookworm (default python:3.11-slim-bookworm). Every
#                    stage uses it, because the virtual environment links to its interpreter.
#   TORCH_INDEX_URL  package index for torch, torchvision and their dependencies (default: the
#                    PyTorch CPU-only index). PyPI's Linux torch wheels are CUDA builds that
#                    add about 4 GB of NVIDIA libraries and Triton to the image.
#   PIP_INDEX_URL    package index for every other requirement (default PyPI).
#
# Stages: `dependencies` installs every requirement of pyproject.toml into /opt/venv,
# `package` builds the edgeface wheel, and `runtime` copies both into a fresh base image.
# A change to edgeface/ alone rebuilds only the small package layers.

# NOTE: a build with these defaults has not been run yet. The image was built and tested only
# with a local base image and a local wheel index (docs/image.md says what that build used).
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=https://pypi.org/simple


FROM ${BASE_IMAGE} AS dependencies

ARG TORCH_INDEX_URL
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# The requirement lists are read from pyproject.toml, so the versions installed here are the
# package's own pins. torch and torchvision go first and come from TORCH_INDEX_URL only. The
# second install, from PIP_INDEX_URL, finds them already satisfied and leaves them alone.
COPY pyproject.toml ./
RUN python3 -c 'import re, tomllib; \
project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
requirements = project["dependencies"] + project["optional-dependencies"]["kfp"]; \
is_torch = lambda r: re.split("[^A-Za-z0-9_.-]", r, maxsplit=1)[0].lower() in ("torch", "torchvision"); \
open("/tmp/torch-requirements.txt", "w").write("\n".join(filter(is_torch, requirements)) + "\n"); \
open("/tmp/requirements.txt", "w").write("\n".join(r for r in requirements if not is_torch(r)) + "\n")' \
 && cat /tmp/torch-requirements.txt /tmp/requirements.txt

RUN pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch-requirements.txt \
 && python3 -c 'import torch; print("installed torch", torch.__version__, "built for CUDA", torch.version.cuda)'

RUN pip install -r /tmp/torch-requirements.txt -r /tmp/requirements.txt


FROM dependencies AS package

ARG PIP_INDEX_URL
COPY pyproject.toml README.md* ./
COPY edgeface ./edgeface
# The KFP components run code from these packages inside the pod.
COPY components ./components
COPY pipelines ./pipelines
RUN pip wheel --no-deps --wheel-dir /dist .


FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="edgeface" \
      org.opencontainers.image.description="Federated face-embedding training steps: data, training, aggregation, evaluation, ONNX export, MLflow tracking" \
      org.opencontainers.image.licenses="Apache-2.0"

# UID and GID 10001 match no user of the base image. The writable folders belong to group 0 as
# well, so a cluster that runs the pod under an arbitrary UID with GID 0 (OpenShift does) can
# still write to them.
# The KFP v2 launcher stages artifacts under /gcs, /minio and /s3 at the filesystem root,
# which a non-root user cannot create. Newer KFP backends mount emptyDir volumes there
# instead, and these folders only cover the backends that do not.
RUN groupadd --gid 10001 edgeface \
 && useradd --uid 10001 --gid 10001 --no-log-init --create-home \
        --home-dir /home/edgeface --shell /usr/sbin/nologin edgeface \
 && mkdir -p /home/edgeface/.cache /gcs /minio /s3 \
 && chown -R 10001:0 /home/edgeface /gcs /minio /s3 \
 && chmod -R g=u /home/edgeface /gcs /minio /s3

COPY --from=dependencies /opt/venv /opt/venv
COPY --from=package /dist /tmp/dist

# --no-index: every requirement of edgeface[kfp] must already be in /opt/venv, so this step
# fails instead of downloading anything the dependencies stage missed.
RUN /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/dist "edgeface[kfp]" \
 && /opt/venv/bin/pip check \
 && rm -rf /tmp/dist

# HOME is set explicitly because the container runtime sets it to / for a UID that has no
# /etc/passwd entry, such as an arbitrary runAsUser. PYTHONDONTWRITEBYTECODE stops Python from
# trying to write .pyc files into the root-owned /opt/venv, where pip compiled them at build
# time.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/edgeface \
    XDG_CACHE_HOME=/home/edgeface/.cache \
    TORCH_HOME=/home/edgeface/.cache/torch \
    MPLCONFIGDIR=/home/edgeface/.cache/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /home/edgeface
USER 10001:10001
RUN edgeface --version

# No ENTRYPOINT: KFP replaces the command of every component container, and
# `docker run IMAGE edgeface ...` runs any edgeface command.
CMD ["edgeface", "--help"]
