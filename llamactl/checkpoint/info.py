"""`llamactl info`: what a checkpoint holds, as tables, with every hash verified."""
from __future__ import annotations

import json

from llamactl.checkpoint.layout import FORMAT, TOKENIZER_FILE, cfg_num_params, tokenizer_vocab_size
from llamactl.checkpoint.read import checkpoint_dir, load_config, read_meta, verify, weight_map
from llamactl.errors import LlamactlError


def info(ckpt_dir) -> None:
    """Print what a checkpoint holds as tables, verifying every hash (raises naming a damaged file)."""
    from llamactl.ui import console, progress, table

    p = checkpoint_dir(ckpt_dir)
    meta = read_meta(p)
    cfg, head = load_config(p, meta=meta)
    lay = meta.get("parallel")
    fmt = f"{meta['format']} v{meta['version']}" if meta["format"] == FORMAT else "plain Hugging Face directory"
    tok = p / TOKENIZER_FILE
    rows = [["format", fmt],
            ["stage", meta.get("stage") or "-"], ["step", f"{meta.get('step', 0):,}"],
            ["tokens seen", f"{meta.get('tokens', 0):,}"], ["head", head], ["dtype", meta.get("dtype") or "-"],
            ["model", f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads ({cfg.kv_heads} kv), "
                      f"ffn {cfg.ffn_dim}, vocab {cfg.vocab_size:,}, context {cfg.max_seq_len:,}"],
            ["parameters", f"{meta.get('parameters', cfg_num_params(cfg, head)):,}"],
            ["saved with", f"tp={lay['tp']} pp={lay['pp']} dp={lay['dp']}" if lay else "-"],
            ["train state", "yes (exact resume)" if meta.get("train_state") else "no"],
            ["tokenizer", f"{tokenizer_vocab_size(tok):,} pieces" if tok.is_file() else "none"]]
    if meta.get("extra"):
        rows.append(["extra", json.dumps(meta["extra"])[:200]])
    console.print(table(f"checkpoint {p}", ["", "value"], rows, justify_numbers=False))

    files = meta.get("files") or {}
    if meta["format"] == "hf":
        names = sorted(set(weight_map(p).values()))
        files = {n: {"bytes": (p / n).stat().st_size if (p / n).is_file() else 0} for n in names}
    status: dict[str, str] = {}
    if meta["format"] != "hf":
        total = sum(int(v.get("bytes", 0)) for v in files.values())
        with progress(transient=True) as bar:
            task = bar.add_task("verifying sha256", total=total)
            problems = verify(p, on_file=lambda name, n: bar.advance(task, n), meta=meta)
        for pr in problems:
            status[pr.split(" ", 2)[1]] = pr.split(" ", 2)[2]
    else:
        problems = verify(p, meta=meta)
    frows = [[n, f"{int(v.get('bytes', 0)) / 2**20:,.2f} MiB", status.get(n, "ok" if meta["format"] != "hf" else "-")]
             for n, v in files.items()]
    console.print(table("files", ["file", "size", "sha256"], frows))
    if problems:
        raise LlamactlError(f"{problems[0]} ({p})")
    if meta["format"] == "hf":
        console.print("no hashes to verify (plain Hugging Face directory); every weight file is present")
    else:
        console.print(f"all {len(files)} files verified (sha256)")
