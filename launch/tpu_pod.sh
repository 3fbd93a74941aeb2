#!/bin/bash
# Runs one training on every worker of a Cloud TPU VM pod slice: the same command on all workers
# (gcloud ... ssh --worker=all), joined by jax.distributed, which discovers the pod itself.
#
#   launch/tpu_pod.sh --tpu my-v5p-64 --zone us-east5-a -- \
#       --config=configs/m2dino.py:paradigm=au --workdir=gs://my-bucket/runs/au
#   launch/tpu_pod.sh --tpu my-v5p-64 --zone us-east5-a --setup 'pip install -e .' -- ...
#   launch/tpu_pod.sh --dry-run --tpu my-v5p-64 --zone us-east5-a -- ...   # print the commands, run nothing
#
# Options: --tpu NAME (or $TPU_NAME), --zone ZONE (or $ZONE / $CLOUDSDK_COMPUTE_ZONE), --project P (or
# $PROJECT; default: gcloud's), --dir DIR (repository on the workers, default ~/m2dino_jax, or
# $M2DINO_REMOTE_DIR), --python PY (default python3, or $M2DINO_PYTHON), --setup CMD (run first on every
# worker, e.g. a git pull or pip install), --dry-run (or M2DINO_DRY_RUN=1).
# On the workers M2DINO_DISTRIBUTED_AUTO=1 makes the entry point call jax.distributed.initialize() with no
# arguments: on TPU VMs JAX reads the coordinator, process count and id from the TPU metadata server.
# The code must already be on every worker at --dir (clone it there, or use --setup); the workdir should
# be a bucket (gs://...) or a shared disk, since all workers write one checkpoint together.

set -euo pipefail

TPU=${TPU_NAME:-}
ZONE_ARG=${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
PROJECT_ARG=${PROJECT:-}
DIR=${M2DINO_REMOTE_DIR:-'~/m2dino_jax'}
PYTHON=${M2DINO_PYTHON:-python3}
SETUP=""
DRY=${M2DINO_DRY_RUN:-0}

# shell-quote one word in single quotes (readable dry-run lines)
sq() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --tpu) TPU=$2; shift 2 ;;
    --zone) ZONE_ARG=$2; shift 2 ;;
    --project) PROJECT_ARG=$2; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --setup) SETUP=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "tpu_pod.sh: unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
done
if [ -z "$TPU" ] || [ -z "$ZONE_ARG" ]; then
  echo "tpu_pod.sh: --tpu and --zone are required (or TPU_NAME and ZONE)" >&2
  exit 2
fi
if [ "$#" -eq 0 ]; then
  echo "tpu_pod.sh: pass the training arguments after --, e.g. -- --config=configs/m2dino.py --workdir=DIR" >&2
  exit 2
fi

SSH=(gcloud compute tpus tpu-vm ssh "$TPU" "--zone=$ZONE_ARG" --worker=all)
if [ -n "$PROJECT_ARG" ]; then SSH+=("--project=$PROJECT_ARG"); fi

# The remote command: the same on every worker.
printf -v TRAIN '%q ' "$@"
REMOTE="cd $DIR && M2DINO_DISTRIBUTED_AUTO=1 $PYTHON -m m2dino_jax.main ${TRAIN% }"
COMMANDS=()
if [ -n "$SETUP" ]; then COMMANDS+=("cd $DIR && $SETUP"); fi
COMMANDS+=("$REMOTE")

for cmd in "${COMMANDS[@]}"; do
  if [ "$DRY" = 1 ]; then
    printf '%s --command %s\n' "${SSH[*]}" "$(sq "$cmd")"
  else
    "${SSH[@]}" --command "$cmd"
  fi
done
