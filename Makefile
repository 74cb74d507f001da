# One command each on a fresh machine: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; a bare `torch` would pull CUDA.
TORCH_PIN ?= torch==2.13.0

.PHONY: install browser lint test test-fast demo bench clean

install: $(VENV)/.installed browser

# The dashboard's browser test drives Debian's chromium; where it is missing and we are root,
# apt installs it. Never fails: without it that one test skips and says why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "no chromium/chromedriver (needs root and apt-get: apt-get install chromium" \
	       "chromium-driver); the dashboard browser test will skip"; \
	elif DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
	     || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	          apt-get install -y -q chromium chromium-driver; }; then :; \
	else echo "apt-get could not install chromium chromium-driver; the dashboard browser" \
	          "test will skip"; fi

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,eval]'
	touch $@

# pyflakes, bugbear, naming and import order (pyproject.toml [tool.ruff.lint])
lint: install
	$(BIN)/ruff check .

# Two workers, each test file on one of them (its module fixtures, its order): the suite's
# tests mostly wait on the processes they start, and hold their windows with two suites at
# once on two cores. TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q --durations=20 -n $(TEST_WORKERS) --dist loadfile

# Pure functions and baby models only: no processes, no sockets, seconds each.
test-fast: install
	$(BIN)/python -m pytest -q -m "not integration and not root"

demo: install
	$(BIN)/testbed demo --out demo-out

bench: install
	$(BIN)/python bench/shard_split.py

clean:
	rm -rf $(VENV) demo-out *.egg-info
