#!/usr/bin/env bash
# A real Slurm on this machine, for development and tests: munge, slurmctld and slurmd, every file
# under one folder, no systemd, no cgroups. One node on loopback, or N nodes, each a network + UTS
# + mount namespace of its own (its own address, hostname and port space) on a bridge: a rank or a
# Dask worker on node2 really talks TCP to node1. The filesystem stays shared, as a cluster's would.
#
#   slurm/local-cluster.sh start DIR [--nodes N]  # prints `export SLURM_CONF=DIR/slurm.conf`; waits until every node is idle
#   slurm/local-cluster.sh stop DIR               # stops the daemons by pid (SIGTERM, then SIGKILL after a grace),
#                                                 # then removes the namespaces and links it made (by their recorded names)
#   slurm/local-cluster.sh node-down DIR NODE [--kill]  # cut NODE off (its link down); --kill: its slurmd and every
#                                                 # process in its namespace killed instead (a crash)
#   slurm/local-cluster.sh node-up DIR NODE       # back as after a reboot: its link up, what ran there killed,
#                                                 # a fresh slurmd; waits until the node is idle
#
# Needs Debian's slurmctld, slurmd, slurm-client and munge (apt-get install -y --no-install-recommends
# slurmctld slurmd slurm-client munge); several nodes also need iproute2 and util-linux (ip, nsenter,
# unshare) and a kernel that allows network namespaces. Run as root. The machine's /etc/hosts is never
# touched: each node bind-mounts DIR/hosts over it inside its own mount namespace.
set -euo pipefail

usage() { echo "usage: $0 start DIR [--nodes N] | stop DIR | node-down DIR NODE [--kill] | node-up DIR NODE" >&2; exit 2; }
cmd=${1:-}; dir=${2:-}
[[ -n "$cmd" && -n "$dir" ]] || usage
shift 2
nodes=1; node_arg=""; kill_node=no
while [[ $# -gt 0 ]]; do
  case "$cmd:$1" in
    start:--nodes) [[ "${2:-}" =~ ^[1-9][0-9]?$ ]] || { echo "error: --nodes takes a number from 1 to 99" >&2; exit 2; }; nodes=$2; shift 2 ;;
    node-down:--kill) kill_node=yes; shift ;;
    node-down:[^-]*|node-up:[^-]*) [[ -z "$node_arg" ]] || usage; node_arg=$1; shift ;;
    *) usage ;;
  esac
done
[[ "$cmd" != node-* || -n "$node_arg" ]] || usage
if [[ "$cmd" == start ]]; then
  mkdir -p "$dir"
elif [[ ! -d "$dir" ]]; then
  echo "error: $dir does not exist: no cluster was started there" >&2; exit 2
fi
dir=$(cd "$dir" && pwd)
if [[ "$dir" =~ [[:space:]] ]]; then  # slurm.conf cannot hold such a path
  echo "error: '$dir' has white space in it; Slurm's config cannot name it: use another folder" >&2; exit 2
fi
host=$(hostname -s)
# The names this folder's cluster gives what it creates outside the folder (namespaces, links):
# derived from the folder, so two clusters never share one, and recorded in DIR/net.list for stop.
tag=$(printf %s "$dir" | md5sum | cut -c1-5)
bridge="fs${tag}br"
ns() { echo "fs${tag}n$1"; }      # node i's network namespace
veth() { echo "fs${tag}v$1"; }    # its link on the bridge (the node's eth0 is the other end)

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

net_names() {  # what this folder's cluster created outside it: "kind name" lines
  [[ -f "$dir/net.list" ]] && cat "$dir/net.list" || true
}

stop() {
  local left kind name pidfile
  left=$(ours)
  while read -r kind name; do  # whatever still runs inside our nodes' namespaces is ours too
    [[ "$kind" == netns ]] && left+=" $(ip netns pids "$name" 2>/dev/null | tr '\n' ' ')"
  done < <(net_names)
  for pidfile in "$dir"/slurmd*.pid; do [[ -e "$pidfile" ]] && stop_pid "$pidfile"; done
  stop_pid "$dir/slurmctld.pid"
  stop_pid "$dir/munge/munged.pid"
  # Step daemons and job tasks still running (a hung job): SIGKILL, they may ignore SIGTERM.
  for p in $left; do alive "$p" && kill -KILL "$p" 2>/dev/null || true; done
  # Then the namespaces and links, by the names recorded when they were made (never by pattern).
  while read -r kind name; do
    case "$kind" in
      netns) ip netns del "$name" 2>/dev/null || true ;;
      veth|bridge) ip link del "$name" 2>/dev/null || true ;;
    esac
  done < <(net_names | sort -k1,1r)  # veth, netns, then the bridge
  rm -f "$dir/net.list"
}

conf_common() {  # the slurm.conf lines one node and N nodes share
  cat <<CONF
ClusterName=fastserve-local
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
SlurmctldLogFile=$dir/log/slurmctld.log
StateSaveLocation=$dir/state
CONF
}

start_slurmd() {  # node i's slurmd, inside its network namespace, with its own hostname and hosts file
  # (nsenter, not `ip netns exec`: that mounts a fresh /sys, hiding the cgroup tree slurmd reads)
  local i=$1
  nsenter --net="/var/run/netns/$(ns "$i")" unshare --uts --mount --propagation private \
    sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
    sh "node$i" "$dir/hosts" "$dir/slurm.conf"
}

make_nodes() {  # the bridge, one namespace per node on it, the hosts file; writes net.list first
  local i sub=$1
  for bin in ip nsenter unshare; do
    command -v "$bin" >/dev/null || { echo "error: $bin not found; several nodes need iproute2 and util-linux (apt-get install -y iproute2 util-linux)" >&2; exit 1; }
  done
  echo "bridge $bridge" > "$dir/net.list"
  ip link add "$bridge" type bridge
  ip addr add "198.18.$sub.1/24" dev "$bridge"
  ip link set "$bridge" up
  printf '127.0.0.1 localhost\n198.18.%s.1 %s\n' "$sub" "$host" > "$dir/hosts"
  for i in $(seq "$nodes"); do
    printf 'netns %s\nveth %s\n' "$(ns "$i")" "$(veth "$i")" >> "$dir/net.list"
    ip netns add "$(ns "$i")"
    ip link add "$(veth "$i")" type veth peer name eth0 netns "$(ns "$i")"
    ip link set "$(veth "$i")" master "$bridge"
    ip link set "$(veth "$i")" up
    ip -n "$(ns "$i")" addr add "198.18.$sub.$((10 + i))/24" dev eth0
    ip -n "$(ns "$i")" link set eth0 up
    ip -n "$(ns "$i")" link set lo up
    printf '198.18.%s.%s node%s\n' "$sub" "$((10 + i))" "$i" >> "$dir/hosts"
  done
}

free_subnet() {  # 198.18.<n>.0/24 for this folder: from its hash on, the first one no link uses
  local n used i
  used=$(ip -4 -o addr show 2>/dev/null | grep -o ' 198\.18\.[0-9]*\.' | cut -d. -f3 | sort -u | tr '\n' ' ')
  n=$(( 16#${tag:0:4} % 250 + 2 ))
  for i in $(seq 250); do
    [[ " $used " == *" $n "* ]] || { echo "$n"; return 0; }
    n=$(( n % 250 + 2 ))
  done
  echo "error: every 198.18.x.0/24 subnet is in use; stop some test clusters" >&2; return 1
}

started=no
on_start_exit() {  # a start that did not finish leaves nothing behind
  local code=$?
  if [[ "$started" == no ]]; then
    set +e
    echo "error: start failed (exit $code); removing what it made" >&2
    stop
  fi
  exit "$code"
}

start() {
  for bin in munged slurmctld slurmd sinfo; do
    command -v "$bin" >/dev/null || { echo "error: $bin not found; install Debian's slurmctld slurmd slurm-client munge" >&2; exit 1; }
  done
  stop  # a leftover cluster in the same folder
  # whatever fails from here on (set -e), nothing is left behind: daemons, namespaces, links
  trap on_start_exit EXIT
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
  chmod 0755 "$dir/munge"
  dd if=/dev/urandom bs=1 count=1024 of="$dir/munge/munge.key" status=none
  chmod 0400 "$dir/munge/munge.key"
  export FASTSERVE_LOCAL_SLURM="$dir"  # marks the daemons and what they start (see ours)
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

  local node names i sub port
  node=$(slurmd -C | head -n1 | sed -E 's/ UpTime=.*//')  # NodeName=… CPUs=… RealMemory=…
  if [[ "$nodes" == 1 ]]; then
    names=$host
    { conf_common; cat <<CONF; } > "$dir/slurm.conf"
SlurmctldHost=${host}(127.0.0.1)
SlurmdPidFile=$dir/slurmd.pid
SlurmdLogFile=$dir/log/slurmd.log
SlurmdSpoolDir=$dir/spool
SlurmctldPort=6817
SlurmdPort=6818
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  else
    sub=$(free_subnet)  # 198.18.<sub>.0/24: the test-bench range, one subnet per cluster
    port=$(( 20000 + 16#${tag:1:3} % 2000 * 2 ))  # slurmctld's (root namespace) and slurmd's: one pair per folder
    make_nodes "$sub"
    names="node[1-$nodes]"
    { conf_common; cat <<CONF
SlurmctldHost=${host}(198.18.$sub.1)
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmdLogFile=$dir/log/slurmd.%n.log
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmdTimeout=20
CONF
      for i in $(seq "$nodes"); do
        echo "$(sed -E "s/^NodeName=[^ ]+/NodeName=node$i/" <<< "$node") NodeAddr=198.18.$sub.$((10 + i)) State=UNKNOWN"
      done
      echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    } > "$dir/slurm.conf"
  fi
  slurmctld -f "$dir/slurm.conf" -i
  if [[ "$nodes" == 1 ]]; then
    slurmd -f "$dir/slurm.conf" -N "$host"
  else
    for i in $(seq "$nodes"); do
      # FASTSERVE_LOCAL_SLURM_DEAD_NODE: a testing aid, a node whose slurmd never starts
      [[ "node$i" == "${FASTSERVE_LOCAL_SLURM_DEAD_NODE:-}" ]] && continue
      start_slurmd "$i" || echo "warning: slurmd of node$i did not start" >&2
    done
  fi
  export SLURM_CONF="$dir/slurm.conf"
  local idle=0
  for _ in $(seq 150); do  # bounded wait: 30 s
    idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | sort -u | wc -l)
    if [[ "$idle" -ge "$nodes" ]]; then
      started=yes
      echo "export SLURM_CONF=$dir/slurm.conf"
      return 0
    fi
    sleep 0.2
  done
  echo "error: $((nodes - idle)) of $nodes nodes did not become idle within 30 s:" >&2
  local n state log
  while read -r n state; do
    [[ "$state" == idle ]] && continue
    log="$dir/log/slurmd.log"; [[ "$nodes" == 1 ]] || log="$dir/log/slurmd.$n.log"
    echo "  $n is $state; the last lines of $log:" >&2
    tail -n 5 "$log" 2>/dev/null | sed 's/^/    /' >&2 || echo "    (no log: slurmd never started)" >&2
  done < <(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
  echo "  see also $dir/log/slurmctld.log" >&2
  started=failed
  stop
  exit 1
}

node_index() {  # NODE (node2 or 2) -> 2, for a node of this cluster
  local i=${node_arg#node}
  [[ "$i" =~ ^[0-9]+$ ]] && grep -qxF "netns $(ns "$i")" "$dir/net.list" 2>/dev/null || {
    echo "error: $dir has no node '$node_arg' (nodes: $(grep -o '^netns .*' "$dir/net.list" 2>/dev/null | wc -l), named node1, node2, ...)" >&2; exit 2; }
  echo "$i"
}

node_down() {
  local i p; i=$(node_index)
  if [[ "$kill_node" == yes ]]; then  # a crash: everything in its namespace, by pid
    for p in $(ip netns pids "$(ns "$i")"); do kill -KILL "$p" 2>/dev/null || true; done
    rm -f "$dir/slurmd.node$i.pid"
  else  # a partition: the processes live on, unreachable, as behind a dead switch port
    ip link set "$(veth "$i")" down
  fi
}

node_up() {  # back as after a reboot: what ran there is gone, a fresh slurmd registers and
  # (ReturnToService=2) the node takes jobs again
  local i p; i=$(node_index)
  for p in $(ip netns pids "$(ns "$i")"); do kill -KILL "$p" 2>/dev/null || true; done
  rm -f "$dir/slurmd.node$i.pid"
  ip link set "$(veth "$i")" up
  FASTSERVE_LOCAL_SLURM="$dir" start_slurmd "$i"
  export SLURM_CONF="$dir/slurm.conf"
  local pidfile="$dir/slurmd.node$i.pid"
  for _ in $(seq 100); do  # bounded wait: 20 s, for a live slurmd the controller sees idle
    if [[ -f "$pidfile" ]] && alive "$(cat "$pidfile")" \
       && [[ "$(sinfo -h -n "node$i" -o %t 2>/dev/null)" == idle ]]; then
      return 0
    fi
    sleep 0.2
  done
  echo "error: node$i did not come back within 20 s; see $dir/log/slurmd.node$i.log" >&2
  exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  node-down) node_down ;;
  node-up) node_up ;;
  *) usage ;;
esac
