# `make demo` and `make test` are the README's quick start; both install .venv first when needed.
VENV ?= .venv
export VENV

.PHONY: install demo test test-fast lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

demo: install  # a fresh demo run each time: pretrain refuses to overwrite an existing run directory
	rm -rf runs/demo
	$(VENV)/bin/hnmix pretrain --config examples/demo.yaml

test: install  # everything, the slow end-to-end runs (subprocesses, torchrun) included: what CI runs
	$(VENV)/bin/python -m pytest -q

test-fast: install  # without the tests marked slow: a few minutes less while developing
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check hnmix tests
