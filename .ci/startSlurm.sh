#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for the tests that submit studies (tests/test_slurm.py): munge, then
# slurmctld and slurmd as root, CPU only, configured for a container or VM without systemd or cgroups
# (proctrack/linuxproc, task/none). Needs the Debian packages slurm-wlm and munge. Idempotent: a running cluster is
# left as it is. Prints where the logs are; `sinfo` shows the node once it is up.
set -euo pipefail
node=$(hostname -s)
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
pgrep -x munged > /dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
# the node line as slurmd sees the hardware, so that the node is not drained for a mismatch
hardware=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
cat > "$conf" <<CONF
ClusterName=lmafs
SlurmctldHost=$node
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
SchedulerParameters=defer_batch=0
MinJobAge=3600
NodeName=$node $hardware State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
pgrep -x slurmctld > /dev/null || slurmctld
pgrep -x slurmd > /dev/null || slurmd
for _ in $(seq 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "slurm: node $node up (logs in /var/log/slurm)"
        exit 0
    fi
    sleep 1
done
echo "slurm: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo >&2 || true
exit 1
