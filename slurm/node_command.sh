#!/usr/bin/env bash
# Print (or, with --exec, run) the DeepSpeed launcher command for this node of a SLURM job.
#
#   slurm/node_command.sh [--exec] SCRIPT [SCRIPT ARGS...]
#
# Each node of the job runs it once (srun --ntasks-per-node=1). It writes a hostfile listing the
# job's nodes and prints, shell-quoted on one line:
#   deepspeed --hostfile FILE --no_ssh --node_rank $SLURM_NODEID --master_addr HEAD --master_port PORT SCRIPT ARGS...
#
# Environment:
#   SLURM_NODEID        this node's index in the job (srun sets it)                     required
#   SLURM_JOB_NODELIST  the job's nodes, expanded with `scontrol show hostnames`
#   LORA_DIST_NODES     space-separated host names used instead of SLURM_JOB_NODELIST (no scontrol needed)
#   SLURM_NNODES        node count; checked against the node list when set
#   GPUS_PER_NODE       ranks per node (hostfile slots)                                 default 8
#   MASTER_ADDR         rendezvous host                                                 default: first node
#   MASTER_PORT         rendezvous port                             default 20000 + SLURM_JOB_ID % 20000
#   HOSTFILE            hostfile path          default ${TMPDIR:-/tmp}/lora_dist_hostfile.$SLURM_JOB_ID
#   DEEPSPEED           launcher executable                                             default deepspeed
set -euo pipefail

node_command_die() {
    echo "node_command.sh: $*" >&2
    exit 1
}

node_command() {
    local exec_mode=0
    if [[ "${1:-}" == "--exec" ]]; then
        exec_mode=1
        shift
    fi
    (( $# >= 1 )) || node_command_die "usage: node_command.sh [--exec] SCRIPT [SCRIPT ARGS...]"
    [[ -n "${SLURM_NODEID:-}" ]] || node_command_die "SLURM_NODEID is not set: run this under srun, one task per node"
    [[ "$SLURM_NODEID" =~ ^[0-9]+$ ]] || node_command_die "SLURM_NODEID=$SLURM_NODEID is not a node index"

    local -a nodes
    if [[ -n "${LORA_DIST_NODES:-}" ]]; then
        read -r -a nodes <<< "$LORA_DIST_NODES"
    else
        [[ -n "${SLURM_JOB_NODELIST:-}" ]] \
            || node_command_die "SLURM_JOB_NODELIST is not set: run inside a SLURM job or set LORA_DIST_NODES"
        command -v scontrol > /dev/null \
            || node_command_die "scontrol not found: set LORA_DIST_NODES to the job's host names"
        mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    fi
    (( ${#nodes[@]} > 0 )) || node_command_die "the job's node list is empty"
    if [[ -n "${SLURM_NNODES:-}" && "$SLURM_NNODES" != "${#nodes[@]}" ]]; then
        node_command_die "SLURM_NNODES=$SLURM_NNODES but the node list has ${#nodes[@]} nodes: ${nodes[*]}"
    fi
    (( SLURM_NODEID < ${#nodes[@]} )) \
        || node_command_die "SLURM_NODEID=$SLURM_NODEID but the job has only ${#nodes[@]} nodes: ${nodes[*]}"

    local slots="${GPUS_PER_NODE:-8}"
    [[ "$slots" =~ ^[1-9][0-9]*$ ]] || node_command_die "GPUS_PER_NODE=$slots is not a positive integer"
    local master_addr="${MASTER_ADDR:-${nodes[0]}}"
    local master_port="${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}"
    local hostfile="${HOSTFILE:-${TMPDIR:-/tmp}/lora_dist_hostfile.${SLURM_JOB_ID:-$$}}"

    # Written per node (to a temporary name, then renamed) so no node reads a half-written file.
    mkdir -p "$(dirname "$hostfile")"
    local tmp="$hostfile.tmp.$$.$SLURM_NODEID"
    local node
    for node in "${nodes[@]}"; do
        printf '%s slots=%s\n' "$node" "$slots"
    done > "$tmp"
    mv -f "$tmp" "$hostfile"

    local -a cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID"
                  --master_addr "$master_addr" --master_port "$master_port" "$@")
    if (( exec_mode )); then
        exec "${cmd[@]}"
    fi
    local line
    printf -v line '%q ' "${cmd[@]}"
    printf '%s\n' "${line% }"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    node_command "$@"
fi
