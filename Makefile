# bnlab: `make audit` runs the claims audit, `make test` the test suite. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bnlab-installed
WARMUP_MSG := "Warming bnlab's kernel cache: compiling the numba CPU kernels (batch norm and its fused ReLU, recurrent layers; two processes) once into numba's on-disk cache, and building the small-call C++ extension into ~/.cache/bnlab (a third process, which then compiles the fused kernels' float64 variants): about 5-7 minutes on a fresh checkout, seconds when warm..."

.PHONY: audit test bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@echo $(WARMUP_MSG)
	$(PY) -m bnlab.kernels.warmup
	touch $(STAMP)

audit: $(STAMP)
	$(VENV)/bin/bnlab audit --profile quick

test: $(STAMP)
	@echo $(WARMUP_MSG)
	$(PY) -m bnlab.kernels.warmup
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

bench: $(STAMP)
	$(VENV)/bin/bnlab bench

clean:
	rm -rf $(VENV) runs .pytest_cache
