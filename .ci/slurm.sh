#!/usr/bin/env bash
# A single-node Slurm cluster for the tests, in a temp folder, run as root (CI's case): no systemd, no cgroups.
#
#   bash .ci/slurm.sh install            # Debian's slurm-wlm, slurmdbd, munge, mariadb-server (apt)
#   eval "$(bash .ci/slurm.sh start)"    # fresh state (job ids start at 1), prints `export SLURM_CONF=...`
#   bash .ci/slurm.sh status             # sinfo and sacctmgr's view
#   bash .ci/slurm.sh stop               # slurmd, slurmctld, slurmdbd, MariaDB, munged last
#
# Accounting (slurmdbd + a local MariaDB) is on because without it submitit cannot see a cancelled or killed job's
# state (sacct has nothing to say) and waits forever. FTSAM_SLURM_DIR (default /tmp/ftsam-slurm) holds everything:
# config, state, spool, logs, database. `start` wipes it first.
set -euo pipefail

DIR=${FTSAM_SLURM_DIR:-/tmp/ftsam-slurm}
HOST=$(hostname -s)
DB_PORT=${FTSAM_SLURM_DB_PORT:-3307}
CONF=$DIR/etc/slurm.conf

log() { echo "slurm.sh: $*" >&2; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    log "$what did not come up in ${limit}s; its log is under $DIR/log"
    return 1
}

stop_pidfile() {  # stop_pidfile FILE NAME: SIGTERM the daemon, wait up to 20 s for it to exit
    local file=$1 name=$2 pid i
    [[ -f $file ]] || return 0
    pid=$(cat "$file" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) ignored SIGTERM; killing it"; kill -KILL "$pid" || true; fi
    fi
    rm -f "$file"
}

install() {
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm slurmdbd munge \
        mariadb-server mariadb-client
}

write_configs() {
    local cpus mem
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    cat >"$CONF" <<EOF
ClusterName=ftsam
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=300
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    if ! munge -n >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    fi
    wait_for 10 munged munge -n
}

start_mariadb() {
    mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --auth-root-authentication-method=socket \
        >"$DIR/log/mariadb-install.log" 2>&1
    mariadbd --no-defaults --datadir="$DIR/db" --user=root --socket="$DIR/run/mysql.sock" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadb.pid" --innodb-buffer-pool-size=32M \
        >"$DIR/log/mariadb.log" 2>&1 &
    wait_for 60 MariaDB mariadb --no-defaults --socket="$DIR/run/mysql.sock" -u root -e "select 1"
    mariadb --no-defaults --socket="$DIR/run/mysql.sock" -u root -e "
        CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

start() {
    if [[ -d $DIR/run ]]; then
        stop  # whatever an earlier start left running
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR"/{etc,state,spool,run,log,db}
    write_configs
    export SLURM_CONF=$CONF
    start_munge
    start_mariadb
    slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for 60 slurmdbd sacctmgr -i show cluster
    sacctmgr -i add cluster ftsam >/dev/null
    slurmctld -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$CONF" -N "$HOST"
    wait_for 30 "the node" sh -c "sinfo -h -N -o %t | grep -qx idle"
    log "cluster up: $(sinfo -h -o '%P %D %c CPUs %t')"
    echo "export SLURM_CONF=$CONF"
}

stop() {
    export SLURM_CONF=$CONF
    if [[ -f $CONF ]] && scontrol ping >/dev/null 2>&1; then
        scancel --full "--user=$(id -un)" 2>/dev/null || true
    fi
    stop_pidfile "$DIR/run/slurmd.pid" slurmd
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
    stop_pidfile "$DIR/run/slurmdbd.pid" slurmdbd
    stop_pidfile "$DIR/run/mariadb.pid" MariaDB
    stop_pidfile /run/munge/munged.pid munged
    log "stopped"
}

status() {
    export SLURM_CONF=$CONF
    sinfo
    sacctmgr -n show cluster format=cluster
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
