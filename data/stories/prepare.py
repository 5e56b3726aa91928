"""
The built-in task: generate every data file of the pipeline from a seed, offline.
    python data/stories/prepare.py [--out DIR] [--seed N]        (DIR defaults to this folder)
A noisy "writer" stands in for InstructGPT's demonstrators: it always writes fluent stories in the task's grammar
(see labeler.py) but honours each attribute of the instruction only some of the time, as real demonstrations are
uneven. SFT imitates that unevenness, which leaves RLHF room to help. The scripted labeler ranks K = 4 responses
of mixed quality per prompt (InstructGPT §3.4 used K = 4 to 9), and is the gold judge for evaluation later.
Splits: all (mood, colour, animal, count) instructions outside labeler.HELDOUT are shuffled and 15% go to val only,
so no val prompt occurs in any train file; the held-out combinations appear only in prompts_val (~30% of it).
Tests import this file by path (importlib) so that it can't clash with other datasets' prepare.py.
"""
import argparse
import itertools
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                              # labeler.py sits beside us
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for common.py
import labeler  # noqa: E402
from common import write_jsonl  # noqa: E402

# Rows per split. Stories are ~30-120 bytes, so 20k pretraining stories are ~1.1 MB of text.
SIZES = {"pretrain": (20_000, 1_000), "sft": (5_000, 500), "prefs": (5_000, 300), "prompts": (2_000, 200)}
# The demonstrator's reliability: the chance it honours each attribute, independently (perfect ~17% of the time).
# Most errors are omissions (no colour, no mood word, a sentence too many or too few) rather than wrong choices,
# and the animal is usually right: the SFT model inherits this unevenness, and RLHF has it to fix.
DEMO_NOISE = {"animal": 0.85, "colour": 0.5, "mood": 0.5, "count": 0.6, "repeat": 0.05, "cut": 0.0}
K = 4               # responses ranked per prompt
HELDOUT_VAL = 0.3   # share of prompts_val drawn from the held-out combinations

def write_story(want, noise, rng, content_rng=None):
    """A fluent story for the instruction `want` (labeler.parse_prompt's dict) that gets each attribute right
    with probability noise[attribute]; the errors mix omissions (no colour, no mood) and wrong choices.
    `content_rng` draws the words that carry no attribute (verbs, places, things): giving K responses the same
    one makes them near-minimal pairs that differ mainly in the attributes the labeler checks."""
    content_rng = content_rng or rng
    animal = want["animal"] if rng.random() < noise["animal"] else rng.choice([a for a in labeler.ANIMALS
                                                                                if a != want["animal"]])
    colour = want["colour"] if rng.random() < noise["colour"] else \
        None if rng.random() < 0.8 else rng.choice([c for c in labeler.COLOURS if c != want["colour"]])
    opposite = "sad" if want["mood"] == "happy" else "happy"
    wrong_moods = ["neutral", "neutral", "neutral", opposite, "mixed"]  # mostly omissions (see DEMO_NOISE)
    mood = want["mood"] if rng.random() < noise["mood"] else rng.choice(wrong_moods)
    n = want["count"] or rng.choice([2, 3])
    if rng.random() >= noise["count"]:
        n = rng.choice([k for k in (n - 1, n + 1) if 1 <= k <= 4])
    mood = opposite if mood == "mixed" and n == 1 else mood  # one sentence can't hold both moods
    # Which mood each sentence expresses: the story's mood at least once, the rest that mood or neutral.
    moods = [rng.choice([mood, "neutral"]) if mood in labeler.MOODS else "neutral" for _ in range(n)]
    if mood in labeler.MOODS:
        moods[rng.randrange(n)] = mood
    elif mood == "mixed":  # one happy and one sad sentence somewhere
        i, j = rng.sample(range(n), 2)
        moods[i], moods[j] = "happy", "sad"
    sentences = [f"A {colour + ' ' if colour else ''}{animal} {content_rng.choice(labeler.VERBS[moods[0]])} "
                 f"{content_rng.choice(labeler.PLACES)}."]
    for m in moods[1:]:
        while True:  # resample until new: repeated sentences are a separate, deliberate kind of noise
            predicate = content_rng.choice(labeler.PREDICATES[m]).format(
                T=content_rng.choice(labeler.THINGS), F=content_rng.choice(labeler.FOODS),
                P=content_rng.choice(labeler.PLACES))
            sentence = f"{content_rng.choice(['It', f'The {animal}'])} {predicate}."
            if sentence not in sentences:
                break
        sentences.append(sentence)
    if n >= 3 and rng.random() < noise["repeat"]:
        sentences[-1] = rng.choice(sentences[1:-1])
    story = " ".join(sentences)
    if rng.random() < noise["cut"]:  # an output that stopped mid-sentence, so the RM learns to dislike those
        story = story[:rng.randrange(len(story) // 2, len(story) - 1)]
    return story

def main(out=HERE, seed=1337, scale=1.0, n_prefs=None, n_demos=None):
    """Write all eight files into `out`; `scale` shrinks every size (tests use it for speed); `n_prefs` and `n_demos`
    set the number of train rankings and train demonstrations. Returns the rows."""
    rng = random.Random(seed)
    sizes = {kind: (max(4, int(n_train * scale)), max(4, int(n_val * scale))) for kind, (n_train, n_val)
             in SIZES.items()}
    # More train rankings make a better, slower RM. They are drawn after the val files, the pretraining text and the
    # demonstrations, which stay byte-identical; the default's rankings come first; only the PPO prompts change.
    if n_prefs is not None:
        if n_prefs < 1:
            raise ValueError(f"n_prefs: need at least 1 ranking, got {n_prefs}")
        sizes["prefs"] = (n_prefs, sizes["prefs"][1])
    # Demonstrations, likewise, but without moving anything else: the default's are always drawn where they are (and
    # a smaller n_demos keeps the first of them), the extra ones after every other file. So a labeling budget can
    # trade demonstrations for rankings (run.sh budget) with the rest of the task byte-identical.
    if n_demos is not None and n_demos < 1:
        raise ValueError(f"n_demos: need at least 1 demonstration, got {n_demos}")
    # -- split the instruction space: held-out combos -> prompts_val only; 15% of the rest -> val only
    instructions = [dict(mood=m, colour=c, animal=a, count=n) for m, c, a, n in
                    itertools.product(labeler.MOODS, labeler.COLOURS, labeler.ANIMALS, labeler.COUNTS)]
    heldout = [w for w in instructions if (w["animal"], w["mood"]) in labeler.HELDOUT]
    seen = [w for w in instructions if (w["animal"], w["mood"]) not in labeler.HELDOUT]
    rng.shuffle(seen)
    n_val_only = round(0.15 * len(seen))
    pools = {"train": seen[n_val_only:], "val": seen[:n_val_only]}
    prompt_of = lambda want: labeler.make_prompt(**want)  # noqa: E731
    rows = {}
    for split, i in (("val", 1), ("train", 0)):  # val first, so train pretraining text can avoid val's stories
        pool = pools[split]
        # -- pretraining text: unconditioned stories about any attributes (held-out pairs included), no instruction
        avoid = {row["text"] for row in rows.get("pretrain_val", [])}
        texts = []
        while len(texts) < sizes["pretrain"][i]:
            text = write_story(rng.choice(instructions), DEMO_NOISE, rng)
            if text not in avoid:
                texts.append(text)
        rows[f"pretrain_{split}"] = [{"text": t} for t in texts]
        # -- demonstrations: the noisy writer answers instructions from this split's pool
        wants = [rng.choice(pool) for _ in range(sizes["sft"][i])]
        rows[f"sft_{split}"] = [{"prompt": prompt_of(w), "response": write_story(w, DEMO_NOISE, rng)} for w in wants]
        # -- preferences: K responses from writers of random skill, ranked by the labeler. No two may tie: a tied pair
        # has no preference (the RM's val accuracy is "ties excluded"), yet a ranking lists it in some order, which
        # would train the RM on coin flips and score it on them. A response that ties one already drawn is drawn again.
        prefs = []
        while len(prefs) < sizes["prefs"][i]:
            want = rng.choice(pool)
            prompt = prompt_of(want)
            responses, scores, content_seed = [], [], rng.random()
            while len(responses) < K:
                skill = rng.uniform(0.3, 1.0)
                noise = dict(animal=skill, colour=skill, mood=skill, count=skill, repeat=(1 - skill) / 4,
                             cut=0.05)
                # The K responses share their content words, so that what differs is mostly what the labeler
                # checks (near-minimal pairs). The animal goes wrong as often as any attribute: with half as many
                # wrong animals our small RM never learned to compare the response's animal with the prompt's
                # (docs/experiments.md#reward-model).
                response = write_story(want, noise, rng, random.Random(content_seed))
                response_score = labeler.score(prompt, response)
                if response_score not in scores:
                    responses.append(response)
                    scores.append(response_score)
            prefs.append({"prompt": prompt, "ranking": labeler.rank(prompt, responses)})
        rows[f"prefs_{split}"] = prefs
        # -- PPO prompts: val also gets the held-out combinations
        n_prompts = sizes["prompts"][i]
        n_heldout = round(HELDOUT_VAL * n_prompts) if split == "val" else 0
        wants = [rng.choice(heldout) for _ in range(n_heldout)]
        wants += [rng.choice(pool) for _ in range(n_prompts - n_heldout)]
        rng.shuffle(wants)
        rows[f"prompts_{split}"] = [{"prompt": prompt_of(w)} for w in wants]
    if n_demos is not None:
        n_extra = max(0, n_demos - len(rows["sft_train"]))
        wants = [rng.choice(pools["train"]) for _ in range(n_extra)]
        extra = [{"prompt": prompt_of(w), "response": write_story(w, DEMO_NOISE, rng)} for w in wants]
        rows["sft_train"] = (rows["sft_train"] + extra)[:n_demos]
    # -- write and report
    for name in sorted(rows):
        write_jsonl(os.path.join(out, f"{name}.jsonl"), rows[name])
        print(f"{name + '.jsonl':<22} {len(rows[name]):>7,} rows")
    demo_scores = [labeler.score(r["prompt"], r["response"]) for r in rows["sft_train"]]
    spreads = [labeler.score(r["prompt"], r["ranking"][0]) - labeler.score(r["prompt"], r["ranking"][-1])
               for r in rows["prefs_train"]]
    n_heldout = sum(labeler.is_heldout(r["prompt"]) for r in rows["prompts_val"])
    print(f"labeler score of demonstrations: mean {sum(demo_scores) / len(demo_scores):.3f} (best achievable 1.000), "
          f"{sum(s == 1.0 for s in demo_scores) / len(demo_scores):.1%} perfect")
    print(f"score spread (best - worst) within a ranking: mean {sum(spreads) / len(spreads):.3f}")
    print(f"held-out (animal, mood) {sorted(labeler.HELDOUT)}: "
          f"{n_heldout:,} of {len(rows['prompts_val']):,} val prompts")
    for row in rows["sft_train"][:3]:
        print(f"--- score {labeler.score(row['prompt'], row['response']):.2f}\n{row['prompt']}{row['response']}")
    return rows

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="generate the built-in stories task")
    parser.add_argument("--out", default=HERE, help="output folder (default: data/stories/)")
    parser.add_argument("--seed", type=int, default=1337, help="same seed -> byte-identical files")
    parser.add_argument("--n_prefs", type=int, default=None,
                        help=f"train rankings (default {SIZES['prefs'][0]:,}; more make a better but slower RM)")
    parser.add_argument("--n_demos", type=int, default=None,
                        help=f"train demonstrations (default {SIZES['sft'][0]:,}); the other files stay the same")
    args = parser.parse_args()
    try:
        main(args.out, args.seed, n_prefs=args.n_prefs, n_demos=args.n_demos)
    except ValueError as e:  # bad input: one line, no traceback
        parser.error(str(e))

# Expected output (seed 1337):
# prefs_train.jsonl        5,000 rows
# prefs_val.jsonl            300 rows
# pretrain_train.jsonl    20,000 rows
# pretrain_val.jsonl       1,000 rows
# prompts_train.jsonl      2,000 rows
# prompts_val.jsonl          200 rows
# sft_train.jsonl          5,000 rows
# sft_val.jsonl              500 rows
# labeler score of demonstrations: mean 0.715 (best achievable 1.000), 14.8% perfect
# score spread (best - worst) within a ranking: mean 0.649
# held-out (animal, mood) [('bear', 'sad'), ('bird', 'happy'), ('fox', 'sad')]: 60 of 200 val prompts
# --- score 0.74
# Write a happy story about a red fox in 2 sentences.
# A fox sat by the pond. It found a stone. It played with a friend.
# --- score 0.56
# Write a sad story about a brown dog.
# A bird sat in the woods. It was very sad.
# --- score 0.53
# Write a happy story about a red goat in 2 sentences.
# A goat slept by the pond.
