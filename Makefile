# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint build pure bench system-deps clean constraints

$(STAMP): pyproject.toml setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# constraints.txt afresh: the newest releases pyproject.toml's ranges admit, in a scratch venv.
# Then `make test` on them before committing the file.
constraints:
	rm -rf .venv-constraints
	python3 -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install -q -e '.[test]'
	sed -n '/^#/p' constraints.txt > constraints.txt.new
	.venv-constraints/bin/python -m pip freeze --exclude-editable >> constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints

# Compile the per-request modules with mypyc, in place (see setup.py). `make pure` undoes it.
build: $(STAMP)
	APIGATE_COMPILE=1 $(PY) setup.py -q build_ext --inplace --force

pure:
	find src -name '*.so' -delete

demo: $(STAMP)
	$(MAKE) build || echo "make demo: compiling failed (no C compiler?): running pure Python"
	$(VENV)/bin/apigate demo

system-deps:
	scripts/install-system-deps
	scripts/install-browser

lint: $(STAMP)
	$(PY) -m ruff check src tests bench setup.py
	$(PY) -m ruff format --check src tests bench setup.py
	$(PY) -m mypy

# Both builds: the pure-Python one on the unit and conformance tests, then the compiled one
# (what `make demo` and the benchmark run) on the whole suite.
test: $(STAMP) system-deps lint
	$(MAKE) pure
	APIGATE_EXPECT_BUILD="pure" $(PY) -m pytest -q -p no:cacheprovider tests/unit tests/conformance
	$(MAKE) build
	APIGATE_EXPECT_BUILD="compiled" $(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP) build
	$(PY) bench/run.py

clean: pure
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
