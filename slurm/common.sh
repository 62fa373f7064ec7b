# Shared by the train_*.sbatch scripts (sourced from the repository, not submitted itself).
#
# Settings, all optional, read from the environment sbatch passes on (export them, or
# `sbatch --export=ALL,NAME=value ...`):
#   LORASB_DIR            repository root (default: the directory sbatch was called from)
#   PYTHON                interpreter with lorasb-ds installed (default: python on PATH)
#   DS_CONFIG             DeepSpeed JSON (default ds_configs/zero3.json)
#   CONFIG                run-config YAML (--config), optional
#   OUTPUT_DIR            run directory (default outputs/<job name>-<job id>: a requeued job keeps it)
#   GPUS_PER_NODE         processes per node (default: the GPUs Slurm gave the job on the node, else
#                         the GPUs nvidia-smi lists, else 1); on CPU-only nodes: CPU processes
#   DIST_TIMEOUT_MINUTES  timeout of every collective (train.dist_timeout_minutes, default 30)
#   MASTER_ADDR, MASTER_PORT  rendezvous (default: 127.0.0.1 for one node, else the first host of
#                         the job; port 20000 + job id % 20000)
#   EXTRA_ARGS            more training arguments, split on spaces (section.key=value ...)
#   LAUNCHER_ARGS         more torchrun / deepspeed runner options, split on spaces
#   SRUN_ARGS             more options for the srun of the training step, split on spaces
# Arguments after the script name on the sbatch line are passed to training too.

# shellcheck disable=SC2034  # the variables set here are read by the sourcing scripts
EXIT_PREEMPTED=75  # lorasb_ds.train.EXIT_PREEMPTED

lorasb_setup() {
    : "${SLURM_JOB_ID:?submit this script with sbatch}"
    cd "${LORASB_DIR:-$SLURM_SUBMIT_DIR}" || exit 2
    [[ -f launch/train.py ]] || { echo "[slurm] $(pwd) is not the lorasb-ds repository: set LORASB_DIR" >&2; exit 2; }
    PYTHON=${PYTHON:-python}
    DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
    OUTPUT_DIR=${OUTPUT_DIR:-outputs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
    DIST_TIMEOUT_MINUTES=${DIST_TIMEOUT_MINUTES:-30}
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

    if [[ -z ${GPUS_PER_NODE:-} ]]; then
        local slurm_gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
        slurm_gpus=${slurm_gpus##*:}  # "a100:8" -> 8
        if [[ $slurm_gpus =~ ^[1-9][0-9]*$ ]]; then
            GPUS_PER_NODE=$slurm_gpus
        elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
        else
            GPUS_PER_NODE=1
        fi
    fi
    local cpus=${SLURM_CPUS_ON_NODE:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1 ))}

    # The rendezvous: one port per job (the same after a requeue), loopback on one node.
    LORASB_MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    if [[ -n ${MASTER_ADDR:-} ]]; then
        LORASB_MASTER_ADDR=$MASTER_ADDR
    elif [[ $NNODES == 1 ]]; then
        LORASB_MASTER_ADDR=127.0.0.1
    else
        LORASB_MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    fi

    TRAIN_ARGS=(--ds_config "$DS_CONFIG" --output_dir "$OUTPUT_DIR" --resume auto)
    [[ -n ${CONFIG:-} ]] && TRAIN_ARGS+=(--config "$CONFIG")
    TRAIN_ARGS+=("train.dist_timeout_minutes=$DIST_TIMEOUT_MINUTES")
    local extra=()
    read -r -a extra <<< "${EXTRA_ARGS:-}"
    TRAIN_ARGS+=("${extra[@]}" "$@")
    read -r -a LAUNCHER_OPTS <<< "${LAUNCHER_ARGS:-}"
    read -r -a SRUN_OPTS <<< "${SRUN_ARGS:-}"
    mkdir -p "$OUTPUT_DIR"
    echo "[slurm] job $SLURM_JOB_ID (${SLURM_JOB_NAME}) start $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on" \
        "$NNODES node(s): $SLURM_JOB_NODELIST; $GPUS_PER_NODE process(es) per node; output $OUTPUT_DIR"
}

# Run one job step in the background so that the batch shell can take the USR1 Slurm sends before
# the time limit (#SBATCH --signal=B:USR1@...) and relay it to every process of the step. Launcher
# processes (torchrun, deepspeed) must ignore USR1 (see lorasb_ignore_usr1); the training processes
# take it, checkpoint at the next step boundary and exit 75.
_lorasb_forward() {
    LORASB_SIGNALLED=1
    echo "[slurm] $(date '+%F %T') SIGUSR1 (time limit near): relaying it to the tasks of step pid $LORASB_STEP_PID"
    kill -USR1 "$LORASB_STEP_PID" 2>/dev/null || true  # srun passes USR1 on to every process of the step
}

lorasb_run() {
    LORASB_SIGNALLED=0
    echo "[slurm] launch: $*"
    trap _lorasb_forward USR1
    "$@" &
    LORASB_STEP_PID=$!
    while kill -0 "$LORASB_STEP_PID" 2>/dev/null; do
        wait "$LORASB_STEP_PID" || true  # returns early when a trapped signal arrives
    done
    LORASB_STEP_RC=0
    wait "$LORASB_STEP_PID" || LORASB_STEP_RC=$?
    trap - USR1
    echo "[slurm] $(date '+%F %T') step ended with exit code $LORASB_STEP_RC"
}

# Exit with the step's code; a run stopped for preemption (exit 75, or any failure after the USR1
# was relayed: launchers report a stopped worker as their own failure) is requeued, and the new
# start continues it (--resume auto).
lorasb_finish() {
    if [[ $LORASB_STEP_RC == "$EXIT_PREEMPTED" ]] || [[ $LORASB_SIGNALLED == 1 && $LORASB_STEP_RC != 0 ]]; then
        echo "[slurm] run stopped with a checkpoint: requeueing job $SLURM_JOB_ID (it resumes from $OUTPUT_DIR)"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit "$EXIT_PREEMPTED"  # Slurm ends this start and queues the job again
        fi
        echo "[slurm] scontrol requeue failed; resubmit with OUTPUT_DIR=$OUTPUT_DIR to continue" >&2
        exit "$EXIT_PREEMPTED"
    fi
    exit "$LORASB_STEP_RC"
}

# Prefix for a launcher command run by srun: the launcher ignores USR1 (inherited across exec) and
# keeps waiting for its workers, which install their own handler.
lorasb_ignore_usr1=(bash -c 'trap "" USR1; exec "$@"' lorasb-launcher)
