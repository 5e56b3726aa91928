"""
The real-data recipes end to end, as CI checks them without a GPU: `SMOKE=1 bash run.sh gpt2` (HH-RLHF) and `... tldr`
(OpenAI's TL;DR) on a GPT-2-shaped model (GPT-2's 50,257-token vocabulary and 1,024-token context, 2 small layers,
random weights, written by transformers) and small raw files in each dataset's published layout (DESIGN.md, "Sources
for real data"). Then what the recipes wrote is checked: every stage's checkpoint and log, eval.json, and that the SFT
demonstrations, the reward model's pairs and PPO's prompts share one template.
    python -m pytest tests/test_recipes.py -q
"""
import gzip
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

import common
import export
from model import load_model

REPO_ROOT = Path(__file__).resolve().parent.parent
EVAL_KEYS = {"n_prompts", "labeler_score_sft", "labeler_score_ppo", "rm_score_sft", "rm_score_ppo", "kl_ppo_sft",
             "win_rate_labeler", "win_rate_rm", "heldout_win_rate_labeler"}  # the built-in task's (DESIGN, Runs)
TEMPLATES = {"gpt2": ("\n\nHuman: ", "\n\nAssistant:"), "tldr": ("SUBREDDIT: r/", "\n\nTL;DR:")}


def write_lines(path, rows, opener=open):
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:  # raw UTF-8, as upstream writes it
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_hh(folder):
    """helpful-base/{train,test}.jsonl.gz with what the real files hold: Unicode, a literal <|endoftext|>, a reply
    starting with two spaces, an empty final reply, sides that differ before the last reply, and an 18-turn dialogue
    far over GPT-2's 1,024 tokens (the SFT and RM cut it from the left; PPO skips it as a prompt)."""
    def pair(dialogue, chosen, rejected):
        return {"chosen": f"{dialogue}\n\nAssistant:{chosen}", "rejected": f"{dialogue}\n\nAssistant:{rejected}"}
    long = "".join(f"\n\nHuman: question {i} " + "about the weather " * 20 + f"\n\nAssistant: answer {i} " +
                   "it will rain " * 25 for i in range(9))  # 18 turns, ~1,900 tokens
    rows = [pair(f"\n\nHuman: Où est la gare? 日本語 {i}", " Tout droit.", " Je ne sais pas.") for i in range(6)]
    rows += [pair("\n\nHuman: Say <|endoftext|>", "  Sure: <|endoftext|>", " No."),
             pair(long + "\n\nHuman: and tomorrow?", " Sunny.", " Rain."),
             pair("\n\nHuman: Hi", " ", " Hello."),  # empty final reply
             {"chosen": "\n\nHuman: Hi\n\nAssistant: A  Human: B\n\nAssistant: C",
              "rejected": "\n\nHuman: Hi\n\nAssistant: X\n\nAssistant: C"}]  # differ before the last reply
    write_lines(folder / "helpful-base" / "train.jsonl.gz", rows, gzip.open)
    write_lines(folder / "helpful-base" / "test.jsonl.gz",
                [pair(f"\n\nHuman: How do I bake bread {i}?", " Flour, water.", " Buy it.") for i in range(4)],
                gzip.open)


def write_tldr(folder):
    """tldr_3_filtered/{train,valid,test}.jsonl (summary without its leading space) and comparisons/*.json (JSON lines;
    texts with a leading space, null notes, a CNN/DM batch to skip), one post far over the 512-token query limit."""
    def post(i, n=3):
        return {"id": f"t3_{i}", "subreddit": "relationships", "title": f"Title {i}", "post": f"My post {i}. " * n,
                "summary": f"short summary {i}"}
    split_rows = {"train": [post(i) for i in range(6)] + [post(99, n=300)], "valid": [post(10)], "test": [post(11)]}
    for split, rows in split_rows.items():
        write_lines(folder / "tldr_3_filtered" / f"{split}.jsonl", rows)
    def comparison(i, split):
        info = {k: v for k, v in post(i).items() if k != "summary"}
        summaries = [{"text": f" summary {j} of {i}", "policy": "sup2", "note": None} for j in range(2)]
        return {"info": info, "summaries": summaries, "choice": i % 2, "worker": "w", "batch": "batch3",
                "split": split, "extra": {}}
    write_lines(folder / "comparisons" / "batch3.json",
                [comparison(i, "train") for i in range(6)] + [comparison(i, "valid1") for i in (10, 11)])
    write_lines(folder / "comparisons" / "cnndm0.json", [{"info": {"id": "c", "article": "News.", "site": "cnn"},
                "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0, "split": "valid1"}])


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, gpt2_tokenizer):
    """Both recipes, SMOKE=1, as subprocesses (bash run.sh, as a user runs them). Returns {recipe: (out, stdout)}."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("recipes")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "tiny_gpt2", safe_serialization=True)
    write_hh(root / "raw" / "hh_rlhf")
    write_tldr(root / "raw" / "tldr")
    results = {}
    for recipe in ("gpt2", "tldr"):
        env = dict(os.environ, SMOKE="1", MODEL=str(root / "tiny_gpt2"), DATA_DIR=str(root / "raw"),
                   OUT=str(root / recipe), OMP_NUM_THREADS="1")  # TIKTOKEN_CACHE_DIR comes from the fixture
        done = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), recipe], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"run.sh {recipe} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        results[recipe] = (root / recipe, done.stdout)
    return results


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["gpt2", "tldr"])
def test_smoke_recipe_writes_every_stage_with_finite_losses_and_eval_json(recipes, recipe):
    """Each stage of InstructGPT's pipeline (§3.5: SFT, RM, PPO) left a checkpoint of its kind and a log of finite
    numbers, and PPO's evaluation wrote eval.json with the built-in task's keys, the labeler's null (no gold judge)."""
    out, stdout = recipes[recipe]
    for stage, kind, keys in (("sft", "policy", ["train/loss"]), ("rm", "reward", ["train/loss"]),
                              ("ppo", "policy", ["objective/kl", "ppo/loss/policy_avg", "ppo/loss/value_avg"])):
        ckpt = common.load_checkpoint(str(out / f"{recipe}_{stage}"), kind)
        assert ckpt["tokenizer"] == "gpt2" and ckpt["model_config"]["vocab_size"] == 50257
        records = [r for r in read_log(out / f"{recipe}_{stage}" / "log.jsonl") if keys[0] in r]
        assert records and all(math.isfinite(r[k]) for r in records for k in keys), stage
    result = json.loads((out / f"{recipe}_ppo" / "eval.json").read_text())
    assert EVAL_KEYS <= set(result)
    assert all(result[k] is None for k in EVAL_KEYS if "labeler" in k)
    assert all(math.isfinite(result[k]) for k in ("rm_score_sft", "rm_score_ppo", "kl_ppo_sft", "win_rate_rm"))
    assert result["n_prompts"] > 0 and "skipped" in stdout


def test_smoke_recipes_print_what_their_prepare_scripts_skipped(recipes):
    """Every prepare script says what it kept and what it skipped, with reasons and counts (DESIGN, Prepared data)."""
    hh, tldr = recipes["gpt2"][1], recipes["tldr"][1]
    assert "skipped 1: empty final reply" in hh and "skipped 1: rejected does not share chosen's prompt" in hh
    assert "skipped 1 of 8 prompts too long for the context" in hh  # the 18-turn dialogue, at PPO
    assert "skipped 1: CNN/DM article, not a Reddit post" in tldr


@pytest.mark.parametrize("recipe", ["gpt2", "tldr"])
def test_sft_rm_and_ppo_prompts_are_rendered_by_one_template(recipes, recipe):
    """The SFT model must learn to end a reply where PPO will ask for one: the prompts of the files each stage really
    read (from its checkpoint's config) start and end alike, and PPO's prompts are exactly the SFT demonstrations'."""
    out, _ = recipes[recipe]
    used = {stage: common.load_checkpoint(str(out / f"{recipe}_{stage}"))["config"][field]
            for stage, field in (("sft", "data"), ("rm", "data"), ("ppo", "prompts"))}
    prompts = {stage: [r["prompt"] for r in common.read_jsonl(path, ["prompt"])] for stage, path in used.items()}
    start, end = TEMPLATES[recipe]
    for stage, rows in prompts.items():
        assert rows and all(p.startswith(start) and p.endswith(end) for p in rows), stage
    assert set(prompts["ppo"]) == set(prompts["sft"])
    demos = common.read_jsonl(used["sft"], ["prompt", "response"])
    assert all(d["response"].startswith(" ") and end not in d["response"] for d in demos)  # the reply, not a turn


def test_recipe_policy_exports_to_transformers_with_equal_logits(recipes, tmp_path):
    """What a user takes away: the PPO policy of a recipe, exported (export.py), is a GPT-2 that transformers runs."""
    transformers = pytest.importorskip("transformers")
    ppo_dir = str(recipes["tldr"][0] / "tldr_ppo")
    export.main(export.Config(ckpt=ppo_dir, out_dir=str(tmp_path / "hf")))
    ours, _ = load_model(ppo_dir)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=1e-4, rtol=0)  # fp32, other op order
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["nanoinstruct_tokenizer"] == "gpt2"
