"""The one checkpoint format: a directory that is also a valid Hugging Face Llama model directory.

    config.json                       HF LlamaConfig (LlamaForCausalLM, or LlamaForSequenceClassification
                                      with num_labels 1 for reward / value heads)
    model-0000X-of-0000N.safetensors  whole (unsharded) tensors under HF names, in the save dtype; one file
                                      per pipeline stage (split further only above `max_shard_bytes`)
    model.safetensors.index.json      tensor name -> file
    tokenizer.model                   the SentencePiece model the weights were trained with
    llamactl.json                     format version, model config, head, dtype, stage, step, tokens, the
                                      parallel layout at save time, sha256 and size of every other file, extra
    train_state/rank{R:05d}.pt        optional, per rank, for exact resume (torch.save; read back with
                                      weights_only=True, so values must be tensors, dicts, lists, tuples,
                                      numbers, bools, str or None)
    train_state/masters{R:05d}.pt     only when the weights were saved narrower than the parameters (bf16
                                      export of fp32 masters): the exact parameters of rank R's shard, written
                                      by dp-rank 0 and read by its dp replicas

Writing is collective: each pipeline stage's tp-rank-0 / dp-rank-0 gathers its tensors one at a time from
its tp group and writes that stage's file, so stages write in parallel and no rank holds the whole model.
Everything goes into `.{name}.tmp-XXXX` next to the target, llamactl.json last, and the directory is
renamed only when complete: a crash never leaves a directory under the final name.

Reading works for any TP/PP layout: each rank reads only its slices (safetensors `get_slice`). Our RoPE
uses HF's rotate-half layout, so HF names need no q/k permutation (Meta's layout: see convert.py).

Modules: layout.py (file names, the file plan, small file helpers), write.py (save), read.py (resolve,
verify, load), info.py (`llamactl info`); HF names and config.json live in llamactl/hf_format.py, the run
directory (step checkpoints, `latest`) in llamactl/rundir.py. Everything is importable from here.
"""
from __future__ import annotations

from llamactl.checkpoint.info import info
from llamactl.checkpoint.layout import (CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, FORMAT, INDEX_FILE, TOKENIZER_FILE,
                                        TRAIN_STATE_DIR, VERSION, cfg_num_params, sha256_file, shard_name,
                                        tokenizer_vocab_size)
from llamactl.checkpoint.read import (check_config, checkpoint_dir, load, load_config, load_model,
                                      load_train_state, model_files, read_meta, resolve, tokenizer_path, verify,
                                      weight_map)
from llamactl.checkpoint.write import publish, save, save_tensors
from llamactl.hf_format import (DTYPE_NAMES, DTYPES, HEAD_PARAMS, config_from_hf, from_hf_name, hf_config,
                                infer_ffn_rule, to_hf_name)
from llamactl.rundir import LATEST_FILE, META_FILE, fsync_dir, is_complete, latest, set_latest

__all__ = [
    "CONFIG_FILE", "DEFAULT_MAX_SHARD_BYTES", "DTYPES", "DTYPE_NAMES", "FORMAT", "HEAD_PARAMS", "INDEX_FILE",
    "LATEST_FILE", "META_FILE", "TOKENIZER_FILE", "TRAIN_STATE_DIR", "VERSION", "cfg_num_params", "check_config",
    "checkpoint_dir", "config_from_hf", "from_hf_name", "fsync_dir", "hf_config", "infer_ffn_rule", "info",
    "is_complete", "latest", "load", "load_config", "load_model", "load_train_state", "model_files", "publish",
    "read_meta", "resolve", "save", "save_tensors", "set_latest", "sha256_file", "shard_name", "to_hf_name",
    "tokenizer_path", "tokenizer_vocab_size", "verify", "weight_map",
]
