# The README's two commands: `make demo` and `make test`. Both set up the host first
# (idempotent: installs Debian packages, starts virtlogd/libvirtd, builds the venv).
.PHONY: setup guest demo test check lint unit

TESTPATH = tests:tests/unit:tests/integration:tests/store

setup:
	scripts/setup-host

guest: setup
	scripts/build-test-guest

demo: guest
	scripts/demo

# mypy runs over the tests too: their helpers import each other across directories, and
# tests/ and tests/store/ each have a conftest module (two runs)
check:
	.venv/bin/ruff check vmarchive tests scripts
	.venv/bin/ruff format --check vmarchive tests
	.venv/bin/mypy
	MYPYPATH=$(TESTPATH) .venv/bin/mypy --explicit-package-bases tests/*.py tests/unit tests/integration
	MYPYPATH=$(TESTPATH) .venv/bin/mypy --explicit-package-bases tests/store
	.venv/bin/lint-imports

test: guest check
	scripts/run-tests
