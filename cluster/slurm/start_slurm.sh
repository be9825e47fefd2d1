#!/usr/bin/env bash
# Start a private single-node Slurm for pico's tests (Debian/Ubuntu, root, no systemd needed).
#
# Everything lives under $PICO_SLURM_BASE: its own slurm.conf (clients find it through
# SLURM_CONF, so /etc/slurm is never touched), state, spool, logs, and the PID of every daemon
# this script started. stop_slurm.sh stops exactly those PIDs. Ports come from the caller so two
# test sessions on one machine do not collide. munged is shared: it is started only when no
# munged answers; one started here is stopped by the last pico test cluster that uses it.
#
#   PICO_SLURM_BASE=/tmp/pico-slurm   PICO_SLURM_CTLD_PORT=6817   PICO_SLURM_SLURMD_PORT=6818
#   PICO_SLURM_INSTALL=1              apt-get install missing packages (0: fail instead)
#
# On success the last line printed is `SLURM_CONF=<path>`.
set -euo pipefail

base=${PICO_SLURM_BASE:-/tmp/pico-slurm}
ctld_port=${PICO_SLURM_CTLD_PORT:-6817}
slurmd_port=${PICO_SLURM_SLURMD_PORT:-6818}
install=${PICO_SLURM_INSTALL:-1}
conf=$base/etc/slurm.conf
started=$(date +%s)

say() { echo "[pico-slurm +$(( $(date +%s) - started ))s] $*" >&2; }
fail() {
  say "FAILED: $*"
  for f in "$base"/log/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }; done
  exit 1
}
# poll a command until it succeeds: retry <seconds> cmd...
retry() { local n=$(( $1 * 4 )); shift; while (( n-- > 0 )); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done; return 1; }
live() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || fail "needs root (slurmd runs jobs as their submitting user)"

if live "$base/pids/slurmctld" && live "$base/pids/slurmd"; then
  say "already running under $base"; echo "SLURM_CONF=$conf"; exit 0
fi

# 1. packages. Daemons must not auto-start on install (there is no init system to own them).
need=()
for pkg in munge slurmctld slurmd slurm-client; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
if (( ${#need[@]} )); then
  [ "$install" = 1 ] || fail "missing Debian packages: ${need[*]} (apt-get install ${need[*]})"
  say "installing ${need[*]}"
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -qq --no-install-recommends "${need[@]}" >"$base.apt.log" 2>&1 \
    || { tail -n 20 "$base.apt.log" >&2; [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d; fail "apt-get install ${need[*]}"; }
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

mkdir -p "$base"/{etc,state,spool,log,pids}

# 2. munge: reuse a running munged (another session may own it), else start ours.
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ -s /run/munge/pico-started ] && kill -0 "$(cat /run/munge/pico-started)" 2>/dev/null; then
    # another pico test cluster started it: share it; the last cluster to stop stops it
    cp /run/munge/pico-started "$base/pids/munged"
  fi
  say "using the munged that is already running"
else
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    head -c 1024 /dev/urandom > /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  retry 20 bash -c 'munge -n | unmunge' || fail "munged did not answer"
  cp /run/munge/munged.pid "$base/pids/munged"
  cp /run/munge/munged.pid /run/munge/pico-started
  say "started munged (pid $(cat "$base/pids/munged"))"
fi

# 3. slurm.conf: one node with the CPUs slurmd detects; 90% of available memory.
host=$(hostname -s)
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts
layout=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Sockets|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' \
         | sed 's/^SocketsPerBoard=/Sockets=/' | tr '\n' ' ')
mem_mb=$(awk '/^MemAvailable:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
cat > "$conf" <<CONF
# pico test cluster (written by start_slurm.sh; removed by stop_slurm.sh)
ClusterName=pico
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
# no cgroups, no systemd: track processes by parentage, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$base/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
StateSaveLocation=$base/state
SlurmdSpoolDir=$base/spool
SlurmctldPidFile=$base/pids/slurmctld
SlurmdPidFile=$base/pids/slurmd
SlurmctldLogFile=$base/log/slurmctld.log
SlurmdLogFile=$base/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 ${layout}RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$conf

# 4. daemons (each forks and writes its pid file); -c: start from a clean state
/usr/sbin/slurmctld -c -f "$conf" || fail "slurmctld did not start"
/usr/sbin/slurmd -c -f "$conf" || fail "slurmd did not start"
retry 60 bash -c 'sinfo -h -N -o %t | grep -qx idle' || fail "node not idle: $(sinfo -N 2>&1)"
say "slurmctld pid $(cat "$base/pids/slurmctld"), slurmd pid $(cat "$base/pids/slurmd"), ports $ctld_port/$slurmd_port"
echo "SLURM_CONF=$conf"
