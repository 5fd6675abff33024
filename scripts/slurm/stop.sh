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
stop_daemons() { # stop_daemons <daemon>...: TERM them together, wait up to 30 s, then KILL
  local daemon pid alive pids=() names=()
  for daemon in "$@"; do
    if pid="$(pid_of "$daemon")"; then
      kill -TERM "$pid" 2>/dev/null
      pids+=("$pid")
      names+=("$daemon ($pid)")
    fi
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  for ((tick = 0; tick < 300; tick++)); do
    alive=0
    for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if [ -d "/proc/$pid" ]; then
      say "$pid ignored TERM for 30 s: KILL"
      kill -KILL "$pid" 2>/dev/null
    fi
  done
  say "stopped ${names[*]}"
}
# the SLURM daemons, then the accounting daemon, then what it used
stop_daemons slurmd slurmctld
stop_daemons slurmdbd
stop_daemons mariadbd munged

# --- 3. leftovers -----------------------------------------------------------------------------
ours() { # the pids of processes that belong to this cluster (not this script or its callers)
  local self=$BASHPID ancestors=" " pid=$$ comm
  while [ "$pid" -gt 1 ]; do
    ancestors+="$pid "
    pid="$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)" || break
    [ -n "$pid" ] || break
  done
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    [[ "$ancestors" == *" $pid "* ]] && continue
    [ "$pid" = "$self" ] && continue
    if grep -qszxF "CAPSNET_SLURM_DAEMON=$DIR" "$proc/environ" ||
      { grep -qszxF "SLURM_CONF=$SLURM_CONF" "$proc/environ" && grep -qsz '^SLURM_JOB_ID=' "$proc/environ"; }; then
      echo "$pid"
    # slurmstepd starts with an empty environment: it is ours when it writes to our slurmd.log
    elif read -r comm 2>/dev/null <"$proc/comm" && [ "$comm" = slurmstepd ] &&
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
