# syntax=docker/dockerfile:1
# The job's GPU image: CUDA 13, Python 3.12 venv with requirements/gpu.txt exactly, tini as PID 1, non-root.
#
#   docker build -t ft-job:latest .                  # make build (the default target is `job`)
#   docker compose run --rm train                    # README: settings are FT_* environment variables
#   docker compose run --rm test-gpu                 # builds `--target test` (adds pytest + tests/), runs make test-gpu
#
# Layers go from rarely to often changed: OS packages, venv, pinned wheels (GBs), the smoke model, the code.
# A change under app/ rebuilds only the last few small layers; a change to requirements/gpu.txt reinstalls.

# Base: CUDA 13.0 *devel*, not runtime. Triton (under unsloth's kernels, bitsandbytes and torch.compile) compiles
# at run time: for each new kernel signature it builds a small C launcher with the system C compiler against
# Python.h and the CUDA headers, and unsloth generates and compiles its patched modules on first use. The runtime
# image has neither a C compiler nor the CUDA headers, so there the first Triton kernel fails to build.
# The cuDNN variant follows the issue; torch's cu130 wheels bring their own cuDNN/cuBLAS (nvidia-* wheels),
# which is what torch loads. `--build-arg BASE_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04` saves about 1 GiB.
# Ubuntu 24.04 ships Python 3.12, the version the GPU wheel set was verified with. The host driver must
# support CUDA 13.0 (driver >= 580).
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

FROM ${BASE_IMAGE} AS app
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# OS packages: Python 3.12 (+ headers for Triton's launcher builds), a C compiler, tini (PID 1), make (make
# test-gpu). Versions come from the Ubuntu 24.04 archive at build time; pinning them breaks the build whenever
# the archive moves on, so they are left to the security updates of the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc g++ make python3.12 python3.12-dev python3.12-venv tini \
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
RUN python3.12 -m venv /opt/venv

WORKDIR /app

# The GPU-verified wheel set, exactly as pinned (tests/test_static.py checks that this step installs
# requirements/gpu.txt and nothing else). torch 2.11.0 exists as 2.11.0+cu130 only on the PyTorch cu130 index;
# with that index added, pip prefers the +cu130 build over PyPI's 2.11.0, and torch-family packages that
# the pins pull in (triton, torchvision, nvidia-* libraries) resolve against the same CUDA 13.0 build.
#
# Then the build-time check: every pin of requirements/gpu.txt is what got installed, torch is the CUDA 13.0
# build, and no installed wheel was built for another CUDA (a +cu12x torchvision would fail on the GPU).
# unsloth declares xformers on Linux; PyPI's xformers is built for another torch/CUDA and the GPU set was
# verified without it (unsloth then uses PyTorch's SDPA): it is removed again, and its absence checked.
COPY requirements/gpu.txt requirements/gpu.txt
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cu130 -r requirements/gpu.txt \
    && pip uninstall -y xformers \
    && python -c 'import importlib.metadata as md, re, torch; \
pins = dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups() for line in open("requirements/gpu.txt") if re.match(r"[A-Za-z0-9_.-]+==", line)); \
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower(); \
installed = {norm(d.name): d.version for d in md.distributions()}; \
wrong = {name: (pin, installed.get(norm(name))) for name, pin in pins.items() if (installed.get(norm(name)) or "").split("+")[0] != pin}; \
assert not wrong, "installed versions differ from requirements/gpu.txt (pin, installed): %s" % wrong; \
want = pins["torch"] + "+cu130"; \
assert torch.__version__ == want, "torch %s is not the pinned build %s" % (torch.__version__, want); \
assert (torch.version.cuda or "").startswith("13.0"), "torch was built for CUDA %s, not 13.0" % torch.version.cuda; \
other = sorted("%s==%s" % (d.name, d.version) for d in md.distributions() if re.search(r"[+]cu(?!130)[0-9]+", d.version)); \
assert not other, "wheels built for another CUDA: %s" % other; \
assert "xformers" not in installed, "xformers is installed: the GPU set was verified without it"; \
print("ok: torch %s (CUDA %s), %d pins as in requirements/gpu.txt" % (torch.__version__, torch.version.cuda, len(pins)))'

# The tiny smoke model (`python -m app.devmodel`: a tokenizer trained on data/sample, random weights; no
# network), so that `ENV_FILE=env/smoke.env docker compose run --rm train` trains without a hub download.
# It depends only on devmodel.py and the sample data, so code changes elsewhere in app/ keep this layer.
COPY data/sample/ data/sample/
COPY app/__init__.py app/devmodel.py app/
RUN HF_HUB_OFFLINE=1 python -m app.devmodel --out .cache/models/smoke --shape small

COPY app/ app/
COPY deploy/entrypoint.py deploy/entrypoint.py

# Runtime defaults. Caches live on the /cache volume (HF downloads, compiled Triton/Inductor kernels survive the
# container); unsloth's generated modules go to per-container /tmp, since concurrent jobs sharing a volume
# would overwrite each other's files mid-import. No telemetry or statistics calls: unsloth's statistics ping
# hangs or fails without a network. Set HF_HUB_OFFLINE=1 yourself where the hub is unreachable (the model must
# then be in /cache/huggingface or a local folder). NCCL_NVLS_ENABLE=0 keeps NVLink multicast (NVLS) off in
# multi-GPU runs.
ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache \
    UNSLOTH_DISABLE_STATISTICS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NCCL_NVLS_ENABLE=0

# Versions, for `docker inspect` (tests/test_static.py checks them against requirements/gpu.txt).
LABEL org.opencontainers.image.title="ft-job" \
      org.opencontainers.image.description="LoRA/QLoRA fine-tuning job: OpenWeights settings and result.json" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04" \
      ft-job.cuda="13.0" \
      ft-job.python="3.12" \
      ft-job.torch="2.11.0+cu130" \
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
# pytest at the version of the CPU test set (requirements/cpu.txt); the job's own pins are untouched.
COPY requirements/cpu.txt requirements/cpu.txt
RUN grep -E '^pytest==' requirements/cpu.txt > /tmp/test-requirements.txt \
    && pip install --no-cache-dir -r /tmp/test-requirements.txt \
    && rm /tmp/test-requirements.txt
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
