PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: install
	$(BIN)/pytest -q

demo: install
	$(BIN)/python -m dstackd.demo

bench: install
	$(BIN)/python bench/append.py
	$(BIN)/python bench/replay.py
	$(BIN)/python bench/claim.py
	$(BIN)/python bench/cli_startup.py

clean:
	rm -rf $(VENV) build *.egg-info
