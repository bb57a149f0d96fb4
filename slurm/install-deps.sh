#!/usr/bin/env bash
# What the Slurm tests need from the system: Debian's slurmctld, slurmd, slurm-client and munge.
# Installs them where it can (root with apt-get); elsewhere says what is missing and that the
# tests marked `slurm` will be skipped. Used by `make test` and `.ci/run`.
set -euo pipefail
missing=()
for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || missing+=("$b"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge
else
  echo "note: ${missing[*]} not found and cannot be installed here (needs root and apt-get):" \
       "the tests marked 'slurm' will be skipped (apt-get install slurmctld slurmd slurm-client munge)" >&2
fi
