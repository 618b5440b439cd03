# llamactl on NVIDIA GPUs: a CUDA *devel* PyTorch image (nvcc is needed to build the fused kernels).
#   docker build -t llamactl .
#   docker run --gpus all --ipc=host -v $PWD/runs:/runs llamactl pretrain --size 7b --data /runs/data --nproc 8
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
# torch comes from the image (it satisfies torch>=2.4, so pip installs no other build).
RUN pip install --no-cache-dir ninja -e .

ENTRYPOINT ["llamactl"]
CMD ["--help"]
