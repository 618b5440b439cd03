#!/bin/bash
# Multi-node llamactl without a scheduler: run this same script on every node (ssh, tmux, pdsh, a cloud
# instance group), each with its own NODE_RANK; the nodes meet at node 0's rendezvous endpoint.
#
#   node 0:  NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash examples/torchrun_multinode.sh
#   node 1:  NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash examples/torchrun_multinode.sh
#
# Change (as variables or below): NNODES, NPROC (GPUs per node), MASTER_ADDR (node 0's address every node
# can reach), MASTER_PORT (free on node 0, open between the nodes), DATA / OUT (the same paths on every node:
# shared storage, or the same copy of the data; checkpoints are written by the ranks that hold each pipeline
# stage, so OUT must be shared), and the training flags in ARGS. Start the nodes within a few minutes of each
# other: an agent waits for the others at the endpoint. Run it again with RESUME=1 to continue a stopped run.
# On one machine (a test of the set-up) use MASTER_ADDR=127.0.0.1 and two shells with NODE_RANK=0 / 1.
#
# Inside the Dockerfile's image: docker run --gpus all --ipc=host --network=host -v /shared:/shared \
#   -e NODE_RANK -e MASTER_ADDR --entrypoint bash llamactl examples/torchrun_multinode.sh
set -euo pipefail

NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:?set NODE_RANK to the rank of this node, 0..NNODES-1}
NPROC=${NPROC:-8}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to node 0 address}
MASTER_PORT=${MASTER_PORT:-29500}
DATA=${DATA:-/shared/data/pile}
OUT=${OUT:-/shared/runs/pretrain-7b}
LLAMACTL=${LLAMACTL:-llamactl}
# 7b on 2 x 8 GPUs: tp 8 inside a node (NVLink), data parallel across the two nodes
ARGS=${ARGS:-"--size 7b --tp 8 --zero --seq-len 4096 --batch-tokens 4194304 --micro-batch 1 --save-every 500 --log-every 10"}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}

# llamactl's own launcher: it re-runs the command under torchrun's agent with these rendezvous flags
# (the same as: torchrun --nnodes $NNODES --nproc-per-node $NPROC --node-rank $NODE_RANK \
#   --master-addr $MASTER_ADDR --master-port $MASTER_PORT -m llamactl pretrain ...)
# shellcheck disable=SC2086  # ARGS is a list of flags
exec $LLAMACTL pretrain --data "$DATA" --out "$OUT" $ARGS \
  --nproc "$NPROC" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" ${RESUME:+--resume}
