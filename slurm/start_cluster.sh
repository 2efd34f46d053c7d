#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost for the tests (as root, without systemd):
# munged, mariadbd, slurmdbd (accounting: submitit reads job states through sacct), slurmctld and
# slurmd, each with its own state, socket and ports under STATE_DIR so nothing touches a system
# Slurm or MariaDB. Prints the line to export; stop it with slurm/stop_cluster.sh STATE_DIR.
#
#   slurm/start_cluster.sh /tmp/memetrain-slurm && export SLURM_CONF=/tmp/memetrain-slurm/slurm.conf
#
# Needs Debian's munge slurmctld slurmd slurm-client slurmdbd mariadb-server (Slurm 22.05).
set -euo pipefail
STATE=$(realpath -m "${1:-/tmp/memetrain-slurm}")
HERE=$(cd "$(dirname "$0")" && pwd)
PORT_BASE=${MEMETRAIN_SLURM_PORT_BASE:-16817}   # slurmctld, slurmd, slurmdbd, mariadbd: four ports from here

for tool in munged mungekey mariadbd mariadb-install-db mariadb slurmdbd slurmctld slurmd sinfo sacctmgr; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found; apt-get install munge slurmctld slurmd slurm-client slurmdbd mariadb-server" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "error: run as root (the test cluster's daemons run as root)" >&2; exit 2; }
if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    echo "error: a test cluster already runs from $STATE; stop it with $HERE/stop_cluster.sh $STATE" >&2; exit 2
fi

mkdir -p "$STATE"/{log,munge,ctld,spool,mysql-run}
chmod 700 "$STATE/munge"
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc counts OMP_NUM_THREADS=1 (a test worker's) as one CPU
MEMORY_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
export SLURM_CONF="$STATE/slurm.conf"

wait_for() {  # wait_for <what> <seconds> <command...>: retry the command until it succeeds
    local what=$1 deadline=$((SECONDS + $2)); shift 2
    until timeout 5 "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "error: $what did not come up in time; see $STATE/log/" >&2; exit 1; }
        sleep 0.2
    done
}

# munge: its own key and socket
[ -f "$STATE/munge/munge.key" ] || mungekey --create --keyfile="$STATE/munge/munge.key" 2>/dev/null
munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/seed"

# MariaDB for slurmdbd: its own data directory; setsid and redirected output, or it holds the caller's pipe open
if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
        --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
fi
setsid mariadbd --user=root --datadir="$STATE/mysql" --socket="$STATE/mysql-run/mysqld.sock" \
    --port=$((PORT_BASE + 3)) --bind-address=127.0.0.1 --pid-file="$STATE/mariadbd.pid" \
    --log-error="$STATE/log/mariadbd.log" --skip-log-bin --innodb-buffer-pool-size=32M \
    </dev/null >"$STATE/log/mariadbd.out" 2>&1 &
wait_for mariadbd 30 mariadb --socket="$STATE/mysql-run/mysqld.sock" -e "SELECT 1"
mariadb --socket="$STATE/mysql-run/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'memetrain-test';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'memetrain-test';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

sed -e "s|@STATE@|$STATE|g" -e "s|@PORT_BASE@|$PORT_BASE|g" -e "s|@DBD_PORT@|$((PORT_BASE + 2))|g" \
    -e "s|@SLURMD_PORT@|$((PORT_BASE + 1))|g" -e "s|@CPUS@|$CPUS|g" -e "s|@MEMORY_MB@|$MEMORY_MB|g" \
    -e "s|@DB_PORT@|$((PORT_BASE + 3))|g" "$HERE/test_cluster/slurm.conf" >"$STATE/slurm.conf"
sed -e "s|@STATE@|$STATE|g" -e "s|@DBD_PORT@|$((PORT_BASE + 2))|g" -e "s|@DB_PORT@|$((PORT_BASE + 3))|g" \
    "$HERE/test_cluster/slurmdbd.conf" >"$STATE/slurmdbd.conf"
chmod 600 "$STATE/slurmdbd.conf"

slurmdbd
wait_for slurmdbd 30 sacctmgr --immediate list cluster
sacctmgr --immediate add cluster memetrain-test >/dev/null 2>&1 || true
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N localhost
wait_for "slurmd (node localhost idle)" 30 bash -c "sinfo --noheader --states=idle --nodes=localhost | grep -q localhost"
echo "export SLURM_CONF=$SLURM_CONF   # test cluster up: $CPUS CPUs, $MEMORY_MB MB on localhost"
