"""
The scripted labeler of the built-in task: the "gold" judge that stands in for InstructGPT's human contractors.
It scores a (prompt, response) pair from the text alone; the reward model only ever sees it through rankings.

A prompt is one instruction line; the response (the story) starts right after its newline:
    Write a happy story about a green frog in 2 sentences.
    A green frog sat by the pond. It played with a friend.
The story language is a tiny grammar, so a byte-level GPT learns it in minutes: the first sentence is
`A [colour] <animal> <verb> <place>.`, every later one `It|The <animal> <predicate>.` (the constants below
list the words). Mood is carried by the verb and the predicates; colour only ever sits right before the animal.

Import it from anywhere with `sys.path.insert(0, "data/stories"); import labeler` (prepare.py does the same).
    score(prompt, response) -> float in [0, 1]      1.0 = everything the instruction asked for
    rank(prompt, responses) -> responses best first (stable for ties)
    parse_prompt(prompt) -> {"mood", "colour", "animal", "count"}   (count is None when not asked)
    is_heldout(prompt) -> bool                      True for the HELDOUT (animal, mood) combinations
"""
import re

# ----------------------------------------------------------------------------- the task's language

MOODS = ("happy", "sad")
COLOURS = ("red", "blue", "green", "pink", "brown", "white")       # no leading vowel, so "a" never needs "an"
ANIMALS = ("frog", "cat", "dog", "fox", "bird", "bear", "duck", "goat")
PLACES = ("by the pond", "in the woods", "on a hill", "near the sea")
THINGS = ("hat", "ball", "kite", "stone")
FOODS = ("bread", "seeds", "berries")
# The first sentence's verb, and every later sentence's predicate, by the mood it expresses.
VERBS = {"happy": ("smiled", "laughed", "sang"), "sad": ("cried", "sighed", "wept"),
         "neutral": ("sat", "lived", "slept")}
PREDICATES = {"happy": ("was very happy", "felt glad", "played with a friend", "laughed all day", "sang a song"),
              "sad": ("was very sad", "felt lonely", "lost its {T}", "cried all day", "was all alone"),
              "neutral": ("ate some {F}", "looked at the sky", "went home", "found a {T}", "walked {P}")}
# Mood is read from these words wherever they appear; no neutral sentence contains one.
MOOD_WORDS = {"happy": {"happy", "glad", "friend", "smiled", "laughed", "sang"},
              "sad": {"sad", "lonely", "lost", "alone", "cried", "sighed", "wept"}}
COUNTS = (None, 1, 2, 3)  # sentence counts a prompt may ask for; None = not asked

# Instructions with these (animal, mood) never occur in training data (demos, preferences, PPO prompts) and make up
# about a third of prompts_val, so evaluation can tell whether PPO learned to follow instructions or memorised pairs.
HELDOUT = frozenset({("fox", "sad"), ("bird", "happy"), ("bear", "sad")})

MAX_CHARS = 250  # a response longer than any 4-sentence story scores 0: length is never a way to more reward

def _alt(words):
    return "(?:" + "|".join(re.escape(w) for w in words) + ")"

_SLOTS = {"{T}": _alt(THINGS), "{F}": _alt(FOODS), "{P}": _alt(PLACES)}
def _fill(template):
    pattern = re.escape(template).replace(r"\{", "{").replace(r"\}", "}")
    for slot, alternatives in _SLOTS.items():
        pattern = pattern.replace(slot, alternatives)
    return pattern

_ALL_VERBS = [v for verbs in VERBS.values() for v in verbs]
_ALL_PREDICATES = [_fill(p) for preds in PREDICATES.values() for p in preds]
INTRO_RE = re.compile(rf"A (?:{_alt(COLOURS)} )?{_alt(ANIMALS)} {_alt(_ALL_VERBS)} {_alt(PLACES)}\.")
BODY_RE = re.compile(rf"(?:It|The {_alt(ANIMALS)}) (?:{'|'.join(_ALL_PREDICATES)})\.")
PROMPT_RE = re.compile(r"Write a (\w+) story about a (\w+) (\w+)(?: in (\d+) sentences?)?\.\n?")
EXAMPLE_PROMPT = "Write a happy story about a green frog in 2 sentences.\n"

# ----------------------------------------------------------------------------- prompts

def make_prompt(mood, colour, animal, count=None):
    plural = "" if count is None else f" in {count} sentence{'s' if count > 1 else ''}"
    return f"Write a {mood} story about a {colour} {animal}{plural}.\n"

def parse_prompt(prompt):
    m = PROMPT_RE.fullmatch(prompt)
    attrs = m and {"mood": m[1], "colour": m[2], "animal": m[3], "count": m[4] and int(m[4])}
    if not m or attrs["mood"] not in MOODS or attrs["colour"] not in COLOURS or attrs["animal"] not in ANIMALS \
            or attrs["count"] not in COUNTS:
        raise ValueError(f"not a stories prompt: {prompt!r}; expected e.g. {EXAMPLE_PROMPT!r} with mood in {MOODS}, "
                         f"colour in {COLOURS}, animal in {ANIMALS}, optional count 1-3")
    return attrs

def is_heldout(prompt):
    attrs = parse_prompt(prompt)
    return (attrs["animal"], attrs["mood"]) in HELDOUT

# ----------------------------------------------------------------------------- the judge

WEIGHTS = {"animal": 0.3, "colour": 0.2, "mood": 0.3, "count": 0.2}  # sums to 1: a perfect story scores 1.0

def score(prompt, response):
    """What the instruction asked for, as a weighted sum of four checks in [0, 1], times gates that make
    gaming pointless: every sentence must be one of the grammar's shapes, repeats and unfinished endings halve it."""
    want = parse_prompt(prompt)
    if not response or len(response) > MAX_CHARS:
        return 0.0
    sentences = re.split(r"(?<=\.) ", response)  # a cut-off last fragment stays a (malformed) sentence
    is_fluent = [bool((INTRO_RE if i == 0 else BODY_RE).fullmatch(s)) for i, s in enumerate(sentences)]
    words = re.findall(r"[a-z]+", response.lower())
    # Animal: the share of animal mentions that are the requested one, squared (a stray cat costs a lot).
    animals = [w for w in words if w in ANIMALS]
    animal = (animals.count(want["animal"]) / len(animals)) ** 2 if animals else 0.0
    # Colour: right and next to the animal > not mentioned (an omission) > a wrong colour (a wrong choice).
    colours = set(w for w in words if w in COLOURS)
    colour = 0.3 if not colours else 0.0 if colours != {want["colour"]} else \
        1.0 if f"{want['colour']} {want['animal']}" in response else 0.6
    # Mood: only the requested mood's words > no mood words > both > only the opposite mood's words.
    opposite = "sad" if want["mood"] == "happy" else "happy"
    has_mood, has_opposite = (any(w in MOOD_WORDS[m] for w in words) for m in (want["mood"], opposite))
    mood = {(True, False): 1.0, (False, False): 0.3, (True, True): 0.15, (False, True): 0.0}[has_mood, has_opposite]
    # Sentence count: exact, or off by one for partial credit; any 1-4 sentences when the prompt doesn't ask.
    n = len(sentences)
    count = (1.0 if n <= 4 else 0.0) if want["count"] is None else {0: 1.0, 1: 0.4}.get(abs(n - want["count"]), 0.0)
    total = (WEIGHTS["animal"] * animal + WEIGHTS["colour"] * colour
             + WEIGHTS["mood"] * mood + WEIGHTS["count"] * count)
    # Gates: word salad and keyword stuffing fail the grammar; a repeated sentence, each sentence beyond the
    # longest story the task asks for (4), and a missing final '.' each halve the score.
    total *= (sum(is_fluent) / n) ** 2
    total *= 0.5 ** (n - len(set(sentences))) * 0.5 ** max(0, n - 4)
    total *= 1.0 if response.endswith(".") else 0.5
    return round(min(1.0, max(0.0, total)), 4)  # rounding makes 1.0 exact and ties exact

def rank(prompt, responses):
    """The responses sorted best first by score; ties keep their given order (Python's sort is stable)."""
    return sorted(responses, key=lambda response: -score(prompt, response))
