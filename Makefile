# One entry point for CI and for people: `make test` runs everything CI runs.
#
#   make test    lint + Rust tests + build the abi3 wheel + install it into a venv + stubtest + pytest
#   make lint    cargo fmt --check, clippy -D warnings, ruff check, ruff format --check
#   make wheel   maturin build --release (one abi3 wheel for every CPython >= 3.10)
#   make demo    install the wheel into the venv and run `ferrolm demo`

PYTHON ?= python3
VENV ?= .ci-venv
VPY := $(VENV)/bin/python
WHEEL_DIR := dist

.PHONY: test lint rust-test wheel venv install pytest demo clean

test: lint rust-test install pytest

venv:
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet "maturin>=1.7,<2" "ruff>=0.6"

lint: venv
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

rust-test:
	cargo test --all-targets

wheel: venv
	rm -rf $(WHEEL_DIR)
	$(VENV)/bin/maturin build --release --out $(WHEEL_DIR)

# The tests import the INSTALLED wheel: python/ is not on sys.path (python-source layout).
# The test dependencies are the wheel's `test` extra (pyproject.toml is their one list).
install: wheel
	$(VPY) -m pip install --quiet --force-reinstall --no-deps $(WHEEL_DIR)/ferrolm-*.whl
	$(VPY) -m pip install --quiet "$$(ls $(WHEEL_DIR)/ferrolm-*.whl)[test]"

pytest:
	$(VPY) -c "import ferrolm, os; assert 'site-packages' in ferrolm.__file__, ferrolm.__file__"
	$(VPY) -m mypy.stubtest ferrolm._core
	$(VPY) -m pytest -q tests

demo: install
	$(VENV)/bin/ferrolm demo

clean:
	rm -rf $(VENV) $(WHEEL_DIR) target
