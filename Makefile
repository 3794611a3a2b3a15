# Every target bootstraps .venv from nothing: the standard library's venv, then pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test demo bench install browser clean gpu-wheels

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

# Two processes (tests/conftest.py gives each one torch thread and its own Prefect home): much
# of the suite waits on servers and subprocesses, and one process would leave a core idle
# meanwhile. loadfile keeps each module on one process, so a module's fixtures start once (the
# production end-to-end module's server and three workers). Not loadgroup: with xdist 3.8 and
# pytest 9.2 it split a module marked xdist_group over both processes, starting its server twice.
# Plain `pytest` (benchmarks/gpu.sh on a machine without xdist) runs in one process.
test: $(STAMP) browser
	$(BIN)/python -m pytest -n 2 --dist loadfile

demo: $(STAMP)
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/nst demo

bench: $(STAMP)
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/engine.py
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/batch.py
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/speed.py
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/speed.py --memory 1024 --evals 60
	PREFECT_HOME=$${PREFECT_HOME:-$(CURDIR)/.prefect-home} $(BIN)/python benchmarks/scale.py --pairs 500
	$(BIN)/python benchmarks/throughput.py --sizes 256
	$(BIN)/python benchmarks/lbfgs.py
	$(BIN)/python benchmarks/launches.py

# Wheels benchmarks/gpu.sh installs on a lent GPU machine that has Python 3.12, torch, torchvision,
# Pillow, numpy and pytest but no network: pydantic and its dependencies, pinned to what .venv
# has, for CPython 3.12 on manylinux x86-64 (pip matches each manylinux tag exactly).
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
              typing-extensions==4.16.0
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)
	@ls .whl

clean:
	rm -rf $(VENV) demo-output
