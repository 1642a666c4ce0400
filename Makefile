# `make demo` and `make test` do the whole set-up on a fresh Linux machine: a .venv with torch,
# then tinykern built against that torch (--no-build-isolation), then the demo or the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
MAX_JOBS ?= 2
BIN = $(VENV)/bin

.PHONY: install demo test bench info clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" numpy setuptools wheel ninja pybind11
	MAX_JOBS=$(MAX_JOBS) $(BIN)/pip install -q --no-build-isolation -e ".[test,sd,bench,rqvae]"
	touch $@

demo: install
	$(BIN)/python -m tinykern demo
	$(BIN)/python -m tinykern rqvae demo --out rqvae-demo.png

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python -m pytest -q bench --benchmark-only

info: install
	$(BIN)/python -m tinykern info

clean:
	rm -rf build *.egg-info tinykern/_C*.so tinykern/_build_info.json $(VENV)/.installed
