# WithAnyone for ComfyUI — developer entry points.
#   make setup   create .venv/ with everything the tests, the demo and training need
#   make test    run the whole test suite
#   make bench   run the benchmarks (each prints its ratios; not part of the tests)
#   make train-smoke  train the tiny model set on the CPU (four phases, a few seconds)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup test bench train-smoke comfyui clean

$(VENV)/.installed: requirements.txt requirements-train.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) tests/bench/bench_adapter.py
	$(PY) tests/bench/bench_faces.py
	$(PY) tests/bench/bench_train.py

train-smoke: setup
	$(PY) -m withanyone_core.testing.smoke_data .cache/smoke
	$(PY) train/run.py --config train/configs/smoke.yaml

comfyui: setup
	$(PY) tools/get_comfyui.py

clean:
	rm -rf .cache .pytest_cache
