#!/usr/bin/env bash
# A one-node Slurm on this machine for the tests of `launch: slurm` (tests/study/test_slurm.py):
# installs Debian's slurm-wlm and munge when missing, writes slurm.conf for this host (its real
# CPUs and memory), creates a munge key, and starts munged, slurmctld and slurmd. Idempotent:
# when the node already answers, it does nothing. Needs root (apt-get, daemons).
set -euo pipefail
log() { echo "[start_slurm] $*"; }
if pgrep -x slurmd >/dev/null && pgrep -x slurmctld >/dev/null && timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
  log "slurm is already up: $(sinfo -h -o '%N %T')"; exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
real_mem=$(( mem_mb * 9 / 10 ))  # leave slurmd's own check some room
conf_dir=/etc/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge \
  /var/lib/munge /var/log/munge /etc/munge
cat > "$conf_dir/slurm.conf" <<CONF
# one-node Slurm for megacpt's CI (written by .ci/start_slurm.sh)
ClusterName=megacpt-ci
SlurmctldHost=$host
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
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MaxArraySize=10001
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
if [[ ! -s /etc/munge/munge.key ]]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chmod 700 /etc/munge /var/lib/munge /var/log/munge
chmod 400 /etc/munge/munge.key
chmod 755 /run/munge
if ! pgrep -x munged >/dev/null; then
  log "starting munged"
  munged --force
fi
if ! pgrep -x slurmctld >/dev/null; then
  log "starting slurmctld on $host ($cpus CPUs, ${real_mem} MB)"
  slurmctld -c
fi
if ! pgrep -x slurmd >/dev/null; then
  log "starting slurmd"
  slurmd -c || { tail -n 20 /var/log/slurm/slurmd.log >&2; exit 1; }
fi
for _ in $(seq 60); do
  if timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc'; then
    log "node up: $(sinfo -h -o '%N %T %c CPUs %m MB')"; exit 0
  fi
  scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
  sleep 1
done
log "slurm did not come up; the logs:"
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
