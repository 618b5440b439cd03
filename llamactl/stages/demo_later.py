"""The demo's RLHF stages: rejection sampling, PPO, GAtt, model-based comparison and the report.

Each is added only when this build has its command (`available`); a missing one is listed as "not
available in this build" and never replaced by anything else. RS and PPO train on a prompt subset
(`subset_prompts`: the first N train prompts of every family, so every family and the safety tag are
present) because K samples of all 2,400 suite prompts would not fit the budget. PPO's held-out prompts
(early stopping, RUN/best) are the next train prompts of every family whose text is not among the RL
prompts: never the held-out prompts the demo's table scores, so choosing the best PPO iteration does not
look at the test set.
"""
from __future__ import annotations

import json
from pathlib import Path

# (demo step, the model it leaves, relative to DEMO): the final chat checkpoint is the last one present
FINAL_MODELS = (("gatt", "gatt"), ("ppo", "ppo/policy"), ("rs", "rs/sft"), ("sft", "sft"))


def subset_prompts(src: Path, dst: Path, per_family: int, exclude: Path | None = None) -> None:
    """The first `per_family` prompts of every family of a suite prompt file whose text is not in the prompt
    file `exclude`, written atomically."""
    from llamactl.tasks.suite import write_text_atomic

    def text(line: str) -> str:
        return json.loads(line).get("prompt", "")

    taken = {text(x) for x in Path(exclude).read_text(encoding="utf-8").splitlines() if x.strip()} if exclude else set()
    seen: dict[str, int] = {}
    lines = []
    for line in Path(src).read_text(encoding="utf-8").splitlines():
        fam = json.loads(line).get("family", "")
        if seen.get(fam, 0) < per_family and text(line) not in taken:
            taken.add(text(line))
            seen[fam] = seen.get(fam, 0) + 1
            lines.append(line)
    write_text_atomic(dst, "\n".join(lines) + "\n")


def add_later_stages(cfg, steps, missing, available, add, evaluate) -> None:
    d, s = cfg.out, str(cfg.seed)
    suite, ev = d / "suite", d / "evals"
    rm_h, rm_s = d / "rm-helpful", d / "rm-safety"
    rl_prompts = d / "prompts" / "rl.jsonl"
    per_family = cfg.n(24, 2)
    policy = d / "sft"          # the model the next stage starts from
    chain = [("sft", d / "sft")]  # (stage, model) in recipe order, for the comparisons

    val_prompts, per_family_val = d / "prompts" / "val.jsonl", cfg.n(4, 1)
    if available(("rlhf", "rs")) or available(("rlhf", "ppo")):
        add("prompts", "prompts", [], rl_prompts, 1,
            extra={"python": (subset_prompts, (suite / "prompts.train.jsonl", rl_prompts, per_family)),
                   "describe": f"first {per_family} prompts of every family of {suite / 'prompts.train.jsonl'} "
                               f"-> {rl_prompts}"})
        add("prompts-val", "prompts", [], val_prompts, 1,
            extra={"python": (subset_prompts, (suite / "prompts.train.jsonl", val_prompts, per_family_val, rl_prompts)),
                   "describe": f"first {per_family_val} prompts of every family of {suite / 'prompts.train.jsonl'} "
                               f"not in {rl_prompts} -> {val_prompts} (PPO's held-out reward)"})

    # rejection sampling: K samples per prompt scored by R_c, best kept in the pool, SFT on the pool; the greedy
    # answer is one more candidate (T 0), so the pool is never worse than greedy by the reward models' judgement
    # (measured: without it, RS of this tiny policy fell below SFT greedy while rising sampled)
    if available(("rlhf", "rs")):
        rs_steps = cfg.n(30, 3)
        add("rs", "rs", ["rlhf", "rs", "--policy", policy, "--rm-helpful", rm_h, "--rm-safety", rm_s,
                         "--prompts", rl_prompts, "--out", d / "rs", "--k", 4 if cfg.scale >= 0.25 else 2, "--temperature", "0,0.7,1.0",
                         "--max-new-tokens", 24, "--seed", s, "--iteration", 1, "--steps", rs_steps, "--batch-size", 8,
                         "--seq-len", 512, "--lr", "1e-4", "--save-every", max(1, rs_steps // 2), "--keep", 2],
            d / "rs" / "rs.json", 15, train=True, extra={"run_dir": d / "rs" / "sft"})
        policy = d / "rs" / "sft"
        evaluate("rs", policy)
        chain.append(("rs", policy))
    else:
        missing.append(("rs", "rlhf rs"))

    # PPO with the paper's reward from the two reward models
    if available(("rlhf", "ppo")):
        iters = cfg.n(12, 2)
        add("ppo", "ppo", ["rlhf", "ppo", "--policy", policy, "--rm-helpful", rm_h, "--rm-safety", rm_s,
                           "--prompts", rl_prompts, "--val-prompts", val_prompts, "--out", d / "ppo", "--iterations", iters, "--batch-size", 8 * cfg.n(4, 1),
                           "--minibatch", 8, "--lr", "1e-5", "--max-new-tokens", 24, "--eval-every",
                           max(1, iters // 3), "--patience", 0, "--save-every", max(1, iters // 3), "--keep", 2,
                           "--seed", s],
            d / "ppo" / "policy", 12, train=True, extra={"run_dir": d / "ppo", "runstate": True})
        policy = d / "ppo" / "policy"
        evaluate("ppo", policy)
        chain.append(("ppo", policy))
    else:
        missing.append(("ppo", "rlhf ppo"))

    # Ghost Attention: multi-turn dialogues with an instruction, kept only in the first turn; then adherence
    # per turn with and without it. The instruction families are the ones the tiny model learns to keep (measured
    # at --minutes 12: start 0 -> 38 %, end 0 -> 50 % at turns 5+; case, language and length it half-keeps
    # already), and the SFT set is replayed 1:1 so the tasks are not forgotten (0.756 -> 0.612 held-out without)
    if available(("gatt", "train")) and available(("gatt", "eval")):
        gatt_steps = cfg.n(40, 3)
        kinds = ["--kinds", "figure,hobby,start,end,mention", "--max-parts", 1]
        add("gatt", "gatt", ["gatt", "train", "--model", policy, "--prompts", rl_prompts, "--out", d / "gatt",
                             "--dialogues", cfg.n(48, 4), "--turns", 8, *kinds, "--max-new-tokens", 16,
                             "--replay", suite / "sft.train.jsonl", "--seed", s, "--steps", gatt_steps,
                             "--batch-size", 8, "--lr", "1e-3", "--save-every", max(1, gatt_steps // 2), "--keep", 2],
            d / "gatt", 23, train=True)
        add("eval-gatt-adherence", "gatt", ["gatt", "eval", "--model", d / "gatt", "--baseline", policy, "--prompts",
                                            suite / "prompts.heldout.jsonl", *kinds, "--turns", 12 if cfg.scale >= 0.25 else 6, "--dialogues",
                                            cfg.n(16, 2), "--out", ev / "gatt-adherence.json"], ev / "gatt-adherence.json", 8)
        policy = d / "gatt"
        evaluate("gatt", policy)
        chain.append(("gatt", policy))
    else:
        missing.append(("gatt", "gatt train"))

    # model-based evaluation: each stage against the one before it
    if available(("rlhf", "compare")):
        for (b, mb), (a, ma) in zip(chain, chain[1:]):
            f = ev / f"compare-{b}-vs-{a}.json"
            add(f"compare-{a}", "compare", ["rlhf", "compare", "--a", ma, "--b", mb, "--prompts",
                                            suite / "prompts.heldout.jsonl", "--rm-helpful", rm_h, "--rm-safety",
                                            rm_s, "--limit", cfg.n(16, 2), "--max-new-tokens", 32, "--seed", s,
                                            "--out", f], f, 4)
    else:
        missing.append(("compare", "rlhf compare"))

    if available(("report",)):
        add("report", "report", ["report", d], d / "report.md", 2)
    else:
        missing.append(("report", "report"))
