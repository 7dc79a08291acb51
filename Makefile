# The two commands of the README:  make lab  |  make test
# Each creates the virtual environment it needs in .venv (no root needed).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# In this .venv torch 2.14.1 and torchvision 0.29.1 are pinned (pip never downloads a newer multi-GB
# build; the package itself asks only for lower bounds, so other environments keep their torch).
TORCH   = torch==2.14.1 torchvision==0.29.1

.PHONY: lab test lint venv clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[test]" $(TORCH)
	touch $@

venv: $(VENV)/.installed

lab: venv
	$(BIN)/jupyter lab --ip=127.0.0.1 --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/01_tour_and_setup.ipynb

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
