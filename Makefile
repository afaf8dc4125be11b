# The README's set-up commands for a fresh machine. Each creates .venv if missing and installs
# what it needs into it.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: bench test test-suite test-floors docs mutation mutation-complete

$(PY):
	python3 -m venv $(VENV)

# The main job: memory vs effective depth, DEQ against unrolled deep baselines.
bench: $(PY)
	$(PIP) install -e ".[bench]"
	$(PY) -m benchmarks.memory_vs_depth

# Everything CI runs (.ci/run): the test suite with the docstring examples, then the
# minimum-versions job.
test: test-suite test-floors

# The test suite (including the docs build, the notebooks and the simulated Colab install) and
# every docstring example under jdeq/, on all cores. pytest exits non-zero on failures and on
# "no tests". Most of the suite's time is XLA compiling small programs, so it compiles them
# cheaply: without LLVM optimization, and with XLA:CPU's older elemental emitters instead of its
# fusion emitters (tests/test_vmap.py: 86 s -> 64 s with the first flag, then 79 s -> 47 s with
# the second, one run each, side by side; the whole suite, 1132 s in CI at f95a824 -> 589 s here).
# The values differ only in rounding, and the floors job below compiles at XLA's defaults.
# Subprocesses and notebook kernels inherit the flags (tests/_devices.py).
FAST_COMPILE := --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false
test-suite: $(PY)
	$(PIP) install -e ".[dev]"
	XLA_FLAGS="$(FAST_COMPILE) $$XLA_FLAGS" \
	  $(PY) -m pytest -n auto -q --durations=25 tests jdeq --doctest-modules

# The core tests and the README example at the exact floors of pyproject.toml, in a venv of
# their own (cached under .cache/floors; the first run downloads the wheels).
test-floors: $(PY)
	$(PY) .ci/floors.py

# Mutation testing of the covered modules (.ci/mutation.py, not part of `make test`): writes
# docs/mutation.md and docs/mutation.json. `mutation` runs SAMPLE mutants per module drawn at
# random (an estimate of each score, about an hour on 2 cores for every module);
# `mutation-complete` runs every mutant (hours per module). MODULES=... runs a subset.
SAMPLE ?= 10
mutation: $(PY)
	$(PIP) install -e ".[dev,mutation]"
	$(PY) .ci/mutation.py --sample $(SAMPLE) $(MODULES)

mutation-complete: $(PY)
	$(PIP) install -e ".[dev,mutation]"
	$(PY) .ci/mutation.py $(MODULES)

# The API reference site (mkdocs.yml) into site/.
docs: $(PY)
	$(PIP) install -e ".[docs]"
	$(VENV)/bin/mkdocs build --strict --site-dir site
