#!/usr/bin/env bash
# Soak run of the audit log's fault handling (issue 16): many kill -9 rounds and disk-full cycles, on this
# machine, against a throwaway PostgreSQL the tests start themselves. Needs root for the tmpfs mounts.
#   scripts/soak.sh                 # 200 kill -9 rounds, 50 disk-full cycles
#   KILL9_ROUNDS=1000 DISK_FULL_CYCLES=200 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$pgbin" ] && export PATH="$PATH:$pgbin"
export KILL9_ROUNDS="${KILL9_ROUNDS:-200}" DISK_FULL_CYCLES="${DISK_FULL_CYCLES:-50}"
echo "kill -9 rounds: $KILL9_ROUNDS; disk-full cycles: $DISK_FULL_CYCLES"
cargo test --test token kill_9_during_signed_drops -- --nocapture
cargo test --test audit a_disk_that_fills_and_empties -- --nocapture
cargo test --lib a_partial_append_on_a_full_disk -- --nocapture
