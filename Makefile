# The two commands a newcomer needs:   make train   |   make test
# Both create the virtual environment .venv from requirements.lock on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test test-slow lint clean-venv

$(BIN)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/python src/train.py $(ARGS)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile $(ARGS)

test-slow: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow $(ARGS)

lint: setup
	$(BIN)/ruff check src tests bench && $(BIN)/ruff format --check src tests bench

clean-venv:
	rm -rf $(VENV)
