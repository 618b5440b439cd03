"""Writing checkpoints: `save` (collective, any TP/PP/DP layout) and `save_tensors` (one process, from full
tensors: conversion). Both write into `.{name}.tmp-XXXX` next to the target, llamactl.json last, and rename
the directory into place only when it is complete."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llamactl import rundir
from llamactl.checkpoint.layout import (CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, FORMAT, INDEX_FILE, TOKENIZER_FILE,
                                        VERSION, cfg_num_params, check_train_state, check_vocab, file_plan,
                                        fsync_file, masters_name, narrows, numel, resolve_tokenizer, sha256_file,
                                        shard_name, stage_entries, state_name, write_json)
from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError
from llamactl.hf_format import DTYPE_NAMES, hf_config, parse_dtype
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.tensor import TPShard, shard_specs
from llamactl.rundir import META_FILE, fsync_dir


def save(out_dir, model, ctx: ParallelContext | None = None, *, tokenizer=None, stage: str = "", step: int = 0,
         tokens: int = 0, train_state: dict | None = None, extra: dict | None = None, overwrite: bool = False,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | str | None = None) -> Path:
    """Write a checkpoint of `model` to out_dir; collective over all ranks when distributed.

    tokenizer: tokenizer.model path (or a dir / Tokenizer holding one), copied in; its vocab must match.
    train_state: this rank's resume state (see the package doc for the allowed values). An existing out_dir
    is refused unless overwrite=True (or it is this step's `step-NNNNNN` of a run: a resumed run saves that
    step again), and then replaced only after the new directory is complete.
    dtype: of the stored weights (torch.bfloat16 or "bf16", ...; None: the parameters' own). When it is narrower than the parameters and a
    train_state is written, the exact parameters go into train_state/masters*.pt too, so that
    `load_train_state(..., model=model)` resumes bit-exactly from the narrowed weights.
    """
    ctx = ctx or getattr(model, "ctx", None) or ParallelContext.single()
    out_dir = Path(out_dir)
    cfg, head = model.cfg, model.head
    dtype = parse_dtype(dtype, "--save-dtype")
    tok_path = resolve_tokenizer(tokenizer)
    if tok_path is not None:
        check_vocab(tok_path, cfg, "--tokenizer")
    if train_state is not None:
        check_train_state(train_state)
    if out_dir.exists() and not overwrite and not rundir.is_step_dir(out_dir, step):
        raise LlamactlError(f"checkpoint directory already exists: {out_dir} (choose another path or overwrite)")
    dist_on = _distributed(ctx)

    # 1. the temporary directory (rank 0 makes it and tells everyone its name)
    tmp_holder: list = [None]
    if ctx.rank == 0:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if rundir.is_step_dir(out_dir):  # this process writes the run dir: leftovers of a killed one go
            rundir.remove_stale_temps(out_dir.parent)
        tmp_holder[0] = tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent)
    if dist_on:
        dist.broadcast_object_list(tmp_holder, src=0)
    tmp = Path(tmp_holder[0])
    try:
        _save_into(tmp, out_dir, model, ctx, dist_on, cfg, head, tok_path, stage, step, tokens,
                   train_state, extra, max_shard_bytes, dtype)
    except BaseException:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    rundir.fault_after_publish(step)
    return out_dir


def _distributed(ctx: ParallelContext) -> bool:
    return ctx.world_size > 1 and dist.is_available() and dist.is_initialized()


def _gather_full(local: torch.Tensor, spec: TPShard | None, all_specs: list[dict] | None, name: str,
                 ctx: ParallelContext, dist_on: bool) -> torch.Tensor | None:
    """The full tensor on tp-rank 0 (None elsewhere); each rank's slice placed by its TPShard."""
    if spec is None or ctx.tp == 1 or not dist_on:
        return local.detach() if ctx.tp_rank == 0 else None
    src = local.detach().contiguous()
    me_dst = ctx.tp_rank == 0
    parts = [torch.empty_like(src) for _ in range(ctx.tp)] if me_dst else None
    dist.gather(src, parts, dst=ctx.tp_ranks[0], group=ctx.tp_group)
    if not me_dst:
        return None
    shape = list(src.shape)
    shape[spec.dim] = spec.full
    full = torch.empty(shape, dtype=src.dtype, device="cpu")
    for r, part in enumerate(parts):
        d, start, length, _ = all_specs[r][name]
        full.narrow(d, start, length).copy_(part.cpu())
    return full


def _hash(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _save_into(tmp: Path, out_dir: Path, model, ctx, dist_on, cfg, head, tok_path, stage, step, tokens,
               train_state, extra, max_shard_bytes, dtype) -> None:
    params = dict(model.named_parameters())
    dtype = dtype or next(iter(params.values())).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    files = file_plan(stage_entries(cfg, head, ctx.pp, ctx.virtual_stages), itemsize, max_shard_bytes)
    n_files = len(files)
    specs = shard_specs(model)
    all_specs = None
    writes_weights = ctx.dp_rank == 0
    if dist_on and ctx.tp > 1 and writes_weights:
        mine = {k: (v.dim, v.start, v.length, v.full) for k, v in specs.items()}
        all_specs = [None] * ctx.tp
        dist.all_gather_object(all_specs, mine, group=ctx.tp_group)

    hashes: dict[str, dict] = {}
    # 2. weights: this stage's files, tensors gathered one at a time onto tp-rank 0 / dp-rank 0
    if writes_weights:
        from safetensors.torch import save_file

        for i, entries in enumerate(files):
            if entries[0].stage != ctx.pp_rank:
                continue
            tensors = {}
            for e in entries:
                if e.name not in params:
                    raise LlamactlError(f"model has no parameter {e.name} (pipeline stage {ctx.pp_rank})")
                full = _gather_full(params[e.name], specs.get(e.name), all_specs, e.name, ctx, dist_on)
                if full is not None:
                    if tuple(full.shape) != e.shape:
                        raise LlamactlError(f"{e.name} has shape {tuple(full.shape)}, expected {e.shape}")
                    tensors[e.hf] = full.to(device="cpu", dtype=dtype).contiguous()
            if ctx.tp_rank == 0:
                path = tmp / shard_name(i, n_files)
                save_file(tensors, str(path), metadata={"format": "pt"})
                del tensors
                fsync_file(path)
                hashes[path.name] = _hash(path)
    # 3. this rank's train state, and the exact parameters when the weights above lost precision
    if train_state is not None:
        for name, obj in [(state_name(ctx.rank), train_state)] + (
                [(masters_name(ctx), {k: v.detach().to("cpu", copy=True) for k, v in params.items()})]
                if writes_weights and any(narrows(p.dtype, dtype) for p in params.values()) else []):
            path = tmp / name
            path.parent.mkdir(exist_ok=True)
            torch.save(obj, path)
            fsync_file(path)
            hashes[name] = _hash(path)
    # 4. everyone's hashes to rank 0, which writes the small files, llamactl.json last
    if dist_on:
        gathered = [None] * ctx.world_size
        dist.all_gather_object(gathered, hashes)
        for h in gathered:
            hashes.update(h)
    if ctx.rank == 0:
        _write_small_files(tmp, files, cfg, head, dtype, tok_path, itemsize, hashes, ctx, stage, step, tokens,
                           train_state is not None, extra)
        fsync_dir(tmp)
    if dist_on:
        dist.barrier()
    # 5. publish: rename into place (an old directory is removed only after the new one is there)
    if ctx.rank == 0:
        publish(tmp, out_dir)
    if dist_on:
        dist.barrier()


def save_tensors(out_dir, cfg: ModelConfig, head: str, get_tensor, *, dtype: torch.dtype, tokenizer=None,
                 stage: str = "", step: int = 0, tokens: int = 0, extra: dict | None = None, overwrite: bool = False,
                 max_shard_bytes: int = 5 * 2**30, on_tensor=None) -> Path:
    """Single-process save from full tensors under our names (conversion): get_tensor(name) -> Tensor.

    Tensors are fetched one at a time and written file by file, so at most one file's worth is in memory.
    on_tensor(name) is called after each tensor (progress bars). Same directory, atomicity and checks as save.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tok_path = resolve_tokenizer(tokenizer)
    if tok_path is not None:
        check_vocab(tok_path, cfg, "--tokenizer")
    if out_dir.exists() and not overwrite:
        raise LlamactlError(f"output directory already exists: {out_dir} (choose another path or --overwrite)")
    itemsize = torch.empty((), dtype=dtype).element_size()
    files = file_plan(stage_entries(cfg, head, 1), itemsize, max_shard_bytes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        hashes = {}
        for i, entries in enumerate(files):
            tensors = {}
            for e in entries:
                t = get_tensor(e.name)
                if tuple(t.shape) != e.shape:
                    raise LlamactlError(f"tensor {e.name} has shape {tuple(t.shape)}, the config needs {e.shape}")
                t = t.to(device="cpu", dtype=dtype).contiguous()
                if any(t.data_ptr() == o.data_ptr() for o in tensors.values()):
                    t = t.clone()  # tied embeddings: safetensors refuses shared storage
                tensors[e.hf] = t
                if on_tensor is not None:
                    on_tensor(e.name)
            path = tmp / shard_name(i, len(files))
            save_file(tensors, str(path), metadata={"format": "pt"})
            del tensors
            fsync_file(path)
            hashes[path.name] = _hash(path)
        _write_small_files(tmp, files, cfg, head, dtype, tok_path, itemsize, hashes, ParallelContext.single(), stage,
                           step, tokens, False, extra)
        fsync_dir(tmp)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_small_files(tmp, files, cfg, head, dtype, tok_path, itemsize, hashes, ctx, stage, step, tokens,
                       has_state, extra) -> None:
    n_files = len(files)
    weight_map = {e.hf: shard_name(i, n_files) for i, entries in enumerate(files) for e in entries}
    total = sum(itemsize * numel(e.shape) for entries in files for e in entries)
    missing = [shard_name(i, n_files) for i in range(n_files) if shard_name(i, n_files) not in hashes]
    if missing:
        raise LlamactlError(f"checkpoint shards were not written: {', '.join(missing)} ({tmp})")
    small = {CONFIG_FILE: hf_config(cfg, head, dtype),
             INDEX_FILE: {"metadata": {"total_size": total}, "weight_map": weight_map}}
    for name, obj in small.items():
        write_json(tmp / name, obj)
    if tok_path is not None:
        shutil.copyfile(tok_path, tmp / TOKENIZER_FILE)
        fsync_file(tmp / TOKENIZER_FILE)
    for name in list(small) + ([TOKENIZER_FILE] if tok_path is not None else []):
        hashes[name] = _hash(tmp / name)
    from llamactl import __version__

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "llamactl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": cfg.to_dict(),
        "head": head,
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "stage": stage,
        "step": int(step),
        "tokens": int(tokens),
        "parameters": cfg_num_params(cfg, head),
        "parallel": {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "virtual_stages": ctx.virtual_stages,
                     "world_size": ctx.world_size},
        "train_state": has_state,
        "files": dict(sorted(hashes.items())),
        "extra": extra or {},
    }
    write_json(tmp / META_FILE, meta)


def publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished tmp directory to out_dir; an existing out_dir is moved aside first and removed
    only after the new one is in place (a kill in between leaves `.{name}.old-*`, removed by the next save)."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / out_dir.name)
    os.rename(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
