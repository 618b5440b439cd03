"""Ghost Attention: loss masks of the training samples, instructions (concise forms, combination, the
user's own), the dialogue roll-out with repair, adherence per turn, data errors, and the commands."""
from __future__ import annotations

import json
import random

import pytest

from llamactl.chat_data import load_records, write_jsonl
from llamactl.cli import main
from llamactl.errors import LlamactlError
from llamactl.gatt_data import (FAMILIES, Dialogue, Figure, Hobby, InstructionPool, Language, adherence_per_turn,
                                family, parse_spec, plan_dialogues, read_constraints_file, roll, training_examples)
from llamactl.sft_data import encode_example, encode_sft
from llamactl.tasks import constraints as C
from llamactl.tokenizer import Tokenizer, dialog_turns
from tests.task_utils import make_suite_and_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_suite_and_checkpoint(tmp_path_factory.mktemp("gatt"))


@pytest.fixture(scope="module")
def tok(made):
    from llamactl import checkpoint

    return Tokenizer.load(checkpoint.tokenizer_path(made[1]))


def _dialogue(n: int = 3) -> Dialogue:
    d = Dialogue(C.EndWith("banana"), "End every answer with the word banana.",
                 [f"Copy this list: cup key{' sun' * i}" for i in range(n)])
    d.answers = [f"cup key{' sun' * i} banana" for i in range(n)]
    d.kept = [True] * n
    return d


# ---- the training samples --------------------------------------------------------------------------------
def test_loss_only_on_the_last_answer_and_instruction_only_in_the_first_turn(tok, tmp_path):
    d = _dialogue(4)
    examples = training_examples(d, random.Random(0), 0)
    assert [len(e.messages) for e in examples] == [3, 5, 7, 9]  # system + one sample per finished turn
    path = tmp_path / "g.jsonl"
    write_jsonl(path, examples, kind="sft")
    read = load_records(path, "sft")
    for k, ex in enumerate(read, 1):
        assert ex.loss == "last_turn" and ex.extra == {"constraint": "end:banana", "turn": k}
        msgs = ex.messages
        assert msgs[0] == {"role": "system", "content": d.instruction}
        assert [m["content"] for m in msgs[1::2]] == d.users[:k]  # user turns without the instruction
        assert all(d.instruction not in m["content"] for m in msgs[1:])
        ids, mask = encode_example(tok, ex)
        turns = dialog_turns(tok, msgs)
        last_prompt, last_answer = turns[-1]
        start = len(ids) - len(last_answer)
        # no token before the last answer (system, users, earlier answers, format) carries loss
        assert not any(mask[:start]) and all(mask[start:])
        assert ids[start:] == last_answer and tok.decode(last_answer).strip() == d.answers[k - 1]
        # the same dialogue without the field trains every answer (the plain SFT reading)
        full = encode_sft(tok, msgs)[1]
        assert sum(full) == sum(len(a) for _, a in turns) and (sum(full) > sum(mask)) == (k > 1)
        # the instruction is in the first turn's tokens only
        first = turns[0][0]
        assert d.instruction in tok.decode(first) and d.instruction not in tok.decode(ids[len(first):])


def test_sft_stage_reads_the_loss_field(tok, tmp_path):
    from llamactl.stages.sft import encode_file

    d = _dialogue(3)
    path = tmp_path / "g.jsonl"
    write_jsonl(path, training_examples(d, random.Random(0), 0), kind="sft")
    for (ids, mask), ex in zip(encode_file(path, tok, "--data"), load_records(path, "sft")):
        assert (ids, mask) == encode_sft(tok, ex.messages, last_turn_only=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b", "loss": "first"}) + "\n")
    with pytest.raises(LlamactlError, match=r"bad.jsonl:1, field loss, --data\)$"):
        encode_file(bad, tok, "--data")


def test_samples_per_dialogue_and_the_ablation(tok):
    d = _dialogue(6)
    ends = [e.extra["turn"] for e in training_examples(d, random.Random(3), 2)]
    assert len(ends) == 2 and len(set(ends)) == 2 and all(1 <= t <= 6 for t in ends)
    plain = training_examples(d, random.Random(3), 2, ghost=False)
    assert [e.extra["turn"] for e in plain] == ends
    for e in plain:  # no system message: the instruction is joined to every user turn
        assert e.messages[0]["role"] == "user" and e.loss == "last_turn"
        assert all(m["content"].startswith(d.instruction) for m in e.messages[0::2])


# ---- instructions ----------------------------------------------------------------------------------------
def test_concise_forms_and_the_papers_families():
    f = Figure("Napoleon")
    assert (f.instruction, f.short, f.spec) == ("Always act as Napoleon from now.", "Figure: Napoleon", "figure:Napoleon")
    assert f.check("Napoleon: we march at dawn") and not f.check("we march at dawn")
    assert f.apply("we march") == "Napoleon: we march" and f.apply("Napoleon: hi") == "Napoleon: hi"
    h = Hobby("chess")
    assert (h.instruction, h.short) == ("You enjoy chess.", "Hobby: chess")
    assert h.check("I played chess.") and h.apply("hello") == "hello chess"
    lang = Language()
    assert lang.short == "Language: pig latin" and lang.check(lang.apply("the cat sat"))
    both = parse_spec("figure:Napoleon+max_words:4")
    assert both.short == "Figure: Napoleon At most 4 words." and both.spec == "figure:Napoleon+max_words:4"
    assert both.check(both.apply("we will march on the capital at dawn"))
    assert family(both) == "combined" and family(h) == "hobby" and family(C.EndWith("x")) == "end"
    # half of the instructions concise (the paper's "half of the time"), none / all at 0 / 1
    prompts = ["What is 2 + 3?"]
    for share, lo, hi in ((0.5, 0.38, 0.62), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)):
        ds = plan_dialogues(InstructionPool(), prompts, dialogues=200, turns=2, concise=share, seed=4)
        frac = sum(d.instruction == d.constraint.short for d in ds) / len(ds)
        assert lo <= frac <= hi
        assert all(d.instruction in (d.constraint.short, d.constraint.instruction) for d in ds)


def test_combination_keeps_kinds_apart_and_adds_the_users():
    mine = parse_spec("start:Ahoy")
    pool = InstructionPool(user=(mine,), max_parts=3)
    seen_user, sizes, fams = False, set(), set()
    for seed in range(400):
        c = pool.sample(random.Random(seed))
        kinds = [p.kind for p in c.parts]
        assert len(kinds) == len(set(kinds)) and 1 <= len(kinds) <= 3
        assert not ("language" in kinds and {"start", "end", "mention"} & set(kinds))
        assert c.check(c.apply("the cat sat on the mat by the door"))  # every combination can be kept
        sizes.add(len(kinds))
        fams |= {family(p) for p in c.parts}
        seen_user |= mine in c.parts
    assert sizes == {1, 2, 3} and seen_user and set(FAMILIES) <= fams
    only = InstructionPool(kinds=("figure", "end"), figures=("Napoleon",), max_parts=1)
    assert {family(only.sample(random.Random(s))) for s in range(50)} == {"figure", "end"}
    assert parse_spec("capitals+figure:Napoleon").check("NAPOLEON: WE MARCH")


def test_instruction_errors_are_one_line(tmp_path):
    for spec, needle in (("figure:Nap0leon", "figure:WORD"), ("language:french", "language:pig_latin"),
                         ("figure:A+start:B", "same kind"), ("language:pig_latin+hobby:chess", "contradict"),
                         ("shout", "unknown constraint")):
        with pytest.raises(LlamactlError, match=needle) as e:
            parse_spec(spec)
        assert "\n" not in str(e.value) and str(e.value).endswith("(--constraint)")
    f = tmp_path / "c.txt"
    f.write_text("# mine\nfigure:Napoleon\n\nend:banana+capitals\nmax_words:zero\n")
    with pytest.raises(LlamactlError, match=rf"\({f}:5, --constraints\)$"):
        read_constraints_file(f)
    f.write_text("figure:Napoleon  # a figure\nend:banana+capitals\n")
    assert [c.spec for c in read_constraints_file(f)] == ["figure:Napoleon", "end:banana+capitals"]
    with pytest.raises(LlamactlError, match="--kinds"):
        InstructionPool(kinds=("hobby", "weather"))


# ---- roll-out and adherence ------------------------------------------------------------------------------
def test_roll_keeps_obeying_answers_repairs_others_and_answers_quiet_turns_alone():
    ds = [Dialogue(C.EndWith("banana"), "End with 'banana'.", ["a", "b", "c", "d"]),
          Dialogue(Figure("Napoleon"), "Figure: Napoleon", ["e", "f", "g", "h"])]
    calls = []

    def answer(dialogs, k):
        calls.append([len(d) for d in dialogs])
        out = []
        for d in dialogs:
            long = len(d) > 3
            assert d[-1]["content"].startswith(("End with", "Figure"))  # the instruction in every user turn
            out.append(["" if long and d[-1]["content"].endswith("c") else f"ok banana {d[-1]['content'][-1]}"] * k)
        return out

    roll(ds, answer, lambda d: len(d) <= 8, every_turn=True, until=False, samples=2)
    a, b = ds
    assert a.answers[:2] == ["ok banana a banana", "ok banana b banana"] and a.kept[:2] == [False, False]
    assert a.answers[2] == "ok banana c banana"  # quiet in the long context: answered alone, then repaired
    assert b.answers[0] == "Napoleon: ok banana e" and all(b.constraint.check(x) for x in b.answers)
    assert [len(d.answers) for d in ds] == [4, 4] and all(d.stopped == "turns" for d in ds)
    assert [1] in calls  # the quiet turn was asked again with no history (one message)


def test_adherence_per_turn_by_hand():
    ds = [Dialogue(C.StartWith("Sure"), "Start with 'Sure'.", list("abcdef")),
          Dialogue(C.StartWith("Well"), "Start with 'Well'.", list("abcd")),
          Dialogue(C.Capitals(), "Answer in capitals.", list("abcdef"))]
    script = {"Start with 'Sure'.": ["Sure a", "Sure b", "Sure c", "no d", "Sure e", "Sure f"],
              "Start with 'Well'.": ["Well a", "nope", "nah", "Well"],
              "Answer in capitals.": ["YES", "YES", "no", "NO", "NO", "NO"]}

    def answer(dialogs, k):
        for d in dialogs:  # the instruction only as the system message, the user turns as planned
            assert d[0]["role"] == "system" and all(x["content"] in "abcdef" for x in d[1::2])
        return [[script[d[0]["content"]][(len(d) - 2) // 2]] for d in dialogs]

    def fits(d):  # the capitals dialogue's context is full after 5 turns
        return len(d) <= (11 if d[0]["content"] == "Answer in capitals." else 99)

    roll(ds, answer, fits, every_turn=False, repair=False)
    adherence, reached = adherence_per_turn(ds, 7)
    assert reached == [3, 3, 3, 3, 2, 1, 0]
    assert adherence == [1.0, 2 / 3, 1 / 3, 2 / 3, 1.0, 1.0, None]
    assert ds[0].kept == [True, True, True, False, True, True] and ds[1].answers[1] == "nope"
    assert [d.stopped for d in ds] == ["turns", "turns", "context"]
    from llamactl.stages.gatt_eval import mean_from

    assert mean_from(adherence, reached, 5) == pytest.approx(1.0)
    assert mean_from(adherence, reached, 2) == pytest.approx((2 + 1 + 2 + 2 + 1) / (3 + 3 + 3 + 2 + 1))


# ---- the commands ----------------------------------------------------------------------------------------
def test_gatt_train_and_eval_commands(made, tmp_path, capsys):
    suite, ckpt = made
    prompts = suite / "prompts.train.jsonl"
    run = tmp_path / "run"
    args = ["gatt", "--model", str(ckpt), "--prompts", str(prompts), "--out", str(run), "--dialogues", "3",
            "--turns", "3", "--max-new-tokens", "4", "--constraint", "figure:Napoleon", "--steps", "2",
            "--batch-size", "2", "--lr", "1e-3", "--save-every", "0"]
    main(args)
    shown = " ".join(capsys.readouterr().out.split())
    assert "GAtt data" in shown and "SFT done" in shown
    stats = json.loads((run / "gatt.json").read_text())
    examples = load_records(run / "gatt.train.jsonl", "sft")
    assert len(examples) == stats["samples"] > 0 and stats["dialogues"] == 3
    assert stats["kept_as_sampled"] + stats["repaired"] == stats["answers"] == sum(stats["turns"])
    for ex in examples:  # every training answer keeps its instruction; loss on the last turn only
        c = parse_spec(ex.extra["constraint"])
        assert ex.loss == "last_turn" and ex.messages[0]["role"] == "system"
        assert all(c.check(m["content"]) for m in ex.messages[2::2])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") != "val"] == [1, 2]
    from llamactl.checkpoint import latest

    assert json.loads((latest(run) / "llamactl.json").read_text())["stage"] == "gatt"
    # a second call on the same run dir refuses to train over it before sampling anything
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1 and "--resume" in capsys.readouterr().err
    # `gatt train` is the same command; --dry-run reuses the data and prints the SFT plan
    main(["gatt", "train", *args[1:], "--dry-run", "--out", str(run)])
    assert "SFT plan" in " ".join(capsys.readouterr().out.split())

    out = tmp_path / "ev" / "gatt.json"
    main(["gatt", "eval", "--model", str(run), "--baseline", str(ckpt), "--prompts", str(suite / "prompts.heldout.jsonl"),
          "--turns", "4", "--dialogues", "2", "--max-new-tokens", "4", "--out", str(out)])
    shown = " ".join(capsys.readouterr().out.split())
    r = json.loads(out.read_text())
    assert r["turns"] == [1, 2, 3, 4] and r["dialogues"] == 2 and 1 <= r["constraints"] <= 2
    assert set(r["models"]) == {"gatt", "baseline"}
    for m in r["models"].values():
        assert len(m["adherence"]) == len(m["reached"]) == 4 and m["reached"][0] == 2
        assert all(a is None or 0.0 <= a <= 1.0 for a in m["adherence"])
        assert all(x >= y for x, y in zip(m["reached"], m["reached"][1:]))
        assert [a is None for a in m["adherence"]] == [n == 0 for n in m["reached"]]
    assert "GAtt adherence per turn" in shown and (out.with_suffix(".png").is_file() or "matplotlib" in shown)


def test_command_errors_are_one_line(made, tmp_path, capsys):
    suite, ckpt = made
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"prompt": 3}\n')
    for extra, needle in ((["--prompts", str(bad)], f"{bad}:2, field prompt, --prompts)"),
                          (["--prompts", str(tmp_path / "none.jsonl")], "--prompts"),
                          (["--prompts", str(bad), "--constraint", "end:x+end:y"], "same kind"),
                          (["--prompts", str(bad), "--concise", "2"], "--concise")):
        with pytest.raises(SystemExit) as e:
            main(["gatt", "--model", str(ckpt), "--out", str(tmp_path / "r"), "--dialogues", "1", *extra])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "gatt.train.jsonl").exists()
    with pytest.raises(SystemExit) as e:
        main(["gatt", "eval", "--model", str(ckpt), "--prompts", str(bad), "--also", "nolabel"])
    assert e.value.code == 1 and "--also" in capsys.readouterr().err


def test_replay_mixes_sft_records_into_the_gatt_set(made, tmp_path, capsys):
    """--replay FILE --replay-ratio R: round(R x GAtt samples) records of the SFT file, unchanged, shuffled in with
    the GAtt samples (the data's fingerprint holds the ratio and the file's hash); a missing file is one line."""
    suite, ckpt = made
    sft_file = suite / "sft.train.jsonl"
    run = tmp_path / "replay"
    base = ["gatt", "--model", str(ckpt), "--prompts", str(suite / "prompts.train.jsonl"), "--out", str(run),
            "--dialogues", "3", "--turns", "2", "--max-new-tokens", "4", "--constraint", "capitals", "--steps", "1",
            "--batch-size", "2", "--lr", "1e-3", "--save-every", "0"]
    main([*base, "--replay", str(sft_file), "--replay-ratio", "2"])
    stats = json.loads((run / "gatt.json").read_text())
    rows = load_records(run / "gatt.train.jsonl", "sft")
    ghost = [r for r in rows if r.loss == "last_turn"]
    replay = [r for r in rows if r.loss != "last_turn"]
    assert len(ghost) == stats["samples"] > 0 and len(replay) == stats["replayed"] == 2 * stats["samples"]
    source = {json.dumps(r.to_json(), sort_keys=True) for r in load_records(sft_file, "sft")}
    assert all(json.dumps(r.to_json(), sort_keys=True) in source for r in replay)
    assert len({json.dumps(r.to_json(), sort_keys=True) for r in replay}) == len(replay)  # drawn without repeats
    assert rows[:len(ghost)] != ghost  # shuffled in, not appended
    assert stats["fingerprint"]["replay_ratio"] == 2 and "replay_sha256" in stats["fingerprint"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "other"), "--replay", str(tmp_path / "nope.jsonl")])
    assert "replay file not found" in capsys.readouterr().err and not (tmp_path / "other").exists()
