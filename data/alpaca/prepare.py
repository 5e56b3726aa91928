"""
Instruction-following demonstrations for GPT-2-scale SFT, from two public sets rendered into one prompt template:
- Stanford Alpaca (CC BY-NC 4.0): https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json
  a JSON array of 52,002 {"instruction", "input", "output"}
- Dolly 15k (CC BY-SA 3.0):
  https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl
  JSON lines {"instruction", "context", "response", "category"}; its "context" plays Alpaca's "input"
    python data/alpaca/prepare.py                       # downloads both into data/alpaca/raw/
    python data/alpaca/prepare.py --datasets dolly      # only Dolly (its licence allows commercial use)
    python data/alpaca/prepare.py --source ~/downloads  # a folder holding either or both files, or one of them
Writes, for split in {train, val} (val: ~2% of prompts, chosen by a hash of the prompt, so it never changes and a
prompt that appears twice lands on one side only):
    sft_{split}.jsonl      {"prompt", "response"}
    prompts_{split}.jsonl  {"prompt"}                the distinct prompts, for PPO and evaluation
The template (ours; Alpaca's own adds a "Below is an instruction..." preamble, ~30 tokens we'd rather spend on text):
    ### Instruction:
    {instruction}

    ### Input:            <- these two lines and the blank after them only when the input is not empty
    {input}

    ### Response:
    {response}
The prompt ends with that newline and the response starts right after it, with no leading space (a GPT-2 token never
spans a newline and a word, so prompt tokens + response tokens equal the tokens of the whole text). Fields are
stripped of surrounding whitespace; Alpaca's placeholder input "<noinput>" counts as empty.
"""
import argparse
import json
import os
import sys
import zlib
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for common.py
from common import download, read_jsonl, write_jsonl  # noqa: E402

SOURCES = {  # name -> (upstream file name, URL)
    "alpaca": ("alpaca_data.json", "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"),
    "dolly": ("databricks-dolly-15k.jsonl", "https://huggingface.co/datasets/databricks/databricks-dolly-15k/"
                                            "resolve/main/databricks-dolly-15k.jsonl"),
}
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
VAL_PERCENT = 2

# ----------------------------------------------------------------------------- parsing (tests import these)

def render(instruction, input, output):
    """One example -> ({"prompt", "response"}, None), or (None, reason) when it is skipped."""
    instruction, input, output = instruction.strip(), input.strip(), output.strip()
    if input == "<noinput>":
        input = ""
    if not instruction:
        return None, "empty instruction"
    if output == "<nooutput>":  # Alpaca's marker for "the model can't do this" (e.g. draw a picture)
        return None, "output is <nooutput>"
    if not output:
        return None, "empty response"
    template = PROMPT_WITH_INPUT if input else PROMPT_NO_INPUT
    return {"prompt": template.format(instruction=instruction, input=input), "response": output}, None

def read_alpaca(path):
    """Alpaca's JSON array as (instruction, input, output) triples; errors say `path:line: ...` or the item."""
    with open(path, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON array")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("instruction", "input",
                                                                                           "output")):
            raise ValueError(f"{path}: item {i}: expected an object with string fields instruction, input, output")
        yield item["instruction"], item["input"], item["output"]

def read_dolly(path):
    for row in read_jsonl(path, fields=("instruction", "context", "response")):
        yield row["instruction"], row["context"], row["response"]

def is_val(prompt):
    # crc32 rather than hash(): Python salts str hashes per process, and the split must not change between runs.
    return zlib.crc32(prompt.encode("utf-8")) % 100 < VAL_PERCENT

# ----------------------------------------------------------------------------- read -> render -> split -> write

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="alpaca,dolly", help="comma-separated: alpaca, dolly")
    parser.add_argument("--source", help="a local copy: a folder holding the upstream files, or one of them")
    parser.add_argument("--out", default=HERE, help="output folder")
    args = parser.parse_args(argv)
    names = args.datasets.split(",")
    if unknown := set(names) - set(SOURCES):
        raise ValueError(f"--datasets: unknown {sorted(unknown)}; expected some of {list(SOURCES)}")

    splits, seen = {"train": [], "val": []}, set()
    for name in names:
        filename, url = SOURCES[name]
        if args.source is None:
            path = download(url, os.path.join(HERE, "raw", filename))
        elif os.path.isfile(args.source):
            path = args.source if os.path.basename(args.source) == filename else None
        else:
            path = os.path.join(args.source, filename) if os.path.exists(os.path.join(args.source, filename)) else None
        if path is None:
            print(f"{name}: no {filename} in {args.source}, skipped")
            continue
        skipped, kept = Counter(), 0
        for fields in (read_alpaca if name == "alpaca" else read_dolly)(path):
            example, reason = render(*fields)
            if example is not None and (example["prompt"], example["response"]) in seen:
                example, reason = None, "duplicate of an earlier example"
            if example is None:
                skipped[reason] += 1
                continue
            seen.add((example["prompt"], example["response"]))
            splits["val" if is_val(example["prompt"]) else "train"].append(example)
            kept += 1
        print(f"{name}: {path}: {kept + sum(skipped.values()):,} examples -> kept {kept:,}")
        for reason, n in skipped.most_common():
            print(f"  skipped {n:,}: {reason}")

    for split, examples in splits.items():
        if not examples:
            continue
        prompts = [{"prompt": p} for p in dict.fromkeys(ex["prompt"] for ex in examples)]  # distinct, in order
        write_jsonl(os.path.join(args.out, f"sft_{split}.jsonl"), examples)
        write_jsonl(os.path.join(args.out, f"prompts_{split}.jsonl"), prompts)
        print(f"{split}: {len(examples):,} demos, {len(prompts):,} distinct prompts -> sft_ and prompts_{split}.jsonl")
    return {split: len(examples) for split, examples in splits.items()}

if __name__ == "__main__":
    main()

# Expected output. Row counts are upstream's; kept and skipped counts were not measured where this was written
# (no network), so they show as N.
# alpaca: data/alpaca/raw/alpaca_data.json: 52,002 examples -> kept N
#   skipped N: duplicate of an earlier example
#   skipped N: output is <nooutput>
# dolly: data/alpaca/raw/databricks-dolly-15k.jsonl: 15,011 examples -> kept N
#   skipped N: ...
# train: N demos, N distinct prompts -> sft_ and prompts_train.jsonl
# val: N demos, N distinct prompts -> sft_ and prompts_val.jsonl   (about 2% of the total)
