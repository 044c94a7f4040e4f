#!/usr/bin/env bash
# Builds kvstrata, starts a cache node on this machine and runs the demo against
# it: a prefill worker process publishes the KV blocks of a few prompts, a
# decode worker process looks them up and fetches them.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cmake --preset default
cmake --build --preset default --target kvstrata-node kvstrata

workdir=$(mktemp -d)
cleanup() {
  [ -n "${node_pid:-}" ] && kill "$node_pid" 2>/dev/null && wait "$node_pid" 2>/dev/null
  rm -rf "$workdir"
}
trap cleanup EXIT

./build/cachenode/kvstrata-node --listen=127.0.0.1:0 --port_file="$workdir/port" \
  --dram_bytes=$((2 << 30)) --prefault 2>"$workdir/node.log" &
node_pid=$!
for _ in $(seq 1 300); do [ -s "$workdir/port" ] && break; sleep 0.1; done
[ -s "$workdir/port" ] || { cat "$workdir/node.log"; echo "node did not start" >&2; exit 1; }
node="127.0.0.1:$(cat "$workdir/port")"
echo "kvstrata-node listening on $node"

./build/tools/kvstrata demo --node="$node" "$@"
echo
./build/tools/kvstrata stat --node="$node"
