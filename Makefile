# The README's two set-up commands for a fresh machine. Each creates .venv if missing and
# installs what it needs into it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: bench test

$(PY):
	python3 -m venv $(VENV)

# The main job: memory vs effective depth, DEQ against unrolled deep baselines.
bench: $(PY)
	$(PIP) install -e ".[bench]"
	$(PY) -m benchmarks.memory_vs_depth

# The whole test suite on all cores (pytest exits non-zero on failures and on "no tests").
test: $(PY)
	$(PIP) install -e ".[dev]"
	$(PY) -m pytest -n auto -q
