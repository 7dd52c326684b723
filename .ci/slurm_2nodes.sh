#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for tests/slurm/test_multinode.py (run as root).
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
NODES=(n1 n2)

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
# node's name), as they do on a real cluster.
for n in "${NODES[@]}"; do
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
PartitionName=two Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONFEOF

running "$CTLD_PID" || slurmctld -f "$CONF"
for n in "${NODES[@]}"; do
  running "$STATE/slurmd-$n.pid" || slurmd -f "$CONF" -N "$n"
done
for _ in $(seq 60); do
  if [[ $(SLURM_CONF=$CONF sinfo -h -N -o %t 2> /dev/null | grep -cE '^(idle|mix|alloc)') == 2 ]]; then
    SLURM_CONF=$CONF sinfo -N
    exit 0
  fi
  SLURM_CONF=$CONF scontrol update NodeName=n1,n2 State=RESUME > /dev/null 2>&1 || true
  sleep 1
done
echo "the two-node slurm did not come up; see $LOGS/*.log" >&2
SLURM_CONF=$CONF sinfo -N >&2 || true
exit 1
