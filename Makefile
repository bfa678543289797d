# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch that CI machines carry; a bare `torch` would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint install install-dev system-packages system-packages-test clean

run: install
	$(VENV)/bin/promptcast run

test: system-packages-test install-dev
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: install-dev
	$(VENV)/bin/ruff check .

system-packages:
	./scripts/install-system-packages.sh run

system-packages-test:
	./scripts/install-system-packages.sh test

$(VENV)/.created: | system-packages
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

clean:
	rm -rf $(VENV) out *.egg-info
