#!/usr/bin/env bash
# A real one-host SLURM cluster (munged + slurmctld + slurmd on localhost) for the tests in
# tests/slurm/ and for trying `fitscale launch --cluster local-slurm` before a real cluster.
#
#   bash cluster/local_slurm.sh install   apt-get Debian's slurm-wlm and munge (needs root)
#   bash cluster/local_slurm.sh start     install if needed, configure, start the daemons, wait for the node
#   bash cluster/local_slurm.sh stop      stop the daemons this script started (by their pid files)
#   bash cluster/local_slurm.sh status    daemons, node state and queue
#
# Every command is idempotent. The daemons run without systemd (containers have none), so the
# script starts them itself and keeps their pid files, state and logs in $FITSCALE_SLURM_DIR.
# It writes /etc/slurm/slurm.conf only when that file is absent or was written by this script:
# a host that already belongs to a real cluster is left untouched.
set -euo pipefail

STATE_DIR="${FITSCALE_SLURM_DIR:-/var/lib/fitscale-slurm}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# Written by fitscale cluster/local_slurm.sh; delete this file to let the script write a fresh one."
HOST="$(hostname -s)"
CPUS="${FITSCALE_SLURM_CPUS:-$(nproc)}"
# Leave a fifth of the memory to the host; SLURM refuses a node that has less than it claims.
MEM_MB="${FITSCALE_SLURM_MEM_MB:-$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)}"

log() { echo "local_slurm: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

need_root() {
  [ "$(id -u)" = 0 ] || die "'$1' needs root (it installs packages and starts system daemons); rerun with sudo"
}

pid_alive() { # pid file -> running? (/proc, not kill -0: that fails on root's daemons for other users)
  [ -s "$1" ] && [ -d "/proc/$(cat "$1")" ]
}

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; }

cmd_install() {
  if installed; then
    log "slurm and munge already installed ($(slurmctld -V))"
    return
  fi
  need_root install
  log "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed; check the network or the apt sources"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ||
    die "apt-get install slurm-wlm munge failed"
  installed || die "slurm-wlm installed but slurmctld/slurmd/munged are not on PATH"
  log "installed $(slurmctld -V)"
}

write_munge_key() {
  local key=/etc/munge/munge.key
  if [ ! -s "$key" ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$key" --force
    else
      dd if=/dev/urandom bs=1 count=1024 of="$key" status=none
    fi
  fi
  chown munge:munge /etc/munge "$key"
  chmod 700 /etc/munge
  chmod 400 "$key"
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 755 /run/munge
}

write_slurm_conf() {
  mkdir -p "$CONF_DIR" "$STATE_DIR"/{ctld,spool,log,run}
  if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script: this host seems to belong to a real cluster; leaving it alone"
  fi
  local tmp="$CONF.tmp.$$"
  cat >"$tmp" <<EOF
$MARKER
ClusterName=fitscale-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
# Quick turnaround for tests: schedule often, kill promptly, let requeued jobs start again at once.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MessageTimeout=10
# A requeued job may start again after cred_expire + 1 s (default 121 s); tests requeue often.
AuthInfo=cred_expire=10
KillWait=30
MinJobAge=3600
InactiveLimit=0
Waittime=0
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if [ -e "$CONF" ] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
    return 1
  fi
  mv "$tmp" "$CONF"
  log "wrote $CONF (node $HOST, $CPUS CPUs, $MEM_MB MB)"
}

start_munged() {
  local pidfile=/run/munge/munged.pid
  if pid_alive "$pidfile" || munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  log "starting munged"
  runuser -u munge -- munged --pid-file="$pidfile" --force
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged did not come up; see /var/log/munge/munged.log"
}

start_daemon() { # name
  local name="$1" pidfile="$STATE_DIR/run/$1.pid"
  if pid_alive "$pidfile"; then
    return
  fi
  log "starting $name"
  "$name" -f "$CONF" || die "$name failed to start; see $STATE_DIR/log/$name.log"
}

node_state() { sinfo --noheader --nodes="$HOST" --format=%T 2>/dev/null | head -1; }

wait_for_node() {
  local state=""
  for _ in $(seq 60); do
    state="$(node_state)"
    case "$state" in
      idle* | mixed* | allocated* | completing*) return ;;
      down* | drain* | fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  die "node $HOST is '${state:-unknown}' after 30 s; see $STATE_DIR/log/slurmctld.log and slurmd.log"
}

cmd_start() {
  if [ "$(id -u)" != 0 ] && pid_alive "$STATE_DIR/run/slurmctld.pid" && pid_alive "$STATE_DIR/run/slurmd.pid"; then
    log "already running (not root: configuration left as it is)"
    return
  fi
  cmd_install
  need_root start
  write_munge_key
  if write_slurm_conf; then
    # Daemons started with an older configuration restart to read the new one.
    stop_pidfile slurmd "$STATE_DIR/run/slurmd.pid"
    stop_pidfile slurmctld "$STATE_DIR/run/slurmctld.pid"
  fi
  start_munged
  start_daemon slurmctld
  # slurmctld needs a moment before slurmd can register with it.
  for _ in $(seq 50); do
    scontrol ping >/dev/null 2>&1 && break
    sleep 0.2
  done
  start_daemon slurmd
  wait_for_node
  log "running: node $HOST is $(node_state)"
}

stop_pidfile() { # name pidfile
  local name="$1" pidfile="$2" pid
  if ! pid_alive "$pidfile"; then
    return
  fi
  pid="$(cat "$pidfile")"
  log "stopping $name (pid $pid)"
  kill "$pid"
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
}

cmd_stop() {
  stop_pidfile slurmd "$STATE_DIR/run/slurmd.pid"
  stop_pidfile slurmctld "$STATE_DIR/run/slurmctld.pid"
  stop_pidfile munged /run/munge/munged.pid
}

cmd_status() {
  local code=0 name
  for name in slurmctld slurmd; do
    if pid_alive "$STATE_DIR/run/$name.pid"; then
      echo "$name: running (pid $(cat "$STATE_DIR/run/$name.pid"))"
    else
      echo "$name: stopped"
      code=3
    fi
  done
  if pid_alive /run/munge/munged.pid; then echo "munged: running (pid $(cat /run/munge/munged.pid))"; else
    echo "munged: stopped"
    code=3
  fi
  if [ "$code" = 0 ]; then
    echo "node $HOST: $(node_state)"
    squeue --noheader --format="%i %j %T %M %R" 2>/dev/null || true
  fi
  return "$code"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
    ;;
esac
