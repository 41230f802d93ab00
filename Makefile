# EarthTwin: `make run` runs the default case, `make test` the serial and MPI test suites.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CASE ?= cases/sqg_twin.yaml

.PHONY: install run test test-serial test-mpi bench-dapper clean docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/twin run $(CASE) --overwrite

test: test-serial test-mpi

test-serial: $(STAMP)
	$(PY) -m pytest -q -m "not mpi and not slow"

test-mpi: $(STAMP)
	timeout 900 $(VENV)/bin/mpiexec -n 2 $(PY) -m mpi4py -m pytest -q --with-mpi -m mpi -p no:cacheprovider

bench-dapper:
	test -x .venv-bench/bin/python || ($(PYTHON) -m venv .venv-bench && .venv-bench/bin/pip install --quiet torch==2.13.0 dapper)
	.venv-bench/bin/pip install --quiet -e .
	.venv-bench/bin/python benchmarks/dapper_l96.py

clean:
	rm -rf $(VENV) out build *.egg-info

docs: $(STAMP)
	$(PY) -m twin.docs README.md
