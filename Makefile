# Entry points everyone relies on: setup (idempotent), demo, test, bench.
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PKGS := iproute2 iptables conntrack iputils-ping docker-compose chromium chromium-driver

.PHONY: setup demo test lint bench mutate apt clean

setup: $(VENV)/.installed node_modules/.installed apt

# constraints.txt pins every transitive package (pip freeze of a working venv), so a fresh
# setup installs what the tests ran with; pyproject.toml pins what the code imports.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The NAT lab tests need ip/iptables/conntrack/ping, the compose test Debian's docker-compose
# parser, the dashboard test Debian's chromium and chromedriver; install them when root and
# missing, else say so (those tests then skip, saying why).
apt:
	@missing=""; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	command -v conntrack >/dev/null || missing="$$missing conntrack"; \
	command -v ping >/dev/null || missing="$$missing iputils-ping"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "not root: lab tests will skip (missing:$$missing)"; fi; \
	fi

demo: setup
	$(PY) -m scripts.demo

# Two pytest-xdist workers (most tests wait on timers, chains and subprocesses, not on the CPU),
# each test module whole on one worker (--dist loadscope), so its module fixtures (a federation, a
# lab) are built once; two workers never run more than two tests at once, which the lab's timing
# bounds allow for. TEST_WORKERS=0 runs everything in one process.
# pytest exit code 5 means "no tests collected": not a failure for CI.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadscope --durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# The linter and the formatter's check alone (make test runs them too, as tests/test_lint.py).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit $$?; done

# Mutation testing of the security core (minutes; not part of `make test`): prints
# mutation_kill_rate and every surviving mutant. Configuration: [tool.mutmut] in pyproject.toml.
mutate: setup
	$(PY) -m pip install -q -e '.[mutate]'
	$(PY) -m scripts.mutate

clean:
	rm -rf $(VENV) node_modules .pytest_cache mutants mutants.log
