# Duet: the two commands a newcomer needs are `make run` and `make test`.
# Both first install the few Debian packages the build needs (with sudo when not root).

# Debian packages the build and tests need beyond a Rust toolchain and gcc.
DEBIAN_PACKAGES := pkg-config cmake nasm

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: deps run server test bench

deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; \
	fi

# The app (for now: the embedded signaling server on 127.0.0.1:8787).
run: deps
	cargo run --release -p duet -- server

# The standalone signaling server.
server: deps
	cargo run --release -p signaling-server -- --listen 127.0.0.1:8787

# Formatting, lints and every test of the workspace.
test: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace

# The signaling load benchmark (prints JSON); see docs/PERFORMANCE.md.
bench: deps
	cargo bench -p signaling-server --bench sigbench
