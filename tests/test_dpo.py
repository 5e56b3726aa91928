"""
Tests for dpo.py, Direct Preference Optimization (Rafailov et al. 2023): the loss of eq. (7) is log 2 while the
policy equals its reference, its gradient is eq. (7)'s and raises the chosen response's log-ratio over the rejected
one's, and a tiny run raises the implicit reward margin on held-out pairs. Tiny seeded byte-level models on CPU.
    python -m pytest tests/test_dpo.py -q
"""
import copy
import math
import random
from dataclasses import asdict

import pytest
import torch

import common
import dpo
from model import GPT, GPTConfig, load_model

TOKENIZER = common.get_tokenizer("bytes")
TINY = dict(block_size=64, vocab_size=TOKENIZER.n_vocab, n_layer=2, n_head=2, n_embd=32)
RANKING = ("Tell me about the cat.\n", ["The cat is happy.", "The cat is here.", "The cat is sad and alone."])
PAIR = ("Hi.\n", ["A dog.", "No dog at all."])

def tiny_policy(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY)).eval()

def test_dpo_loss_is_log2_when_policy_equals_reference():
    """At step 0 π = π_ref, so every implicit reward β log π/π_ref is 0 and eq. (7) is -log σ(0) = log 2 exactly,
    for a K = 3 ranking (3 pairs) and a pair alike, whatever β."""
    policy = tiny_policy()
    for beta in (0.1, 1.0):
        with torch.no_grad():
            loss, r_chosen, r_rejected = dpo.dpo_loss(policy, policy, TOKENIZER, [RANKING, PAIR], beta, 64, "cpu")
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # fp32 rounding of log 2
        assert len(r_chosen) == 3 + 1 and (r_chosen == 0).all() and (r_rejected == 0).all()

def test_sequence_logprob_sums_the_response_tokens_and_its_end_of_text_only():
    """log π(y|x) is the sum over the response's tokens and its end-of-text, computed here one token at a time from
    full forwards of the unpadded sequence: neither the prompt nor the padding of a longer row enters it."""
    policy = tiny_policy()
    x, y, start = dpo.encode_responses(TOKENIZER, [RANKING, PAIR], 64, "cpu")
    assert start == len(PAIR[0]) - 1  # the shorter prompt's last token predicts its first response token
    with torch.no_grad():
        batched = dpo.sequence_logprobs(policy, x, y, start)
        torch.testing.assert_close(batched, dpo.sequence_logprobs(policy, x, y), atol=1e-5, rtol=0)  # same sums
        for i, (prompt, response) in enumerate((p, r) for p, ranking in (RANKING, PAIR) for r in ranking):
            prompt_ids = TOKENIZER.encode_ordinary(prompt)
            ids = prompt_ids + TOKENIZER.encode_ordinary(response) + [TOKENIZER.eot_token]
            by_hand = sum(torch.log_softmax(policy(torch.tensor([ids[:t]]))[0, -1], -1)[ids[t]].item()
                          for t in range(len(prompt_ids), len(ids)))
            assert batched[i].item() == pytest.approx(by_hand, abs=1e-4)  # fp32 sums of ~30 terms, other op order

def test_dpo_gradient_raises_the_chosen_log_ratio_over_the_rejected_one():
    """DPO eq. (7)'s gradient is -β σ(r_l - r_w) ∇(log π(y_w) - log π(y_l)); at π = π_ref, σ(0) = 1/2. So the loss's
    gradient equals that of -β/2 (log π(y_w) - log π(y_l)) computed by hand, and one small step along it raises
    the chosen response's log-ratio over the rejected one's."""
    beta, policy = 0.5, tiny_policy()
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    loss, _, _ = dpo.dpo_loss(policy, ref_policy, TOKENIZER, [PAIR], beta, 64, "cpu")
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    logprobs = dpo.sequence_logprobs(policy, *dpo.encode_responses(TOKENIZER, [PAIR], 64, "cpu"))
    by_hand = torch.autograd.grad(-beta / 2 * (logprobs[0] - logprobs[1]), list(policy.parameters()))
    for g, h in zip(grads, by_hand):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)  # fp32, logsigmoid's chain rule vs by hand
    with torch.no_grad():
        for p, g in zip(policy.parameters(), grads):
            p -= 1e-2 * g
        _, r_chosen, r_rejected = dpo.dpo_loss(policy, ref_policy, TOKENIZER, [PAIR], beta, 64, "cpu")
    assert (r_chosen - r_rejected).item() > 1e-3

ANIMALS, HELDOUT = ("cat", "dog", "fox", "bee", "cow", "pig"), ("owl", "yak")

def write_preferences(path, animals, n, seed):
    """The happy story beats the sad one; half the rows are pairs, half K = 3 rankings."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        a, verb = rng.choice(animals), rng.choice(("is", "was", "felt"))
        happy, sad, prompt = f"The {a} {verb} happy.", f"The {a} {verb} sad.", f"Tell me about the {a}.\n"
        rows.append({"prompt": prompt, "chosen": happy, "rejected": sad} if i % 2 else
                    {"prompt": prompt, "ranking": [happy, f"The {a} {verb} here.", sad]})
    common.write_jsonl(str(path), rows)

def test_tiny_dpo_run_raises_the_heldout_implicit_reward_margin(tmp_path):
    """dpo.main on a random tiny policy: the implicit reward margin on held-out pairs (about animals never seen in
    training) starts at 0 (π = π_ref) and ends clearly positive, ordering most pairs as labelled; the checkpoint is a
    policy that load_model reads, as eval.py does."""
    write_preferences(tmp_path / "prefs_train.jsonl", ANIMALS, 64, seed=0)
    write_preferences(tmp_path / "prefs_val.jsonl", HELDOUT, 16, seed=1)
    policy = tiny_policy()
    common.save_checkpoint(str(tmp_path / "sft" / "ckpt.pt"), {
        "kind": "policy", "model_config": asdict(policy.config), "model": policy.state_dict(), "tokenizer": "bytes",
        "step": 0, "config": {}})
    cfg = dpo.Config(out_dir=str(tmp_path / "dpo"), sft=str(tmp_path / "sft"), data=str(tmp_path / "prefs_train.jsonl"),
                     beta=0.1, batch_size=8, group_by_length=0, epochs=2, lr=3e-3, warmup_steps=2, eval_interval=8,
                     device="cpu", dtype="float32")
    result = dpo.main(cfg)
    assert result["val_margin_start"] == 0 and result["val_accuracy_start"] == 0
    assert result["val_margin"] > 0.5 and result["val_accuracy"] > 0.9
    trained, ckpt = load_model(cfg.out_dir, kind="policy")
    assert ckpt["tokenizer"] == "bytes" and ckpt["config"]["beta"] == 0.1
    assert not torch.equal(trained.lm_head.weight, policy.lm_head.weight)
