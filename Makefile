# Every target bootstraps .venv from nothing: the standard library's venv, then pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo bench install browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev,aws]'
	touch $(STAMP)

install: $(STAMP)

# The browser test drives Debian's Chromium through its chromedriver; nothing downloads a browser.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing Debian's chromium and chromium-driver"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: $(STAMP) browser
	$(BIN)/python -m pytest

demo: $(STAMP)
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/nst demo

bench: $(STAMP)
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/engine.py
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/batch.py
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/speed.py
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/speed.py --memory 1024
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/scale.py --pairs 500

clean:
	rm -rf $(VENV) demo-output
