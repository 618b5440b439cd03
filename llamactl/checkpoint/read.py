"""Reading checkpoints: find one (`resolve`), describe it (`read_meta`, `load_config`), check it (`verify`),
and fill a model of any TP/PP layout from it, each rank reading only its slices (`load`, `load_model`,
`load_train_state`). llamactl.json is parsed once per load and passed along; each file is hashed once."""
from __future__ import annotations

from pathlib import Path

import torch

from llamactl.checkpoint.layout import (CONFIG_FILE, FORMAT, INDEX_FILE, TOKENIZER_FILE, TRAIN_STATE_DIR, VERSION,
                                        cfg_num_params, check_vocab, masters_name, read_json, sha256_file,
                                        state_name)
from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError
from llamactl.hf_format import HEAD_PARAMS, config_from_hf, to_hf_name
from llamactl.parallel.context import ParallelContext
from llamactl.parallel.tensor import TPShard, shard_specs
from llamactl.rundir import META_FILE, latest


def checkpoint_dir(ckpt_dir) -> Path:
    """ckpt_dir as a Path, refused (one line) when it does not exist or is a file."""
    p = Path(ckpt_dir)
    if not p.exists():
        raise LlamactlError(f"checkpoint directory not found: {p}")
    if not p.is_dir():
        raise LlamactlError(f"not a checkpoint directory (a file): {p}")
    return p


def resolve(path, flag: str = "--model") -> Path:
    """A checkpoint dir as given, or the newest complete one of a run dir (or of its `latest` file)."""
    path = Path(path)
    if path.name == "latest" and path.is_file():
        path = path.parent
    if path.is_dir() and not (path / META_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        found = latest(path)
        if found is None:
            raise LlamactlError(f"no complete checkpoint in run dir ({path}, {flag})")
        return found
    return path


def read_meta(ckpt_dir) -> dict:
    """llamactl.json of a checkpoint; for a plain Hugging Face directory, an equivalent summary."""
    p = checkpoint_dir(ckpt_dir)
    if (p / META_FILE).is_file():
        meta = read_json(p / META_FILE, META_FILE)
        if meta.get("format") != FORMAT:
            raise LlamactlError(f"{META_FILE} is not a llamactl checkpoint description ({p})")
        if int(meta.get("version", 0)) > VERSION:
            raise LlamactlError(f"checkpoint format version {meta.get('version')} is newer than this llamactl "
                                f"understands ({VERSION}); upgrade llamactl ({p})")
        return meta
    if (p / CONFIG_FILE).is_file():
        d = read_json(p / CONFIG_FILE, CONFIG_FILE)
        cfg, head = config_from_hf(d, str(p))
        return {"format": "hf", "version": None, "model": cfg.to_dict(), "head": head,
                "dtype": d.get("torch_dtype") or d.get("dtype"), "stage": "hf", "step": 0, "tokens": 0,
                "parameters": cfg_num_params(cfg, head), "parallel": None, "train_state": False,
                "files": {}, "extra": {}, "hf_config": d}
    if p.name.startswith(".") and ".tmp-" in p.name:
        raise LlamactlError(f"incomplete checkpoint (interrupted while writing): {p}")
    raise LlamactlError(f"not a checkpoint directory: {p} has neither {META_FILE} nor {CONFIG_FILE}")


def load_config(ckpt_dir, *, meta: dict | None = None) -> tuple[ModelConfig, str]:
    """(ModelConfig, head) recorded in a checkpoint (or read from a plain HF config.json)."""
    meta = meta if meta is not None else read_meta(ckpt_dir)
    try:
        return ModelConfig.from_dict(meta["model"]), meta["head"]
    except (KeyError, TypeError) as e:
        raise LlamactlError(f"{META_FILE} has no valid model config ({e}) ({ckpt_dir})") from None


def tokenizer_path(ckpt_dir) -> Path:
    """The checkpoint's tokenizer.model."""
    p = checkpoint_dir(ckpt_dir) / TOKENIZER_FILE
    if not p.is_file():
        raise LlamactlError(f"checkpoint has no {TOKENIZER_FILE} ({ckpt_dir})")
    return p


def weight_map(p: Path) -> dict[str, str]:
    """HF tensor name -> file, from the index (or the one model.safetensors of a small HF model)."""
    if (p / INDEX_FILE).is_file():
        idx = read_json(p / INDEX_FILE, INDEX_FILE)
        wm = idx.get("weight_map")
        if not isinstance(wm, dict):
            raise LlamactlError(f"{INDEX_FILE} has no weight_map ({p})")
        return wm
    if (p / "model.safetensors").is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(p / "model.safetensors"), framework="pt") as f:
                return {k: "model.safetensors" for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise LlamactlError(f"model.safetensors is not a valid safetensors file ({p}: {e})") from None
    raise LlamactlError(f"no weights in {p}: neither {INDEX_FILE} nor model.safetensors "
                        f"(Meta or .bin checkpoints: run `llamactl convert` first)")


def verify(ckpt_dir, files: list[str] | None = None, *, on_file=None, meta: dict | None = None) -> list[str]:
    """Problems of a checkpoint (empty = intact): missing files and sha256 mismatches, named by file.

    files: only these (relative names); on_file(name, nbytes) is called after each file (progress bars);
    meta: the already parsed read_meta(ckpt_dir).
    """
    p = Path(ckpt_dir)
    if not p.is_dir():
        return [f"checkpoint directory not found: {p}"]
    try:
        meta = meta if meta is not None else read_meta(p)
    except LlamactlError as e:
        return [str(e)]
    if meta["format"] == "hf":  # no hashes to check: at least every weight file must be there
        try:
            wm = weight_map(p)
        except LlamactlError as e:
            return [str(e)]
        return [f"shard {f} is missing" for f in sorted(set(wm.values())) if not (p / f).is_file()]
    problems = []
    for name, info in meta.get("files", {}).items():
        if files is not None and name not in files:
            continue
        f = p / name
        kind = "shard" if name.endswith(".safetensors") else "file"
        if not f.is_file():
            problems.append(f"{kind} {name} is missing")
        elif f.stat().st_size != info.get("bytes", f.stat().st_size):
            problems.append(f"{kind} {name} is corrupted (size {f.stat().st_size:,} != {info['bytes']:,} bytes)")
        elif sha256_file(f) != info.get("sha256"):
            problems.append(f"{kind} {name} is corrupted (sha256 mismatch)")
        if on_file is not None:
            on_file(name, info.get("bytes", 0))
    return problems


_verify = verify  # `load` has a keyword argument of the same name

_CHECKED_FIELDS = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_dim", "norm_eps", "rope_theta")


def check_config(saved: ModelConfig, model_cfg: ModelConfig, where: str) -> None:
    """Raise naming the first field where a checkpoint's model differs from the model being filled."""
    for f in _CHECKED_FIELDS:
        a, b = getattr(saved, f), getattr(model_cfg, f)
        if a != b:
            raise LlamactlError(f"checkpoint has {f}={a} but the model has {f}={b} ({where})")


def heads_compatible(saved: str, model_head: str) -> bool:
    return (saved == "lm") == (model_head == "lm")


def model_files(meta: dict, shards) -> list[str]:
    """The files a model load depends on: its shards and every small file of the model directory (config.json,
    the index, tokenizer.model), never the train state. One list, so `eval`, `generate`, `chat` and resume
    accept and refuse the same checkpoints (a llamactl checkpoint without its config.json is damaged)."""
    small = [n for n in meta.get("files", {}) if not n.endswith(".safetensors")
             and not n.startswith(TRAIN_STATE_DIR + "/")]
    return sorted(set(shards) | set(small))


@torch.no_grad()
def load(ckpt_dir, model, ctx: ParallelContext | None = None, *, verify: bool = True, strict_head: bool = True,
         meta: dict | None = None, flag: str | None = None) -> dict:
    """Fill `model`'s parameters from a checkpoint (or plain HF dir), reading only this rank's slices.

    Checks the model config (and the tokenizer's vocabulary) first, and with verify=True the sha256 of
    every file read (each once). A reward/value model may load an lm checkpoint with strict_head=False: the
    head is then left as it is. meta: the already parsed read_meta(ckpt_dir); flag: named in errors
    (e.g. "--model"). Returns the checkpoint's llamactl.json contents.
    """
    from safetensors import safe_open

    p = checkpoint_dir(ckpt_dir)
    where = f"{p}, {flag}" if flag else str(p)
    meta = meta if meta is not None else read_meta(p)
    saved_cfg, saved_head = load_config(p, meta=meta)
    check_config(saved_cfg, model.cfg, where)
    skip_head = False
    if not heads_compatible(saved_head, model.head):
        if strict_head:
            raise LlamactlError(f"checkpoint has a {saved_head} head but the model a {model.head} head ({where})")
        skip_head = True
    wm = weight_map(p)
    specs = shard_specs(model)
    params = dict(model.named_parameters())
    tie = False
    if "lm_head.weight" not in wm and "output.weight" in params and not skip_head:
        tie = bool((meta.get("hf_config") or {}).get("tie_word_embeddings"))
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name in params:
        if skip_head and name in HEAD_PARAMS:
            continue
        hf = to_hf_name(name)
        if hf not in wm and tie and name == "output.weight":
            hf = "model.embed_tokens.weight"
        if hf not in wm:
            raise LlamactlError(f"checkpoint lacks tensor {hf} ({where})")
        by_file.setdefault(wm[hf], []).append((name, hf))
    if verify and meta["format"] != "hf":
        problems = _verify(p, files=model_files(meta, by_file), meta=meta)
        if problems:
            raise LlamactlError(f"{problems[0]} ({where})")
    if (p / TOKENIZER_FILE).is_file():
        check_vocab(p / TOKENIZER_FILE, model.cfg, where)
    for fname, names in sorted(by_file.items()):
        fpath = p / fname
        if not fpath.is_file():
            raise LlamactlError(f"shard {fname} is missing ({where})")
        try:
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for name, hf in names:
                    if hf not in keys:
                        raise LlamactlError(f"shard {fname} lacks tensor {hf} ({where})")
                    _load_param(f.get_slice(hf), params[name], specs.get(name), hf, fname, where)
        except LlamactlError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors' own error types
            raise LlamactlError(f"shard {fname} cannot be read: {e} ({where})") from None
    return meta


def _load_param(sl, param: torch.Tensor, spec: TPShard | None, hf: str, fname: str, where: str) -> None:
    full_shape = list(param.shape)
    if spec is not None:
        full_shape[spec.dim] = spec.full
    if list(sl.get_shape()) != full_shape:
        raise LlamactlError(f"tensor {hf} in {fname} has shape {tuple(sl.get_shape())}, the model needs "
                            f"{tuple(full_shape)} ({where})")
    if spec is None:
        t = sl[:]
    else:
        idx = [slice(None)] * len(full_shape)
        idx[spec.dim] = slice(spec.start, spec.start + spec.length)
        t = sl[tuple(idx)]
    param.copy_(t.to(dtype=param.dtype))


def load_train_state(ckpt_dir, ctx: ParallelContext | None = None, model=None, *,
                     meta: dict | None = None) -> dict | None:
    """This rank's train state (None if the checkpoint has none); the layout must equal the saved one.

    model: when the weights were stored narrower than the parameters (save(dtype=bf16) of an fp32 model),
    its parameters are set to the exact saved values (train_state/masters*.pt), so resume is bit-exact.
    meta: the already parsed read_meta(ckpt_dir).
    """
    ctx = ctx or ParallelContext.single()
    p = checkpoint_dir(ckpt_dir)
    meta = meta if meta is not None else read_meta(p)
    if not meta.get("train_state"):
        return None
    lay = meta.get("parallel") or {}
    now = {"tp": ctx.tp, "pp": ctx.pp, "dp": ctx.dp, "virtual_stages": ctx.virtual_stages}
    saved = {**now, **{k: lay.get(k) for k in ("tp", "pp", "dp")}, "virtual_stages": lay.get("virtual_stages", 1)}
    if saved != now:  # (checkpoints from before virtual stages were saved at 1)
        show = lambda d: " ".join(f"{k}={d[k]}" for k in now)  # noqa: E731
        raise LlamactlError(f"train_state was saved with {show(saved)}; exact resume needs the same layout, not "
                            f"{show(now)} (--tp/--pp/--virtual-stages/--nproc) ({p})")
    state = _read_state_file(p, meta, state_name(ctx.rank))
    if model is not None and masters_name(ctx) in meta.get("files", {}):
        _restore_masters(model, _read_state_file(p, meta, masters_name(ctx)), masters_name(ctx), p)
    return state


def _read_state_file(p: Path, meta: dict, name: str):
    problems = verify(p, files=[name], meta=meta)
    if problems:
        raise LlamactlError(f"{problems[0]} ({p})")
    try:
        return torch.load(p / name, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise LlamactlError(f"cannot read {name}: {str(e).splitlines()[0]} ({p})") from None


@torch.no_grad()
def _restore_masters(model, saved: dict, name: str, where: Path) -> None:
    params = dict(model.named_parameters())
    if not isinstance(saved, dict) or set(saved) != set(params):
        raise LlamactlError(f"{name} does not hold this model's parameters ({where})")
    for k, p in params.items():
        t = saved[k]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
            raise LlamactlError(f"{name} has a different shape for {k} ({where})")
        p.copy_(t.to(dtype=p.dtype))


def load_model(ckpt_dir, ctx: ParallelContext | None = None, *, device="cpu", dtype=torch.float32,
               head: str | None = None, verify: bool = True, flag: str | None = None):
    """(model, meta): build this rank's shard for the checkpoint's config and load it (llamactl.json read once).

    head: build another head than the checkpoint's (e.g. a reward model from an lm checkpoint); an
    incompatible head is then freshly initialised (N(0, 0.02), seeded, layout-independent).
    """
    from llamactl.model import build_model

    meta = read_meta(ckpt_dir)
    cfg, saved_head = load_config(ckpt_dir, meta=meta)
    head = head or saved_head
    model = build_model(cfg, ctx, head, device=device, dtype=dtype)
    fresh_head = not heads_compatible(saved_head, head)
    if fresh_head:
        _init_head(model)
    load(ckpt_dir, model, ctx, verify=verify, strict_head=not fresh_head, meta=meta, flag=flag)
    return model, meta


def _init_head(model, seed: int = 0) -> None:
    """A fresh head (e.g. a reward model started from a chat checkpoint), layout-independent like init."""
    from llamactl.model import init_weights

    init_weights(model, seed, only=HEAD_PARAMS)
