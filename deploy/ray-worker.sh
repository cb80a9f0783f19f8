#!/usr/bin/env bash
# fleetloop Ray GPU worker: joins the Ray head at $RAY_ADDRESS and blocks (the container's process).
#
#   RAY_ADDRESS                  the head's GCS address, host:port (required), e.g. ray-head:6379
#   FLEETLOOP_GPUS_PER_WORKER    "all" (default): this worker uses every GPU the container sees.
#                                N (a number): this worker claims N GPUs of its own, so that
#                                `docker compose up --scale ray-worker=K` on one host gives K
#                                workers with disjoint GPUs (K * N <= GPUs on the host). Docker
#                                hands every replica the same devices; the replicas share a
#                                volume at $FLEETLOOP_GPU_SLOT_DIR and each holds a lock (flock)
#                                on one slot for as long as it runs -- the kernel drops the lock
#                                when the process dies, however it dies.
#   FLEETLOOP_GPU_SLOT_DIR       default /var/lib/fleetloop/gpu-slots
#   RAY_WORKER_NUM_CPUS          CPUs this worker offers to Ray (default: what Ray detects)
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray head address (host:port), e.g. ray-head:6379}"
per="${FLEETLOOP_GPUS_PER_WORKER:-all}"
slot_dir="${FLEETLOOP_GPU_SLOT_DIR:-/var/lib/fleetloop/gpu-slots}"
args=(--address="${RAY_ADDRESS}" --block --disable-usage-stats)
if [ -n "${RAY_WORKER_NUM_CPUS:-}" ]; then
  args+=(--num-cpus="${RAY_WORKER_NUM_CPUS}")
fi

count_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU ' || true
  else
    python -c 'import torch; print(torch.cuda.device_count())'
  fi
}

if [ "${per}" != "all" ]; then
  case "${per}" in
    '' | *[!0-9]* | 0)
      echo "fleetloop-ray-worker: FLEETLOOP_GPUS_PER_WORKER must be 'all' or a positive number, not '${per}'" >&2
      exit 2 ;;
  esac
  total="$(count_gpus)"
  slots=$((total / per))
  if [ "${slots}" -lt 1 ]; then
    echo "fleetloop-ray-worker: this container sees ${total} GPU(s), fewer than FLEETLOOP_GPUS_PER_WORKER=${per}" >&2
    exit 2
  fi
  mkdir -p "${slot_dir}"
  claimed=""
  for ((k = 0; k < slots; k++)); do
    exec {lock_fd}>"${slot_dir}/slot-${k}.lock"
    if flock --nonblock "${lock_fd}"; then
      claimed="${k}"
      break  # the descriptor stays open, and locked, through the exec below
    fi
    exec {lock_fd}>&-
  done
  if [ -z "${claimed}" ]; then
    echo "fleetloop-ray-worker: all ${slots} GPU slot(s) of ${per} GPU(s) on this host are held by other" \
         "workers; scale ray-worker down to ${slots} or lower FLEETLOOP_GPUS_PER_WORKER" >&2
    exit 3
  fi
  first=$((claimed * per))
  CUDA_VISIBLE_DEVICES="$(seq -s, "${first}" $((first + per - 1)))"
  export CUDA_VISIBLE_DEVICES
  args+=(--num-gpus="${per}")
  echo "fleetloop-ray-worker: slot ${claimed}: GPUs ${CUDA_VISIBLE_DEVICES} of ${total}" >&2
fi

echo "fleetloop-ray-worker: joining the Ray head at ${RAY_ADDRESS}" >&2
exec ray start "${args[@]}"
