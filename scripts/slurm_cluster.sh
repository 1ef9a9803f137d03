#!/usr/bin/env bash
# A single-node Slurm cluster on this host, for `nox -s slurm` (and by hand):
#   scripts/slurm_cluster.sh start DIR   # munged + slurmctld + slurmd; prints `export SLURM_CONF=DIR/slurm.conf`
#   scripts/slurm_cluster.sh stop DIR    # stops what `start` started (pid files under DIR)
# Needs root and Debian's slurm-wlm + munge (apt-get install slurm-wlm munge); no systemd, no
# cgroups, no accounting database. The settings and their reasons: ../shared/SLURM.md (measured on
# this kind of machine): fast requeue needs cred_expire=10 and a 1-second scheduler.
set -euo pipefail
cmd="${1:-}"; dir="${2:-}"
if [ -z "$cmd" ] || [ -z "$dir" ]; then echo "usage: $0 start|stop DIR" >&2; exit 2; fi
dir="$(realpath -m "$dir")"

stop() {
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
    if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; rm -f "$pidfile"; fi
  done
}

case "$cmd" in
  stop) stop; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac

missing=()
for bin in munged mungekey slurmctld slurmd sbatch sinfo; do command -v "$bin" >/dev/null || missing+=("$bin"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "slurm: not installed here (missing: ${missing[*]}); as root: apt-get update && apt-get install -y slurm-wlm munge" >&2
  exit 3
fi
if [ "$(id -u)" != 0 ]; then echo "slurm: the single-node cluster runs its daemons as root; run as root" >&2; exit 3; fi

mkdir -p "$dir/state" "$dir/spool" "$dir/log" /run/munge /etc/munge
chown munge:munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then mungekey -c -k /etc/munge/munge.key; fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$dir/munged.pid"
fi

host="$(hostname -s)"; cpus="$(nproc)"; mem="$(free -m | awk '/^Mem:/{print $2}')"
cat > "$dir/slurm.conf" <<CONF
ClusterName=harness
SlurmctldHost=$host
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=1,sched_interval=1
ReturnToService=2
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  state="$(sinfo -h -o %t 2>/dev/null || true)"
  if [ "$state" = "idle" ]; then echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 0.5
done
echo "slurm: the node did not become idle in 30 s (state: ${state:-none}); logs in $dir/log" >&2
stop
exit 1
