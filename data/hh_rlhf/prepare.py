"""
Anthropic HH-RLHF (Bai et al. 2022), MIT licence: pairs of whole dialogues that differ only in the last Assistant reply.
Source: https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz
(gzip JSON lines {"chosen", "rejected"}, each "\n\nHuman: ...\n\nAssistant: ..."; split train, and test -> val).
    python data/hh_rlhf/prepare.py                          # downloads helpful-base into data/hh_rlhf/raw/
    python data/hh_rlhf/prepare.py --subset harmless-base
    python data/hh_rlhf/prepare.py --source ~/hh-rlhf       # holds {subset}/{split}.jsonl.gz or {split}.jsonl.gz
Writes, for split in {train, val}:
    prefs_{split}.jsonl    {"prompt", "chosen", "rejected"}   reward model pairs
    sft_{split}.jsonl      {"prompt", "response"}             the chosen side as a demonstration
    prompts_{split}.jsonl  {"prompt"}                         distinct prompts, for PPO
The prompt is the dialogue up to and including its last "\n\nAssistant:"; the response is everything after it, kept
exactly, so it starts with the reply's space (" Sure, ..."). GPT-2's tokenizer attaches a space to the word after it,
so prompt tokens + response tokens then equal the tokens of the whole dialogue, and the model learns to emit that space.
Text is kept as is, including any Unicode and a literal "<|endoftext|>" (we always tokenize with encode_ordinary).
Long dialogues are not cut here: at training time the prompt is truncated from the left, so it keeps its end.
"""
import argparse
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for common.py
from common import download, read_jsonl, write_jsonl  # noqa: E402

URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"
SPLITS = {"train": "train", "test": "val"}  # upstream split -> our split
ASSISTANT = "\n\nAssistant:"

# ----------------------------------------------------------------------------- parsing (tests import these)

def parse_hh_row(chosen, rejected):
    """One upstream row -> ({"prompt", "chosen", "rejected"}, None), or (None, reason) when the row is skipped."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return None, "no Assistant turn"
    prompt = chosen[:cut + len(ASSISTANT)]
    # Real rows sometimes differ before the last reply (two Assistant turns in a row, a reply holding an inline
    # "  Human:"), so the two sides would not answer the same prompt.
    if not rejected.startswith(prompt):
        return None, "rejected does not share chosen's prompt"
    chosen_reply, rejected_reply = chosen[len(prompt):], rejected[len(prompt):]
    # A response ends where the model should emit end-of-text, so it must not run on into another turn, not even one
    # glued on inline ("... sure.  Human: and ...", as the real files hold): SFT would teach the policy to write them.
    if any(turn in reply for reply in (chosen_reply, rejected_reply) for turn in ("\n\nHuman:", ASSISTANT)):
        return None, "a reply runs on into another turn"
    if any("  Human:" in reply for reply in (chosen_reply, rejected_reply)):
        return None, "a reply holds an inline '  Human:' turn"
    if not chosen_reply.strip() or not rejected_reply.strip():
        return None, "empty final reply"  # the real files hold dialogues ending "\n\nAssistant: "
    if chosen_reply == rejected_reply:
        return None, "chosen == rejected"  # no preference to learn from
    return {"prompt": prompt, "chosen": chosen_reply, "rejected": rejected_reply}, None

# ----------------------------------------------------------------------------- read -> parse -> write

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", default="helpful-base",
                        help="helpful-base, harmless-base, helpful-online or helpful-rejection-sampled")
    parser.add_argument("--source", help="a local copy (a folder, or one {split}.jsonl.gz file) instead of downloading")
    parser.add_argument("--out", default=HERE, help="output folder")
    args = parser.parse_args(argv)

    counts = {}
    for upstream, split in SPLITS.items():
        name = f"{upstream}.jsonl.gz"
        if args.source is None:
            cache = os.path.join(HERE, "raw", args.subset, name)
            path = download(URL.format(subset=args.subset, split=upstream), cache)
        elif os.path.isfile(args.source):
            path = args.source if os.path.basename(args.source) == name else None
        else:
            path = next((p for p in (os.path.join(args.source, args.subset, name), os.path.join(args.source, name))
                         if os.path.exists(p)), None)
        if path is None:
            print(f"{split}: no {name} in {args.source}, not written")
            continue

        rows, prefs, skipped = read_jsonl(path, ["chosen", "rejected"]), [], Counter()
        for row in rows:
            example, reason = parse_hh_row(row["chosen"], row["rejected"])
            if reason:
                skipped[reason] += 1
            else:
                prefs.append(example)
        sft = [{"prompt": p["prompt"], "response": p["chosen"]} for p in prefs]
        prompts = [{"prompt": p} for p in dict.fromkeys(p["prompt"] for p in prefs)]  # distinct, in first-seen order
        for kind, examples in (("prefs", prefs), ("sft", sft), ("prompts", prompts)):
            if examples:  # a kind with no data is not written
                write_jsonl(os.path.join(args.out, f"{kind}_{split}.jsonl"), examples)
        print(f"{split}: {path}: {len(rows):,} rows -> {len(prefs):,} prefs (and sft demos), {len(prompts):,} prompts")
        for reason, n in skipped.most_common():
            print(f"  skipped {n:,}: {reason}")
        counts[split] = len(prefs)
    print(f"wrote prefs_, sft_ and prompts_{{{','.join(counts)}}}.jsonl to {args.out}")
    return counts

if __name__ == "__main__":
    main()

# Expected output (helpful-base). The row counts are upstream's; the kept and skipped counts depend on the real files
# and were not measured where this was written (no network), so they show as N:
# train: data/hh_rlhf/raw/helpful-base/train.jsonl.gz: 43,835 rows -> N prefs (and sft demos), N prompts
#   skipped N: empty final reply
#   skipped N: rejected does not share chosen's prompt
#   skipped N: chosen == rejected
#   skipped N: a reply runs on into another turn
#   skipped N: a reply holds an inline '  Human:' turn
# val: data/hh_rlhf/raw/helpful-base/test.jsonl.gz: 2,354 rows -> N prefs (and sft demos), N prompts
#   skipped N: ...
# wrote prefs_, sft_ and prompts_{train,val}.jsonl to data/hh_rlhf
