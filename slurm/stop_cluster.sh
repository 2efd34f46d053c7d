#!/usr/bin/env bash
# Stop the test cluster started by slurm/start_cluster.sh STATE_DIR: each daemon by its pid file,
# waiting (bounded) for it to exit. Jobs still running are killed with slurmd.
set -uo pipefail
STATE=$(realpath -m "${1:-/tmp/memetrain-slurm}")
export SLURM_CONF="$STATE/slurm.conf"
[ -f "$SLURM_CONF" ] && scancel --full --quiet --user=root 2>/dev/null || true
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
    pidfile="$STATE/$daemon.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
done
echo "test cluster in $STATE stopped"
