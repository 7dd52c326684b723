#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/slurm (run as root; Debian packages).
#   .ci/slurm_up.sh            install (apt) if needed, configure, start; waits until the node is idle
# No cgroups on CI machines: proctrack/linuxproc and task/none. Two fake GPUs as Slurm's own test
# suite makes them (GRES on /dev/tty0-1); CUDA is absent, so the ranks use gloo on the CPU.
set -euo pipefail

if ! command -v slurmctld > /dev/null || ! command -v sbatch > /dev/null || ! command -v munged > /dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge > /dev/null
fi

HOST=$(hostname -s)
CONF=/etc/slurm
mkdir -p "$CONF" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
chmod 0755 /run/munge

if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2> /dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged > /dev/null || runuser -u munge -- munged

# CPUs are declared (not detected) so that two tiny jobs fit side by side on a 2-core machine;
# config_overrides lets slurmd accept the declared values.
cat > "$CONF/slurm.conf" << CONFEOF
ClusterName=mimscale-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=$HOST CPUs=8 Gres=gpu:2 State=UNKNOWN
PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONFEOF
for i in 0 1; do  # the fake GPUs' device files (present on most machines; made if not)
  [[ -e /dev/tty$i ]] || mknod "/dev/tty$i" c 4 "$i"
done
cat > "$CONF/gres.conf" << 'CONFEOF'
AutoDetect=off
Name=gpu File=/dev/tty[0-1]
CONFEOF
rm -f "$CONF/cgroup.conf"

# By pid file, not by name: the two-node cluster of .ci/slurm_2nodes.sh runs daemons of the same names.
running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2> /dev/null; }
running /run/slurmctld.pid || slurmctld
running /run/slurmd.pid || slurmd
for _ in $(seq 60); do
  if sinfo -h -o %t 2> /dev/null | grep -qE '^(idle|mix|alloc)'; then
    sinfo
    exit 0
  fi
  scontrol update NodeName="$HOST" State=RESUME > /dev/null 2>&1 || true
  sleep 1
done
echo "slurm did not come up; see /var/log/slurm/*.log" >&2
sinfo >&2 || true
exit 1
