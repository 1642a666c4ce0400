# `make demo` and `make test` do the whole set-up on a fresh Linux machine: a .venv with torch,
# then tinykern built against that torch (--no-build-isolation), then the demo or the tests.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
MAX_JOBS ?= 2
BIN = $(VENV)/bin

.PHONY: install demo test bench info fuzz clean

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

# `make fuzz FUZZ_SECONDS=600 FUZZ_TARGETS=fuzz/fuzz_gguf.py`: atheris campaigns, each target for
# FUZZ_SECONDS from seeds it builds itself; prints inputs tried, crashes, hangs, silent successes.
FUZZ_SECONDS ?= 60
FUZZ_TIMEOUT ?= 10
FUZZ_TARGETS ?= $(wildcard fuzz/fuzz_*.py)

fuzz: install
	$(BIN)/pip install -q atheris
	$(BIN)/python fuzz/campaign.py --seconds $(FUZZ_SECONDS) --timeout $(FUZZ_TIMEOUT) $(FUZZ_TARGETS)

clean:
	rm -rf build *.egg-info tinykern/_C*.so tinykern/_build_info.json $(VENV)/.installed
