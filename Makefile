# The README's two commands: `make demo` and `make test`. Both set up the host first
# (idempotent: installs Debian packages, starts virtlogd/libvirtd, builds the venv).
.PHONY: setup guest demo test check lint unit

TESTPATH = tests:tests/unit:tests/integration:tests/store
#: Python scripts without the .py suffix (ruff and mypy look for it in directories)
PYSCRIPTS = scripts/gen-vectors scripts/gen-exit-codes

setup:
	scripts/setup-host

guest: setup
	scripts/build-test-guest

demo: guest
	scripts/demo

# mypy runs over the tests and scripts too: their helpers import each other across
# directories, and tests/ and tests/store/ each have a conftest module (two runs)
check:
	.venv/bin/ruff check vmarchive tests scripts $(PYSCRIPTS)
	.venv/bin/ruff format --check vmarchive tests scripts $(PYSCRIPTS)
	.venv/bin/mypy
	MYPYPATH=$(TESTPATH) .venv/bin/mypy --explicit-package-bases tests/*.py tests/unit tests/integration
	MYPYPATH=$(TESTPATH) .venv/bin/mypy --explicit-package-bases tests/store
	MYPYPATH=tests:scripts .venv/bin/mypy --explicit-package-bases scripts/*.py
	for f in $(PYSCRIPTS); do MYPYPATH=tests:scripts .venv/bin/mypy --explicit-package-bases $$f || exit 1; done
	.venv/bin/lint-imports

test: guest check
	scripts/run-tests
