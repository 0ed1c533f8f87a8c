# One entry point for CI and for people: `make test` runs everything CI runs.
#
#   make test    lint + Rust tests + build the manylinux wheel + install it into a venv + stubtest + pytest
#                (the pytest run includes tests/test_packaging.py: auditwheel on the wheel, a fresh venv)
#                + the sdist built from scratch in a clean venv
#   make lint    cargo fmt --check, clippy -D warnings, ruff check, ruff format --check
#   make wheel   one abi3 wheel for every CPython >= 3.10 on Linux with glibc >= 2.17 (manylinux_2_17)
#   make wheel-freethreaded   the cp314t wheel (free-threaded CPython 3.14 cannot load abi3)
#   make sdist   the source archive; `make sdist-check` builds and imports it in a clean venv
#   make demo    install the wheel into the venv and run `ferrolm demo`

PYTHON ?= python3
VENV ?= .ci-venv
VPY := $(VENV)/bin/python
WHEEL_DIR := dist
BUILD_DIR := build

# The build tools, pinned: the wheel's compatibility is only as good as the tools that proved it.
MATURIN := maturin>=1.7,<2
# zig links against glibc 2.17's symbols, so the wheel runs on RHEL/Rocky 8, Ubuntu 20.04 and most
# clusters without a manylinux Docker image. 0.13: zig 0.14 links a UBSan runtime that breaks
# cargo-zigbuild builds of some crates (PyO3/maturin-action#335).
ZIGLANG := ziglang==0.13.0.post1
AUDITWHEEL := auditwheel==6.8.2
MANYLINUX := manylinux_2_17
# maturin's zig linker (cargo-zigbuild) finds zig as `python3 -m ziglang`, with the python named
# here: the venv's, where ziglang is installed (the python3 on PATH may not have it).
ZIG_ENV := CARGO_ZIGBUILD_PYTHON_PATH=$(abspath $(VPY))
BUILD_WHEEL := $(ZIG_ENV) $(VENV)/bin/maturin build --release --zig --compatibility $(MANYLINUX)

.PHONY: test lint rust-test wheel wheel-freethreaded sdist sdist-check venv install pytest demo clean

test: lint rust-test install pytest sdist-check

venv:
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet "$(MATURIN)" "ruff>=0.6" "$(ZIGLANG)" "$(AUDITWHEEL)"

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
	$(BUILD_WHEEL) --out $(WHEEL_DIR)

# PyO3 builds a version-specific cp314t extension (abi3 does not exist for free-threaded 3.14);
# maturin uses its own record of 3.14t's build settings, so no 3.14t interpreter is needed to build.
wheel-freethreaded: venv
	$(BUILD_WHEEL) --interpreter python3.14t --out $(WHEEL_DIR)

sdist: venv
	rm -f $(WHEEL_DIR)/ferrolm-*.tar.gz
	$(VENV)/bin/maturin sdist --out $(WHEEL_DIR)

# What a user without a wheel does: pip builds the sdist (maturin from PyPI, cargo, this Rust
# toolchain) in a venv that has nothing else. The build honours CARGO_TARGET_DIR (.ci/run sets it),
# so after the first run on a machine only ferrolm itself is compiled again, not its dependencies.
# The archive's files all carry maturin's fixed, reproducible date (2006), which cargo would take
# for "unchanged since the last build" and reuse a stale library: unpack with fresh dates (tar -m)
# so ferrolm is always rebuilt from what the archive holds. LTO is off here (the check is that the
# archive builds, not how fast the result runs): it saves most of the rebuild's time.
SDIST_CHECK_ENV := CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
sdist-check: sdist
	rm -rf $(BUILD_DIR)/sdist-venv $(BUILD_DIR)/sdist-src
	mkdir -p $(BUILD_DIR)/sdist-src
	tar -xzmf "$$(ls $(WHEEL_DIR)/ferrolm-*.tar.gz)" -C $(BUILD_DIR)/sdist-src
	$(PYTHON) -m venv $(BUILD_DIR)/sdist-venv
	$(SDIST_CHECK_ENV) $(BUILD_DIR)/sdist-venv/bin/python -m pip install --quiet $(BUILD_DIR)/sdist-src/ferrolm-*/
	cd / && $(abspath $(BUILD_DIR))/sdist-venv/bin/python -c "import ferrolm; \
	  tok = ferrolm.Tokenizer.train(iter(['hello world'] * 50), 300, show_progress=False); \
	  assert tok.decode(tok.encode('hello world')) == 'hello world'; \
	  print('sdist: ferrolm', ferrolm.__version__, 'built, installed and imported from', ferrolm.__file__)"

# The tests import the INSTALLED wheel: python/ is not on sys.path (python-source layout).
# The test dependencies are the wheel's `test` extra (pyproject.toml is their one list).
install: wheel
	$(VPY) -m pip install --quiet --force-reinstall --no-deps $(WHEEL_DIR)/ferrolm-*-abi3-*.whl
	$(VPY) -m pip install --quiet "$$(ls $(WHEEL_DIR)/ferrolm-*-abi3-*.whl)[test]"

pytest:
	$(VPY) -c "import ferrolm, os; assert 'site-packages' in ferrolm.__file__, ferrolm.__file__"
	$(VPY) -m mypy.stubtest ferrolm._core
	$(VPY) -m pytest -q tests

demo: install
	$(VENV)/bin/ferrolm demo

clean:
	rm -rf $(VENV) $(WHEEL_DIR) $(BUILD_DIR) target
