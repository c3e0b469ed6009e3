# The README's two commands: `make demo` and `make test`. Both set up the host first
# (idempotent: installs Debian packages, starts virtlogd/libvirtd, builds the venv).
.PHONY: setup guest demo test check lint unit

setup:
	scripts/setup-host

guest: setup
	scripts/build-test-guest

demo: guest
	scripts/demo

check:
	.venv/bin/ruff check vmarchive tests scripts
	.venv/bin/ruff format --check vmarchive tests
	.venv/bin/mypy
	.venv/bin/lint-imports

test: guest check
	scripts/run-tests
