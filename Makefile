# Every target creates .venv on first use; nothing needs installing by hand.
PYTHON ?= python3
# The coordinator's native strategy for demo-secure (fedavg, fedadam, ...).
STRATEGY ?= fedavg
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `flwr new` in Flower 1.25 and later fetches its templates from the Flower Hub, which CI
# cannot reach. tests/integration/test_flwr_new.py runs the `flwr new` of flwr 1.24.0, the
# last release that ships its templates, from this wheel (downloaded, never installed).
FLWR_NEW := $(VENV)/flwr-new/.downloaded

demo-dp: $(STAMP)
	$(PY) examples/digits/demo.py --dp

demo-secure: $(STAMP)
	$(PY) examples/digits/demo.py --dp --secagg --strategy $(STRATEGY)

.PHONY: demo demo-dp demo-secure test node-deps proto lint typecheck bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits/demo.py

# Two pytest-xdist workers (the CI machine has 2 cores); WORKERS=0 runs the suite in one process.
# The fuzz tests share one live federation and count what they sent to it, so they run after
# the rest, in one process of their own (tests/fuzz/conftest.py says why).
WORKERS ?= 2

test: $(STAMP) node-deps $(FLWR_NEW)
	$(PY) -m pytest -q -n $(WORKERS) --ignore=tests/fuzz
	$(PY) -m pytest -q tests/fuzz

$(FLWR_NEW): $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --dest $(VENV)/flwr-new flwr==1.24.0
	touch $@

# The Node.js silo example (examples/node) and its test need its two npm packages.
# Without npm the test skips, and fails under CI=true (.ci/run installs nodejs and npm).
node-deps:
	@if command -v npm >/dev/null; then \
		test -f examples/node/node_modules/.installed || { \
			npm ci --prefix examples/node --no-audit --no-fund --ignore-scripts --loglevel=error \
			&& touch examples/node/node_modules/.installed; }; \
	else echo "npm not found: tests/integration/test_node_silo.py will skip"; fi

proto: $(STAMP)
	$(PY) proto/generate.py

lint: $(STAMP)
	$(VENV)/bin/ruff check fedpriv tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy fedpriv

bench: $(STAMP)
	$(PY) benchmarks/round_bench.py

# On a machine with a CUDA GPU: the silo side's GPU paths, bf16 and DP throughput, torchrun.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
