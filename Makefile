# The job's commands. `make run` and `make test` work on a fresh clone with Python 3.11 and no GPU.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SMOKE_MODEL := .cache/models/smoke
OUTPUT ?= output
IMAGE ?= ft-job:latest
# The settings file of check, preview and train (docker compose reads the same name): ENV_FILE=env/code.env.
# ENV=env/code.env is accepted too; check and preview default to the smoke preset, train to env/example.env.
ENV_FILE ?= $(ENV)
# The Python of the GPU tests: the venv's when there is one (CPU torch there: the tests skip, with the reason),
# else python3 (the image's venv). On a GPU host: GPU_PYTHON=/path/to/python with requirements/gpu.txt + pytest.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: help run test test-fast lint test-gpu test-image build train check preview bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The CPU set from its hash lock; torch as its CPU build, chosen explicitly (PyPI's torch is the CUDA build).
$(VENV)/.installed: requirements/cpu.lock.txt scripts/install-cpu-lock.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	scripts/install-cpu-lock.sh $(PY)
	touch $@

$(SMOKE_MODEL)/devmodel.json: $(VENV)/.installed app/devmodel.py data/sample/train.jsonl data/sample/test.jsonl
	$(PY) -m app.devmodel --out $(SMOKE_MODEL) --shape small

run: $(SMOKE_MODEL)/devmodel.json  ## train the tiny local model on data/sample (CPU, about a minute)
	set -a; . env/smoke.env; set +a; FT_OUTPUT_DIR=$(OUTPUT) $(PY) -m app train

check: $(SMOKE_MODEL)/devmodel.json  ## validate settings + data, GPU preflight (ENV_FILE=env/x.env), no weights loaded
	set -a; . $(or $(ENV_FILE),env/smoke.env); set +a; FT_OUTPUT_DIR=$(OUTPUT) $(PY) -m app check

preview: $(SMOKE_MODEL)/devmodel.json  ## the first training rows with trained tokens marked (ENV_FILE=env/x.env)
	set -a; . $(or $(ENV_FILE),env/smoke.env); set +a; $(PY) -m app preview -n 2

test: $(VENV)/.installed lint  ## static checks, unit and integration tests (CPU)
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed  ## unit tests only
	$(PY) -m pytest -q -m "not integration"

lint: $(VENV)/.installed  ## ruff, hadolint, compose spec, Kubernetes schemas, pins and settings names
	PATH=$(abspath $(VENV))/bin:$$PATH scripts/lint.sh

test-gpu:  ## GPU tests, skipped with the reason without CUDA (GPU_PYTHON=...; image: docker compose run --rm test-gpu)
	@$(GPU_PYTHON) -c "import pytest, torch" 2>/dev/null || { echo "make test-gpu: $(GPU_PYTHON) lacks pytest or \
	torch. Install requirements/gpu.txt and pytest into a venv and pass GPU_PYTHON=/that/venv/bin/python (or \
	run make test once for the CPU venv, where these tests skip)." >&2; exit 2; }
	$(GPU_PYTHON) -m pytest -q -m gpu -rs tests/test_gpu.py

test-image:  ## build the image (Debian stand-in base, podman; root) and run it on the CPU: ~16 min cold, ~9 warm
	scripts/test-image.sh

build:  ## build the GPU image
	docker build -t $(IMAGE) .

train:  ## train with docker compose (ENV_FILE=env/code.env), data in ./data, results in ./output
	mkdir -p data $(OUTPUT) && ENV_FILE=$(ENV_FILE) OUTPUT_DIR=$(abspath $(OUTPUT)) docker compose run --rm train

# openweights 0.14.0's own training code (its wheel's openweights/jobs/unsloth/), for bench/e2e.py's `ow` path: from
# PyPI, into the cache the parity tests use (tests/owpkg.py). OW_DIR=folder instead, on a host without PyPI.
OW_JOBS := .cache/openweights/jobs-unsloth
$(OW_JOBS)/training.py:
	$(PYTHON) -m pip download -q --no-deps --disable-pip-version-check openweights==0.14.0 -d .cache/openweights
	$(PYTHON) -c 'import glob, pathlib, sys, zipfile; out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); \
	  z = zipfile.ZipFile(glob.glob(".cache/openweights/openweights-0.14.0-*.whl")[0]); \
	  [(out / pathlib.Path(n).name).write_bytes(z.read(n)) for n in z.namelist() \
	   if n.startswith("openweights/jobs/unsloth/") and n.endswith(".py") and n.count("/") == 3]' $(OW_JOBS)

bench: $(if $(OW_DIR),,$(OW_JOBS)/training.py)  ## job vs plain transformers+PEFT+TRL vs OpenWeights: end to end, throughput, the sweep row (GPU, ~45 min)
	$(PYTHON) -m bench.e2e --out bench/results/e2e --shape qwen2-7b --paths job,job-warm,plain,ow --drop-caches \
	  --ow-dir $(or $(OW_DIR),$(OW_JOBS))
	$(PYTHON) -m bench.run --out bench/results --shapes qwen2-7b,qwen2-0.5b --modes bf16,4bit \
	  --paths job,job-ckpt,baseline,baseline-noupcast --warmup 4 --steps 8 --micro-batch 2 --accum 4
	$(PYTHON) -m bench.sweep --out bench/results/sweep --shape qwen2-7b --prompts 6 --seeds 4 --standalone 3

clean:  ## remove the venv, local models and outputs
	rm -rf $(VENV) .cache $(OUTPUT)
