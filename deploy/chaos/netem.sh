#!/bin/sh
# Chaos sidecar (docker compose --profile chaos): runs in a node's network namespace and adds
# WAN latency, jitter and loss with tc netem to the interface that leads to its peers (the
# `wan` network; the region network stays clean). Stopping the sidecar removes the qdisc.
#
#   NETEM_PEERS   host names of the peers, space-separated (required)
#   NETEM_DELAY   one-way delay added to this node's outgoing WAN traffic (default 50ms);
#                 the round trip between two regions is the sum of both sides' delays
#   NETEM_JITTER  delay variation (default 0ms)
#   NETEM_LOSS    packet loss (default 0%)
set -eu

delay=${NETEM_DELAY:-50ms}
jitter=${NETEM_JITTER:-0ms}
loss=${NETEM_LOSS:-0%}
peers=${NETEM_PEERS:?set NETEM_PEERS to the peer host names}

# Peers may still be starting: wait until one resolves, then ask the kernel which interface
# routes to it.
dev=""
while [ -z "$dev" ]; do
  for peer in $peers; do
    # shellcheck disable=SC2046
    set -- $(getent hosts "$peer" || true)
    if [ $# -gt 0 ]; then
      dev=$( (ip -o route get "$1" || true) | sed -n 's/.* dev \([^ ]*\).*/\1/p')
      [ -n "$dev" ] && break
    fi
  done
  [ -n "$dev" ] || sleep 1
done

tc qdisc replace dev "$dev" root netem delay "$delay" "$jitter" loss "$loss"
echo "netem on $dev: delay $delay jitter $jitter loss $loss (peers: $peers)"

cleanup() {
  tc qdisc del dev "$dev" root 2>/dev/null || true
  echo "netem removed from $dev"
  exit 0
}
trap cleanup TERM INT
while :; do
  sleep 3600 &
  wait $! || true
done
