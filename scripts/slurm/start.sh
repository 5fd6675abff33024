#!/usr/bin/env bash
# Start a private single-node SLURM cluster (with accounting) on this machine, for the
# `engines` test tier and for trying `hydra/launcher=slurm` without a real cluster.
#
#   scripts/slurm/start.sh [DIR]        # DIR: $CAPSNET_SLURM_DIR, else /tmp/capsnet-slurm
#   eval "$(scripts/slurm/start.sh | tail -n 1)"   # sets SLURM_CONF for sbatch, squeue, sacct, submitit
#   scripts/slurm/stop.sh [DIR]
#
# Daemons, in order: munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd.  Every config
# file, state dir, log, pid file and socket lives under DIR; nothing goes to /etc, /run or
# /var (apart from the Debian packages themselves, installed here when missing).
#
# The node declares two fake GPUs (gres/gpu, character devices twinned with /dev/null), more
# CPUs than the machine has (SlurmdParameters=config_overrides), so the GPUs are what limits
# how many jobs run at once, and accounting through slurmdbd (submitit asks sacct for job
# states).  Credentials expire after CAPSNET_SLURM_CRED_EXPIRE s (10), so a requeued job may
# start again about that long after it stopped (SLURM's default is 120 s).
#
# Settings (environment): CAPSNET_SLURM_DIR, CAPSNET_SLURM_PORT (first of 4 consecutive TCP
# ports: slurmctld, slurmd, slurmdbd, mariadb; default 7817), CAPSNET_SLURM_CPUS (declared
# CPUs, default 16), CAPSNET_SLURM_GPUS (declared GPUs, default 2), CAPSNET_SLURM_CRED_EXPIRE.
# The last line printed is the `export SLURM_CONF=...` line; the same is in DIR/env.sh.
set -euo pipefail

DIR="${1:-${CAPSNET_SLURM_DIR:-/tmp/capsnet-slurm}}"
PORT="${CAPSNET_SLURM_PORT:-7817}"
CPUS="${CAPSNET_SLURM_CPUS:-16}"
GPUS="${CAPSNET_SLURM_GPUS:-2}"
CRED_EXPIRE="${CAPSNET_SLURM_CRED_EXPIRE:-10}"
CTLD_PORT=$PORT
SLURMD_PORT=$((PORT + 1))
DBD_PORT=$((PORT + 2))
DB_PORT=$((PORT + 3))
NODE="$(hostname -s)"
PARTITION="${CAPSNET_SLURM_PARTITION:-gpu}"  # the name the docs use for a cluster's GPU partition
START=$(date +%s.%N)

say() { echo "[slurm start] $*" >&2; }
die() {
  echo "[slurm start] error: $*" >&2
  exit 1
}
elapsed() { awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

[ "$(id -u)" = 0 ] || die "needs root (it installs packages and runs the daemons as root)"
# DIR is this script's alone: a new or empty dir, or one it made before.
if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ] && [ ! -f "$DIR/.capsnet-slurm" ]; then
  die "$DIR holds other files: give a new or empty dir (argument or CAPSNET_SLURM_DIR)"
fi
mkdir -p "$DIR"
touch "$DIR/.capsnet-slurm"
DIR="$(cd "$DIR" && pwd)" # absolute: the daemons and the jobs read these paths from elsewhere
ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log
export SLURM_CONF=$ETC/slurm.conf
# Marks every daemon started here: stop.sh finds leftovers by this variable (and slurmstepd,
# which starts with an empty environment, by its open slurmd.log), never by process name.
export CAPSNET_SLURM_DAEMON="$DIR"

# --- 1. packages --------------------------------------------------------------------------
BINARIES=(munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sbatch sinfo sacct)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core)
missing=()
for binary in "${BINARIES[@]}"; do
  command -v "$binary" >/dev/null || missing+=("$binary")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # The package lists may be stale or absent: update once and retry before giving up.
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$DIR/apt.log" 2>&1 ||
    { apt-get update -q >>"$DIR/apt.log" 2>&1 &&
      apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$DIR/apt.log" 2>&1; } ||
    die "apt-get install failed; see $DIR/apt.log"
  say "installed in $(elapsed) s"
fi

# --- 2. already running? --------------------------------------------------------------------
# A daemon counts as running when its pid file names a live process running that program.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
running() { # running <daemon>: its pid file names a live process of that program
  local pid
  pid="$(cat "$RUN/$1.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/exe" ] && [ "$(basename "$(readlink "/proc/$pid/exe")" -wlm)" = "$1" ]
}
up=()
for daemon in "${DAEMONS[@]}"; do
  if running "$daemon"; then up+=("$daemon"); fi
done
if [ ${#up[@]} -eq ${#DAEMONS[@]} ] && sinfo -h -N -o %T 2>/dev/null | grep -q '^idle$\|^mixed$\|^allocated$'; then
  say "already running in $DIR: reusing it"
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi
[ ${#up[@]} -eq 0 ] || die "a cluster is partly running in $DIR (${up[*]}): run scripts/slurm/stop.sh $DIR first"
for port in "$CTLD_PORT" "$SLURMD_PORT" "$DBD_PORT" "$DB_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "TCP port $port is in use: choose other ports with CAPSNET_SLURM_PORT=<first of 4 free ports>"
  fi
done

# From here on, a failed start stops whatever it had started (by pid file, see stop.sh).
stop_on_failure() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    say "start failed: stopping what was started"
    "$(dirname "${BASH_SOURCE[0]}")/stop.sh" "$DIR" >&2 || true
  fi
  exit "$status"
}
trap stop_on_failure EXIT

# --- 3. files -------------------------------------------------------------------------------
mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/munge" "$DIR/secret" "$DIR/spool/ctld" "$DIR/spool/slurmd" "$DIR/dev"
# munged wants its socket dir open to all (clients of any user) and its key private.
chmod 755 "$DIR" "$DIR/munge"
chmod 700 "$DIR/secret"
# Fake GPUs: character devices 1:3 (a /dev/null twin).  slurmd only stats them to know the device.
for ((i = 0; i < GPUS; i++)); do
  [ -c "$DIR/dev/nvidia$i" ] || mknod "$DIR/dev/nvidia$i" c 1 3
done
[ -f "$DIR/secret/munge.key" ] || mungekey --create --keyfile="$DIR/secret/munge.key"
chmod 400 "$DIR/secret/munge.key"
[ -f "$DIR/secret/db.pass" ] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DIR/secret/db.pass")
DB_PASS="$(cat "$DIR/secret/db.pass")"
MUNGE_SOCKET=$DIR/munge/munge.socket
# Memory declared like the GPUs: bookkeeping (no cgroups here), large enough that two jobs with
# conf/hydra/launcher/slurm.yaml's own request (mem_gb: 32, cpus_per_task: 8) run at once.
MEM_MB="${CAPSNET_SLURM_MEM_MB:-81920}"

cat >"$ETC/slurm.conf" <<EOF
# Written by scripts/slurm/start.sh: a private one-node cluster in $DIR
ClusterName=capsnet
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again cred_expire + 1 s after it stopped
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups here
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look at pending jobs every 2 s (defaults: 60 s, backfill 30 s): a requeued job starts as
# soon as its credential has expired
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
KillWait=10
MailProg=/bin/true
GresTypes=gpu
# the node's CPUs and memory as declared below, not as detected
SlurmdParameters=config_overrides
# accounting (submitit reads job states with sacct).  The slurmdbd connection takes its
# munge socket from AccountingStoragePass, not from AuthInfo.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB Gres=gpu:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

{
  echo "# Written by scripts/slurm/start.sh: fake GPUs, not detected"
  echo "AutoDetect=off"
  for ((i = 0; i < GPUS; i++)); do echo "NodeName=$NODE Name=gpu File=$DIR/dev/nvidia$i"; done
} >"$ETC/gres.conf"

# slurmdbd finds slurmdbd.conf beside $SLURM_CONF; it must be private to SlurmUser.
(umask 077 && cat >"$ETC/slurmdbd.conf" <<EOF
# Written by scripts/slurm/start.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
chmod 600 "$ETC/slurmdbd.conf"

echo "export SLURM_CONF=$SLURM_CONF" >"$DIR/env.sh"

wait_for() { # wait_for <seconds> <command...>: poll until the command succeeds
  local seconds=$1
  shift
  for ((tick = 0; tick < seconds * 5; tick++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  return 1
}
fail_with_log() { # fail_with_log <what> <log file>
  echo "[slurm start] error: $1; the end of $2:" >&2
  tail -n 20 "$2" >&2 2>/dev/null || true
  exit 1
}

# --- 4. daemons -----------------------------------------------------------------------------
# munged: its own key, socket, pid file and log.
munged --key-file="$DIR/secret/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$RUN/munged.pid" \
  --log-file="$LOG/munged.log" --seed-file="$DIR/secret/munged.seed" ||
  fail_with_log "munged did not start" "$LOG/munged.log"
wait_for 10 munge -n -S "$MUNGE_SOCKET" || fail_with_log "munged does not answer" "$LOG/munged.log"

# mariadbd: a private data dir, TCP on 127.0.0.1 only.  --skip-name-resolve, so that the
# grant for slurm@127.0.0.1 matches the TCP connection from slurmdbd.
DB_SOCKET=$RUN/mariadb.socket
if [ ! -d "$DIR/mysql/mysql" ]; then
  mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --skip-test-db \
    --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
    fail_with_log "mariadb-install-db failed" "$LOG/mariadb-install.log"
fi
setsid mariadbd --no-defaults --datadir="$DIR/mysql" --socket="$DB_SOCKET" --pid-file="$RUN/mariadbd.pid" \
  --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --user=root --log-error="$LOG/mariadbd.log" \
  --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
wait_for 60 mariadb --no-defaults -S "$DB_SOCKET" -u root -e 'SELECT 1' ||
  fail_with_log "mariadbd does not answer" "$LOG/mariadbd.log"
mariadb --no-defaults -S "$DB_SOCKET" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

slurmdbd || fail_with_log "slurmdbd did not start" "$LOG/slurmdbd.log"
wait_for 60 sacctmgr -n list cluster || fail_with_log "slurmdbd does not answer" "$LOG/slurmdbd.log"

# slurmctld starts from an empty state every time: jobs of a previous life cannot be running
# (stop.sh cancels them and ends their processes), and a job recovered after a crash can keep
# the node allocated for minutes.  Job ids go on after the highest that the accounting
# database or the old state (job.<id> dirs) knows, so sacct never sees one id twice.
last_id="$({
  echo 0
  sacct -a -X -n -P -o JobIDRaw -S 1970-01-01 -E now 2>/dev/null
  find "$DIR/spool/ctld" -maxdepth 2 -type d -name 'job.*' 2>/dev/null | sed 's/.*job\.//'
} | grep -E '^[0-9]+$' | sort -n | tail -n 1)"
echo "FirstJobId=$((last_id + 1))" >>"$SLURM_CONF"
rm -rf "${DIR:?}/spool/ctld" "${DIR:?}/spool/slurmd"
mkdir -p "$DIR/spool/ctld" "$DIR/spool/slurmd"
slurmctld -f "$SLURM_CONF" || fail_with_log "slurmctld did not start" "$LOG/slurmctld.log"
wait_for 30 scontrol ping || fail_with_log "slurmctld does not answer" "$LOG/slurmctld.log"

slurmd -f "$SLURM_CONF" -N "$NODE" || fail_with_log "slurmd did not start" "$LOG/slurmd.log"
# The node is idle once slurmd has registered.
states="$LOG/node-states.log"
: >"$states"
node_idle() {
  local state
  state="$(sinfo -h -N -n "$NODE" -o %T 2>&1)"
  echo "$(date +%T.%N) $state" >>"$states"
  [ "$state" = idle ]
}
wait_for 120 node_idle ||
  fail_with_log "node $NODE is not idle after 120 s: $(tail -n 1 "$states"); squeue: $(squeue -h 2>&1)" "$LOG/slurmd.log"

trap - EXIT
say "cluster up in $(elapsed) s: $NODE, partition $PARTITION, $CPUS CPUs, gpu:$GPUS; dir $DIR"
echo "export SLURM_CONF=$SLURM_CONF"
