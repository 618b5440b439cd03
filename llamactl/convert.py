"""Meta and Hugging Face Llama checkpoints in and out of the llamactl format.

Hugging Face: config.json + safetensors (sharded or single) or pytorch_model*.bin, tokenizer.model.
Our RoPE already uses HF's rotate-half layout, so tensors are only renamed.

Meta: params.json + consolidated.XX.pth, one file per model-parallel rank, split as fairscale split
them: tok_embeddings on dim 1; wq, wk, wv, w1, w3, output on dim 0; wo, w2 on dim 1; norms replicated.
Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...; ours rotates halves, so the rows of wq
and wk are permuted within each head on the way in and back on the way out. `rope.freqs` is ignored.

Files from elsewhere are never unpickled blindly: every torch.load uses weights_only=True.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from llamactl import checkpoint as ckpt
from llamactl.checkpoint.layout import check_vocab, read_json, stage_entries, write_json
from llamactl.config import ModelConfig
from llamactl.errors import LlamactlError
from llamactl.hf_format import DTYPES, config_from_hf, parse_dtype, to_hf_name

FORMATS = ("hf", "meta")
# fairscale split dim of each Meta tensor (None: replicated on every model-parallel rank)
_META_SPLIT = {"tok_embeddings.weight": 1, "output.weight": 0, "norm.weight": None, "attention.wq.weight": 0,
               "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
               "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
               "attention_norm.weight": None, "ffn_norm.weight": None}


def meta_split_dim(name: str) -> int | None:
    key = name.split(".", 2)[2] if name.startswith("layers.") else name
    return _META_SPLIT[key]


# ---- the RoPE layouts ------------------------------------------------------------------------------------
def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq / wk from Meta's interleaved-pair RoPE layout to the rotate-half layout (HF's `permute`)."""
    d1, d2 = w.shape
    return w.reshape(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of interleaved_to_half."""
    d1, d2 = w.shape
    return w.reshape(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def _rope_heads(name: str, cfg: ModelConfig) -> int | None:
    if name.endswith("attention.wq.weight"):
        return cfg.n_heads
    if name.endswith("attention.wk.weight"):
        return cfg.kv_heads
    return None


# ---- helpers -------------------------------------------------------------------------------------------
def _src_dir(src, flag: str) -> Path:
    p = Path(src)
    if not p.exists():
        raise LlamactlError(f"source not found: {p} ({flag})")
    if not p.is_dir():
        raise LlamactlError(f"source must be a directory: {p} ({flag})")
    return p


def _torch_load(path: Path) -> dict:
    """torch.load with weights_only=True (memory-mapped when the file allows)."""
    import pickle

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise
        except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling raises many types
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        unsafe = next((ln for ln in lines if "Unsupported global" in ln), None)
        if unsafe:  # a pickle holding more than tensors: refused, never executed
            why = unsafe[unsafe.index("Unsupported global"):].split(" was not", 1)[0] + " is not allowed"
        else:
            why = f"not a PyTorch tensor file ({type(e).__name__}: {lines[0] if lines else ''})"
        raise LlamactlError(f"cannot read {path.name} as plain tensors (torch.load weights_only=True): {why} "
                            f"({path})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LlamactlError(f"{path.name} does not hold a flat dict of tensors ({path})")
    return obj


def _progress(total: int, what: str):
    from llamactl.ui import progress

    bar = progress(transient=False)
    task = bar.add_task(what, total=total)
    return bar, (lambda *_: bar.advance(task))


# ---- Hugging Face in -----------------------------------------------------------------------------------
class _HFReader:
    """Tensors of a HF directory by HF name: safetensors read lazily, .bin files loaded on first use."""

    def __init__(self, src: Path):
        self.src = src
        self.kind, self.weight_map = self._index(src)
        self._open: dict[str, object] = {}

    @staticmethod
    def _index(src: Path) -> tuple[str, dict[str, str]]:
        for kind, index, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"),
                                    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (src / index).is_file():
                wm = read_json(src / index, index).get("weight_map")
                if not isinstance(wm, dict):
                    raise LlamactlError(f"{index} has no weight_map ({src})")
                return kind, wm
            if (src / single).is_file():
                return kind, {k: single for k in _HFReader._keys(src / single, kind)}
        raise LlamactlError(f"no weights in {src}: expected model.safetensors[.index.json] or "
                            f"pytorch_model.bin[.index.json] (--from hf)")

    @staticmethod
    def _keys(path: Path, kind: str) -> list[str]:
        if kind == "bin":
            return list(_torch_load(path))
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # noqa: BLE001
            raise LlamactlError(f"{path.name} is not a valid safetensors file: {e} ({path})") from None

    def get(self, hf_name: str) -> torch.Tensor:
        fname = self.weight_map[hf_name]
        if fname not in self._open:
            path = self.src / fname
            if not path.is_file():
                raise LlamactlError(f"weight file {fname} listed in the index is missing ({self.src})")
            if self.kind == "bin":
                self._open = {fname: _torch_load(path)}  # keep one .bin in memory at a time
            else:
                from safetensors import safe_open

                try:
                    self._open[fname] = safe_open(str(path), framework="pt")
                except Exception as e:  # noqa: BLE001
                    raise LlamactlError(f"{fname} is not a valid safetensors file: {e} ({self.src})") from None
        f = self._open[fname]
        return f[hf_name] if self.kind == "bin" else f.get_tensor(hf_name)


def _ignored_hf(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")


def convert_hf(src, dst, *, tokenizer=None, dtype: torch.dtype | None = None, overwrite: bool = False,
               show_progress: bool = True) -> Path:
    """A Hugging Face Llama directory (LlamaForCausalLM or a 1-label sequence classifier) -> checkpoint."""
    src = _src_dir(src, "--from hf")
    if not (src / ckpt.CONFIG_FILE).is_file():
        raise LlamactlError(f"{src} has no config.json: not a Hugging Face model directory (--from hf)")
    hf_cfg = read_json(src / ckpt.CONFIG_FILE, "config.json")
    cfg, head = config_from_hf(hf_cfg, str(src))
    tok = _find_tokenizer(tokenizer, [src], "a Hugging Face directory")
    reader = _HFReader(src)
    tied = bool(hf_cfg.get("tie_word_embeddings")) and "lm_head.weight" not in reader.weight_map
    needed = {to_hf_name(e.name) for e in stage_entries(cfg, head, 1)[0]}
    unexpected = sorted(k for k in reader.weight_map if k not in needed and not _ignored_hf(k))
    if unexpected:
        raise LlamactlError(f"unexpected tensors {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''} "
                            f"in {src}: not a plain Llama model")

    def get(name: str) -> torch.Tensor:
        hf = to_hf_name(name)
        if hf == "lm_head.weight" and tied:
            hf = "model.embed_tokens.weight"
        if hf not in reader.weight_map:
            raise LlamactlError(f"{src} lacks tensor {hf}")
        return reader.get(hf)

    if dtype is None:
        dtype = get("norm.weight").dtype
    extra = {"source": str(src.resolve()), "from": "hf"}
    return _write(dst, cfg, head, get, dtype, tok, "convert-hf", extra, overwrite, show_progress)


def _find_tokenizer(flag, dirs: list[Path], what: str) -> Path:
    if flag is not None:
        p = Path(flag)
        p = p / ckpt.TOKENIZER_FILE if p.is_dir() else p
        if not p.is_file():
            raise LlamactlError(f"tokenizer file not found: {p} (--tokenizer)")
        return p
    for d in dirs:
        if (d / ckpt.TOKENIZER_FILE).is_file():
            return d / ckpt.TOKENIZER_FILE
    raise LlamactlError(f"no tokenizer.model in {dirs[0]} ({what}); pass --tokenizer path/to/tokenizer.model")


def _write(dst, cfg, head, get, dtype, tok, stage, extra, overwrite, show_progress) -> Path:
    check_vocab(tok, cfg, "--tokenizer")  # (save_tensors checks too; here before any progress output)
    if Path(dst).exists() and not overwrite:
        raise LlamactlError(f"output directory already exists: {dst} (choose another path or --overwrite)")
    n = len(stage_entries(cfg, head, 1)[0])
    if not show_progress:
        return ckpt.save_tensors(dst, cfg, head, get, dtype=dtype, tokenizer=tok, stage=stage, extra=extra,
                                 overwrite=overwrite)
    bar, tick = _progress(n, f"writing {Path(dst).name}")
    with bar:
        return ckpt.save_tensors(dst, cfg, head, get, dtype=dtype, tokenizer=tok, stage=stage, extra=extra,
                                 overwrite=overwrite, on_tensor=tick)


# ---- Meta in --------------------------------------------------------------------------------------------
def _meta_shards(src: Path) -> list[Path]:
    shards = sorted(src.glob("consolidated.*.pth"))
    if not shards:
        raise LlamactlError(f"no consolidated.XX.pth files in {src} (--from meta)")
    nums = [int(m.group(1)) if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)) else -1 for p in shards]
    if sorted(nums) != list(range(len(shards))):
        raise LlamactlError(f"consolidated shards are not numbered 00..{len(shards) - 1:02d}: "
                            f"{', '.join(p.name for p in shards)} ({src})")
    return [src / f"consolidated.{i:02d}.pth" for i in range(len(shards))]


def config_from_params(params: dict, where: str, vocab_size: int | None = None,
                       max_seq_len: int = 4096) -> ModelConfig:
    """ModelConfig from Meta's params.json (vocab_size -1, as in Meta's files, is taken from the weights)."""
    try:
        vocab = int(params.get("vocab_size", -1))
        if vocab <= 0:
            if vocab_size is None:
                raise LlamactlError(f"params.json has vocab_size {vocab} and it cannot be inferred ({where})")
            vocab = vocab_size
        return ModelConfig(dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=int(params["n_heads"]),
                           n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab,
                           multiple_of=int(params.get("multiple_of", 256)),
                           ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
                           norm_eps=float(params.get("norm_eps", 1e-5)),
                           rope_theta=float(params.get("rope_theta", 10000.0)),
                           max_seq_len=int(params.get("max_seq_len", max_seq_len)))
    except KeyError as e:
        raise LlamactlError(f"params.json lacks {e.args[0]!r} ({where})") from None
    except (TypeError, ValueError) as e:
        raise LlamactlError(f"params.json has a bad value: {e} ({where})") from None


def convert_meta(src, dst, *, tokenizer=None, dtype: torch.dtype | None = None, overwrite: bool = False,
                 max_seq_len: int = 4096, show_progress: bool = True) -> Path:
    """Meta's consolidated.XX.pth + params.json -> checkpoint (shards merged, q/k rows permuted)."""
    src = _src_dir(src, "--from meta")
    if not (src / "params.json").is_file():
        raise LlamactlError(f"{src} has no params.json: not a Meta Llama checkpoint (--from meta)")
    params = read_json(src / "params.json", "params.json")
    shards = [_torch_load(p) for p in _meta_shards(src)]
    mp = len(shards)
    if "tok_embeddings.weight" not in shards[0]:
        raise LlamactlError(f"{src / 'consolidated.00.pth'} has no tok_embeddings.weight: not a Meta Llama checkpoint")
    vocab = shards[0]["tok_embeddings.weight"].shape[0]
    cfg = config_from_params(params, str(src), vocab_size=vocab, max_seq_len=max_seq_len)
    tok = _find_tokenizer(tokenizer, [src, src.parent], "a Meta checkpoint")
    expected = {e.name for e in stage_entries(cfg, "lm", 1)[0]}
    for i, sd in enumerate(shards):
        extra = sorted(set(sd) - expected - {"rope.freqs"})
        if extra:
            raise LlamactlError(f"unexpected tensors {', '.join(extra[:3])} in consolidated.{i:02d}.pth ({src})")

    def get(name: str) -> torch.Tensor:
        parts = []
        for i, sd in enumerate(shards):
            if name not in sd:
                raise LlamactlError(f"consolidated.{i:02d}.pth lacks {name} ({src})")
            parts.append(sd[name])
        d = meta_split_dim(name)
        full = parts[0] if d is None or mp == 1 else torch.cat(parts, dim=d)
        heads = _rope_heads(name, cfg)
        return interleaved_to_half(full, heads) if heads else full

    if dtype is None:
        dtype = shards[0]["norm.weight"].dtype
    extra = {"source": str(src.resolve()), "from": "meta", "mp": mp}
    return _write(dst, cfg, "lm", get, dtype, tok, "convert-meta", extra, overwrite, show_progress)


def convert(src, dst, from_: str, *, tokenizer=None, dtype: str | None = None, overwrite: bool = False,
            show_progress: bool = True) -> Path:
    """`llamactl convert --from hf|meta SRC DST`."""
    d = parse_dtype(dtype)
    if from_ == "hf":
        out = convert_hf(src, dst, tokenizer=tokenizer, dtype=d, overwrite=overwrite, show_progress=show_progress)
    elif from_ == "meta":
        out = convert_meta(src, dst, tokenizer=tokenizer, dtype=d, overwrite=overwrite, show_progress=show_progress)
    else:
        raise LlamactlError(f"unknown source format {from_!r}; one of {', '.join(FORMATS)} (--from)")
    if show_progress:
        _summary(out)
    return out


def _summary(out: Path) -> None:
    from llamactl.ui import console

    meta = ckpt.read_meta(out)
    cfg, head = ckpt.load_config(out, meta=meta)
    console.print(f"wrote {out}: {head} head, {meta['parameters']:,} parameters ({meta['dtype']}), "
                  f"dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size:,}")


# ---- out --------------------------------------------------------------------------------------------------
def _reader(src: Path) -> tuple[ModelConfig, str, dict, Callable[[str], object]]:
    """(cfg, head, meta, slice_of(name)) for a verified checkpoint; slice_of gives a safetensors slice."""
    from safetensors import safe_open

    meta = ckpt.read_meta(src)
    wm = ckpt.weight_map(src)
    problems = ckpt.verify(src, ckpt.model_files(meta, wm.values()), meta=meta)  # not the train state
    if problems:
        raise LlamactlError(f"{problems[0]} ({src})")
    cfg, head = ckpt.load_config(src, meta=meta)
    handles: dict[str, object] = {}

    def slice_of(name: str):
        hf = to_hf_name(name)
        if hf not in wm:
            raise LlamactlError(f"checkpoint lacks tensor {hf} ({src})")
        f = wm[hf]
        if f not in handles:
            handles[f] = safe_open(str(src / f), framework="pt")
        return handles[f].get_slice(hf)

    return cfg, head, meta, slice_of


def _new_dir(dst: Path, overwrite: bool) -> Path:
    if dst.exists() and not overwrite:
        raise LlamactlError(f"output directory already exists: {dst} (choose another path or --overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def export_hf(src, dst, *, dtype: torch.dtype | None = None, overwrite: bool = False,
              show_progress: bool = True) -> Path:
    """A clean Hugging Face directory (config, safetensors, index, tokenizer, generation config)."""
    src, dst = ckpt.checkpoint_dir(src), Path(dst)
    cfg, head, meta, slice_of = _reader(src)
    src_dtype = DTYPES.get(meta.get("dtype") or "float32", torch.float32)
    dtype = dtype or src_dtype
    tmp = _new_dir(dst, overwrite)
    try:
        tok = src / ckpt.TOKENIZER_FILE
        get = lambda name: slice_of(name)[:]  # noqa: E731
        # re-encode through save_tensors (same names and files), then drop what is ours only
        kw = dict(dtype=dtype, tokenizer=tok if tok.is_file() else None, stage="export")
        if show_progress:
            bar, tick = _progress(len(stage_entries(cfg, head, 1)[0]), f"writing {dst.name}")
            with bar:
                out = ckpt.save_tensors(tmp / "w", cfg, head, get, on_tensor=tick, **kw)
        else:
            out = ckpt.save_tensors(tmp / "w", cfg, head, get, **kw)
        for f in out.iterdir():
            if f.name != ckpt.META_FILE:
                shutil.move(str(f), tmp / f.name)
        shutil.rmtree(out)
        gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
               "max_length": cfg.max_seq_len}
        if head == "lm":
            write_json(tmp / "generation_config.json", gen)
        if tok.is_file():
            write_json(tmp / "tokenizer_config.json", {
                "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": False,
                "model_max_length": cfg.max_seq_len})
        ckpt.publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def export_meta(src, dst, *, mp: int = 1, dtype: torch.dtype | None = None, overwrite: bool = False,
                show_progress: bool = True) -> Path:
    """params.json + consolidated.XX.pth (mp shards split as fairscale does, q/k back to interleaved)."""
    src, dst = ckpt.checkpoint_dir(src), Path(dst)
    cfg, head, meta, slice_of = _reader(src)
    if head != "lm":
        raise LlamactlError(f"Meta's format has no {head} head; export it with --to hf ({src})")
    if mp < 1:
        raise LlamactlError(f"--mp must be at least 1, not {mp}")
    for what, n in (("attention heads", cfg.n_heads), ("kv heads", cfg.kv_heads), ("FFN size", cfg.ffn_dim),
                    ("dim", cfg.dim), ("vocabulary", cfg.vocab_size)):
        if n % mp:
            raise LlamactlError(f"--mp {mp} does not divide the {n} {what}")
    src_dtype = DTYPES.get(meta.get("dtype") or "float32", torch.float32)
    dtype = dtype or src_dtype
    names = [e.name for e in stage_entries(cfg, "lm", 1)[0]]
    tmp = _new_dir(dst, overwrite)
    try:
        params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.kv_heads,
                  "vocab_size": cfg.vocab_size, "multiple_of": cfg.multiple_of,
                  "ffn_dim_multiplier": cfg.ffn_dim_multiplier, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}
        write_json(tmp / "params.json", params)
        if (src / ckpt.TOKENIZER_FILE).is_file():
            shutil.copyfile(src / ckpt.TOKENIZER_FILE, tmp / ckpt.TOKENIZER_FILE)
        bar, tick = _progress(mp * len(names), f"writing {dst.name}") if show_progress else (None, None)
        if bar is not None:
            bar.start()
        try:
            for r in range(mp):
                sd = {}
                for name in names:
                    sl = slice_of(name)
                    shape = sl.get_shape()
                    d = meta_split_dim(name)
                    if d is None or mp == 1:
                        t = sl[:]
                    else:
                        n = shape[d] // mp
                        idx = [slice(None)] * len(shape)
                        idx[d] = slice(r * n, (r + 1) * n)
                        t = sl[tuple(idx)]
                    heads = _rope_heads(name, cfg)
                    if heads:  # the rows of this rank's heads only: permute with the local head count
                        t = half_to_interleaved(t, heads // mp)
                    sd[name] = t.to(dtype).contiguous().clone()
                    if tick:
                        tick()
                torch.save(sd, tmp / f"consolidated.{r:02d}.pth")
                del sd
        finally:
            if bar is not None:
                bar.stop()
        ckpt.publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def export(src, dst, to: str, *, mp: int = 1, dtype: str | None = None, overwrite: bool = False,
           show_progress: bool = True) -> Path:
    """`llamactl export --to hf|meta CKPT DST`."""
    d = parse_dtype(dtype)
    if to == "hf":
        if mp != 1:
            raise LlamactlError("--mp applies to --to meta only")
        out = export_hf(src, dst, dtype=d, overwrite=overwrite, show_progress=show_progress)
    elif to == "meta":
        out = export_meta(src, dst, mp=mp, dtype=d, overwrite=overwrite, show_progress=show_progress)
    else:
        raise LlamactlError(f"unknown target format {to!r}; one of {', '.join(FORMATS)} (--to)")
    if show_progress:
        from llamactl.ui import console

        console.print(f"wrote {out} ({to}{f', {mp} shards' if to == 'meta' else ''})")
    return out
