# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs everything, runs the Noisy Student loop on the bundled digits
#   make test   creates .venv, installs everything, runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned so that pip takes the wheels a machine already has in its cache or
# local index; any CUDA or CPU build of torch >= 2.6 works.
TORCH ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/nstudent demo

test: $(VENV)/.installed
	$(PY) -m pytest

# Format, lint and type checks (ruff, mypy); CI runs them before the tests.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
