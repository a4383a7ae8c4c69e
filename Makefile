# polaris-opt: `make demo` sets everything up and runs the main job; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/polaris-opt
# The install is redone only when pyproject.toml changes.
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench lint format models clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	@mkdir -p build
	$(CLI) quantize models/resnet_s.onnx --int8 --calib models/resnet_s.calib.npz --method mse --bias-correction -o build/resnet_s.int8.onnx
	$(CLI) inspect build/resnet_s.int8.onnx --top 8
	$(CLI) prune models/resnet_s.onnx --structured channel --sparsity 0.5 --correct --calib models/resnet_s.calib.npz -o build/resnet_s.pruned.onnx

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_foundation.py
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_prune.py
	$(PY) benchmarks/bench_spmm.py
	$(PY) benchmarks/bench_qmatmul.py
	$(PY) benchmarks/bench_runtime.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Rebuilding the zoo trains the digits models, which needs scikit-learn's bundled digits data.
models: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,zoo]"
	$(PY) models/build_zoo.py --out models

clean:
	rm -rf build .pytest_cache .ruff_cache
