#!/usr/bin/env bash
# A real single-node Slurm on this machine, for development and tests: munge, slurmctld and slurmd
# on loopback, every file under one folder, no systemd, no cgroups.
#
#   slurm/local-cluster.sh start DIR     # prints `export SLURM_CONF=DIR/slurm.conf`; waits until the node is idle
#   slurm/local-cluster.sh stop DIR      # stops the daemons by pid (SIGTERM, then SIGKILL after a grace)
#
# Needs Debian's slurmctld, slurmd, slurm-client and munge (apt-get install -y --no-install-recommends
# slurmctld slurmd slurm-client munge). Run as root.
set -euo pipefail

cmd=${1:-}; dir=${2:-}
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
host=$(hostname -s)

alive() {  # a pid whose process exists and is not a zombie (kill -0 alone can be fooled here)
  local pid=$1 state
  [[ -r /proc/$pid/stat ]] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ "$state" != Z && "$state" != X ]]
}

stop_pid() {  # SIGTERM, wait up to 5 s, then SIGKILL
  local pidfile=$1 pid
  [[ -f "$pidfile" ]] || return 0
  pid=$(cat "$pidfile"); [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
  alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

ours() {  # this cluster's daemons, its step daemons (which outlive slurmd, detached, when a job
  # hangs) and their descendants (the jobs' tasks). The daemons carry FASTSERVE_LOCAL_SLURM=DIR in
  # their environment; step daemons clear theirs but work in DIR/log. Never by name: other Slurms
  # may run here. This script and its callers are spared.
  local roots=() e p cwd mine=" $$ " q=$$
  while [[ "$q" -gt 1 ]]; do q=$(awk '{print $4}' "/proc/$q/stat" 2>/dev/null || echo 1); mine+="$q "; done
  for e in /proc/[0-9]*/environ; do
    p=${e#/proc/}; p=${p%/environ}
    [[ "$mine" == *" $p "* ]] && continue
    cwd=$(readlink "/proc/$p/cwd" 2>/dev/null || true)
    if [[ "$cwd" == "$dir/log" ]] \
       || { tr '\0' '\n' < "$e"; } 2>/dev/null | grep -qxF "FASTSERVE_LOCAL_SLURM=$dir"; then
      roots+=("$p")
    fi
  done
  [[ ${#roots[@]} -gt 0 ]] || return 0
  ps -eo pid=,ppid= | awk -v roots="${roots[*]}" -v mine="$mine" '
    BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1
            m = split(mine, s, " "); for (i = 1; i <= m; i++) spare[s[i]] = 1 }
    { if (!($1 in spare)) parent[$1] = $2 }
    END { grew = 1; while (grew) { grew = 0; for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 } }
          for (p in keep) print p }'
}

stop() {
  local left
  left=$(ours)
  stop_pid "$dir/slurmd.pid"
  stop_pid "$dir/slurmctld.pid"
  stop_pid "$dir/munge/munged.pid"
  # Step daemons and job tasks still running (a hung job): SIGKILL, they may ignore SIGTERM.
  for p in $left; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
}

start() {
  for bin in munged slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || { echo "error: $bin not found; install Debian's slurmctld slurmd slurm-client munge" >&2; exit 1; }
  done
  stop  # a leftover cluster in the same folder
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
  chmod 0755 "$dir/munge"
  dd if=/dev/urandom bs=1 count=1024 of="$dir/munge/munge.key" status=none
  chmod 0400 "$dir/munge/munge.key"
  export FASTSERVE_LOCAL_SLURM="$dir"  # marks the daemons and what they start (see ours)
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

  node=$(slurmd -C | head -n1 | sed -E 's/ UpTime=.*//')  # NodeName=… CPUs=… RealMemory=…
  cat > "$dir/slurm.conf" <<CONF
ClusterName=fastserve-local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5,kill_invalid_depend
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
ReturnToService=2
MpiDefault=none
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPort=6817
SlurmdPort=6818
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  slurmctld -f "$dir/slurm.conf" -i
  slurmd -f "$dir/slurm.conf" -N "$host"
  export SLURM_CONF="$dir/slurm.conf"
  for _ in $(seq 150); do  # bounded wait: 30 s
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
      echo "export SLURM_CONF=$dir/slurm.conf"
      return 0
    fi
    sleep 0.2
  done
  echo "error: the node did not become idle within 30 s; see $dir/log/slurmctld.log and slurmd.log" >&2
  sinfo >&2 || true
  stop
  exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
