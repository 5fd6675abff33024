#!/usr/bin/env bash
# Stop the private SLURM cluster that scripts/slurm/start.sh started in DIR:
#
#   scripts/slurm/stop.sh [DIR]         # DIR: $CAPSNET_SLURM_DIR, else /tmp/capsnet-slurm
#
# 1. cancels every job of that cluster and waits for them to end (slurmstepd and the jobs'
#    processes outlive slurmd otherwise);
# 2. stops slurmd, slurmctld, slurmdbd, mariadbd and munged, in that order, each by the pid in
#    its pid file (checked to be that program), never by process name;
# 3. ends what is left of the cluster's processes: those carrying CAPSNET_SLURM_DAEMON=DIR
#    (the daemons), the slurmstepd processes that log to DIR/log/slurmd.log, and job
#    processes (both SLURM_JOB_ID and SLURM_CONF=DIR/etc/slurm.conf in their environment).
# DIR itself (config, logs, the accounting database) is kept; remove it for a fresh start.
# Exit status 0 when nothing of the cluster is left running.
set -uo pipefail

DIR="${1:-${CAPSNET_SLURM_DIR:-/tmp/capsnet-slurm}}"
say() { echo "[slurm stop] $*" >&2; }
if [ ! -d "$DIR" ]; then
  say "no cluster dir $DIR: nothing to stop"
  exit 0
fi
DIR="$(cd "$DIR" && pwd)"
if [ ! -f "$DIR/.capsnet-slurm" ]; then
  say "$DIR is not a cluster dir of scripts/slurm/start.sh: nothing to stop"
  exit 0
fi
RUN=$DIR/run
export SLURM_CONF=$DIR/etc/slurm.conf

pid_of() { # pid_of <daemon>: the pid in its pid file, if that process is running that program
  local pid
  pid="$(cat "$RUN/$1.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/exe" ] && [ "$(basename "$(readlink "/proc/$pid/exe")" -wlm)" = "$1" ] && echo "$pid"
}

# --- 1. jobs --------------------------------------------------------------------------------
if pid_of slurmctld >/dev/null; then
  jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086  # one argument per job id
    scancel $jobs 2>/dev/null
    for ((tick = 0; tick < 150; tick++)); do # KillWait is 10 s: TERM, then KILL
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# --- 2. daemons, by pid file ----------------------------------------------------------------
stop_daemon() { # stop_daemon <daemon>: TERM, wait up to 30 s, then KILL
  local pid
  pid="$(pid_of "$1")" || return 0
  kill -TERM "$pid" 2>/dev/null
  for ((tick = 0; tick < 150; tick++)); do
    [ -d "/proc/$pid" ] || break
    sleep 0.2
  done
  if [ -d "/proc/$pid" ]; then
    say "$1 ($pid) ignored TERM for 30 s: KILL"
    kill -KILL "$pid" 2>/dev/null
  fi
  say "stopped $1 ($pid)"
}
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
  stop_daemon "$daemon"
done

# --- 3. leftovers -----------------------------------------------------------------------------
ours() { # the pids of processes that belong to this cluster (not this script or its callers)
  local self=$BASHPID ancestors=" " pid=$$ environ
  while [ "$pid" -gt 1 ]; do
    ancestors+="$pid "
    pid="$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)" || break
    [ -n "$pid" ] || break
  done
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    [[ "$ancestors" == *" $pid "* ]] && continue
    [ "$pid" = "$self" ] && continue
    environ="$(tr '\0' '\n' 2>/dev/null <"$proc/environ")" || continue
    if grep -qxF "CAPSNET_SLURM_DAEMON=$DIR" <<<"$environ" ||
      { grep -q '^SLURM_JOB_ID=' <<<"$environ" && grep -qxF "SLURM_CONF=$SLURM_CONF" <<<"$environ"; }; then
      echo "$pid"
    # slurmstepd starts with an empty environment: it is ours when it writes to our slurmd.log
    elif [ "$(basename "$(readlink "$proc/exe" 2>/dev/null)" -wlm)" = slurmstepd ] &&
      find "$proc/fd" -lname "$DIR/log/slurmd.log" 2>/dev/null | grep -q .; then
      echo "$pid"
    fi
  done
}
left="$(ours | tr '\n' ' ')"
if [ -n "${left// /}" ]; then
  say "ending leftover processes of the cluster: $left"
  # shellcheck disable=SC2086
  kill -TERM $left 2>/dev/null
  sleep 2
  left="$(ours | tr '\n' ' ')"
  # shellcheck disable=SC2086
  [ -z "${left// /}" ] || kill -KILL $left 2>/dev/null
  sleep 0.5
  left="$(ours | tr '\n' ' ')"
fi
if [ -n "${left// /}" ]; then
  say "error: still running: $left"
  exit 1
fi
rm -f "$RUN"/*.pid
say "stopped; nothing of the cluster in $DIR is running"
