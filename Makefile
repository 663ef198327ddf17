# Two commands: `make run` (the main job) and `make test` (ruff, then the full suite).
# Each sets itself up: a .venv with torch==2.13.0 installed first (so pip never pulls a
# CUDA build of a newer torch), then tokenwave and its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenwave-installed
export OMP_NUM_THREADS ?= 2
PROMPT ?= a slow, sad piano ballad in A minor

.PHONY: run test lint setup bench clean

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]" -c constraints.txt
	# The reference encodec package (test oracle) pins an old torchaudio: install without deps.
	$(BIN)/python -m pip install -q --no-deps encodec==0.1.1
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	mkdir -p out
	$(BIN)/tokenwave generate "$(PROMPT)" --duration 10 --seed 0 -o out/music.wav --force

test: lint
	$(BIN)/python -m pytest tests

# One line length and the pyflakes/pycodestyle rules, configured in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.codec

clean:
	rm -rf $(VENV) out .pytest_cache
