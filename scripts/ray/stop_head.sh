#!/usr/bin/env bash
# Stop the Ray head that scripts/ray/start_head.sh started from <dir>, and every process it
# started, and nothing else: the head was made the leader of its own session, so its
# processes are exactly those whose session id is the head's pid (Linux never hands out a
# pid again while a session of that id has members).  Never `ray stop`, which stops every
# Ray on the machine.
#
#   scripts/ray/stop_head.sh <dir>
#
# First SIGTERM to the head (it drains and stops its processes), then, after
# RAY_HEAD_STOP_GRACE seconds (default 30), SIGKILL to whatever of its session is left.
# Exits 0 once no process of the session remains.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 <dir>" >&2
  exit 2
fi
dir="$(cd "$1" && pwd)"
grace="${RAY_HEAD_STOP_GRACE:-30}"
if [ ! -f "$dir/head.pid" ]; then
  echo "no head.pid in $dir: no head was started there" >&2
  exit 1
fi
sid="$(cat "$dir/head.pid")"

members() { ps -eo pid=,sid= | awk -v s="$sid" '$2 == s { print $1 }'; }

if kill -0 "$sid" 2>/dev/null; then
  # The pid must still be our head: a `ray start` of this dir, leading its own session.
  if ! tr '\0' ' ' <"/proc/$sid/cmdline" | grep -q -- "--temp-dir=$dir/ray"; then
    echo "error: pid $sid is not the Ray head of $dir any more; not touching it" >&2
    exit 1
  fi
  kill -TERM "$sid"
elif [ -n "$(members)" ]; then
  # The head itself is gone (crashed, killed): nobody drains its processes but us.
  # shellcheck disable=SC2046  # one pid per word
  kill -TERM $(members) 2>/dev/null || true
fi

waited=0
while [ -n "$(members)" ] && [ "$waited" -lt "$((grace * 2))" ]; do
  sleep 0.5
  waited=$((waited + 1))
done
left="$(members)"
if [ -n "$left" ]; then
  echo "killing what is left of the head's session after ${grace}s: $(echo $left)" >&2
  # shellcheck disable=SC2086  # one pid per word
  kill -KILL $left 2>/dev/null || true
  sleep 1
fi
if [ -n "$(members)" ]; then
  echo "error: processes of the head's session $sid survived SIGKILL: $(members | tr '\n' ' ')" >&2
  exit 1
fi
rm -f "$dir/head.pid" "$dir/address"
echo "stopped the Ray head of $dir"
