# WithAnyone for ComfyUI — developer entry points.
#   make demo    get ComfyUI, install the pack, run the single-person workflow (small random models
#                when the real model files are missing; it says which files go where)
#   make comfyui-ui   the browser UI on the demo's ComfyUI and models: http://127.0.0.1:8188 (PORT=...)
#   make setup   create .venv/ with everything the tests, the demo and training need
#   make test    run the whole test suite
#   make bench   run the benchmarks (each prints its ratios; not part of the tests)
#   make train-smoke  train the tiny model set on the CPU (four phases, a few seconds)
#   make gpu-check    on a CUDA machine: the CUDA tests and the FLUX.1-dev-size benchmark (< 8 min)
#   make workflows    regenerate example_workflows/ (JSON + thumbnails) against a real server
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup demo comfyui-ui test bench train-smoke gpu-check comfyui workflows clean

$(VENV)/.installed: requirements.txt requirements-train.txt requirements-dev.txt requirements-parity.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps -r requirements-parity.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) tools/demo.py

PORT ?= 8188
comfyui-ui: setup
	$(PY) tools/demo.py --serve --port $(PORT)

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) tests/bench/bench_adapter.py
	$(PY) tests/bench/bench_faces.py
	$(PY) tests/bench/bench_train.py
	$(PY) tests/bench/bench_comfy.py
	$(PY) tests/bench/bench_precision.py
	$(PY) tests/bench/bench_prepare.py

train-smoke: setup
	$(PY) -m train.smoke_data .cache/smoke
	$(PY) train/run.py --config train/configs/smoke.yaml
	$(PY) train/run.py --config train/configs/smoke-multiid2m.yaml

gpu-check: setup
	$(PY) tests/gpu/gpu_check.py

comfyui: setup
	$(PY) tools/get_comfyui.py

workflows: setup
	$(PY) tools/build_workflows.py

clean:
	rm -rf .cache .pytest_cache
