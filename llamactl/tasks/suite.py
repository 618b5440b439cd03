"""Write the suite to a directory, and read its prompt files back with validation.

    OUT/pretrain.txt            blank-line separated documents: people's facts, worked examples of the
                                training split in prose, filler sentences from the same vocabulary
    OUT/sft.train.jsonl         {"messages": [user, assistant], "family", "safety"}; with writer_slips, some
                                answers carry a careless writer's slip (writers.py)
    OUT/sft.heldout.jsonl
    OUT/prompts.train.jsonl     {"family", "prompt", "answer", "safety", + scorer fields}
    OUT/prompts.heldout.jsonl   the same items as sft.heldout (the number later stages are judged by)
    OUT/suite.json              version, seed, config, counts per family and split, sha256 of every file

Every random choice comes from `random.Random("<seed>:<purpose>")` (string seeds hash with SHA-512, not
PYTHONHASHSEED), so a seed gives byte-identical files. Train / held-out are split by item *key* (content
without wording) with a seeded hash, so no held-out question appears in training in any wording.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from llamactl.errors import LlamactlError
from llamactl.tasks.families import FAMILIES, TaskParams
from llamactl.tasks.writers import write_demonstrations
from llamactl.tasks.world import Entity, entity_document, filler_document, make_entities

VERSION = 1
MANIFEST = "suite.json"
SPLITS = ("train", "heldout")
RESERVED_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


@dataclass(frozen=True)
class SuiteConfig:
    """How much of everything to write; the defaults give ~1.5 MB of text, written in a few seconds."""
    seed: int = 0
    entities: int = 32               # invented people whose facts the pretraining text states
    heldout_fraction: float = 0.2    # share of item keys reserved for held-out items
    sft_train: int = 1000            # per family
    prompts_train: int = 300         # per family
    heldout: int = 100               # per family, distinct prompts (fewer if a family has fewer keys)
    pretrain_examples: int = 1500    # worked training examples per family in pretrain.txt
    entity_documents: int = 25       # biographies per person in pretrain.txt (facts need many exposures)
    filler_documents: int = 2000
    writer_slips: float = 0.0        # share of slippable SFT demonstrations with a careless writer's slip (writers.py)
    tasks: TaskParams = field(default_factory=TaskParams)

    @classmethod
    def from_dict(cls, d: dict, where: str = "suite config") -> "SuiteConfig":
        """From a plain mapping (a TOML table, the manifest's "config"), unknown keys refused."""
        d = dict(d)
        tasks = d.pop("tasks", {})
        for obj, known in ((d, cls), (tasks, TaskParams)):
            unknown = set(obj) - {f.name for f in dataclasses.fields(known)}
            if unknown:
                raise LlamactlError(f"unknown suite config keys {sorted(unknown)} ({where})")
            for f in dataclasses.fields(known):
                v = obj.get(f.name)
                want = float if f.type == "float" else int
                if f.name != "tasks" and v is not None and (isinstance(v, bool) or not isinstance(v, (want, int))):
                    raise LlamactlError(f"suite config key {f.name} must be a number, got {v!r} ({where})")
        return cls(**d, tasks=TaskParams(**tasks))


def _rng(seed: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{purpose}")


def is_heldout(seed: int, family: str, key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{family}:{key}".encode()).digest()[:8], "big")
    return h < fraction * 2 ** 64


def sample_items(cfg: SuiteConfig, world: tuple[Entity, ...], family: str, split: str, n: int,
                 purpose: str, *, unique: bool) -> list[dict]:
    """n items of one family from one split (fewer only when `unique` and the split runs out of prompts)."""
    fam, rng = FAMILIES[family], _rng(cfg.seed, f"{purpose}:{family}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        key, fields = fam.make(rng, cfg.tasks, world)
        if is_heldout(cfg.seed, family, key, cfg.heldout_fraction) != (split == "heldout"):
            continue
        if unique and fields["prompt"] in seen:
            continue
        seen.add(fields["prompt"])
        out.append({"family": family, "prompt": fields.pop("prompt"), "answer": fields.pop("answer"),
                    "safety": fam.safety, **fields})
    return out


def pretrain_documents(cfg: SuiteConfig, world: tuple[Entity, ...]) -> list[str]:
    """Facts of every person, worked examples from the training split only, filler; shuffled."""
    rng = _rng(cfg.seed, "pretrain")
    docs = [entity_document(e, rng) for e in world for _ in range(cfg.entity_documents)]
    for name, fam in FAMILIES.items():
        items = sample_items(cfg, world, name, "train", cfg.pretrain_examples, "pretrain", unique=False)
        i = 0
        while i < len(items):
            k = rng.randint(1, 5)
            docs.append(" ".join(fam.prose(it, rng) for it in items[i:i + k]))
            i += k
    docs += [filler_document(rng) for _ in range(cfg.filler_documents)]
    rng.shuffle(docs)
    return docs


def sft_record(item: dict) -> dict:
    return {"messages": [{"role": "user", "content": item["prompt"]},
                         {"role": "assistant", "content": item["answer"]}],
            "family": item["family"], "safety": item["safety"]}


def _jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _check_config(cfg: SuiteConfig) -> None:
    if not 0 <= cfg.writer_slips < 1:
        raise LlamactlError(f"writer_slips must be at least 0 and below 1, got {cfg.writer_slips} (suite config)")
    if not 0 < cfg.heldout_fraction < 1:
        raise LlamactlError(f"heldout_fraction must be between 0 and 1, got {cfg.heldout_fraction} (suite config)")
    for f in ("entities", "sft_train", "prompts_train", "heldout"):
        if getattr(cfg, f) < 1:
            raise LlamactlError(f"{f} must be at least 1, got {getattr(cfg, f)} (suite config)")
    for f in ("pretrain_examples", "entity_documents", "filler_documents"):
        if getattr(cfg, f) < 0:
            raise LlamactlError(f"{f} must not be negative, got {getattr(cfg, f)} (suite config)")
    t = cfg.tasks
    if t.max_operand < 1 or not 1 <= t.min_list <= t.max_list or t.max_count < 1:
        raise LlamactlError(f"bad task sizes {t} (suite config)")


def build_suite(cfg: SuiteConfig) -> tuple[dict[str, str], dict]:
    """Every file's text, and the manifest (without file hashes); pure, nothing written."""
    _check_config(cfg)
    world = make_entities(_rng(cfg.seed, "world"), cfg.entities)
    sets: dict[str, list[dict]] = {"sft.train": [], "prompts.train": [], "heldout": []}
    for name in FAMILIES:
        sets["sft.train"] += sample_items(cfg, world, name, "train", cfg.sft_train, "sft.train", unique=False)
        sets["prompts.train"] += sample_items(cfg, world, name, "train", cfg.prompts_train, "prompts.train",
                                              unique=False)
        held = sample_items(cfg, world, name, "heldout", cfg.heldout, "heldout", unique=True)
        if not held:
            raise LlamactlError(f"family {name} has no held-out items; raise heldout_fraction (suite config)")
        sets["heldout"] += held
    sets["sft.train"] = write_demonstrations(sets["sft.train"], cfg.writer_slips, _rng(cfg.seed, "writers"))
    train_prompts = {it["prompt"] for s in ("sft.train", "prompts.train") for it in sets[s]}
    leaked = [it["prompt"] for it in sets["heldout"] if it["prompt"] in train_prompts]
    if leaked:  # the key split makes this impossible; a family whose key misses part of its prompt would not
        raise RuntimeError(f"held-out prompt also in training: {leaked[0]!r}")
    docs = pretrain_documents(cfg, world)
    pretrain = "\n\n".join(docs) + "\n"
    files = {"pretrain.txt": pretrain,
             "sft.train.jsonl": _jsonl(sft_record(it) for it in sets["sft.train"]),
             "sft.heldout.jsonl": _jsonl(sft_record(it) for it in sets["heldout"]),
             "prompts.train.jsonl": _jsonl(sets["prompts.train"]),
             "prompts.heldout.jsonl": _jsonl(sets["heldout"])}

    def counts(items):
        return {name: sum(it["family"] == name for it in items) for name in FAMILIES}

    manifest = {
        "format": "llamactl-tasks", "version": VERSION, "seed": cfg.seed, "config": dataclasses.asdict(cfg),
        "families": {n: {"safety": f.safety, "scorer": f.scorer} for n, f in FAMILIES.items()},
        "counts": {"sft.train": counts(sets["sft.train"]), "sft.heldout": counts(sets["heldout"]),
                   "prompts.train": counts(sets["prompts.train"]), "prompts.heldout": counts(sets["heldout"])},
        "slips": {"sft.train": counts([it for it in sets["sft.train"] if it.get("slip")])},
        "pretrain": {"documents": len(docs), "bytes": len(pretrain.encode())},
        "entities": len(world),
    }
    return files, manifest


def write_suite(out, seed: Optional[int] = None, *, config: Optional[SuiteConfig] = None,
                overwrite: bool = False) -> dict:
    """Generate the suite into `out` atomically (temp dir, then rename) and return its manifest.

    `seed` overrides `config.seed`. An existing non-empty `out` is replaced only with `overwrite`.
    """
    out = Path(out)
    cfg = config or SuiteConfig()
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    if out.exists() and not out.is_dir():
        raise LlamactlError(f"{out} exists and is not a directory (--out)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LlamactlError(f"{out} exists and is not empty (--out; pass --overwrite to replace it)")
    files, manifest = build_suite(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest["files"] = {}
        for name, text in files.items():
            data = text.encode("utf-8")
            (tmp / name).write_bytes(data)
            manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "x", out)  # put the user's directory back as it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ---- reading back -----------------------------------------------------------------------------------
_JSON_TYPES = {int: "an integer", str: "a string", list: "a list", bool: "true or false"}


def _validate_item(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise LlamactlError(f"expected a JSON object ({where})")
    for f, t in (("family", str), ("prompt", str), ("answer", str), ("safety", bool)):
        if f not in obj:
            raise LlamactlError(f"missing field \"{f}\" ({where})")
        if not isinstance(obj[f], t) or (t is int and isinstance(obj[f], bool)):
            raise LlamactlError(f"field \"{f}\" must be {_JSON_TYPES[t]} ({where})")
    fam = FAMILIES.get(obj["family"])
    if fam is None:
        raise LlamactlError(f"unknown family {obj['family']!r}; known: {', '.join(FAMILIES)} ({where}, field \"family\")")
    if not obj["prompt"].strip():
        raise LlamactlError(f"empty prompt ({where}, field \"prompt\")")
    for tag in RESERVED_TAGS:
        if tag in obj["prompt"]:
            raise LlamactlError(f"prompt contains the reserved tag {tag} ({where}, field \"prompt\")")
    if obj["safety"] != fam.safety:
        raise LlamactlError(f"family {fam.name} has safety {str(fam.safety).lower()} ({where}, field \"safety\")")
    for f, t in fam.fields.items():
        if f not in obj:
            raise LlamactlError(f"missing field \"{f}\" for family {fam.name} ({where})")
        if not isinstance(obj[f], t) or (t is int and isinstance(obj[f], bool)):
            raise LlamactlError(f"field \"{f}\" must be {_JSON_TYPES[t]} ({where})")
    if fam.scorer == "number":
        try:
            int(obj["answer"])
        except ValueError:
            raise LlamactlError(f"answer {obj['answer']!r} is not a whole number ({where}, field \"answer\")") from None
    if fam.scorer == "fact" and obj["answer"] not in obj["options"]:
        raise LlamactlError(f"answer {obj['answer']!r} is not one of the options ({where}, field \"options\")")
    return obj


def load_items(path) -> list[dict]:
    """Task items from a prompt file (prompts.*.jsonl), each validated; errors name the file and line."""
    from llamactl.textfiles import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise LlamactlError(f"prompt file not found: {path} (--prompts)")
    items = [_validate_item(obj, f"{path}, line {i}") for i, obj in iter_jsonl(path, "--prompts")]
    if not items:
        raise LlamactlError(f"no items in prompt file ({path})")
    return items


def read_manifest(suite_dir) -> dict:
    path = Path(suite_dir) / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlamactlError(f"not a task suite: {path} is missing (--suite; make one with llamactl data tasks)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlamactlError(f"cannot read {path}: {e} (--suite)") from None
    if not isinstance(m, dict) or m.get("format") != "llamactl-tasks":
        raise LlamactlError(f"{path} is not a llamactl task-suite manifest (--suite)")
    if m.get("version") != VERSION:
        raise LlamactlError(f"task suite version {m.get('version')} is not {VERSION} ({path}; regenerate it)")
    return m


def suite_items(suite_dir, split: str = "heldout") -> list[dict]:
    """The prompt items of one split of a written suite (`llamactl eval tasks --suite DIR`)."""
    if split not in SPLITS:
        raise LlamactlError(f"unknown split {split!r}: {' or '.join(SPLITS)} (--split)")
    read_manifest(suite_dir)
    return load_items(Path(suite_dir) / f"prompts.{split}.jsonl")


def write_text_atomic(path, text: str, flag: str = "--out") -> Path:
    """Write one output file (preference pairs, an evaluation's JSON) through a temporary file and a
    rename, so a failure never leaves it half-written and an old file stays until the new one is whole."""
    path = Path(path)
    if path.is_dir():
        raise LlamactlError(f"{path} is a directory ({flag} names a file)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
