# m2dino_jax: `make test` and `make demo` create .venv on first use and install the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo demo-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check m2dino_jax configs launch tests

# test files run on TEST_WORKERS processes (pytest-xdist), a whole file per worker so module fixtures are shared
TEST_WORKERS ?= 2

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	$(BIN)/python -m m2dino_jax.demo

demo-all: $(STAMP)
	$(BIN)/python -m m2dino_jax.demo --all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
