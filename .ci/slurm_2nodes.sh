#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for tests/slurm/test_multinode.py (run as root),
# plus n3, a node whose name does not resolve, in a partition of its own.
#   .ci/slurm_2nodes.sh up      install (apt) if needed, configure, start; waits until n1, n2 are idle
#   .ci/slurm_2nodes.sh down    stop the daemons this script started (by their pid files)
# Clients reach it with SLURM_CONF=/etc/slurm-2nodes/slurm.conf. It is a cluster of its own (own
# config, ports, state and pid files) so that the one-node cluster of .ci/slurm_up.sh, which the
# other Slurm tests use, keeps its node and its queue.
#
# Why this design: Debian's slurmd is built with multiple-slurmd support, so two slurmd run here as
# nodes n1 and n2 (`slurmd -N n1`), each on its own port, with %n in the spool/pid/log paths. Both
# addresses are 127.0.0.1 (/etc/hosts entries added below): nothing but loopback is ever a target,
# no network namespace or veth pair is needed, and the shared filesystem is simply the same disk.
# Network namespaces would model separate hosts more faithfully but need iproute2 and privileges
# CI machines may not grant; what this cluster tests (rendezvous across srun's two node steps,
# signals, node loss, shard split) does not depend on distinct addresses.
set -euo pipefail

ACTION=${1:-up}
CONF_DIR=/etc/slurm-2nodes
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurm-2nodes
LOGS=/var/log/slurm-2nodes
CTLD_PID=/run/slurmctld-2nodes.pid
NODES=(n1 n2 n3)
# A directory the nodes do not share, as a node-local disk on a real cluster: n2's slurmd (and so
# every job step it starts) runs in a mount namespace of its own, where an empty tmpfs hides it; n1
# sees this machine's directory. tests/slurm/test_multinode.py puts a run.out_dir there.
NODE_LOCAL=/srv/mimscale-node-local

running() {  # a pid file whose process is alive
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2> /dev/null
}

if [[ "$ACTION" == down ]]; then
  for pidfile in "$STATE"/slurmd-*.pid "$CTLD_PID"; do
    if running "$pidfile"; then kill "$(cat "$pidfile")"; fi
  done
  exit 0
fi
[[ "$ACTION" == up ]] || { echo "usage: $0 up|down" >&2; exit 2; }

if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null || ! command -v munged > /dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge > /dev/null
fi

mkdir -p "$CONF_DIR" "$STATE/ctld" "$LOGS" /run/munge /etc/munge
chmod 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2> /dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged > /dev/null || runuser -u munge -- munged

# The node names must resolve for the rendezvous (slurm/pretrain.sbatch's MASTER_ADDR is the first
# node's name), as they do on a real cluster. All but n3: a node whose name does not resolve, alone
# in partition "odd", for the batch script's check of that.
for n in n1 n2; do
  grep -qE "^127\.0\.0\.1[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
done

# CPUs are declared (not detected) so that two ranks per node fit on a 2-core machine.
cat > "$CONF" << CONFEOF
ClusterName=mimscale-2nodes
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=6827
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmdTimeout=30
SchedulerParameters=sched_interval=2
NodeName=n1 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=17001 CPUs=8 State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=17002 CPUs=8 State=UNKNOWN
NodeName=n3 NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=17003 CPUs=2 State=UNKNOWN
PartitionName=two Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
PartitionName=odd Nodes=n3 Default=NO MaxTime=INFINITE State=UP
CONFEOF

mkdir -p "$NODE_LOCAL"
running "$CTLD_PID" || slurmctld -f "$CONF"
for n in "${NODES[@]}"; do
  running "$STATE/slurmd-$n.pid" && continue
  if [[ $n == n2 ]]; then  # slurmd daemonizes inside the namespace, which lives on with it
    # shellcheck disable=SC2016  # expanded by the inner shell
    unshare --mount --propagation private bash -c 'mount -t tmpfs -o size=16m tmpfs "$1" && exec slurmd -f "$2" -N n2' \
      _ "$NODE_LOCAL" "$CONF"
  else
    slurmd -f "$CONF" -N "$n"
  fi
done
for _ in $(seq 60); do
  if [[ $(SLURM_CONF=$CONF sinfo -h -N -o %t 2> /dev/null | grep -cE '^(idle|mix|alloc)') == 3 ]]; then
    SLURM_CONF=$CONF sinfo -N
    exit 0
  fi
  SLURM_CONF=$CONF scontrol update NodeName=n1,n2,n3 State=RESUME > /dev/null 2>&1 || true
  sleep 1
done
echo "the two-node slurm did not come up; see $LOGS/*.log" >&2
SLURM_CONF=$CONF sinfo -N >&2 || true
exit 1
