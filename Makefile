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
# "no tests". XLA compiles without LLVM optimization here: most of the suite's time is compiling
# small programs, and -O0 takes a quarter off it (tests/test_vmap.py 86 s -> 64 s, one run each,
# side by side); the values differ only in rounding, and the floors job below compiles at the
# default level. Subprocesses and notebook kernels inherit the flag (tests/_devices.py).
test-suite: $(PY)
	$(PIP) install -e ".[dev]"
	XLA_FLAGS="--xla_backend_optimization_level=0 $$XLA_FLAGS" \
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
