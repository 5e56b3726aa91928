"""
Tests for eval.py: a policy judged against the SFT model on the same val prompts and seed (InstructGPT §4 in
miniature), best-of-N ranked by the RM (WebGPT, Nakano et al. 2021), win rates with ties, the report, and that
reusing the SFT model's samples changes no number. Tiny seeded byte-level models on CPU, no network.
    python -m pytest tests/test_eval.py -q
"""
import json
import math
import os

import pytest
import torch

import common
import eval
from model import load_model
from test_ppo import EVAL_KEYS, write_inputs

def tiny_config(tmp_path, out_dir, **overrides):
    """eval.Config for write_inputs' checkpoints and its val prompts, everything pinned."""
    inputs = write_inputs(tmp_path, with_labeler=True)
    return eval.Config(**{**dict(sft=inputs["sft"], reward=inputs["reward"],
                                 prompts=str(tmp_path / "prompts_val.jsonl"), out_dir=str(out_dir), n_eval=8,
                                 max_new_tokens=12, seed=1337, device="cpu", dtype="float32"), **overrides})

def test_eval_writes_the_keys_ppo_writes_and_sft_against_itself_is_a_tie(tmp_path):
    """The CLI's eval.json has exactly PPO's keys. With no --policy, the SFT model is judged against itself: the
    same seed draws the same samples, so every comparison is a tie (0.5) and KL(π || π_SFT) is exactly 0."""
    cfg = tiny_config(tmp_path, tmp_path / "out" / "eval_sft")
    result = eval.main(cfg)
    with open(tmp_path / "out" / "eval_sft" / "eval.json") as f:
        assert json.load(f) == result and set(result) == set(EVAL_KEYS)
    assert result["win_rate_rm"] == result["win_rate_labeler"] == result["heldout_win_rate_labeler"] == 0.5
    assert result["kl_ppo_sft"] == 0.0 and result["n_prompts"] == 8

def test_reusing_the_sft_side_gives_the_same_numbers(tmp_path):
    """PPO computes the SFT model's samples and scores once per run and passes them to every evaluation; the
    result must be exactly what evaluating from scratch gives (each side draws from its own seeded generator)."""
    cfg = tiny_config(tmp_path, tmp_path / "out")
    policy, sft_policy = load_model(cfg.sft)[0], load_model(cfg.sft)[0]
    with torch.no_grad():
        policy.transformer.ln_f.bias.add_(0.3)  # a π that differs from SFT
    reward_model = load_model(cfg.reward, kind="reward")[0]
    prompts = [r["prompt"] for r in common.read_jsonl(cfg.prompts)]
    tokenizer, ctx = common.get_tokenizer("bytes"), common.setup_device("cpu", "float32")[2]
    args = (policy, sft_policy, reward_model, tokenizer, prompts, common.load_labeler(cfg.prompts), cfg, ctx)
    sft_side = eval.sample_and_score(sft_policy, reward_model, tokenizer, prompts, cfg, ctx)[:2]
    fresh, reused = eval.evaluate(*args), eval.evaluate(*args, sft_side=sft_side)
    assert fresh == reused and fresh[0]["kl_ppo_sft"] > 0 and fresh[0]["rm_score_ppo"] != fresh[0]["rm_score_sft"]

def test_the_sft_side_is_sampled_once_then_read_from_its_cache_until_the_sft_model_changes(tmp_path, monkeypatch):
    """Every report row and PPO's evaluations compare with the same SFT samples, so the first evaluation writes them
    beside the SFT checkpoint and later ones read them back, with the same numbers. A retrained SFT model (a newer
    checkpoint file) is sampled afresh."""
    cfg = tiny_config(tmp_path, tmp_path / "out" / "eval_bon", best_of=2)
    first = eval.main(cfg)
    assert len(list((tmp_path / "sft").glob("eval_sft_*.json"))) == 1
    sampled, real = [], eval.sample_and_score
    monkeypatch.setattr(eval, "sample_and_score", lambda model, *a, **k: sampled.append(model) or real(model, *a, **k))
    assert eval.main(cfg) == first and len(sampled) == 1  # π's side only
    ckpt = tmp_path / "sft" / "ckpt.pt"
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    assert eval.main(cfg) == first and len(sampled) == 3  # both sides: the cache no longer matches

def test_best_of_n_beats_its_own_policy_by_the_reward_model_it_is_ranked_by(tmp_path):
    """Best-of-N (the report's rejection-sampling row): of N samples from SFT keep the one the RM scores highest.
    By that same RM it can only tie or beat a single SFT sample drawn with the same seed; KL is not estimated (null),
    and the report gathers the row into out/report.md."""
    result = eval.main(tiny_config(tmp_path, tmp_path / "out" / "eval_bon", best_of=4))
    assert result["rm_score_ppo"] > result["rm_score_sft"] and result["win_rate_rm"] > 0.5
    assert result["kl_ppo_sft"] is None
    eval.main(eval.Config(out_dir=str(tmp_path / "out" / "report"), report=True))
    report = (tmp_path / "out" / "report.md").read_text()
    assert (f"| best-of-N from SFT, ranked by the RM | {result['labeler_score_ppo']:.3f} | "
            f"{result['win_rate_labeler']:.3f} |") in report
    assert f"| {result['rm_score_ppo']:.3f} | — |" in report

def test_few_shot_prompts_the_policy_but_the_rm_reads_the_plain_prompt(tmp_path):
    """The few-shot row puts demonstrations before each prompt (InstructGPT's "GPT-3 prompted" baseline), but the RM
    and the labeler judge the response to the plain prompt, as for every other row; KL is null (π's log-probs are
    of another context)."""
    cfg = tiny_config(tmp_path, tmp_path / "out" / "eval_fewshot", few_shot=1)
    common.write_jsonl(str(tmp_path / "sft_train.jsonl"), [{"prompt": "Q:", "response": "A."}])
    result = eval.main(cfg)
    plain = eval.main(tiny_config(tmp_path, tmp_path / "out" / "eval_sft"))
    assert result["kl_ppo_sft"] is None and result["rm_score_sft"] == plain["rm_score_sft"]
    assert result["rm_score_ppo"] != plain["rm_score_ppo"]  # the prefix changed what π wrote

def test_win_rate_counts_ties_as_half():
    """A win counts 1, a tie 1/2, a loss 0 (so identical models score exactly 0.5); no pairs gives NaN, not 0."""
    a, b = torch.tensor([3.0, 1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 5.0, 0.0])
    assert eval.win_rate(a, b) == (1 + 0.5 + 0 + 0.5) / 4
    assert eval.win_rate(a, a) == 0.5 and eval.win_rate(b, a) == 1 - eval.win_rate(a, b)
    assert math.isnan(eval.win_rate(torch.tensor([]), torch.tensor([])))

def fake_eval(folder, labeler_score, win_rate):
    """An eval.json with every key, as eval.main writes it, for the report's and the seeds tool's tests."""
    result = {key: 0.0 for key in EVAL_KEYS}
    result.update(labeler_score_ppo=labeler_score, win_rate_labeler=win_rate, n_prompts=200)
    os.makedirs(folder, exist_ok=True)
    common.write_json(os.path.join(folder, "eval.json"), result)

def test_seeds_of_gives_the_mean_and_standard_error_over_training_seeds(tmp_path):
    """--seeds_of: over the runs of one row on S training seeds, the mean and the standard error of the mean (sample
    standard deviation / sqrt(S), computed here with the statistics module), which is what a claim that one method
    beats another must rest on; the report shows it beside that row. Fewer than two runs is a one-line error."""
    import statistics
    scores, wins = [0.80, 0.84, 0.78], [0.70, 0.76, 0.73]
    for seed, (s, w) in enumerate(zip(scores, wins), 1):
        fake_eval(tmp_path / f"eval_ppo_seed{seed}", s, w)
    spread = eval.main(eval.Config(seeds_of=str(tmp_path / "eval_ppo_seed*")))
    for key, values in (("labeler_score_ppo", scores), ("win_rate_labeler", wins)):
        mean, se, n = spread[key]
        assert n == 3 and abs(mean - statistics.mean(values)) < 1e-12
        assert abs(se - statistics.stdev(values) / math.sqrt(3)) < 1e-12
    fake_eval(tmp_path / "ppo", 0.81, 0.72)
    eval.write_report(str(tmp_path))
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| PPO |"))
    assert f"{statistics.mean(scores):.3f} ± {statistics.stdev(scores) / math.sqrt(3):.3f}" in row and "3 seeds" in row
    with pytest.raises(ValueError, match="fewer than two run folders"):
        eval.main(eval.Config(seeds_of=str(tmp_path / "eval_dpo_seed*")))

def test_report_has_the_new_methods_rows_and_the_labeling_budget_table(tmp_path):
    """The report's rows for DPO, critic-free PPO and PPO from the base model, each judged against SFT, and one row
    of the labeling-budget table per evaluated split, ordered by the share of the budget spent on demonstrations,
    with the demonstrations and rankings counted from that split's own data files."""
    for run_name, score in (("eval_dpo", 0.7), ("ppo_rloo", 0.8), ("eval_ppo_base", 0.5)):
        fake_eval(tmp_path / run_name, score, score)
    for share, n_demos, n_prefs in ((80, 4, 1), (20, 1, 6)):
        folder = tmp_path / f"budget_d{share}"
        common.write_jsonl(str(folder / "data" / "sft_train.jsonl"), [{"prompt": "p", "response": "r"}] * n_demos)
        common.write_jsonl(str(folder / "data" / "prefs_train.jsonl"), [{"prompt": "p", "chosen": "a",
                                                                          "rejected": "b"}] * n_prefs)
        fake_eval(folder / "eval", share / 100, 0.5)
    eval.write_report(str(tmp_path))
    lines = (tmp_path / "report.md").read_text().splitlines()
    for name in ("| DPO | 0.700", "| critic-free PPO (RLOO) | 0.800", "| PPO from the base model (no SFT) | 0.500"):
        assert any(line.startswith(name) for line in lines), name
    budget = [line for line in lines if line.startswith("| 20%") or line.startswith("| 80%")]
    assert budget == ["| 20% | 1 | 6 | 0.200 | 0.500 |", "| 80% | 4 | 1 | 0.800 | 0.500 |"]
