"""What `llamactl demo` runs: the whole Llama 2-Chat recipe as the list of public commands a user would type.

Each `Step` is one `llamactl ...` command line, the path whose existence says it finished, whether it is a
training run (continued with `--resume` when its run dir already holds a checkpoint) and the CPU seconds
it is expected to take on 2 idle cores (the overall ETA). `--minutes` scales every stage's steps and sample
counts by minutes / MINUTES_PER_SCALE, so a smaller budget is the same recipe, shorter.

The tiny settings were measured on 2 CPU cores: pretraining on 512-token windows (GAtt's multi-turn
dialogues fit in the context), enough pretraining steps for the facts family; SFT at a high learning
rate for a model this small; preference pairs from the SFT policy at two temperatures and from two model
variants (the SFT policy against the pretrained model: on unsafe prompts the SFT model refuses and the
pretrained one complies), half and half for the helpfulness RM, 90/10 for the safety RM as in the paper.
Later stages (rs, ppo, gatt, compare, report) are added when their command exists in this build.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llamactl.errors import LlamactlError

DEFAULT_MINUTES = 12.0   # the default budget (--minutes)
# minutes of 2 idle cores per unit of the counts below, measured: scale 1 ran in 3 min 52 s, and scale 3.33 reached the
# end of rejection sampling in 7.5 min (pretrain 212 s, sft 137 s); the seconds given to `add` are per unit
MINUTES_PER_SCALE = 3.6
SIZES = ("tiny",)        # presets the step counts are tuned for
CHAT_PROMPT = "Reverse these words: leaf book water"   # a task-suite question (the reverse family)


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    minutes: float = DEFAULT_MINUTES
    size: str = "tiny"
    seed: int = 0

    def check(self) -> None:
        if not self.minutes > 0:
            raise LlamactlError(f"--minutes must be positive, got {self.minutes} (--minutes)")
        if self.size not in SIZES:
            raise LlamactlError(f"the demo is tuned for the {', '.join(SIZES)} preset, got {self.size!r} (--size)")

    @property
    def scale(self) -> float:
        return self.minutes / MINUTES_PER_SCALE

    def n(self, base: int, low: int = 1) -> int:
        """A step or sample count of the default budget, scaled by --minutes (at least `low`)."""
        return max(low, round(base * self.scale))

    def options(self) -> dict:
        """What a resumed demo must be started with again (recorded in demo.json)."""
        return {"minutes": self.minutes, "size": self.size, "seed": self.seed}


@dataclass
class Step:
    """One public command of the demo."""
    name: str                    # unique; also the key in demo.json
    stage: str                   # the recipe stage it belongs to (progress display)
    argv: list[str]              # arguments after `llamactl`
    output: Path                 # exists when the command finished (checked with `done`)
    seconds: float               # expected wall seconds on 2 idle cores at this budget (the ETA)
    train: bool = False          # a training run: --resume when its run dir holds a checkpoint
    needs: tuple[str, ...] = ()  # the command path it needs, e.g. ("rlhf", "rs")
    extra: dict = field(default_factory=dict)


def detector_flag(argv: list[str], pairs: Path) -> list[str]:
    """`rm eval` of the safety RM checks the unsafe detector on safety-tagged pairs; when the annotator found
    none (a very small budget: both models answer unsafe prompts alike), it reports accuracy alone."""
    import json

    if any(json.loads(x).get("safety") for x in pairs.read_text().splitlines() if x.strip()):
        return argv
    return [*argv, "--no-safety"]


def plan(cfg: DemoConfig, available) -> tuple[list[Step], list[tuple[str, str]]]:
    """(the steps to run, [(stage, command) of stages whose command this build lacks]).

    `available(path: tuple[str, ...]) -> bool` says whether `llamactl <path...>` exists."""
    d, s = cfg.out, str(cfg.seed)
    suite, tok, data = d / "suite", d / "tokenizer", d / "data"
    ev, prefs = d / "evals", d / "prefs"
    x = cfg.scale
    steps: list[Step] = []
    missing: list[tuple[str, str]] = []

    def add(name, stage, argv, output, seconds, **kw):
        steps.append(Step(name, stage, [str(a) for a in argv], output, seconds * x if kw.get("train") else seconds,
                          **kw))

    limit = cfg.n(24, 3)   # held-out prompts per family in every `eval tasks` (8 families)
    eval_seconds = 3 + 0.01 * limit * 8  # greedy and 2 samples per prompt

    def evaluate(stage, model, raw=False):
        add(f"eval-{stage}", stage, ["eval", "tasks", "--model", model, "--suite", suite, "--limit", limit,
                                     "--samples", 2, "--temperature", 0.7, "--max-new-tokens", 32, "--seed", s,
                                     *(["--raw"] if raw else []), "--out", ev / f"{stage}.json"],
            ev / f"{stage}.json", eval_seconds)

    # data: the task suite, a tokenizer trained on its pretraining text, token shards
    add("suite", "data", ["data", "tasks", "--out", suite, "--seed", s, "--overwrite"], suite / "suite.json", 3)
    add("tokenizer", "data", ["tokenizer", "train", "--input", suite / "pretrain.txt", "--out", tok,
                              "--vocab-size", 1000, "--overwrite"], tok / "tokenizer.model", 3)
    add("data", "data", ["data", "prepare", "--input", suite / "pretrain.txt", "--tokenizer", tok, "--out", data,
                         "--val-fraction", 0.02], data / "index.json", 5)

    # pretraining on 512-token windows
    pt_steps = cfg.n(240, 4)
    add("pretrain", "pretrain", ["pretrain", "--size", cfg.size, "--data", data, "--out", d / "pretrain",
                                 "--steps", pt_steps, "--seq-len", 512, "--batch-tokens", 4096, "--micro-batch", 8,
                                 "--save-every", max(1, pt_steps // 4), "--keep", 2, "--eval-tokens", 4096,
                                 "--seed", s], d / "pretrain", 65, train=True)
    evaluate("pretrain", d / "pretrain", raw=True)

    # supervised fine-tuning on the suite's SFT set
    sft_steps = cfg.n(150, 4)
    add("sft", "sft", ["sft", "--init", d / "pretrain", "--data", suite / "sft.train.jsonl", "--out", d / "sft",
                       "--steps", sft_steps, "--seq-len", 512, "--batch-size", 8, "--micro-batch", 8, "--lr", "1e-3",
                       "--save-every", max(1, sft_steps // 4), "--keep", 2, "--seed", s],
        d / "sft", 42, train=True)
    evaluate("sft", d / "sft")

    # the simulated annotator (Figure 4): pairs from the SFT policy at two temperatures, and pairs from two model
    # variants (SFT against pretrained), as the paper varies both; the variants' unsafe prompts are the safety data.
    # The policy answers most prompts alike (ties), so its own pairs are drawn several times per prompt: what RS and
    # PPO need is an RM that ranks the policy's own answers (measured at --minutes 12, on the RS samples' pairs that
    # the ground truth tells apart: 61 % right from one draw per prompt and 133 steps, 68 % from twelve draws and
    # 1,200 steps, counting 82 -> 94 %; PPO from one RS model at 0.797 held-out ended at 0.764 with an RM of four
    # draws and 400 steps, at 0.801 with this one)
    pairs = cfg.n(90, 4)  # prompts per family (the suite's train split has 300)
    draws = max(1, round(2.4 * x))  # answer pairs per prompt from the policy itself
    pref = ["--max-new-tokens", 16, "--seed", s]
    add("prefs-helpful", "preferences", ["data", "preferences", "--model", d / "sft", "--prompts",
                                         suite / "prompts.train.jsonl", "--temperatures", "0.7,1.5",
                                         "--pairs-per-prompt", draws, "--limit", pairs, *pref,
                                         "--out", prefs / "helpful.jsonl"],
        prefs / "helpful.jsonl", 3 + 0.005 * pairs * 8 * draws)
    add("prefs-variants", "preferences", ["data", "preferences", "--model", d / "sft", "--model-b", d / "pretrain",
                                          "--prompts", suite / "prompts.train.jsonl", "--temperatures", "0.7",
                                          "--limit", pairs, *pref, "--out", prefs / "variants.jsonl"],
        prefs / "variants.jsonl", 3 + 0.005 * pairs * 8)
    held = cfg.n(16, 3)
    add("prefs-heldout", "preferences", ["data", "preferences", "--model", d / "sft", "--model-b", d / "pretrain",
                                         "--prompts", suite / "prompts.heldout.jsonl", "--temperatures", "0.7,1.2",
                                         "--limit", held, *pref, "--out", prefs / "heldout.jsonl"],
        prefs / "heldout.jsonl", 3 + 0.005 * held * 8)
    add("prefs-heldout-policy", "preferences", ["data", "preferences", "--model", d / "sft", "--prompts",
                                                suite / "prompts.heldout.jsonl", "--temperatures", "0.7,1.5",
                                                "--pairs-per-prompt", draws, "--limit", held, *pref,
                                                "--out", prefs / "heldout-policy.jsonl"],
        prefs / "heldout-policy.jsonl", 3 + 0.005 * held * 8 * draws)

    # the two reward models, from the SFT checkpoint (the helpfulness RM trains longer: it has the policy's pairs)
    def rm_flags(steps):
        return ["--steps", steps, "--batch-pairs", 16, "--micro-batch", 8, "--lr", "3e-4", "--warmup", 2,
                "--save-every", max(1, steps // 2), "--keep", 2, "--seed", s]
    rm, rm_help = rm_flags(cfg.n(40, 3)), rm_flags(cfg.n(300, 3))
    # helpfulness: both kinds of pairs, 7:3 (measured at --minutes 12: 98.5 % right on held-out SFT-vs-pretrained
    # pairs, 73.0 % on held-out pairs of the policy's own answers; with one draw of its own pairs, half and half,
    # significantly better was 68 % from its own pairs alone and 98 % with the variants' pairs)
    add("rm-helpful", "rm-helpful", ["rm", "train", "--kind", "helpfulness", "--init", d / "sft", "--mix",
                                     f"{prefs / 'helpful.jsonl'}:0.7,{prefs / 'variants.jsonl'}:0.3",
                                     "--out", d / "rm-helpful", *rm_help],
        d / "rm-helpful", 30, train=True)
    add("eval-rm-helpful", "rm-helpful", ["rm", "eval", "--model", d / "rm-helpful", "--data",
                                          prefs / "heldout.jsonl", "--out", ev / "rm-helpful.json"],
        ev / "rm-helpful.json", 6)
    add("eval-rm-helpful-policy", "rm-helpful", ["rm", "eval", "--model", d / "rm-helpful", "--data",
                                                 prefs / "heldout-policy.jsonl", "--out", ev / "rm-helpful-policy.json"],
        ev / "rm-helpful-policy.json", 4)
    add("rm-safety", "rm-safety", ["rm", "train", "--kind", "safety", "--init", d / "sft", "--mix",
                                   f"{prefs / 'variants.jsonl'}:0.9,{prefs / 'helpful.jsonl'}:0.1",
                                   "--out", d / "rm-safety", *rm],
        d / "rm-safety", 5, train=True)
    add("eval-rm-safety", "rm-safety", ["rm", "eval", "--model", d / "rm-safety", "--data",
                                        prefs / "heldout.jsonl", "--out", ev / "rm-safety.json"],
        ev / "rm-safety.json", 6, extra={"adjust": (detector_flag, (prefs / "heldout.jsonl",))})

    from llamactl.stages import demo_later

    demo_later.add_later_stages(cfg, steps, missing, available, add, evaluate)
    return steps, missing
