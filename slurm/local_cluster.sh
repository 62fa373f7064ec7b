#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying the sbatch scripts and for the launcher
# tests: slurmctld + slurmd + munged on localhost, no systemd, no cgroups.
#
#   slurm/local_cluster.sh start    install the Debian packages if missing, write the config, start
#                                   munged, slurmctld and slurmd, wait until the node is idle
#   slurm/local_cluster.sh stop     cancel leftover jobs, stop the three daemons (by their pid files)
#   slurm/local_cluster.sh status   what runs; exit 0 when the cluster takes jobs
#   slurm/local_cluster.sh install  only install the packages (slurmctld slurmd slurm-client munge)
#
# Needs root and Debian/Ubuntu (apt). It writes /etc/slurm/slurm.conf and refuses to replace one it
# did not write (FORCE=1 replaces it). Meant for throw-away machines and CI, not for a real cluster.
# The node gets the CPUs and memory `slurmd -C` reports, NodeAddr=127.0.0.1, one partition "debug".
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
RUN_DIR=/run/slurm
LOG_DIR=/var/log/slurm
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MARKER="# written by lorasb-ds slurm/local_cluster.sh"
WAIT_S=${WAIT_S:-60}
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "[local_cluster] $*"; }
die() { echo "[local_cluster] error: $*" >&2; exit 1; }

pid_alive() {  # pid file -> 0 when its process runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sbatch scontrol munged munge; do
        command -v "$cmd" >/dev/null 2>&1 || [[ -x /usr/sbin/$cmd ]] || missing=1
    done
    [[ $missing == 0 ]] && return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get; install ${PACKAGES[*]}"
    [[ $(id -u) == 0 ]] || die "installing ${PACKAGES[*]} needs root"
    log "installing ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' maintainer scripts from starting daemons (no init system to own them here).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
    fi
    local apt=(apt-get install -y -q --no-install-recommends "${PACKAGES[@]}") rc=0
    if ! "${apt[@]}" >/tmp/local_cluster-apt.log 2>&1; then
        log "apt-get install failed; running apt-get update once and retrying"
        { apt-get update -q && "${apt[@]}"; } >>/tmp/local_cluster-apt.log 2>&1 || rc=$?
    fi
    [[ $made_policy == 1 ]] && rm -f "$policy"
    if [[ $rc != 0 ]]; then
        tail -n 30 /tmp/local_cluster-apt.log >&2
        die "apt-get install ${PACKAGES[*]} failed (exit $rc); log in /tmp/local_cluster-apt.log"
    fi
}

write_config() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF" && [[ ${FORCE:-0} != 1 ]]; then
        die "$CONF exists and was not written by this script; set FORCE=1 to replace it"
    fi
    local node_line host
    host=$(hostname -s)
    # First line of `slurmd -C`: "NodeName=... CPUs=... Boards=... ... RealMemory=..."
    node_line=$(slurmd -C | head -n 1)
    [[ $node_line == NodeName=* ]] || die "unexpected output of 'slurmd -C': $node_line"
    node_line=$(sed -E "s/^NodeName=[^ ]+/NodeName=$host/" <<<"$node_line")
    mkdir -p "$CONF_DIR"
    cat > "$CONF" <<EOF
$MARKER
ClusterName=lorasb-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# requeued jobs wait cred_expire seconds before they start again (default 120)
AuthInfo=cred_expire=5
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
ReturnToService=2
MinJobAge=5
KillWait=30
InactiveLimit=0
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    log "wrote $CONF ($node_line)"
}

start_munge() {
    if pid_alive "$MUNGE_PID"; then return 0; fi
    [[ -s /etc/munge/munge.key ]] || { mungekey --create >/dev/null 2>&1 || die "no /etc/munge/munge.key"; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    local i
    for ((i = 0; i < 50; i++)); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "munged does not answer (munge -n | unmunge failed)"
}

node_state() {
    sinfo -h -N -n "$(hostname -s)" -o %t 2>/dev/null | head -n 1
}

cluster_up() {
    pid_alive "$CTLD_PID" && pid_alive "$SLURMD_PID" && scontrol ping 2>/dev/null | grep -q "is UP" \
        && [[ $(node_state) =~ ^(idle|mix|alloc) ]]
}

start() {
    [[ $(id -u) == 0 ]] || die "start needs root"
    local t0=$SECONDS
    install_packages
    if cluster_up; then log "already running"; status; return 0; fi
    write_config
    mkdir -p "$RUN_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    start_munge
    if ! pid_alive "$CTLD_PID"; then
        slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
    fi
    local i
    for ((i = 0; i < WAIT_S * 5; i++)); do
        scontrol ping 2>/dev/null | grep -q "is UP" && break
        sleep 0.2
    done
    scontrol ping 2>/dev/null | grep -q "is UP" \
        || { tail -n 20 "$LOG_DIR/slurmctld.log" >&2 || true; die "slurmctld is not UP after ${WAIT_S}s"; }
    if ! pid_alive "$SLURMD_PID"; then
        slurmd || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
    fi
    local state=""
    for ((i = 0; i < WAIT_S * 5; i++)); do
        state=$(node_state)
        [[ $state =~ ^(idle|mix|alloc)$ ]] && break
        if [[ $state =~ ^(down|drain|drng|fail) ]] && ((i % 10 == 9)); then
            scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 0.2
    done
    if [[ ! $state =~ ^(idle|mix|alloc)$ ]]; then
        tail -n 20 "$LOG_DIR/slurmd.log" >&2 || true
        scontrol show node "$(hostname -s)" >&2 || true
        die "node $(hostname -s) is '$state', not idle, after ${WAIT_S}s"
    fi
    log "up in $((SECONDS - t0))s"
    status
}

stop_daemons() {  # name:pidfile ...: SIGTERM to all at once, then wait for each (SIGKILL after 10 s)
    local entry name file i
    local -a names=() pids=()
    for entry in "$@"; do
        name=${entry%%:*} file=${entry#*:}
        if pid_alive "$file"; then
            names+=("$name") pids+=("$(cat "$file")")
            kill "${pids[-1]}" 2>/dev/null || true
        fi
        rm -f "$file"
    done
    for i in "${!pids[@]}"; do
        local pid=${pids[$i]} n
        for ((n = 0; n < 100; n++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "${names[$i]} ($pid) did not stop on SIGTERM; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        else
            log "stopped ${names[$i]} ($pid)"
        fi
    done
}

stop() {
    if pid_alive "$CTLD_PID" && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
        log "cancelling jobs: $(squeue -h -o %i | tr '\n' ' ')"
        local jobs
        mapfile -t jobs < <(squeue -h -o %i)
        scancel --full "${jobs[@]}" 2>/dev/null || true
        local i
        for ((i = 0; i < 50; i++)); do
            [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    stop_daemons "slurmd:$SLURMD_PID" "slurmctld:$CTLD_PID"
    stop_daemons "munged:$MUNGE_PID"  # last: the Slurm daemons authenticate through it while stopping
}

status() {
    local ok=0 name file
    for name in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        file=${name#*:}
        if pid_alive "$file"; then echo "${name%%:*}: running (pid $(cat "$file"))"
        else echo "${name%%:*}: not running"; ok=1; fi
    done
    if pid_alive "$CTLD_PID"; then
        scontrol ping 2>/dev/null || ok=1
        sinfo -N -o "%N %t %c %m" 2>/dev/null || ok=1
        [[ $(node_state) =~ ^(idle|mix|alloc)$ ]] || ok=1
    fi
    return $ok
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    install) install_packages ;;
    *) echo "usage: $0 start|stop|status|install" >&2; exit 2 ;;
esac
