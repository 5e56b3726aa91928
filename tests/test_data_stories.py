"""
The built-in task: the scripted labeler is the gold judge (it stands in for InstructGPT's human labelers, §3.4),
so it must reward exactly what the instruction asks for and be impossible to game; prepare.py must be
deterministic, keep its splits apart, and hold the HELDOUT combinations out of everything we train on.
    python -m pytest tests/test_data_stories.py -q
"""
import filecmp
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest

STORIES = Path(__file__).resolve().parent.parent / "data" / "stories"
sys.path.insert(0, str(STORIES))
import labeler  # noqa: E402

# By path, under its own name: every dataset has a prepare.py, and `import prepare` would clash between them.
_spec = importlib.util.spec_from_file_location("stories_prepare", STORIES / "prepare.py")
prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare)

PROMPT = "Write a happy story about a green frog in 3 sentences.\n"
PERFECT = "A green frog sat by the pond. It played with a friend. The frog was very happy."

def load(folder, name):
    with open(Path(folder) / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One full-size run (a few seconds), shared by the tests that look at the generated files."""
    folder = tmp_path_factory.mktemp("stories")
    prepare.main(out=str(folder), seed=1337)
    return folder

def test_correct_response_scores_exactly_one_and_beats_each_flaw():
    """A story doing everything asked scores 1.0, and each single flaw the labeler checks costs something."""
    assert labeler.score(PROMPT, PERFECT) == 1.0
    flawed = {
        "wrong animal": "A green cat sat by the pond. It played with a friend. The cat was very happy.",
        "missing colour": "A frog sat by the pond. It played with a friend. The frog was very happy.",
        "wrong colour": "A red frog sat by the pond. It played with a friend. The frog was very happy.",
        "opposite mood": "A green frog sat by the pond. It was all alone. The frog was very sad.",
        "no mood": "A green frog sat by the pond. It went home. The frog looked at the sky.",
        "wrong count": "A green frog sat by the pond. It played with a friend.",
        "repeated sentence": "A green frog sat by the pond. It played with a friend. It played with a friend.",
        "unfinished ending": "A green frog sat by the pond. It played with a friend. The frog was very ha",
        "trailing junk": PERFECT + " The",
    }
    for flaw, response in flawed.items():
        assert labeler.score(PROMPT, response) < 1.0, flaw
    assert labeler.rank(PROMPT, list(flawed.values()) + [PERFECT])[0] == PERFECT

def test_wrong_choices_score_below_omissions():
    """Writing the wrong colour or the opposite mood is worse than leaving it out (the task's penalties)."""
    missing_colour = "A frog sat by the pond. It played with a friend. The frog was very happy."
    wrong_colour = "A red frog sat by the pond. It played with a friend. The frog was very happy."
    no_mood = "A green frog sat by the pond. It went home. The frog looked at the sky."
    opposite_mood = "A green frog sat by the pond. It was all alone. The frog was very sad."
    assert labeler.score(PROMPT, wrong_colour) < labeler.score(PROMPT, missing_colour)
    assert labeler.score(PROMPT, opposite_mood) < labeler.score(PROMPT, no_mood)

def test_keyword_stuffing_and_repetition_score_low():
    """Gaming the keyword checks must not pay: lists of every animal and colour, the right words repeated,
    word salad, fluent sentences about every animal, and an overlong response all score below 0.3."""
    games = [
        " ".join(f"{c} {a}" for c in labeler.COLOURS for a in labeler.ANIMALS) + " happy.",
        "green frog " * 10,
        "A green frog sat by the pond. " + "green frog. " * 10,
        "frog frog frog green green happy.",
        "A green frog sat by the pond. " + " ".join(f"The {a} was very happy." for a in labeler.ANIMALS),
        PERFECT + " The frog felt glad." * 12,
        "A green frog sat by the pond. It played with a friend. The frog was very happy. " * 3,
    ]
    for response in games:
        assert labeler.score(PROMPT, response) < 0.3, response

def test_score_is_always_in_unit_interval_on_random_strings():
    """Whatever the policy emits (PPO samples byte by byte), the gold score stays in [0, 1]."""
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz .\n" + "".join(labeler.ANIMALS + labeler.COLOURS)
    fragments = PERFECT.split(" ") + list(labeler.ANIMALS) + list(labeler.COLOURS) + ["."]
    for _ in range(2000):
        chars = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))
        words = " ".join(rng.choice(fragments) for _ in range(rng.randrange(0, 30)))
        for response in (chars, words):
            assert 0.0 <= labeler.score(PROMPT, response) <= 1.0

def test_rank_returns_best_first_and_keeps_ties_in_order():
    """rank() sorts by score, best first; equal scores keep their given order (a stable sort)."""
    tie_a = "A frog sat by the pond. It played with a friend. The frog was very happy."
    tie_b = "A frog slept by the pond. It played with a friend. The frog was very happy."
    worst = "A red cat sat by the pond."
    assert labeler.rank(PROMPT, [worst, tie_a, PERFECT, tie_b]) == [PERFECT, tie_a, tie_b, worst]
    assert labeler.rank(PROMPT, [worst, tie_b, tie_a]) == [tie_b, tie_a, worst]

def test_parse_prompt_reads_attributes_and_rejects_other_text():
    """parse_prompt inverts make_prompt, and anything else is a ValueError that shows a valid example."""
    assert labeler.parse_prompt(PROMPT) == {"mood": "happy", "colour": "green", "animal": "frog", "count": 3}
    assert labeler.parse_prompt(labeler.make_prompt("sad", "red", "fox"))["count"] is None
    assert labeler.is_heldout(labeler.make_prompt("sad", "red", "fox", 1))
    for bad in ["Write a story.", "Write a happy story about a purple frog.\n", PROMPT + "A green frog"]:
        with pytest.raises(ValueError, match="expected e.g."):
            labeler.parse_prompt(bad)

def test_generator_is_deterministic_for_a_seed_and_differs_across_seeds(tmp_path):
    """Same seed -> byte-identical files (random.Random(seed), never the global generator); another seed differs."""
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        prepare.main(out=str(tmp_path / name), seed=seed, scale=0.05)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 8
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert match == files
    assert filecmp.cmpfiles(tmp_path / "a", tmp_path / "c", files, shallow=False)[1] == files

def test_more_rankings_extend_the_default_ones_and_leave_the_rest_of_the_task_alone(tmp_path):
    """--n_prefs buys a better RM with more rankings: the default's rankings come first, and the val files,
    pretraining text and demonstrations are byte-identical, so the two RMs start from the same SFT model and are
    scored on the same val rankings."""
    default = prepare.main(out=str(tmp_path / "default"), scale=0.05)
    more = prepare.main(out=str(tmp_path / "more"), scale=0.05, n_prefs=3 * len(default["prefs_train"]))
    assert len(more["prefs_train"]) == 3 * len(default["prefs_train"])
    assert more["prefs_train"][:len(default["prefs_train"])] == default["prefs_train"]
    same = ["pretrain_train.jsonl", "pretrain_val.jsonl", "sft_train.jsonl", "sft_val.jsonl", "prefs_val.jsonl",
            "prompts_val.jsonl"]  # all but prefs_train and prompts_train, which are drawn after the extra rankings
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "default", tmp_path / "more", same, shallow=False)
    assert match == same
    with pytest.raises(ValueError, match="n_prefs: need at least 1 ranking"):
        prepare.main(out=str(tmp_path / "none"), scale=0.05, n_prefs=0)

def test_demonstration_count_extends_or_cuts_the_default_ones_and_leaves_every_other_file_alone(tmp_path):
    """--n_demos trades demonstrations for rankings at a labeling budget (run.sh budget): more keep the default's
    demonstrations first, fewer keep the first of them, and all seven other files are byte-identical either way, so
    only the number of demonstrations differs between the budget's splits."""
    default = prepare.main(out=str(tmp_path / "default"), scale=0.05)
    n = len(default["sft_train"])
    more = prepare.main(out=str(tmp_path / "more"), scale=0.05, n_demos=3 * n)
    fewer = prepare.main(out=str(tmp_path / "fewer"), scale=0.05, n_demos=n // 2)
    assert len(more["sft_train"]) == 3 * n and more["sft_train"][:n] == default["sft_train"]
    assert fewer["sft_train"] == default["sft_train"][:n // 2]
    assert {r["prompt"] for r in more["sft_train"]}.isdisjoint(r["prompt"] for r in default["sft_val"])  # train pool
    same = ["pretrain_train.jsonl", "pretrain_val.jsonl", "sft_val.jsonl", "prefs_train.jsonl", "prefs_val.jsonl",
            "prompts_train.jsonl", "prompts_val.jsonl"]
    for folder in ("more", "fewer"):
        assert filecmp.cmpfiles(tmp_path / "default", tmp_path / folder, same, shallow=False)[0] == same, folder
    with pytest.raises(ValueError, match="n_demos: need at least 1 demonstration"):
        prepare.main(out=str(tmp_path / "none"), scale=0.05, n_demos=0)

def test_splits_do_not_overlap(data_dir):
    """No val story, demonstration, ranking or prompt also occurs in train, so val numbers measure generalization."""
    for kind, key in (("pretrain", "text"), ("sft", "prompt"), ("prefs", "prompt"), ("prompts", "prompt")):
        train = {row[key] for row in load(data_dir, f"{kind}_train")}
        val = {row[key] for row in load(data_dir, f"{kind}_val")}
        assert not train & val, kind

def test_heldout_combinations_only_appear_in_val_prompts(data_dir):
    """HELDOUT (animal, mood) instructions never occur in anything we train on, and make up ~30% of prompts_val."""
    for name in ("sft_train", "sft_val", "prefs_train", "prefs_val", "prompts_train"):
        assert not any(labeler.is_heldout(row["prompt"]) for row in load(data_dir, name)), name
    val = [labeler.parse_prompt(row["prompt"]) for row in load(data_dir, "prompts_val")]
    assert {(w["animal"], w["mood"]) for w in val} >= labeler.HELDOUT
    assert 0.2 < sum((w["animal"], w["mood"]) in labeler.HELDOUT for w in val) / len(val) < 0.4

def test_demonstrations_are_fluent_but_mediocre_and_rankings_have_spread_and_no_ties(data_dir):
    """The demonstrator writes grammatical stories but follows the instruction unevenly (leaving RLHF room to help),
    and each K = 4 ranking runs from a clearly better to a clearly worse response, best first, with no two responses
    tied by the labeler: every one of its C(4,2) pairs is a real preference."""
    demos = load(data_dir, "sft_train")
    scores = [labeler.score(row["prompt"], row["response"]) for row in demos]
    assert 0.6 < sum(scores) / len(scores) < 0.75
    assert 0.1 < sum(s == 1.0 for s in scores) / len(scores) < 0.25
    for row in demos:
        sentences = re.split(r"(?<=\.) ", row["response"])
        assert labeler.INTRO_RE.fullmatch(sentences[0]) and all(labeler.BODY_RE.fullmatch(s) for s in sentences[1:])
    spreads = []
    for row in load(data_dir, "prefs_train"):
        assert len(row["ranking"]) == len(set(row["ranking"])) == prepare.K
        ranked = [labeler.score(row["prompt"], r) for r in row["ranking"]]
        assert ranked == sorted(ranked, reverse=True) and len(set(ranked)) == prepare.K
        spreads.append(ranked[0] - ranked[-1])
    assert min(spreads) > 0 and sum(spreads) / len(spreads) > 0.3
