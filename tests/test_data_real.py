"""
The real-data prepare scripts, run on small files written here in the exact upstream layouts (no network).
    python -m pytest tests/test_data_real.py -q
"""
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_prepare(name):
    # Each data/<name>/prepare.py is a script, not a package module, so we import it from its path.
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", REPO_ROOT / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")

# ----------------------------------------------------------------------------- Anthropic HH-RLHF

def write_hh(path, pairs):
    # Upstream files are gzip JSON lines with raw UTF-8 (ensure_ascii=False).
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for chosen, rejected in pairs:
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}, ensure_ascii=False) + "\n")


def test_hh_prompt_ends_at_last_assistant_and_response_keeps_its_leading_space(tmp_path, capsys):
    """A pair differs only in the last reply: prompt = up to "\n\nAssistant:", responses = what follows, exactly."""
    hh = load_prepare("hh_rlhf")
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Café au lait? 日本語 <|endoftext|> ok\n\nAssistant:"
    write_hh(tmp_path / "src" / "train.jsonl.gz", [
        (dialogue + "  Yes, with milk. <|endoftext|>", dialogue + " No."),     # kept: Unicode, EOT text, two spaces
        (dialogue + " ", dialogue + " No."),                                  # empty final reply
        (dialogue + " Yes.", "\n\nHuman: Hi\n\nAssistant: Other.\n\nAssistant: No."),  # rejected's prefix differs
        (dialogue + " Same.", dialogue + " Same."),                           # no preference
        (dialogue + " Yes.\n\nHuman: and?", dialogue + " No."),               # a reply running into another turn
        (dialogue + " Yes.  Human: and?", dialogue + " No."),                 # ... or holding one inline
    ])
    hh.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")])
    prefs = read(tmp_path / "out" / "prefs_train.jsonl")
    assert prefs == [{"prompt": dialogue, "chosen": "  Yes, with milk. <|endoftext|>", "rejected": " No."}]
    assert read(tmp_path / "out" / "sft_train.jsonl") == [{"prompt": dialogue, "response": prefs[0]["chosen"]}]
    assert read(tmp_path / "out" / "prompts_train.jsonl") == [{"prompt": dialogue}]
    assert not (tmp_path / "out" / "prefs_val.jsonl").exists()  # no test.jsonl.gz in the source: no val files
    printed = capsys.readouterr().out
    for reason in ("empty final reply", "rejected does not share chosen's prompt", "chosen == rejected",
                   "a reply runs on into another turn", "a reply holds an inline '  Human:' turn"):
        assert f"skipped 1: {reason}" in printed


def test_hh_reads_subset_folder_and_maps_test_split_to_val(tmp_path):
    hh = load_prepare("hh_rlhf")
    pair = ("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant: B")
    write_hh(tmp_path / "harmless-base" / "test.jsonl.gz", [pair])
    counts = hh.main(["--subset", "harmless-base", "--source", str(tmp_path), "--out", str(tmp_path / "out")])
    assert counts == {"val": 1}
    assert read(tmp_path / "out" / "prefs_val.jsonl")[0]["chosen"] == " A"


def test_hh_literal_endoftext_survives_as_ordinary_tokens(gpt2_tokenizer):
    """User text must never inject an end-of-text token: encode_ordinary keeps "<|endoftext|>" as plain text."""
    hh = load_prepare("hh_rlhf")
    example, reason = hh.parse_hh_row("\n\nHuman: say <|endoftext|>\n\nAssistant: <|endoftext|>",
                                      "\n\nHuman: say <|endoftext|>\n\nAssistant: no")
    assert reason is None and example["chosen"] == " <|endoftext|>"
    ids = gpt2_tokenizer.encode_ordinary(example["prompt"] + example["chosen"])
    assert 50256 not in ids and gpt2_tokenizer.decode(ids) == example["prompt"] + example["chosen"]

# ----------------------------------------------------------------------------- OpenAI TL;DR

def comparison(post, texts, choice, split="train", **info):
    return {"info": {"id": "t3_x", "post": post, "title": "T", "subreddit": "AskReddit", **info},
            "summaries": [{"text": t, "policy": "sup2", "note": None} for t in texts],
            "choice": choice, "worker": "w", "batch": "batch3", "split": split, "extra": {}}


def test_tldr_sft_response_is_space_plus_summary_and_query_follows_openai_template(tmp_path, gpt2_tokenizer):
    tldr = load_prepare("tldr")
    row = {"id": "a", "subreddit": "relationships", "title": "Help", "post": "My post.", "summary": "short one"}
    write_lines(tmp_path / "tldr_3_filtered" / "train.jsonl", [row])
    write_lines(tmp_path / "tldr_3_filtered" / "valid.jsonl", [dict(row, summary="val one")])
    tldr.main(["--source", str(tmp_path), "--out", str(tmp_path / "out")])
    query = "SUBREDDIT: r/relationships\n\nTITLE: Help\n\nPOST: My post.\n\nTL;DR:"
    assert read(tmp_path / "out" / "sft_train.jsonl") == [{"prompt": query, "response": " short one"}]
    assert read(tmp_path / "out" / "sft_val.jsonl") == [{"prompt": query, "response": " val one"}]
    assert read(tmp_path / "out" / "prompts_train.jsonl") == [{"prompt": query}]
    assert not (tmp_path / "out" / "prefs_train.jsonl").exists()  # no comparison files: no prefs written


def test_tldr_long_post_is_cut_at_a_newline_until_the_query_fits_512_tokens(gpt2_tokenizer):
    """OpenAI's query processing: cut the post at its last "\\n" while the query is over 512 gpt2 tokens."""
    tldr = load_prepare("tldr")
    paragraphs = [f"paragraph {i} " + "word " * 60 for i in range(20)]  # ~62 tokens each, ~1,250 in all
    query = tldr.format_query(gpt2_tokenizer, "tifu", "title", "\n".join(paragraphs))
    assert len(gpt2_tokenizer.encode_ordinary(query)) <= 512
    post = query.split("POST: ", 1)[1].removesuffix("\n\nTL;DR:")
    kept = post.split("\n")
    assert kept == paragraphs[:len(kept)]  # whole paragraphs, cut at a newline
    longer = tldr.QUERY.format(subreddit="tifu", title="title", post="\n".join(paragraphs[:len(kept) + 1]))
    assert len(gpt2_tokenizer.encode_ordinary(longer)) > 512  # and it kept as many as fit


def test_tldr_post_without_newlines_keeps_the_longest_prefix_that_fits(gpt2_tokenizer):
    tldr = load_prepare("tldr")
    post = " ".join(f"w{i}" for i in range(2000))
    query = tldr.format_query(gpt2_tokenizer, "tifu", "title", post)
    kept = query.split("POST: ", 1)[1].removesuffix("\n\nTL;DR:")
    assert post.startswith(kept) and len(gpt2_tokenizer.encode_ordinary(query)) <= 512
    one_more = tldr.QUERY.format(subreddit="tifu", title="title", post=post[:len(kept) + 1])
    assert len(gpt2_tokenizer.encode_ordinary(one_more)) > 512


def openai_query(tokenizer, subreddit, title, post, max_tokens=512):
    """OpenAI's loop as they wrote it (process_query, summarize_from_feedback/tasks.py): the slow, obvious reference."""
    tldr = load_prepare("tldr")
    while len(tokenizer.encode_ordinary(tldr.QUERY.format(subreddit=subreddit, title=title, post=post))) > max_tokens:
        post = post[:post.rindex("\n")] if "\n" in post else post[:-1]
    return tldr.QUERY.format(subreddit=subreddit, title=title, post=post)


def test_tldr_cut_matches_openais_one_character_scan_where_the_token_count_wobbles(gpt2_tokenizer):
    """" boyfriend" is 1 token but " boyfrien" 3: a query ending in it fits 512 tokens while shorter ones do not, and a
    binary search over the prefix length (which assumes fewer characters never mean more tokens) stops short."""
    tldr = load_prepare("tldr")
    n_tokens = lambda post: len(gpt2_tokenizer.encode_ordinary(tldr.QUERY.format(  # noqa: E731
        subreddit="relationships", title="t", post=post)))
    filler = "a" + " a" * (512 - n_tokens("a boyfriend"))  # " a" is one token: filler + " boyfriend" makes 512
    post = filler + " boyfriend" + " and then some more words that do not fit"
    assert n_tokens(filler + " boyfriend") == 512 and n_tokens(filler + " boyfrien") == 514  # the wobble
    lo, hi = 0, len(post)  # the binary search this replaced: longest prefix that fits, if counts were monotonic
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if n_tokens(post[:mid]) <= 512 else (lo, mid - 1)
    expected = openai_query(gpt2_tokenizer, "relationships", "t", post)
    assert expected.endswith(" boyfriend\n\nTL;DR:") and lo < len(filler + " boyfriend")  # the trap is real
    assert tldr.format_query(gpt2_tokenizer, "relationships", "t", post) == expected
    for cut in range(len(filler) - 3, len(post), 2):  # and posts ending anywhere around it
        assert tldr.format_query(gpt2_tokenizer, "relationships", "t", post[:cut]) == \
            openai_query(gpt2_tokenizer, "relationships", "t", post[:cut])


def test_tldr_choice_picks_chosen_and_cnndm_rows_are_skipped(tmp_path, gpt2_tokenizer, capsys):
    tldr = load_prepare("tldr")
    cnndm = {"info": {"id": "c", "article": "News.", "site": "cnn"}, "summaries": [{"text": " a"}, {"text": " b"}],
             "choice": 0, "split": "valid1"}
    write_lines(tmp_path / "comparisons" / "batch3.json", [
        comparison("Post one.", [" worse", " better"], choice=1),
        comparison("Post two.", [" good", " bad"], choice=0, split="valid2"),
        comparison("Post three.", [" same", " same"], choice=0, split="valid1"),
    ])
    write_lines(tmp_path / "comparisons" / "cnndm0.json", [cnndm])
    counts = tldr.main(["--source", str(tmp_path), "--out", str(tmp_path / "out")])
    assert counts["prefs"] == {"train": 1, "val": 1}
    train = read(tmp_path / "out" / "prefs_train.jsonl")
    assert train == [{"prompt": "SUBREDDIT: r/AskReddit\n\nTITLE: T\n\nPOST: Post one.\n\nTL;DR:",
                      "chosen": " better", "rejected": " worse"}]  # texts kept as is: one leading space, not two
    assert read(tmp_path / "out" / "prefs_val.jsonl")[0]["chosen"] == " good"
    printed = capsys.readouterr().out
    assert "skipped 1: CNN/DM article, not a Reddit post" in printed and "skipped 1: chosen == rejected" in printed


def test_malformed_json_line_names_file_and_line(tmp_path, gpt2_tokenizer):
    """Errors are one line and say where (STYLE rule 10), in every input format."""
    tldr, hh = load_prepare("tldr"), load_prepare("hh_rlhf")
    good = comparison("Post.", [" a", " b"], choice=0)
    path = tmp_path / "comparisons" / "batch4.json"
    write_lines(path, [good, good])
    path.write_text(path.read_text() + '{"info": {"post": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"batch4\.json:3: "):
        tldr.main(["--source", str(tmp_path), "--out", str(tmp_path / "out")])
    gz = tmp_path / "hh" / "train.jsonl.gz"
    write_hh(gz, [("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: c")])
    with gzip.open(gz, "at", encoding="utf-8") as f:
        f.write("not json\n")
    with pytest.raises(ValueError, match=r"train\.jsonl\.gz:2: "):
        hh.main(["--source", str(gz), "--out", str(tmp_path / "out")])

# ----------------------------------------------------------------------------- Alpaca and Dolly

def test_alpaca_template_has_input_block_only_when_input_is_given_and_skips_nooutput(tmp_path, capsys):
    alpaca = load_prepare("alpaca")
    items = [
        {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Draw a cat.", "input": "", "output": "<nooutput>"},
        {"instruction": "Say nothing.", "input": "<noinput>", "output": "  "},
    ]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(items, indent=4), encoding="utf-8")  # upstream's layout
    counts = alpaca.main(["--source", str(tmp_path), "--out", str(tmp_path / "out")])
    assert sum(counts.values()) == 2
    demos = {d["response"]: d["prompt"] for split in counts if counts[split]
             for d in read(tmp_path / "out" / f"sft_{split}.jsonl")}
    assert demos["1. Eat well."] == "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"
    assert demos["Bonjour"] == "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n"
    printed = capsys.readouterr().out
    assert "skipped 1: output is <nooutput>" in printed and "skipped 1: empty response" in printed
    assert "dolly: no databricks-dolly-15k.jsonl" in printed  # a missing source file is reported, not fatal


def test_dolly_context_becomes_input_and_val_split_is_a_stable_hash_of_the_prompt(tmp_path):
    alpaca = load_prepare("alpaca")
    rows = [{"instruction": f"Question {i}?", "context": "Some context." if i % 2 else "", "response": f"Answer {i}.",
             "category": "open_qa"} for i in range(300)]
    write_lines(tmp_path / "databricks-dolly-15k.jsonl", rows)
    counts = alpaca.main(["--datasets", "dolly", "--source", str(tmp_path), "--out", str(tmp_path / "out")])
    val = read(tmp_path / "out" / "sft_val.jsonl")
    assert counts["train"] + counts["val"] == 300 and 0 < counts["val"] < 30  # ~2%, with room for chance
    assert all(alpaca.is_val(d["prompt"]) for d in val)
    demos = {d["response"]: d["prompt"] for d in read(tmp_path / "out" / "sft_train.jsonl") + val}
    assert demos["Answer 1."] == "### Instruction:\nQuestion 1?\n\n### Input:\nSome context.\n\n### Response:\n"
    assert "### Input:" not in demos["Answer 2."]


def test_alpaca_malformed_json_names_file_and_line(tmp_path):
    alpaca = load_prepare("alpaca")
    broken = '[\n    {\n        "instruction": "x",\n        oops\n'  # line 4 is not JSON
    (tmp_path / "alpaca_data.json").write_text(broken, encoding="utf-8")
    with pytest.raises(ValueError, match=r"alpaca_data\.json:4: "):
        alpaca.main(["--datasets", "alpaca", "--source", str(tmp_path), "--out", str(tmp_path / "out")])
