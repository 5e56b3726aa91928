"""
OpenAI's Reddit TL;DR task from "Learning to summarize from human feedback" (Stiennon et al. 2020).
Demonstrations (BASE = https://openaipublic.blob.core.windows.net/summarize-from-feedback):
    {BASE}/datasets/tldr_3_filtered/{split}.jsonl, rows {"id", "subreddit", "title", "post", "summary"};
    train -> train, valid and test -> val.
Comparisons: {BASE}/dataset/comparisons/{batch}.json,
    JSON lines {"info": {"post", "title", "subreddit", ...}, "summaries": [{"text"}, {"text"}], "choice", "split"};
    split train -> train, valid1 / valid2 -> val. CNN/DM batches (an "article" instead of a "post") are skipped.
    python data/tldr/prepare.py                     # downloads into data/tldr/raw/ (hundreds of MB)
    python data/tldr/prepare.py --source ~/tldr     # a local copy: tldr_3_filtered/*.jsonl, comparisons/*.json
Writes, for split in {train, val}:
    sft_{split}.jsonl      {"prompt", "response"}             response = " " + summary
    prefs_{split}.jsonl    {"prompt", "chosen", "rejected"}   chosen = summaries[choice].text (already starts with " ")
    prompts_{split}.jsonl  {"prompt"}                         the distinct SFT queries, for PPO
The prompt is OpenAI's query, QUERY below, cut to at most 512 gpt2 tokens the way their code does it.
"""
import argparse
import functools
import glob
import itertools
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for common.py
from common import download, get_tokenizer, read_jsonl, write_jsonl  # noqa: E402

BASE = "https://openaipublic.blob.core.windows.net/summarize-from-feedback"
SFT_DIR, COMPARISONS_DIR = "datasets/tldr_3_filtered", "dataset/comparisons"  # sic: "datasets" vs "dataset"
SFT_FILES = {"train": "train", "valid": "val", "test": "val"}  # upstream file -> our split
# The Reddit comparison batches; the CNN/DM ones (batch0_cnndm, cnndm0, cnndm2) would only be skipped: not fetched.
BATCHES = [f"batch{i}" for i in range(3, 23)] + ["edit_b2_eval_test"]
PREF_SPLITS = {"train": "train", "valid1": "val", "valid2": "val"}
QUERY = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
MAX_QUERY_TOKENS = 512

# ----------------------------------------------------------------------------- parsing (tests import these)

def format_query(tokenizer, subreddit, title, post, max_tokens=MAX_QUERY_TOKENS):
    """OpenAI's query (summarize_from_feedback/tasks.py, process_query): while it is over max_tokens, cut the post back
    at its last newline and re-encode; with no newline left, drop one character and re-encode. The answer is the first
    query that fits. Returns None if even an empty post does not fit (OpenAI raises there)."""
    def query(p):
        return QUERY.format(subreddit=subreddit, title=title, post=p)
    def fits(p):
        return len(tokenizer.encode_ordinary(query(p))) <= max_tokens
    while not fits(post) and "\n" in post:
        post = post[:post.rindex("\n")]
    if fits(post):
        return query(post)
    if not fits(""):
        return None
    # No newline left. GPT-2's token count is not monotonic in the prefix length (" boyfrien" is 3 tokens, " boyfriend"
    # one), so a binary search can stop at a shorter prefix than OpenAI's one-character-at-a-time scan. We scan the
    # same way, downward, but start from a bound no longer prefix can fit under, a few characters above the answer.
    start = len(QUERY.split("{post}")[0].format(subreddit=subreddit, title=title))  # where the post begins
    for n in range(longest_possible_fit(tokenizer, query(post), start, max_tokens, len(post)), -1, -1):
        if fits(post[:n]):
            return query(post[:n])
    raise AssertionError("unreachable: the empty post fits")

def longest_possible_fit(tokenizer, text, start, max_tokens, n_max):
    """A bound n such that no query of a prefix post[:m], m > n, fits max_tokens, where text = query(post) and the
    post starts at character `start` of it. Why it is safe: tiktoken cuts text into pieces with GPT-2's regex and
    encodes each piece on its own, and a piece always ends where a non-space character meets a space or newline
    (every regex branch but the whitespace ones excludes whitespace after its optional leading space). Which piece
    starts where is decided by at most two characters past the piece's end, so every string that starts with
    text[:J + 2], J such a boundary, encodes text[:J] into the same tokens as text does: the query of post[:m] with
    start + m >= J + 2 has at least those tokens, plus one for what follows them ("\n\nTL;DR:")."""
    tokens = tokenizer.encode_ordinary(text)
    token_ends = list(itertools.accumulate(len(b) for b in tokenizer.decode_tokens_bytes(tokens)))  # byte offsets
    n_bytes, n_tokens = len(text[:start].encode()), 0
    for j in range(start, len(text) - 1):
        n_bytes += len(text[j].encode())  # bytes of text[:j + 1]
        if text[j + 1] in " \n\t" and not text[j].isspace():  # J = j + 1 ends a piece (isspace covers Unicode's)
            while n_tokens < len(token_ends) and token_ends[n_tokens] <= n_bytes:
                n_tokens += 1  # the tokens of text[:j + 1], which is a token boundary too
            if n_tokens + 1 > max_tokens:
                return max(0, min(n_max, j + 2 - start))  # m with start + m >= J + 2 cannot fit
    return n_max

def parse_comparison(row, make_query):
    """One comparison row -> ({"prompt", "chosen", "rejected"}, split), or (None, reason) when it is skipped.
    make_query(subreddit, title, post) is format_query with the tokenizer bound."""
    info, summaries = row.get("info", {}), row.get("summaries", [])
    if "post" not in info:
        return None, "CNN/DM article, not a Reddit post"
    if row.get("split") not in PREF_SPLITS:
        return None, f"split {row.get('split')!r}"
    if len(summaries) != 2 or row.get("choice") not in (0, 1):
        return None, "not two summaries with a choice of 0 or 1"
    # `choice` indexes the summary the labeler preferred; both texts already start with a space.
    chosen, rejected = summaries[row["choice"]]["text"], summaries[1 - row["choice"]]["text"]
    if not chosen.strip() or not rejected.strip():
        return None, "empty summary"
    if chosen == rejected:
        return None, "chosen == rejected"
    prompt = make_query(info["subreddit"], info["title"], info["post"])
    if prompt is None:
        return None, f"title alone is over {MAX_QUERY_TOKENS} tokens"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, PREF_SPLITS[row["split"]]

# ----------------------------------------------------------------------------- read -> parse -> write

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="a local copy: a folder holding the upstream files, instead of downloading")
    parser.add_argument("--out", default=HERE, help="output folder")
    args = parser.parse_args(argv)
    make_query = functools.partial(format_query, get_tokenizer("gpt2"))

    def local(upstream_dir, name):
        """An upstream file: downloaded once into raw/, or from --source (in a subfolder like upstream's, or flat)."""
        folder = os.path.basename(upstream_dir)
        if args.source is None:
            cache = os.path.join(HERE, "raw", folder, name)
            return download(f"{BASE}/{upstream_dir}/{name}", cache)
        paths = [os.path.join(args.source, folder, name), os.path.join(args.source, name)]
        return next((p for p in paths if os.path.exists(p)), None)

    # -- demonstrations: OpenAI's SFT target is " " + summary + <|endoftext|>; sft.py appends the end-of-text.
    sft = {"train": [], "val": []}
    for upstream, split in SFT_FILES.items():
        path = local(SFT_DIR, f"{upstream}.jsonl")
        if path is None:
            print(f"sft: no {upstream}.jsonl in {args.source}, skipped")
            continue
        rows = read_jsonl(path, fields=("subreddit", "title", "post", "summary"))
        skipped = Counter()
        for row in rows:
            prompt = make_query(row["subreddit"], row["title"], row["post"])
            if prompt is None:
                skipped[f"title alone is over {MAX_QUERY_TOKENS} tokens"] += 1
            elif not row["summary"].strip():
                skipped["empty summary"] += 1
            else:
                sft[split].append({"prompt": prompt, "response": " " + row["summary"]})
        print(f"sft: {path}: {len(rows):,} rows -> {len(rows) - sum(skipped.values()):,} demos for {split}")
        for reason, n in skipped.most_common():
            print(f"  skipped {n:,}: {reason}")

    # -- comparisons: with --source, every *.json there is read (CNN/DM batches included, and skipped row by row)
    if args.source is None:
        paths = [local(COMPARISONS_DIR, f"{batch}.json") for batch in BATCHES]
    else:
        paths = sorted(glob.glob(os.path.join(args.source, "comparisons", "*.json")) or
                       glob.glob(os.path.join(args.source, "*.json")))
    prefs, skipped, rows = {"train": [], "val": []}, Counter(), 0
    make_query = functools.lru_cache(maxsize=None)(make_query)  # one post appears in many rows: build its query once
    for path in paths:
        for row in read_jsonl(path):
            rows += 1
            example, split_or_reason = parse_comparison(row, make_query)
            if example is None:
                skipped[split_or_reason] += 1
            else:
                prefs[split_or_reason].append(example)
    print(f"prefs: {len(paths):,} comparison files: {rows:,} rows -> {len(prefs['train']):,} train, "
          f"{len(prefs['val']):,} val")
    for reason, n in skipped.most_common():
        print(f"  skipped {n:,}: {reason}")

    # -- write; a kind with no rows (e.g. no comparison files in --source) is not written
    for split in ("train", "val"):
        prompts = [{"prompt": p} for p in dict.fromkeys(ex["prompt"] for ex in sft[split])]  # distinct, in order
        for kind, examples in (("sft", sft[split]), ("prefs", prefs[split]), ("prompts", prompts)):
            if examples:
                path = os.path.join(args.out, f"{kind}_{split}.jsonl")
                write_jsonl(path, examples)
                print(f"wrote {len(examples):,} rows to {path}")
    return {kind: {split: len(d[split]) for split in d} for kind, d in (("sft", sft), ("prefs", prefs))}

if __name__ == "__main__":
    main()

# Expected output. Row counts of the SFT files are upstream's; kept and skipped counts were not measured where this was
# written (no network), so they show as N. tldr_3_filtered was filtered to short posts, so few queries need cutting.
# sft: data/tldr/raw/tldr_3_filtered/train.jsonl: 116,722 rows -> N demos for train
# sft: data/tldr/raw/tldr_3_filtered/valid.jsonl: 6,447 rows -> N demos for val
# sft: data/tldr/raw/tldr_3_filtered/test.jsonl: 6,553 rows -> N demos for val
# prefs: 21 comparison files: N rows -> N train, N val
#   skipped N: chosen == rejected
# wrote N rows to data/tldr/sft_train.jsonl
# wrote N rows to data/tldr/prefs_train.jsonl
# wrote N rows to data/tldr/prompts_train.jsonl
# wrote N rows to data/tldr/sft_val.jsonl
# wrote N rows to data/tldr/prefs_val.jsonl
# wrote N rows to data/tldr/prompts_val.jsonl
