# Duet: the two commands a newcomer needs are `make run` and `make test`.
# Both first install the few Debian packages the build needs (with sudo when not root).

# Debian packages the build and tests need beyond a Rust toolchain and gcc.
# xvfb, x11-apps (xwd) and the Mesa/X libraries: the real-window test (tests/window.rs);
# iproute2 and iptables: the NAT namespace test (tests/nat.rs); coturn: its
# turnutils_uclient, an independent TURN client for signaling-server/tests/turn.rs;
# chromium and nodejs: the web client's browser tests (tests/browser.rs, which runs
# `npm ci` in tests/browser for the pinned playwright-core; never a browser download);
# redis-server: the cluster-mode tests (signaling-server/tests/cluster.rs start their own);
# libvpx-dev: VP8 in the native client (env-libvpx-sys links Debian's libvpx 1.12);
# firefox-esr: the Firefox tests (tests/firefox.rs, puppeteer-core over WebDriver BiDi),
# whose calls run on VP8 (no H.264 in Firefox without its downloaded OpenH264 plugin).
DEBIAN_PACKAGES := pkg-config cmake nasm libclang-dev libasound2-dev libwayland-dev \
	pulseaudio pulseaudio-utils libasound2-plugins \
	xvfb x11-apps libegl1 libgl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcursor1 libxrandr2 libxi6 \
	iproute2 iptables coturn chromium nodejs redis-server \
	libvpx-dev firefox-esr

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# PulseAudio needs a runtime directory; tests talk to a null sink (no sound card needed).
export XDG_RUNTIME_DIR ?= /tmp/duet-runtime-$(shell id -u)
# npm ci in tests/browser: puppeteer-core and playwright-core never download a browser
# (the tests drive Debian's chromium and firefox-esr); these make sure of it.
export PUPPETEER_SKIP_DOWNLOAD := 1
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: deps audio run server test bench

deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing; \
	fi

# The app: the desktop window (starts the signaling server in-process when none answers
# on 127.0.0.1:8787).
run: deps
	cargo run --release -p duet

# The standalone signaling server.
server: deps
	cargo run --release -p signaling-server -- --listen 127.0.0.1:8787

# A PulseAudio null sink for the audio device tests: starts a daemon if none runs and
# adds a sink named nullsink if missing (on a desktop it leaves your devices alone).
audio:
	@mkdir -p $(XDG_RUNTIME_DIR) && chmod 700 $(XDG_RUNTIME_DIR)
	@pactl info >/dev/null 2>&1 || { pulseaudio -n --daemonize=yes --exit-idle-time=-1 \
		-L module-native-protocol-unix -L module-always-sink >/dev/null 2>&1; sleep 1; }
	@pactl list short sinks | grep -q nullsink || \
		pactl load-module module-null-sink sink_name=nullsink rate=48000 >/dev/null

# Formatting, lints and every test of the workspace. The real-window test leaves its
# screenshots in target/window-test/, the browser tests theirs in target/browser-test/
# (CI artifacts).
test: deps audio
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	PULSE_SINK=nullsink PULSE_SOURCE=nullsink.monitor DUET_REQUIRE_WINDOW_TEST=1 \
		DUET_REQUIRE_NAT_TEST=1 DUET_REQUIRE_AUDIO_TEST=1 DUET_REQUIRE_COTURN_TEST=1 \
		DUET_REQUIRE_BROWSER_TEST=1 DUET_REQUIRE_REDIS_TEST=1 \
		cargo test --workspace

# The benchmarks (print JSON); see docs/PERFORMANCE.md.
bench: deps
	cargo bench -p signaling-server --bench sigbench
	cargo bench -p signaling-server --bench turnbench
