#!/usr/bin/env bash
# The flash-crowd benchmark: a `shoal-master` (upload 8 MiB/s) and N `shoal fetch` processes
# (upload 4 MiB/s each) on loopback, all started at once on one MIB-MiB file. Prints p50, p90
# and max completion over the Kumar-Ross lower bound, origin egress over F, and upload idle
# time. Usage: bench/flash-crowd.sh [N] [MIB]   (default 12 64)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p shoal-node -p shoal-master
cargo build --release -q -p shoal-examples --example flash_crowd
exec target/release/examples/flash_crowd "${1:-12}" "${2:-64}" --bin-dir target/release
