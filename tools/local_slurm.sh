#!/usr/bin/env bash
# Bring up / tear down a single-node SLURM cluster on this machine, for testing
# `snakemake --profile profiles/slurm` against a real scheduler (tests/test_slurm.py, .ci/run).
#
#   tools/local_slurm.sh up       install (if missing), configure, start, wait until idle
#   tools/local_slurm.sh down     stop slurmd, slurmctld, munged (configuration is kept)
#   tools/local_slurm.sh status   daemons + sinfo
#
# Idempotent: `up` on a running cluster only checks it; `down` on a stopped one does nothing.
# Needs root (apt-get, /etc/slurm, daemons). No systemd: the daemons are started by hand,
# which is what containers and CI runners allow.
#
# Choices, and why (Slurm 22.05 from Debian bookworm):
# - ProctrackType=proctrack/linuxproc, TaskPlugin=task/none: no cgroup hierarchy is needed
#   (containers usually do not delegate one).
# - SelectType=select/cons_tres + CR_Core_Memory: memory is a consumable resource, so
#   `sbatch --mem` is scheduled like on a real cluster.
# - JobAcctGatherType=jobacct_gather/linux + JobAcctGatherParams=OverMemoryKill: enforces
#   --mem without cgroups by polling /proc every JobAcctGatherFrequency seconds and killing a
#   step that exceeds its limit -> the job ends OUT_OF_MEMORY, as on a production cluster.
# - No accounting database by default (AccountingStorageType=none): `sacct` then fails, so
#   the Snakemake plugin must poll with `squeue`, which only sees finished jobs for
#   MinJobAge seconds; MinJobAge=600 keeps them visible long enough (plugin needs >= 120).
#   CUTANA_SLURM_ACCOUNTING=1 additionally sets up slurmdbd + MariaDB so `sacct` works.
set -euo pipefail

CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
PARTITION=${CUTANA_SLURM_PARTITION:-debug}
ACCOUNTING=${CUTANA_SLURM_ACCOUNTING:-0}
WAIT_SECONDS=${CUTANA_SLURM_WAIT:-60}

say() { printf '[local_slurm] %s\n' "$*"; }
die() { printf '[local_slurm] ERROR: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (apt-get, /etc/slurm, daemons)"; }

# pid of a running daemon by its exact command name (`ps -C` matches the name, not the args,
# so this never matches e.g. an editor that has "slurmd" in a path). Zombies are skipped: the
# daemons fork into the background and, without systemd as init, the exited parent can linger.
daemon_pid() {
    { ps -C "$1" -o pid=,stat= 2>/dev/null || true; } | awk '$2 !~ /^Z/ {print $1; exit}'
}

# the daemons fork into the background: wait until the forked daemon is there
wait_daemon() {
    local name=$1 _
    for _ in $(seq 20); do
        sleep 0.5
        [ -n "$(daemon_pid "$name")" ] && return 0
    done
    tail -n 20 "$LOG_DIR/$name.log" >&2 2>/dev/null || true
    die "$name did not start"
}

install_packages() {
    local pkgs=(slurm-wlm munge)
    [ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "packages present: ${pkgs[*]}"
        return
    fi
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_conf() {
    local host cpus mem_total real_mem
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory a bit below the physical total: slurmd refuses a node that claims more than
    # it has, and the OS plus the daemons need headroom.
    mem_total=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
    real_mem=$((mem_total - mem_total / 10))
    [ "$real_mem" -gt 1024 ] || real_mem=$mem_total
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"

    local acct_lines
    if [ "$ACCOUNTING" = 1 ]; then
        acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
    else
        acct_lines="AccountingStorageType=accounting_storage/none"
    fi

    cat >"$CONF_DIR/slurm.conf.new" <<EOF
# Written by tools/local_slurm.sh: single-node test cluster (see comments in the script).
ClusterName=cutana
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=1
${acct_lines}
JobCompType=jobcomp/none
MinJobAge=600
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=${host} CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF_DIR/slurm.conf" ] && cmp -s "$CONF_DIR/slurm.conf" "$CONF_DIR/slurm.conf.new"; then
        rm -f "$CONF_DIR/slurm.conf.new"
        say "slurm.conf unchanged ($CONF_DIR/slurm.conf)"
    else
        mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
        say "wrote $CONF_DIR/slurm.conf (node $host: CPUs=$cpus RealMemory=${real_mem}MB)"
        CONF_CHANGED=1
    fi
    if [ "$ACCOUNTING" = 1 ]; then
        cat >"$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=${LOG_DIR}/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
        chmod 600 "$CONF_DIR/slurmdbd.conf"
    fi
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating munge key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    if [ -n "$(daemon_pid munged)" ]; then
        say "munged already running (pid $(daemon_pid munged))"
    else
        # munged refuses to run as root; run it as its own user, as the Debian unit does
        runuser -u munge -- /usr/sbin/munged
        wait_daemon munged
        say "started munged (pid $(daemon_pid munged))"
    fi
    munge -n | unmunge >/dev/null || die "munge round trip failed"
}

start_accounting() {
    [ "$ACCOUNTING" = 1 ] || return 0
    if [ -z "$(daemon_pid mariadbd)" ] && [ -z "$(daemon_pid mysqld)" ]; then
        mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
        (mysqld_safe >/dev/null 2>&1 &)
        for _ in $(seq 30); do mysqladmin ping >/dev/null 2>&1 && break; sleep 1; done
        say "started mariadb"
    fi
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db" || die "mariadb not reachable"
    if [ -z "$(daemon_pid slurmdbd)" ]; then
        slurmdbd
        wait_daemon slurmdbd
        for _ in $(seq 30); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
        say "started slurmdbd (pid $(daemon_pid slurmdbd))"
    fi
    sacctmgr -i add cluster cutana >/dev/null 2>&1 || true
}

start_slurm() {
    if [ -n "$(daemon_pid slurmctld)" ] && [ "${CONF_CHANGED:-0}" = 1 ]; then
        say "configuration changed: restarting daemons"
        stop_daemons slurmd slurmctld
    fi
    if [ -n "$(daemon_pid slurmctld)" ]; then
        say "slurmctld already running (pid $(daemon_pid slurmctld))"
    else
        slurmctld
        wait_daemon slurmctld
        say "started slurmctld (pid $(daemon_pid slurmctld))"
    fi
    if [ -n "$(daemon_pid slurmd)" ]; then
        say "slurmd already running (pid $(daemon_pid slurmd))"
    else
        slurmd
        wait_daemon slurmd
        say "started slurmd (pid $(daemon_pid slurmd))"
    fi
}

wait_idle() {
    local host state
    host=$(hostname -s)
    for _ in $(seq "$WAIT_SECONDS"); do
        state=$(sinfo -h -n "$host" -o '%T' 2>/dev/null | head -n1 || true)
        case "$state" in
            idle|mixed|allocated)
                say "node $host is $state"
                sinfo
                return 0
                ;;
            down*|drain*)
                # left over from an earlier unclean stop: bring the node back
                scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
                ;;
        esac
        sleep 1
    done
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node $host did not become idle within ${WAIT_SECONDS}s (state: ${state:-unknown})"
}

stop_daemons() {
    local name pid
    for name in "$@"; do
        pid=$(daemon_pid "$name")
        [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        say "stopped $name (pid $pid)"
    done
}

status() {
    local name pid
    for name in munged slurmctld slurmd slurmdbd; do
        pid=$(daemon_pid "$name")
        printf '%-10s %s\n' "$name" "${pid:-not running}"
    done
    sinfo 2>/dev/null || say "sinfo: controller not reachable"
}

case "${1:-}" in
    up)
        need_root
        install_packages
        CONF_CHANGED=0
        write_conf
        start_munge
        start_accounting
        start_slurm
        wait_idle
        ;;
    down)
        need_root
        # cancel what is left so that slurmd does not keep orphaned job steps around
        scancel --user=root >/dev/null 2>&1 || true
        stop_daemons slurmd slurmctld slurmdbd munged
        if [ -n "$(daemon_pid mariadbd)" ]; then
            mysqladmin shutdown && say "stopped mariadb"
        fi
        ;;
    status)
        status
        ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
