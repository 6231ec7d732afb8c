#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests and for trying launcher=slurm without a cluster.
#
#   eval "$(scripts/slurm_local_cluster.sh start)"   # installs slurm-wlm + munge if missing, starts them,
#                                                    # prints `export SLURM_CONF=...` for sbatch/squeue/scontrol
#   sinfo; sbatch --wrap hostname; squeue
#   scripts/slurm_local_cluster.sh stop
#   scripts/slurm_local_cluster.sh status
#
# Debian's slurm-wlm (slurmctld + slurmd, both on localhost) and munge. The configuration, state, spool and logs
# live in $ATELIER_SLURM_DIR (default /tmp/atelier-slurm); nothing under /etc/slurm is touched. Node CPUs and
# memory come from nproc and /proc/meminfo. Settings chosen for tests:
#   - ReturnToService=2: the node comes back by itself after a slurmd restart;
#   - AuthInfo=cred_expire=10: a requeued job may start again after ~11 s instead of 121 s;
#   - SlurmctldParameters=preempt_send_user_signal: a preempted job gets its --signal before the SIGTERM
#     (what a cluster admin sets for graceful preemption);
#   - no accounting (sacct fails; submitit then relies on its result files, with a warning).
# Needs root (it runs slurmd, which starts jobs as their users). Safe to call `start` twice: a running cluster
# with the same configuration is reused.
set -euo pipefail

DIR="${ATELIER_SLURM_DIR:-/tmp/atelier-slurm}"
CONF="$DIR/slurm.conf"
PARTITION="${ATELIER_SLURM_PARTITION:-debug}"

say() { echo "slurm_local_cluster: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    if id munge >/dev/null 2>&1; then
        su -s /bin/sh munge -c "/usr/sbin/munged" || /usr/sbin/munged --force
    else
        /usr/sbin/munged --force
    fi
    for _ in $(seq 50); do munge_ok && return; sleep 0.1; done
    say "munged did not come up"; exit 1
}

write_conf() {
    local host cpus mem_mb
    host="$(hostname -s)"
    cpus="$(nproc)"
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat > "$CONF.new" <<EOF
# written by scripts/slurm_local_cluster.sh
ClusterName=atelier
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldParameters=preempt_send_user_signal
KillWait=30
MinJobAge=600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_idle() {
    for _ in $(seq 150); do
        if SLURM_CONF="$CONF" sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            return
        fi
        sleep 0.2
    done
    say "the node did not become idle; logs in $DIR/log"
    SLURM_CONF="$CONF" sinfo >&2 || true
    exit 1
}

start() {
    install_packages
    start_munge
    if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
        wait_idle
        echo "export SLURM_CONF=$CONF"
        return
    fi
    stop_daemons
    write_conf
    /usr/sbin/slurmctld -f "$CONF" -i
    /usr/sbin/slurmd -f "$CONF"
    wait_idle
    say "up: $(SLURM_CONF="$CONF" sinfo -h -o '%P %D node(s) %c CPUs %t' | head -1) (SLURM_CONF=$CONF)"
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
    local f
    for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        if pid_alive "$f"; then
            kill "$(cat "$f")" 2>/dev/null || true
            for _ in $(seq 50); do pid_alive "$f" || break; sleep 0.1; done
            pid_alive "$f" && kill -9 "$(cat "$f")" 2>/dev/null || true
        fi
        rm -f "$f"
    done
}

stop() {
    if [ -f "$CONF" ] && pid_alive "$DIR/slurmctld.pid"; then
        SLURM_CONF="$CONF" scancel --full --quiet --partition "$PARTITION" 2>/dev/null || true
    fi
    stop_daemons
    say "stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF="$CONF" sinfo && SLURM_CONF="$CONF" squeue ;;
    *) say "usage: $0 start|stop|status"; exit 2 ;;
esac
