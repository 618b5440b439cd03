# llamactl on NVIDIA GPUs: a CUDA *devel* PyTorch image (nvcc is needed to build the fused kernels).
#   docker build -t llamactl .
#   docker run --gpus all --ipc=host -v $PWD/runs:/runs llamactl pretrain --size 7b --data /runs/data --nproc 8
#
# Multi-node (README "Multi-node"): the same image on every node, one container per node, each starting
# its GPUs' ranks and meeting node 0 at --master-addr:--master-port. --network=host so the rendezvous and
# NCCL reach the other nodes (and the InfiniBand devices: add --device=/dev/infiniband --cap-add=IPC_LOCK),
# the run directory on shared storage mounted at the same path everywhere:
#   docker run --gpus all --ipc=host --network=host -v /shared:/shared llamactl pretrain --size 7b \
#     --data /shared/pile --out /shared/runs/7b --tp 8 --nproc 8 --nnodes 2 --node-rank $NODE_RANK \
#     --master-addr 10.0.0.1 --master-port 29500
#   examples/torchrun_multinode.sh    the same as a script (no scheduler); it runs in this image too
#   examples/slurm/pretrain_70b.sbatch  Slurm: srun one launcher per node; with pyxis/enroot this image is
#                                       --container-image (enroot import dockerd://llamactl)
# A job's stdout is not a terminal: training prints plain log lines every --log-every steps; give the GPU's
# peak with --peak-tflops (H100 989, A100 312) for an MFU that does not depend on a start-up measurement.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

# Build the CUDA kernels for A100 (8.0) and H100/H200 (9.0) without needing a GPU at build time.
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    LLAMACTL_KERNEL_CACHE=/opt/llamactl-kernels \
    PYTHONUNBUFFERED=1

WORKDIR /opt/llamactl
COPY pyproject.toml README.md ./
COPY llamactl ./llamactl
COPY parallel ./parallel
COPY kernels ./kernels
COPY examples ./examples
# torch comes from the image (it satisfies torch>=2.4, so pip installs no other build).
RUN pip install --no-cache-dir ninja -e .

ENTRYPOINT ["llamactl"]
CMD ["--help"]
