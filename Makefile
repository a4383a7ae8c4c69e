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

test: $(STAMP) chromium
	$(PY) -m pytest -q

# tests/test_report_browser.py screenshots a report in headless Chromium. Debian's package is
# installed when it is missing and this is root with apt-get; when that cannot be done or fails,
# `make test` goes on and that test skips, saying why.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report screenshot test"; \
	    (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && \
	     apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 || \
	    echo "could not install chromium: tests/test_report_browser.py will skip"; \
	  else echo "no chromium and no apt-get as root: tests/test_report_browser.py will skip"; fi; }

bench: $(STAMP)
	$(PY) benchmarks/bench_foundation.py
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_prune.py
	$(PY) benchmarks/bench_spmm.py
	$(PY) benchmarks/bench_qmatmul.py
	$(PY) benchmarks/bench_runtime.py
	$(PY) benchmarks/bench_end_to_end.py
	$(PY) benchmarks/bench_ci.py
	$(PY) benchmarks/bench_bench.py

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
