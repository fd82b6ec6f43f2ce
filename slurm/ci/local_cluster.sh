#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for CI and for trying the sbatch scripts on one machine.
#   slurm/ci/local_cluster.sh start DIR && export SLURM_CONF=DIR/slurm.conf
#   slurm/ci/local_cluster.sh stop DIR
# Needs Debian's slurmctld, slurmd, slurm-client and munge; everything it writes lives in DIR.
set -euo pipefail
action=${1:?start|stop} dir=$(realpath -m "${2:?state folder}")
if [[ $action == stop ]]; then
  for daemon in slurmd slurmctld munged; do
    [[ -f $dir/$daemon.pid ]] && kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
  done
  exit 0
fi
mkdir -p "$dir"/{state,spool,munge,log}
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
# munge: its own key and socket in DIR; run as root here, so allow it.
[[ -f $dir/munge/munge.key ]] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 700 "$dir/munge"; chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
# A requeued job may start again only cred_expire + 1 s after its requeue (slurm.conf(5)): slurmctld
# sets that BeginTime so that the new launch credential is newer than the node's revocation of the
# old run's one. Both are time stamps in whole seconds: a relaunch within the revocation's second is
# refused by slurmd ("error: Job N already killed, do not launch batch job"; slurmctld: "Killing
# non-startable batch JobId=N: Job credential revoked") and the job fails, exit code 1, not run.
# Hence never `scontrol update StartTime=now` a requeued job; here cred_expire is 10 s instead of
# 120 s, short enough for tests to let Slurm restart a requeued job itself, long enough for a step's
# credential to reach slurmd on a loaded machine. sched_interval=1: the main scheduler starts such a
# job within a second of its BeginTime (no event does; by default it would wait up to 60 s).
cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 50); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm: one-node cluster up ($host, $cpus CPUs), SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "slurm: the cluster did not come up; logs in $dir/log" >&2
tail -5 "$dir"/log/*.log >&2
exit 1
