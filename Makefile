# `make test` and `make book` each create or refresh .venv from requirements.txt on their own.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Jupyter finds the venv's python3 kernel before any other one on the machine;
# TensorFlow's C++ start-up lines stay out of every run.
export JUPYTER_PATH := $(CURDIR)/$(VENV)/share/jupyter
export TF_CPP_MIN_LOG_LEVEL := 3
export TF_ENABLE_ONEDNN_OPTS := 0
export KERAS_BACKEND := tensorflow
export PYTHONHASHSEED := 0

.PHONY: venv test check book screenshots notebooks bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

## test: every test: the package, the notebook checks, nbval on every chapter, the book build,
## spread over the machine's cores a file at a time (each notebook keeps one kernel)
test: venv
	$(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder

## check: one chapter alone (nbval on it) and the static notebook checks, e.g.
##   make check NB=chapters/05_mha_torch.ipynb
check: venv
	@test -n "$(NB)" || { echo "usage: make check NB=chapters/NN_name.ipynb"; exit 2; }
	$(PY) -m pytest $(NB) tests/test_notebooks.py

## book: builds the site into _build/html exactly from the outputs stored in the notebooks
book: venv
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

## screenshots: builds the site, then saves every chapter, whole, at both widths, light and dark,
## to _build/screenshots/full/ (needs Chromium, as the browser test does)
screenshots: book
	$(PY) tools/screenshots.py

## notebooks: re-executes every chapter top to bottom in a fresh kernel and stores the outputs
notebooks: venv
	$(PY) tools/notebooks.py $(or $(NB),chapters/*.ipynb)

## bench: the like-for-like table: each of our layers (and chapter 13's threaded NumPy attention) beside
## the library implementation that does the same work, time (one process, interleaved, median of 7) and
## peak memory (a fresh process each); writes benchmarks/results/like_for_like.{csv,md}. About 4 min.
## `$(PY) benchmarks/run.py --sweep` adds the sweep over T = 128 ... 8192 (attention.csv, time.png, memory.png).
bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf _build .pytest_cache
