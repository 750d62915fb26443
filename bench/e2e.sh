#!/usr/bin/env bash
# End-to-end benchmark, in one run on this machine, loopback only:
#   1. one `shoal fetch` of a SIZE_MIB file from a `shoal-master` (TCP + TLS + yamux,
#      every block verified, written to disk);
#   2. `curl` fetching the same file from nginx (plain HTTP) on loopback.
# For both: throughput, CPU seconds per GiB (user+sys of the client and the server), and peak
# RSS of the shoal node and master. Usage: bench/e2e.sh [SIZE_MIB]   (default 1024)
# The files (about 4 x SIZE_MIB) go under $TMPDIR (default /tmp); TMPDIR=/dev/shm keeps them in
# memory when the disk is short of space (then "to disk" means to tmpfs, for nginx too).
# SHOAL_BIN=/abs/dir runs the `shoal` and `shoal-master` found there instead of building
# target/release (to alternate two builds in one session). FETCH_ARGS adds options to both
# `shoal fetch` runs, e.g. FETCH_ARGS=--direct-io.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/shoal-bench.XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null; rm -rf "$WORK"' EXIT

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "installing nginx (Debian package) for the HTTP baseline" >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx curl >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -n "${SHOAL_BIN:-}" ]; then
  BIN=$SHOAL_BIN
else
  cargo build --release -q -p shoal-node -p shoal-master
  BIN=target/release
fi

head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$WORK/file.bin"
BYTES=$(stat -c %s "$WORK/file.bin")

cpu_of() { # pid -> user+sys seconds from /proc (clock ticks)
  awk -v t="$(getconf CLK_TCK)" '{print ($14+$15)/t}' "/proc/$1/stat"
}

# --- shoal ---
/usr/bin/env time -f "%U %S %M" -o "$WORK/master.time" \
  "$BIN/shoal-master" --data-dir "$WORK/m" --listen /ip4/127.0.0.1/tcp/0 --listen /ip4/127.0.0.1/udp/0/quic-v1 >/dev/null 2>"$WORK/master.log" &
for _ in $(seq 200); do [ "$(cat "$WORK/m/bootstrap.addr" 2>/dev/null | wc -l)" -ge 2 ] && break; sleep 0.05; done
TCP_ADDR=$(grep /tcp/ "$WORK/m/bootstrap.addr" | head -1)
QUIC_ADDR=$(grep /quic-v1/ "$WORK/m/bootstrap.addr" | head -1)
ID=$("$BIN/shoal-master" add "$WORK/file.bin" --data-dir "$WORK/m" 2>/dev/null | tail -1)
sleep 2.5 # the running master rescans its registry every 2 s
MPID=$(pgrep -f "^$BIN/shoal-master --data-dir $WORK/m" | head -1)
# Before each transfer, dd copies the file into a new file in the same directory and deletes
# it: the "dd" row. On a VM whose host takes back the guest's free pages (virtio-balloon free
# page reporting, as here), writing into pages the host took back costs several times more
# (here dd: about 2 s for 1 GiB after a few idle seconds, 0.5 s right after a delete); the dd
# hands each transfer the same just-freed pages, so that the rows compare the programs, not
# which of them the host's reclaim happened to hit.
FLOORS=()
write_floor() {
  rm -f "$WORK/floor.bin"
  /usr/bin/env time -f "%e %U %S" -o "$WORK/floor.time" dd if="$WORK/file.bin" of="$WORK/floor.bin" bs=1M 2>/dev/null
  rm -f "$WORK/floor.bin"
  local e u s
  read -r e u s < "$WORK/floor.time"
  [ "$e" = 0.00 ] && e=0.01 # a small file copies faster than time's resolution
  FLOORS+=("$(echo "$BYTES / $e / 1000000" | bc -l) $(echo "($u + $s) / $GIB" | bc -l)")
}
# One fetch over each transport, into a fresh data dir and output each time.
fetch_over() { # name addr -> "MB/s client-cpu-per-GiB server-cpu-per-GiB rss-KiB"
  rm -rf "$WORK/n" "$WORK/out.bin"
  local m0 m1 start end
  m0=$(cpu_of "$MPID")
  start=$(date +%s.%N)
  /usr/bin/env time -f "%U %S %M" -o "$WORK/node.time" \
    "$BIN/shoal" fetch "$ID" --bootstrap "$2" --listen /ip4/127.0.0.1/tcp/0 \
    --data-dir "$WORK/n" --out "$WORK/out.bin" --seed-time 0 ${FETCH_ARGS:-} 2>/dev/null
  end=$(date +%s.%N)
  m1=$(cpu_of "$MPID")
  cmp -s "$WORK/file.bin" "$WORK/out.bin" || { echo "shoal ($1) output differs!" >&2; exit 1; }
  rm -rf "$WORK/n" "$WORK/out.bin"
  read -r nu ns nrss < "$WORK/node.time"
  echo "$(echo "$BYTES / ($end - $start) / 1000000" | bc -l) $(echo "($nu + $ns) / $GIB" | bc -l) $(echo "($m1 - $m0) / $GIB" | bc -l) $nrss"
}
GIB=$(echo "$BYTES / 1073741824" | bc -l)
write_floor
read -r T_MBS T_CCPU T_SCPU T_RSS <<< "$(fetch_over tcp "$TCP_ADDR")"
write_floor
read -r Q_MBS Q_CCPU Q_SCPU Q_RSS <<< "$(fetch_over quic "$QUIC_ADDR")"
kill -INT "$MPID"; for _ in $(seq 100); do kill -0 "$MPID" 2>/dev/null || break; sleep 0.05; done
MRSS=$(awk '{print $3}' "$WORK/master.time" 2>/dev/null || echo "?")

# --- nginx + curl ---
mkdir -p "$WORK/www" && ln "$WORK/file.bin" "$WORK/www/file.bin"
cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 64; }
http {
  access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  server { listen 127.0.0.1:18080; root $WORK/www; }
}
CONF
"$NGINX" -c "$WORK/nginx.conf"
sleep 0.5
NPID=$(cat "$WORK/nginx.pid"); WPID=$(pgrep -P "$NPID" | head -1)
write_floor
W0=$(cpu_of "$WPID")
START=$(date +%s.%N)
/usr/bin/env time -f "%U %S %M" -o "$WORK/curl.time" curl -s -o "$WORK/curl.bin" http://127.0.0.1:18080/file.bin
END=$(date +%s.%N)
W1=$(cpu_of "$WPID")
read CU CS CRSS < "$WORK/curl.time"
HTTP_S=$(echo "$END - $START" | bc -l)
cmp -s "$WORK/file.bin" "$WORK/curl.bin" || { echo "curl output differs!" >&2; exit 1; }
rm -f "$WORK/curl.bin"

printf "\nfile: %d MiB, loopback, %s\n\n" "$SIZE_MIB" "$(date -u +%F)"
printf "| transfer | MB/s | client CPU-s/GiB | server CPU-s/GiB | client peak RSS |\n|---|---|---|---|---|\n"
printf "| shoal fetch over TCP (TLS+yamux, verified, to disk) | %.0f | %.2f | %.2f | %d MiB (master %s KiB) |\n" \
  "$T_MBS" "$T_CCPU" "$T_SCPU" "$((T_RSS / 1024))" "$MRSS"
printf "| shoal fetch over QUIC (verified, to disk) | %.0f | %.2f | %.2f | %d MiB |\n" \
  "$Q_MBS" "$Q_CCPU" "$Q_SCPU" "$((Q_RSS / 1024))"
printf "| curl from nginx (plain HTTP, to disk) | %.0f | %.2f | %.2f | %d MiB |\n" \
  "$(echo "$BYTES / $HTTP_S / 1000000" | bc -l)" "$(echo "($CU + $CS) / $GIB" | bc -l)" \
  "$(echo "($W1 - $W0) / $GIB" | bc -l)" "$((CRSS / 1024))"
printf "| dd into a new file just before each of the %d transfers (see the script) | %s | %s | | |\n" \
  "${#FLOORS[@]}" \
  "$(printf '%s\n' "${FLOORS[@]}" | awk '{printf "%s%.0f", (NR>1?", ":""), $1}')" \
  "$(printf '%s\n' "${FLOORS[@]}" | awk '{printf "%s%.2f", (NR>1?", ":""), $2}')"
