# hpc-kernels: the targets other tools and the docs rely on. Run as root on Debian 12 or 13:
# they install packages, create the test users and start the local Slurm cluster.
#
#   make demo        set everything up, start the cluster, run the README demo as hk-alice
#   make test        the whole test suite, as the unprivileged user hk-alice, on the real cluster
#   make bench       relay transports vs direct IPC and an ssh tunnel, start-up of each runtime (podman cold/warm), 100 kernels at once, batches, nbgrader (docs/performance.md)

SHELL := /bin/bash
REPO := $(CURDIR)
TEST_USER := hk-alice
PYTEST_ARGS ?=
VENV := /opt/hpc-kernels/venv

.PHONY: setup install cluster-up cluster-down cluster-status demo test unit bench clean

setup:                          ## packages, users, the site venv with hpc-kernel on every user's PATH
	cluster/setup.sh $(REPO)

install:                        ## reinstall this tree into the site venv (cheap)
	cluster/setup.sh --venv-only $(REPO)

cluster-up:                     ## start slurmctld, munged and slurmd for c1, c2 (idempotent)
	cluster/setup.sh
	cluster/up.sh

cluster-down:                   ## stop what cluster-up started, by PID (idempotent)
	cluster/down.sh

cluster-status:
	cluster/status.sh

demo: setup cluster-up            ## the README's walk-through, as hk-alice
	cluster/as-user.sh $(TEST_USER) / bash $(REPO)/cluster/demo.sh

# The tests run from a copy the test user can read, against the installed package. cluster/,
# bench/, the Makefile and .ci/ go with them: tests/test_commands.py reads them.
test: setup cluster-up            ## all tests, as hk-alice, on the real cluster
	@tmp=$$(mktemp -d /tmp/hk-tests.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	cp -r tests pyproject.toml cluster bench Makefile .ci "$$tmp"/ && chmod -R a+rX "$$tmp" && \
	cluster/as-user.sh $(TEST_USER) "$$tmp" $(VENV)/bin/pytest $(PYTEST_ARGS)

unit: setup                     ## only the tests that need no cluster
	@tmp=$$(mktemp -d /tmp/hk-tests.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	cp -r tests pyproject.toml cluster bench Makefile .ci "$$tmp"/ && chmod -R a+rX "$$tmp" && \
	cluster/as-user.sh $(TEST_USER) "$$tmp" $(VENV)/bin/pytest -m "not cluster" $(PYTEST_ARGS)

bench: setup cluster-up           ## measured side by side in one run; prints a table
	@tmp=$$(mktemp -d /tmp/hk-bench.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	cp -r bench "$$tmp"/ && chmod -R a+rX "$$tmp" && \
	cluster/as-user.sh $(TEST_USER) "$$tmp" $(VENV)/bin/python bench/bench_relay.py $(BENCH_ARGS) && \
	cluster/as-user.sh $(TEST_USER) "$$tmp" $(VENV)/bin/python bench/bench_startup.py && \
	cluster/as-user.sh $(TEST_USER) "$$tmp" $(VENV)/bin/python bench/bench_scale.py && \
	cluster/as-user.sh $(TEST_USER) "$$tmp" $(VENV)/bin/python bench/bench_batch.py && \
	cluster/as-user.sh $(TEST_USER) "$$tmp" $(VENV)/bin/python bench/bench_nbgrader.py

clean:
	rm -rf build *.egg-info
