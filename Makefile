# Two commands on a fresh machine: `make demo` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.installed-dev
# The notebooks' kernel (their metadata names it): this venv's python, registered inside the venv, so
# papermill and JupyterLab run from .venv find it and two clones never overwrite each other's.
KERNEL_NAME := pyconv-workbook
KERNEL := $(VENV)/share/jupyter/kernels/$(KERNEL_NAME)/kernel.json
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
ALLOW_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

.PHONY: setup data demo test lint lab tensorboard clean-runs

setup: $(INSTALLED) $(KERNEL) data

$(INSTALLED): pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[export]'
	touch $@

$(KERNEL): $(INSTALLED)
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL_NAME) --display-name "Python (pyconv-workbook)"

$(DEV_INSTALLED): $(INSTALLED)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: setup
	mkdir -p runs/demo
	for notebook in notebooks/0*.ipynb; do \
		$(PY) -m papermill --log-output $$notebook runs/demo/$$(basename $$notebook) || exit 1; \
	done

lint: $(DEV_INSTALLED)
	$(PY) -m ruff check pyconv_core tests
	$(PY) -m ruff format --check pyconv_core tests
	$(PY) -m mypy

test: setup lint
	$(PY) -m pytest -q --nbval-lax --nbval-current-env tests notebooks

lab: setup
	$(VENV)/bin/jupyter lab $(ALLOW_ROOT) --ServerApp.root_dir=$(CURDIR)

# every run's scalars and parameters (runs/<name>/events.out.tfevents.*), on localhost only
tensorboard: setup
	$(VENV)/bin/tensorboard --logdir runs
