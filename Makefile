# Two commands on a fresh machine: `make demo` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test lab clean-runs

setup: $(INSTALLED) data

$(INSTALLED): pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e .
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: setup
	mkdir -p runs/demo
	$(PY) -m papermill --log-output notebooks/00_quickstart.ipynb runs/demo/00_quickstart.ipynb
	$(PY) -m papermill --log-output notebooks/01_classification.ipynb runs/demo/01_classification.ipynb

test: setup
	$(PY) -m pytest -q --nbval-lax --nbval-current-env tests notebooks

lab: setup
	$(VENV)/bin/jupyter lab notebooks
