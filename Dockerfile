# The job's GPU image: CUDA 13, Python 3.12 venv with requirements/gpu.lock.txt exactly, tini as PID 1, non-root.
#
#   docker build -t ft-job:latest .                  # make build (the default target is `job`)
#   docker compose run --rm train                    # README: settings are FT_* environment variables
#   docker compose run --rm test-gpu                 # builds `--target test` (adds pytest + tests/), runs make test-gpu
#   make test-image                                  # builds this file on a Debian stand-in base and runs it (CPU)
#
# Layers go from rarely to often changed: OS packages, venv, locked wheels (GBs), the smoke model, the code.
# A change under app/ rebuilds only the last few small layers; a change to requirements/gpu.lock.txt reinstalls.

# Base: CUDA 13.0 *devel*, not runtime. Triton (under unsloth's kernels, bitsandbytes and torch.compile) compiles
# at run time: for each new kernel signature it builds a small C launcher with the system C compiler against
# Python.h and the CUDA headers, and unsloth generates and compiles its patched modules on first use. The runtime
# image has neither a C compiler nor the CUDA headers, so there the first Triton kernel fails to build.
# The cuDNN variant follows the issue; torch's CUDA 13.0 wheels bring their own cuDNN/cuBLAS (nvidia-* wheels),
# which is what torch loads. `--build-arg BASE_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04` saves about 1 GiB.
# Ubuntu 24.04 ships Python 3.12, the version the GPU wheel set was verified with. The host driver must
# support CUDA 13.0 (driver >= 580).
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
# The base distribution's Python, `python$PYTHON_VERSION` in its archive. `make test-image` builds this file on a
# Debian bookworm stand-in (no registry is reachable there) with PYTHON_VERSION=3.11; the lock installs on both.
ARG PYTHON_VERSION=3.12

FROM ${BASE_IMAGE} AS app
ARG BASE_IMAGE
ARG PYTHON_VERSION
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# OS packages: Python (+ headers for Triton's launcher builds), a C compiler, tini (PID 1), make (make
# test-gpu). Versions come from the Ubuntu 24.04 archive at build time; pinning them breaks the build whenever
# the archive moves on, so they are left to the security updates of the release. `apt-get clean` drops the
# downloaded packages where the base keeps them (150 MB on a plain Debian base). ca-certificates also trusts
# what the base put in /usr/local/share/ca-certificates (the CI stand-in: its machine's TLS-intercepting CA).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc g++ make "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-dev" "python${PYTHON_VERSION}-venv" tini \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/*

# The job's user: uid/gid 1000 (Ubuntu 24.04 images already hold a user 1000, `ubuntu`: replaced by `ft`).
# /output and /cache are the volumes' mount points; their owner and mode seed a fresh Docker named volume, and
# 1777 lets a run under another --user (e.g. your own uid on a workstation) write there too.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && (groupdel ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 ft \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ft \
    && mkdir -p /app /data /output /cache \
    && chown ft:ft /output /cache \
    && chmod 1777 /output /cache

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN "python${PYTHON_VERSION}" -m venv /opt/venv

WORKDIR /app

# The whole wheel set from the lock: every package at its version, each file checked against its sha256, so that two
# builds a month apart install the same bytes (tests/test_static.py checks that this step installs the lock and
# nothing else, and that the lock agrees with requirements/gpu.txt; scripts/lock.sh regenerates it). --no-deps:
# the lock is the whole set; unsloth declares xformers, which the lock leaves out (PyPI's xformers is built for
# another torch/CUDA and the GPU set was verified without it, unsloth then uses PyTorch's SDPA). PyPI's torch
# 2.11.0 is the CUDA 13.0 build, with the nvidia-*-cu13 libraries as its own dependencies: no extra index.
#
# Then the build-time check, a layer of its own so that changing it keeps the 6 GB above: the venv holds exactly
# the lock (nothing missing, nothing else, no xformers), pip finds every declared dependency satisfied but
# unsloth's xformers, torch is the CUDA 13.0 build (its __version__ says 2.11.0+cu130, its package metadata
# 2.11.0), and no package's metadata carries a local version such as +cu126 (a wheel built for another CUDA would
# fail on the GPU).
COPY requirements/gpu.lock.txt requirements/gpu.lock.txt
RUN pip install --no-cache-dir --no-deps --require-hashes -r requirements/gpu.lock.txt
# hadolint ignore=DL3059
RUN python -c 'import importlib.metadata as md, re, subprocess, sys, torch; \
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower(); \
lock = {norm(name): version for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==(\S+)", open("requirements/gpu.lock.txt").read(), re.M)}; \
installed = {norm(d.name): d.version for d in md.distributions()}; \
wrong = {name: (lock.get(name), installed.get(name)) for name in (set(lock) | set(installed)) - {"pip"} if lock.get(name) != installed.get(name)}; \
assert not wrong, "the venv differs from requirements/gpu.lock.txt (lock, installed): %s" % wrong; \
assert "xformers" not in installed, "xformers is installed: the GPU set was verified without it"; \
check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout.splitlines(); \
broken = [line for line in check if not re.search(r" requires xformers\b|^No broken requirements", line)]; \
assert not broken, "pip check: %s" % broken; \
assert torch.__version__.split("+")[0] == lock["torch"], "torch %s is not the locked %s" % (torch.__version__, lock["torch"]); \
assert torch.version.cuda == "13.0", "torch was built for CUDA %s, not 13.0" % torch.version.cuda; \
local = sorted("%s==%s" % item for item in installed.items() if "+" in item[1]); \
assert not local, "wheels with a local version (another CUDA build?): %s" % local; \
print("ok: torch %s (CUDA %s), %d packages as in requirements/gpu.lock.txt" % (torch.__version__, torch.version.cuda, len(lock)))'

# The tiny smoke model (`python -m app.devmodel`: a tokenizer trained on data/sample, random weights; no
# network), so that `ENV_FILE=env/smoke.env docker compose run --rm train` trains without a hub download.
# It depends only on devmodel.py and the sample data, so code changes elsewhere in app/ keep this layer.
COPY data/sample/ data/sample/
COPY app/__init__.py app/devmodel.py app/
# save_pretrained writes some files with mode 0600 (as root here): made readable by every uid, writable by none,
# since the job runs as uid 1000 (or any --user) and only reads the model.
RUN HF_HUB_OFFLINE=1 python -m app.devmodel --out .cache/models/smoke --shape small \
    && chmod -R a+rX,go-w .cache

COPY app/ app/
COPY deploy/entrypoint.py deploy/entrypoint.py
COPY deploy/k8s/sweep-configs.jsonl deploy/k8s/sweep-configs.jsonl

# Runtime defaults. Caches live on the /cache volume (HF downloads, compiled Triton/Inductor kernels and Triton's
# autotuning choices survive the container); unsloth's generated modules go to per-container /tmp, since concurrent
# jobs sharing a volume would overwrite each other's files mid-import. No telemetry or statistics calls: unsloth's
# statistics ping hangs or fails without a network. Set HF_HUB_OFFLINE=1 yourself where the hub is unreachable (the
# model must then be in /cache/huggingface or a local folder). NCCL_NVLS_ENABLE=0 keeps NVLink multicast (NVLS) off
# in multi-GPU runs. With a read-only root (`--read-only`), mount /cache as well as /output: importing torch's
# compiler (transformers does) creates TORCHINDUCTOR_CACHE_DIR, and /tmp wants a tmpfs.
ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TRITON_CACHE_DIR=/cache/triton \
    TRITON_CACHE_AUTOTUNING=1 \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache \
    UNSLOTH_DISABLE_STATISTICS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NCCL_NVLS_ENABLE=0

# Versions, for `docker inspect` (tests/test_static.py checks them against requirements/gpu.txt). torch is PyPI's
# 2.11.0, the CUDA 13.0 build (ft-job.cuda).
LABEL org.opencontainers.image.title="ft-job" \
      org.opencontainers.image.description="LoRA/QLoRA fine-tuning job: OpenWeights settings and result.json" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      ft-job.cuda="13.0" \
      ft-job.python="${PYTHON_VERSION}" \
      ft-job.torch="2.11.0" \
      ft-job.transformers="5.17.0" \
      ft-job.trl="1.14.2" \
      ft-job.peft="0.21.0" \
      ft-job.accelerate="1.15.0" \
      ft-job.datasets="4.8.5" \
      ft-job.unsloth="2026.10.9" \
      ft-job.unsloth_zoo="2026.10.9" \
      ft-job.bitsandbytes="0.50.2" \
      ft-job.torchao="0.18.0"

# --- test: the image plus pytest and tests/, for `make test-gpu` (docker compose run --rm test-gpu) ----------
FROM app AS test
# pytest at the version of the CPU test set (requirements/cpu.txt), locked against the job's set (scripts/lock.sh):
# it adds pytest, iniconfig and pluggy and leaves every package of requirements/gpu.lock.txt as it is.
COPY requirements/gpu-test.lock.txt requirements/gpu-test.lock.txt
RUN pip install --no-cache-dir --no-deps --require-hashes -r requirements/gpu-test.lock.txt
COPY Makefile pyproject.toml ./
COPY tests/ tests/
# /app belongs to root: no .pytest_cache there.
ENV PYTEST_ADDOPTS="-p no:cacheprovider"
USER 1000:1000
ENTRYPOINT ["tini", "--"]
CMD ["make", "test-gpu"]

# --- job: the default target --------------------------------------------------------------------------------
FROM app AS job
USER 1000:1000
# tini is PID 1: it forwards SIGTERM/SIGINT to the job (which then checkpoints and exits 75) and reaps the
# dataloader workers. Not `tini -g`: signalling the whole group would kill the workers mid-checkpoint.
# deploy/entrypoint.py execs `python -m app ARGS` (so the job itself receives the signals); with
# STOP_WHEN_DONE=1 it instead runs the job as a child and then stops the RunPod pod / Vast.ai instance.
ENTRYPOINT ["tini", "--", "python", "/app/deploy/entrypoint.py"]
CMD ["train"]
