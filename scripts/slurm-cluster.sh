#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests that submit real jobs (tests/test_cluster*.py).
#   scripts/slurm-cluster.sh start    write slurm.conf, start munged, slurmctld and slurmd (as root); wait
#                                     until sinfo shows the node idle
#   scripts/slurm-cluster.sh stop     stop the three daemons this script started
#   scripts/slurm-cluster.sh status   sinfo, or exit 1 when the cluster is down
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge) and root: slurmd runs jobs as their
# user. No cgroups: proctrack/linuxproc and task/none work in containers (Slurm 22.05 has no
# CgroupPlugin=disabled, so there is no cgroup.conf at all). State lives in $SLURM_STATE (/var/tmp/hnmix-slurm).
set -euo pipefail
STATE=${SLURM_STATE:-/var/tmp/hnmix-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by hnmix scripts/slurm-cluster.sh"
PARTITION=${SLURM_PARTITION:-debug}

die() { echo "slurm-cluster: $*" >&2; exit 1; }

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: leaving it alone"
  fi
  local host node
  host=$(hostname -s)
  # this machine as slurmd sees it: CPUs, sockets, cores, threads, memory (NodeName=... line of slurmd -C)
  node=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$host/")
  mkdir -p "$(dirname "$CONF")" "$STATE"/{ctld,d,log}
  cat >"$CONF" <<EOF
$MARK
ClusterName=hnmix
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
# ended jobs stay visible to squeue (hnmix waits on job states without an accounting database)
MinJobAge=300
# SIGTERM to SIGKILL: time for a run to finish its step and write last.pt
KillWait=30
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
  # munged as the munge user when that works, as root (--force) in containers where it does not
  if id munge >/dev/null 2>&1 && command -v runuser >/dev/null; then
    runuser -u munge -- munged 2>/dev/null || munged --force
  else
    munged --force
  fi
  for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.25; done
  die "munged did not start"
}

status() { sinfo -h -o "%P %a %D %t %N" 2>/dev/null | grep -q . && sinfo; }

start() {
  command -v slurmctld >/dev/null || die "slurmctld not found: apt-get install slurm-wlm munge"
  [ "$(id -u)" = 0 ] || die "start needs root (slurmd runs jobs as their user)"
  if status >/dev/null 2>&1; then echo "slurm-cluster: already up"; sinfo; return; fi
  write_conf
  start_munge
  slurmctld -c -f "$CONF"   # -c: a fresh state, no jobs from an earlier start
  slurmd -f "$CONF"
  for _ in $(seq 60); do
    if sinfo -h -o "%t" 2>/dev/null | grep -qx "idle"; then sinfo; return; fi
    sleep 0.5
  done
  sinfo >&2 || true
  tail -n 20 "$STATE"/log/*.log >&2 || true
  die "the node did not become idle in 30 s (logs above, in $STATE/log)"
}

stop_one() {  # the daemon whose pid file this script's slurm.conf names, by its pid only
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$pidfile"
}

stop() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then  # a real cluster's config: not ours to stop
    echo "slurm-cluster: $CONF was not written by this script: leaving that cluster alone" >&2; return 1
  fi
  scancel --user=root 2>/dev/null || true
  stop_one "$STATE/slurmd.pid"
  stop_one "$STATE/slurmctld.pid"
  echo "slurm-cluster: stopped (munged left running; state in $STATE)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status || { echo "slurm-cluster: down" >&2; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
