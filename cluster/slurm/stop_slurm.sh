#!/usr/bin/env bash
# Stop what start_slurm.sh started under $PICO_SLURM_BASE, by recorded PID and nothing else.
#   PICO_SLURM_BASE=/tmp/pico-slurm   PICO_SLURM_KEEP=1 keeps the directory (logs) afterwards
set -uo pipefail

base=${PICO_SLURM_BASE:-/tmp/pico-slurm}
keep=${PICO_SLURM_KEEP:-0}
export SLURM_CONF=$base/etc/slurm.conf

# a zombie (reaped late where PID 1 is not an init) counts as stopped
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $s != Z* ]]; }

stop() {  # stop <name>: TERM, wait up to 20 s, then KILL; only if the pid still runs <name>
  local file=$base/pids/$1 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$1" ]; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 80); do alive "$pid" || break; sleep 0.25; done
    alive "$pid" && { echo "$1 ($pid) ignored TERM; killing" >&2; kill -KILL "$pid" 2>/dev/null; }
    echo "stopped $1 ($pid)" >&2
  fi
  rm -f "$file"
}

# jobs first, so no job process outlives the slurmd that tracks it
if [ -s "$base/pids/slurmctld" ] && kill -0 "$(cat "$base/pids/slurmctld")" 2>/dev/null; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.25; done
  fi
fi
stop slurmd
stop slurmctld
# munged is recorded only when a pico test cluster started it; it stays up while any other
# Slurm daemon on this machine may still use it
if [ -s "$base/pids/munged" ]; then
  if ps -C slurmctld,slurmd -o stat= | grep -qv '^Z'; then  # zombies do not count
    echo "leaving munged ($(cat "$base/pids/munged")) running: another Slurm on this machine uses it" >&2
    rm -f "$base/pids/munged"
  else
    stop munged
    rm -f /run/munge/pico-started
  fi
fi
[ "$keep" = 1 ] || rm -rf "$base"
