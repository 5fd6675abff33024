#!/usr/bin/env bash
# Start a real Ray head node (`ray start --head`) that lives in a directory of its own,
# for trying hydra/launcher=ray_gpus against a cluster on one machine (and for the
# `engines` tests).  Stop it with scripts/ray/stop_head.sh <dir>: that stops exactly this
# head and the processes it started, never another Ray on the machine (no `ray stop`).
#
#   scripts/ray/start_head.sh <dir> [port]      # prints the head's address, e.g. 10.0.0.5:46379
#   set -a; . <dir>/driver.env; set +a           # the head's authentication, for the driver
#   python src/train.py -m hydra/launcher=ray_gpus hydra.launcher.ray.init.address=<that address> ...
#   scripts/ray/stop_head.sh <dir>
#
# <dir> becomes the head's working directory and holds everything it writes: head.log,
# head.pid, address, driver.env, auth_token, and Ray's temp dir <dir>/ray (sessions, logs,
# sockets).  Keep <dir> short (e.g. /tmp/rayhead): Ray's Unix sockets live under it and a
# socket path may not exceed 107 bytes.
#
# Authentication is chosen here, not left to chance: `ray start` turns token
# authentication on by itself when ~/.ray/auth_token exists (any earlier local ray.init()
# writes one), and a driver that joins by <ip>:<port> then cannot connect unless it sets
# RAY_AUTH_MODE=token.  By default the head gets a token of its own (<dir>/auth_token,
# readable by you only), so nobody else on the network can run code on it, and
# <dir>/driver.env holds the two variables a driver needs (RAY_AUTH_MODE=token,
# RAY_AUTH_TOKEN_PATH=<dir>/auth_token).  RAY_HEAD_AUTH=disabled starts an open head
# (driver.env then says RAY_AUTH_MODE=disabled).  Settings (environment):
#   RAY_HEAD_NUM_GPUS  GPUs the head declares (default 2; they need not exist: Ray then
#                      just hands out the ids 0..N-1 through CUDA_VISIBLE_DEVICES)
#   RAY_HEAD_NUM_CPUS  CPUs the head declares (default: the machine's count)
#   RAY_HEAD_NODE_IP   the address the head listens on (default: Ray's choice)
#   RAY_HEAD_OBJECT_STORE_BYTES  the head's object store (default: Ray's, ~30% of memory)
#   RAY_HEAD_TIMEOUT   seconds to wait for the head to come up (default 120)
#   RAY_HEAD_AUTH      token (default) or disabled
#   RAY                the `ray` executable (default: the one on PATH)
# The head's jobs run with this script's environment plus whatever the launcher forwards
# (hydra.launcher.forward_env): start it from a plain shell to see what a cluster node sees.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 <dir> [port]" >&2
  exit 2
fi
mkdir -p "$1"
dir="$(cd "$1" && pwd)"
port="${2:-46379}"
ray_bin="${RAY:-ray}"
num_gpus="${RAY_HEAD_NUM_GPUS:-2}"
num_cpus="${RAY_HEAD_NUM_CPUS:-$(nproc)}"
timeout="${RAY_HEAD_TIMEOUT:-120}"
auth="${RAY_HEAD_AUTH:-token}"
temp_dir="$dir/ray"

# Ray puts <temp dir>/session_<date>_<time>_<pid>/sockets/plasma_store (61 more bytes) under it.
if [ "${#temp_dir}" -gt 45 ]; then
  echo "error: $temp_dir is too long for Ray's socket paths (at most 45 characters); use a shorter <dir>" >&2
  exit 2
fi
if [ -f "$dir/head.pid" ] && kill -0 "$(cat "$dir/head.pid")" 2>/dev/null; then
  echo "error: a head already runs from $dir (pid $(cat "$dir/head.pid")); stop it with scripts/ray/stop_head.sh $dir" >&2
  exit 1
fi
rm -f "$dir/head.pid" "$dir/address" "$dir/driver.env" "$temp_dir/ray_current_cluster"

case "$auth" in
  token)
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$dir/auth_token")
    auth_env=(RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$dir/auth_token")
    ;;
  disabled)
    auth_env=(RAY_AUTH_MODE=disabled)
    ;;
  *)
    echo "error: RAY_HEAD_AUTH must be token or disabled, got $auth" >&2
    exit 2
    ;;
esac
printf '%s\n' "${auth_env[@]}" >"$dir/driver.env"

# Every port the head would otherwise take at a fixed default is chosen here, next to the
# GCS port, so two heads on one machine never collide: Ray client server port+1,
# dashboard port+2, dashboard agent port+3.  The rest Ray picks free at random.
args=(
  start --head --block
  --port="$port"
  --ray-client-server-port="$((port + 1))"
  --dashboard-port="$((port + 2))"
  --dashboard-agent-listen-port="$((port + 3))"
  --include-dashboard=false
  --num-gpus="$num_gpus"
  --num-cpus="$num_cpus"
  --temp-dir="$temp_dir"
  --disable-usage-stats
)
if [ -n "${RAY_HEAD_NODE_IP:-}" ]; then
  args+=(--node-ip-address="$RAY_HEAD_NODE_IP")
fi
if [ -n "${RAY_HEAD_OBJECT_STORE_BYTES:-}" ]; then
  args+=(--object-store-memory="$RAY_HEAD_OBJECT_STORE_BYTES")
fi

# `ray start --block` stays in the foreground and, on SIGTERM, drains and stops every
# process of its node.  setsid makes it the leader of a new session: every process the
# head starts (GCS, raylet, workers, agents) stays in that session, which is how
# stop_head.sh finds exactly them.  The script runs without job control, so setsid does
# not fork and $! is the head's own pid (checked below).
cd "$dir"
env "${auth_env[@]}" setsid "$ray_bin" "${args[@]}" >"$dir/head.log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$dir/head.pid"
session="$(ps -o sid= -p "$pid" | tr -d ' ')"  # empty if it already exited: reported below
if [ -n "$session" ] && [ "$session" != "$pid" ]; then
  echo "error: the head (pid $pid) did not become a session leader (session $session); stopping it" >&2
  kill -TERM "$pid"
  exit 1
fi

# The head writes <temp dir>/ray_current_cluster once its GCS and raylet are up.
waited=0
until [ -s "$temp_dir/ray_current_cluster" ]; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "error: the Ray head exited while starting; the end of $dir/head.log:" >&2
    tail -n 30 "$dir/head.log" >&2
    exit 1
  fi
  if [ "$waited" -ge "$((timeout * 2))" ]; then
    echo "error: the Ray head did not come up within ${timeout}s; the end of $dir/head.log:" >&2
    tail -n 30 "$dir/head.log" >&2
    exit 1
  fi
  sleep 0.5
  waited=$((waited + 1))
done
cp "$temp_dir/ray_current_cluster" "$dir/address"
cat "$dir/address"
echo
