# `make demo` and `make test` are the README's quick start; both install .venv first when needed.
VENV ?= .venv
export VENV

.PHONY: install demo test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

demo: install  # a fresh demo run each time: pretrain refuses to overwrite an existing run directory
	rm -rf runs/demo
	$(VENV)/bin/hnmix pretrain --config examples/demo.yaml

test: install
	$(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check hnmix tests
