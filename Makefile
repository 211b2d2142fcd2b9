# Set-up and the two everyday commands. `make demo` and `make test` each create
# the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: install demo test

$(BIN)/seqsetvae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first, so the project's torch range installs nothing more.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/seqsetvae

install: $(BIN)/seqsetvae

demo: install
	$(BIN)/seqsetvae run --out $(OUT)

test: install
	$(BIN)/python -m pytest -q
