"""
Tests for ppo.py, step 3 of InstructGPT (Ouyang et al. 2022, §3.5): π starts equal to π_ref (KL 0, ratio 1), GAE
(Schulman et al. 2016) against a slow loop, padding that no loss sees, the RM's score on the last real token, a toy
problem that PPO (Schulman et al. 2017) really solves, no NaN on degenerate batches, the N+ details' EOS trick
(Huang et al. 2024), an exact resume, and the eval.json PPO writes through eval.py. Tiny seeded byte-level models
on CPU, no network.
    python -m pytest tests/test_ppo.py -q
"""
import copy
import json
import math
import os
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

import common
import ppo
import sft
from model import GPT, GPTConfig, load_model, token_logprobs
from sample import generate

TOKENIZER = common.get_tokenizer("bytes")  # 256 byte ids + <|endoftext|> = 256
EOT = TOKENIZER.eot_token
TINY = dict(block_size=64, vocab_size=TOKENIZER.n_vocab, n_layer=2, n_head=2, n_embd=32)
ANIMALS = ("cat", "dog", "frog", "owl", "fox", "bee", "hen", "cow")
PROMPTS = [f"Tell me about the {a}.\n" for a in ANIMALS]
# A toy gold judge beside the prompts (common.load_labeler finds it): vowels per byte; "owl" prompts are held out.
LABELER = '''
def score(prompt, response):
    return sum(c in "aeiou" for c in response) / max(1, len(response))

def is_heldout(prompt):
    return "owl" in prompt
'''

def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()

def eos_policy(eos_logit, context_gain=1.0):
    """A tiny policy with a chosen taste for ending: ln_f's bias becomes a unit vector u and, with tied weights,
    logit(EOS) = wte[EOS]·h = eos_logit · (1 + gain · u·x̂). With gain 0 the context is ignored: every position's
    logit(EOS) is exactly eos_logit (the other logits are ~±0.05), so ±30 means always / never ending."""
    model = tiny_gpt()
    with torch.no_grad():
        u = F.normalize(torch.randn(TINY["n_embd"]), dim=0)
        model.transformer.ln_f.weight.mul_(context_gain)
        model.transformer.ln_f.bias.copy_(u)
        model.transformer.wte.weight[EOT] = eos_logit * u
    return model

def write_inputs(folder, policy=None, with_labeler=False):
    """Checkpoints of a tiny SFT policy (by default one that ends about half its 12-token responses, so scores vary)
    and a random tiny RM, and train/val prompts, in `folder`; returns the matching ppo.Config kwargs."""
    rm = tiny_gpt(seed=1, scalar_head=True)
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)  # as in test_reward: scores that differ by more than rounding
    for name, kind, model in (("sft", "policy", policy or eos_policy(2.0)), ("rm", "reward", rm)):
        common.save_checkpoint(str(folder / name / "ckpt.pt"), {
            "kind": kind, "model_config": asdict(model.config), "model": model.state_dict(), "tokenizer": "bytes",
            "step": 0, "config": {}})
    common.write_jsonl(str(folder / "prompts_train.jsonl"), [{"prompt": p} for p in PROMPTS * 2])
    common.write_jsonl(str(folder / "prompts_val.jsonl"), [{"prompt": p.replace("Tell", "Talk")} for p in PROMPTS])
    if with_labeler:
        (folder / "labeler.py").write_text(LABELER)
    return dict(sft=str(folder / "sft"), reward=str(folder / "rm"), prompts=str(folder / "prompts_train.jsonl"))

def tiny_config(out_dir, inputs, **overrides):
    """Everything that matters is pinned here, so the lead's tuning of Config's defaults cannot change these tests."""
    return ppo.Config(**{**dict(out_dir=str(out_dir), **inputs, val_prompts="", n_iters=4, batch_size=8,
                                n_minibatches=2, ppo_epochs=2, max_new_tokens=12, lr=1e-3, anneal_lr=True, ptx_coef=0.0,
                                save_interval=2, eval_interval=100, n_eval=8, seed=1337, device="cpu",
                                dtype="float32"), **overrides})

def iteration_records(run_dir):
    """log.jsonl's per-iteration records (eval records carry eval/* keys instead of objective/kl)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "objective/kl" in r]

def rollout(policy, ref_policy, n_new=12, seed=0, temperature=0.7, copies=1):
    """A generate() rollout of `copies` × the 8 prompts, and log π, log π_ref of its responses recomputed by full
    forwards, as ppo.main does."""
    out = generate(policy, [TOKENIZER.encode_ordinary(p) for p in PROMPTS * copies], n_new, temperature=temperature,
                   eos_id=EOT, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logprobs = [ppo.response_logprobs(m, out.tokens, out.attention_mask, out.prompt_len, temperature)[0]
                    for m in (policy, ref_policy)]
    return out, *logprobs

def run_with_recorded_ratios(cfg):
    """ppo.main(cfg), recording every policy_loss call's masked log π - log π_old. -> (result, [log-ratios])"""
    log_ratios, real_policy_loss = [], ppo.policy_loss

    def recording_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
        log_ratios.append(((logprobs - old_logprobs) * mask).detach())
        return real_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ppo, "policy_loss", recording_policy_loss)
        return ppo.main(cfg), log_ratios

@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """ppo.main for 4 iterations with a labeler (~2 s). Every policy_loss call's log-ratio is recorded on the way,
    to see the ratio where it is used. Returns (cfg, eval.json's dict, [log π - log π_old per minibatch])."""
    folder = tmp_path_factory.mktemp("ppo")
    cfg = tiny_config(folder / "A", write_inputs(folder, with_labeler=True))
    return cfg, *run_with_recorded_ratios(cfg)

# ----------------------------------------------------------------------------- before the first update: π = π_ref

def test_kl_to_reference_is_zero_and_ratio_is_one_before_first_update():
    """InstructGPT eq. (2) penalises log π - log π_ref; π starts as a copy of π_SFT, so on its first rollout the
    per-token KL is exactly 0, and PPO's ratio exp(log π - log π_old) (Schulman et al. 2017, eq. (6)) is exactly 1:
    nothing is clipped and the surrogate is just -mean(A), with gradient -A/n per real token."""
    policy = tiny_gpt()
    out, logprobs, ref_logprobs = rollout(policy, copy.deepcopy(policy))
    _, kl = ppo.compute_rewards(torch.zeros(len(PROMPTS)), logprobs, ref_logprobs, out.response_mask, 0.05)
    assert (kl == 0).all()  # exactly: identical weights, identical forwards
    advantages = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(0)) * out.response_mask
    new_logprobs = logprobs.clone().requires_grad_()
    loss, clipfrac, approxkl = ppo.policy_loss(new_logprobs, logprobs, advantages, out.response_mask, 0.2)
    assert clipfrac == 0 and approxkl == 0
    n = out.response_mask.sum()
    assert loss == -(advantages * out.response_mask).sum() / n  # ratio exp(0) = 1 exactly
    loss.backward()
    torch.testing.assert_close(new_logprobs.grad, -advantages * out.response_mask / n, atol=1e-7, rtol=0)  # fp32

def test_main_logs_zero_kl_and_unit_ratio_on_its_first_minibatch(ppo_run):
    """The same property where it is used: ppo.main's first iteration logs objective/kl == 0.0, and its first
    minibatch sees log π - log π_old == 0 exactly (old log-probs come from the same full forward, not the sampler's
    KV-cache numbers). Later minibatches see a ratio ≠ 1, so the update really moved π."""
    cfg, _, log_ratios = ppo_run
    assert iteration_records(cfg.out_dir)[0]["objective/kl"] == 0.0
    assert len(log_ratios) == cfg.n_iters * cfg.ppo_epochs * cfg.n_minibatches
    assert (log_ratios[0] == 0).all()
    assert log_ratios[1].abs().max() > 1e-4

# ----------------------------------------------------------------------------- GAE against a slow loop

def gae_by_hand(rewards, values, lengths, gamma, lam):
    """The obvious reference, one row at a time with Python floats: δ_t = r_t + γV_{t+1} - V_t and
    A_t = δ_t + γλA_{t+1}, where the value after the last real token is 0; padding gets A = 0 and return 0."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b, L in enumerate(lengths):
        next_advantage = 0.0
        for t in reversed(range(L)):
            next_value = values[b][t + 1] if t + 1 < L else 0.0
            next_advantage = rewards[b][t] + gamma * next_value - values[b][t] + gamma * lam * next_advantage
            advantages[b][t] = next_advantage
    returns = [[a + (v if t < L else 0.0) for t, (a, v) in enumerate(zip(arow, vrow))]
               for arow, vrow, L in zip(advantages, values, lengths)]
    return torch.tensor(advantages), torch.tensor(returns)

def test_gae_matches_a_hand_written_loop_on_a_ragged_batch():
    """GAE (Schulman et al. 2016, eq. (16)) over responses of lengths 6, 3, 1 and 5 in a (4, 6) batch. Values at
    padding are garbage on purpose: no bootstrapping from padding. Rewards at padding are 0, as compute_rewards
    leaves them."""
    lengths = [6, 3, 1, 5]
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]  # (B, R)
    rng = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, generator=rng) * mask
    values = torch.randn(4, 6, generator=rng)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
        advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
        ref_advantages, ref_returns = gae_by_hand(rewards.tolist(), values.tolist(), lengths, gamma, lam)
        torch.testing.assert_close(advantages, ref_advantages, atol=1e-6, rtol=0)  # fp32 vs Python floats, ≤ 6 steps
        torch.testing.assert_close(returns, ref_returns, atol=1e-6, rtol=0)

def test_gae_with_lambda_one_is_return_minus_value():
    """With γ = λ = 1 the value terms telescope (Schulman et al. 2016, eq. (18)): A_t = Σ_{t'≥t} r_t' - V(s_t), so
    the value target `returns` is the plain reward-to-go (the Monte Carlo return)."""
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    rng = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(2, 5, generator=rng) * mask, torch.randn(2, 5, generator=rng)
    advantages, returns = ppo.compute_gae(rewards, values, mask, 1.0, 1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(returns, reward_to_go, atol=1e-6, rtol=0)  # fp32, 5 additions
    torch.testing.assert_close(advantages, (reward_to_go - values) * mask, atol=1e-6, rtol=0)

# ----------------------------------------------------------------------------- padding: no loss sees it

# ----------------------------------------------------------------------------- critic-free: RLOO and "GRPO"

def test_rloo_baseline_is_the_mean_of_the_other_samples_of_the_same_prompt():
    """RLOO (Ahmadian et al. 2024): with k samples of a prompt, sample i's baseline is the mean reward of the
    other k - 1, checked against a slow loop over groups and members; the advantage is reward minus that. GRPO's
    (Shao et al. 2024, §4.1.2) is the group's z-score, with the sample standard deviation."""
    k, rewards = 4, torch.randn(12, generator=torch.Generator().manual_seed(0))  # 3 prompts x 4 samples, in a row
    by_hand = []
    for group in range(len(rewards) // k):
        members = rewards[group * k:(group + 1) * k].tolist()
        by_hand += [sum(r for j, r in enumerate(members) if j != i) / (k - 1) for i in range(k)]
    torch.testing.assert_close(ppo.loo_baseline(rewards, k), torch.tensor(by_hand), atol=1e-6, rtol=0)  # fp32
    torch.testing.assert_close(ppo.critic_free_advantages(rewards, k, "rloo"), rewards - torch.tensor(by_hand),
                               atol=1e-6, rtol=0)
    grpo = ppo.critic_free_advantages(rewards, k, "grpo").view(-1, k)
    torch.testing.assert_close(grpo.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(grpo.std(1), torch.ones(3), atol=1e-5, rtol=0)

def test_critic_free_run_trains_no_value_model_and_its_checkpoint_holds_none(tmp_path, monkeypatch):
    """--advantage=rloo: each rollout batch holds every prompt 4 times in a row (the groups the baseline reads), and
    no value model is built or trained. The run's checkpoint has no value_model, Adam holds state for the policy's
    parameters alone, the value metrics are logged as null, and π has moved; --resume continues such a run. A
    critic-free baseline with one sample per prompt is a one-line error."""
    inputs = write_inputs(tmp_path, with_labeler=True)
    cfg = tiny_config(tmp_path / "rloo", inputs, advantage="rloo", samples_per_prompt=4)
    batches, real_generate = [], ppo.generate

    def recording_generate(model, prompts, *args, **kwargs):  # the rollouts' prompts, batch by batch
        batches.append(prompts)
        return real_generate(model, prompts, *args, **kwargs)
    monkeypatch.setattr(ppo, "generate", recording_generate)
    ppo.main(cfg)
    assert len(batches) == cfg.n_iters and all(b[i] == b[i - i % 4] for b in batches for i in range(len(b)))
    ckpt = common.load_checkpoint(cfg.out_dir, "policy")
    policy, _ = load_model(cfg.out_dir, kind="policy")
    sft_policy, _ = load_model(inputs["sft"], kind="policy")
    assert "value_model" not in ckpt
    assert len(ckpt["optimizer"]["state"]) == len(list(policy.parameters()))
    records = iteration_records(cfg.out_dir)
    assert all(r["ppo/loss/value_avg"] is None and r["ppo/val/explained_variance"] is None for r in records)
    assert all(math.isfinite(r["ppo/loss/policy_avg"]) for r in records)
    assert not torch.equal(policy.lm_head.weight, sft_policy.lm_head.weight)
    ppo.main(replace(cfg, n_iters=cfg.n_iters + 2, resume=True))
    assert common.load_checkpoint(cfg.out_dir, "policy")["step"] == cfg.n_iters + 2
    with pytest.raises(ValueError, match="samples_per_prompt"):
        ppo.main(replace(cfg, out_dir=str(tmp_path / "bad"), samples_per_prompt=1))

def test_masked_positions_contribute_nothing_to_any_loss():
    """Right padding after EOS holds whatever the forward produced there. Replacing log-probs, values, advantages
    and returns at masked positions with huge garbage must leave both PPO losses, their stats, masked_mean and
    masked_whiten's output at real tokens unchanged (exactly: masked terms are multiplied by 0, never added)."""
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 1, 4])[:, None]  # (B, R)
    rng = torch.Generator().manual_seed(0)
    clean = [torch.randn(4, 6, generator=rng) for _ in range(6)]  # logprobs, old, advantages, values, old, returns
    garbage = [torch.where(mask, x, torch.full_like(x, 1e3) * (i + 1)) for i, x in enumerate(clean)]

    def everything(logprobs, old_logprobs, advantages, values, old_values, returns):
        return (*ppo.policy_loss(logprobs, old_logprobs, advantages, mask, 0.2),
                *ppo.value_loss(values, old_values, returns, mask, 0.2),
                ppo.masked_mean(advantages, mask), ppo.masked_whiten(advantages, mask),
                ppo.masked_whiten(advantages, mask, shift_mean=False))
    for a, b in zip(everything(*clean), everything(*garbage)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (ppo.masked_whiten(clean[2], mask)[~mask] == 0).all()
    whitened = ppo.masked_whiten(clean[2], mask)
    assert abs(ppo.masked_mean(whitened, mask)) < 1e-6  # fp32 sums of 14 numbers of size ~1
    assert abs(ppo.masked_mean(whitened ** 2, mask) - 1) < 1e-5

def test_masked_mean_of_an_empty_mask_is_zero_not_nan():
    """A fully masked batch (nanochat #590 was a NaN from exactly this) gives 0, as masked_mean's docstring says."""
    x = torch.randn(3, 4)
    assert ppo.masked_mean(x, torch.zeros(3, 4, dtype=torch.bool)) == 0
    per_row = ppo.masked_mean(x, torch.tensor([[True] * 4, [False] * 4, [True, False, False, False]]), dim=1)
    torch.testing.assert_close(per_row, torch.stack([x[0].mean(), torch.tensor(0.0), x[2, 0]]))

def test_score_lands_on_the_last_real_token_never_on_padding():
    """InstructGPT §3.5: the RM scores the whole response, so its score is the reward of the response's last action:
    the EOS token (the cut-off end for a row that never stops). Each row has its EOS at another position; every
    other token's reward is -β·KL, and the padding after the EOS gets exactly 0."""
    eos_at = [0, 2, 4, None]  # None: never ends, all 6 tokens real
    R, beta = 6, 0.1
    tokens = torch.randint(0, 256, (4, R), generator=torch.Generator().manual_seed(0))
    for b, t in enumerate(eos_at):
        if t is not None:
            tokens[b, t] = EOT
    mask = torch.stack([torch.arange(R) <= (R if t is None else t) for t in eos_at])  # through the EOS
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0])
    logprobs, ref_logprobs = torch.randn(4, R), torch.randn(4, R)
    rewards, kl = ppo.compute_rewards(scores, logprobs, ref_logprobs, mask, beta)
    for b, t in enumerate(eos_at):
        last = mask[b].sum().item() - 1
        assert last == (R - 1 if t is None else t) and (t is None or tokens[b, last] == EOT)
        expected = -beta * (logprobs[b] - ref_logprobs[b]) * mask[b]
        expected[last] += scores[b]
        torch.testing.assert_close(rewards[b], expected, atol=1e-6, rtol=0)  # fp32
        assert (rewards[b, last + 1:] == 0).all() and (kl[b, last + 1:] == 0).all()

# ----------------------------------------------------------------------------- learning

@pytest.mark.parametrize("advantage", ["gae", "rloo", "grpo"])
def test_ppo_updates_raise_the_reward_on_a_toy_problem(advantage):
    """The core loop of ppo.main with the RM replaced by a reward we can read: the number of lowercase letters in the
    response. Rollout -> compute_rewards (small β) -> compute_gae (V = 0) -> masked_whiten -> clipped surrogate
    (Schulman et al. 2017, eq. (7)) -> Adam. After 8 iterations of 16 rollouts the policy's own probability of a
    lowercase letter, measured on fresh samples, must rise from chance, 26/257 ≈ 0.10 per token, to over 0.3 (it
    reached 0.49-0.63 over five model seeds; a large lr suits a 2-layer model). The critic-free advantages (RLOO,
    Ahmadian et al. 2024; GRPO, Shao et al. 2024) must get there too, with each response scored against 3 others."""
    policy = tiny_gpt()
    ref_policy, optimizer = copy.deepcopy(policy), torch.optim.Adam(policy.parameters(), lr=3e-2)
    is_lower = torch.zeros(TOKENIZER.n_vocab, dtype=torch.bool)
    is_lower[ord("a"):ord("z") + 1] = True

    def lowercase_probability():  # E_π[lowercase] per response token, on a fixed-seed rollout of the current π
        out, _, _ = rollout(policy, policy, n_new=16, seed=123, temperature=1.0)
        with torch.no_grad():
            logits = ppo.response_logprobs(policy, out.tokens, out.attention_mask, out.prompt_len, 1.0)[1]
        return ppo.masked_mean(logits.softmax(-1)[..., is_lower].sum(-1), out.response_mask).item()

    before = lowercase_probability()
    for iteration in range(8):
        out, old_logprobs, ref_logprobs = rollout(policy, ref_policy, 16, iteration, 1.0, copies=2)
        mask, P = out.response_mask, out.prompt_len
        scores = (is_lower[out.responses] & mask).sum(1).float()  # (B,) the toy reward
        rewards, _ = ppo.compute_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef=0.01)
        if advantage == "gae":
            advantages, _ = ppo.compute_gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=0.95)
        else:  # groups of 4 consecutive rollouts (other prompts, but this toy reward ignores the prompt)
            advantages = ppo.critic_free_advantages(rewards.sum(1), 4, advantage)[:, None] * mask
        advantages = ppo.masked_whiten(advantages, mask)
        for _ in range(4):  # PPO epochs over the whole batch
            logprobs, _ = ppo.response_logprobs(policy, out.tokens, out.attention_mask, P, 1.0)
            loss, _, _ = ppo.policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = lowercase_probability()
    assert 0.09 < before < 0.11 and after > 0.3, (before, after)

# ----------------------------------------------------------------------------- degenerate batches

@pytest.mark.parametrize("lengths", [[1] * 8, [12] * 8], ids=["all-eos", "never-eos"])
def test_no_nan_when_every_response_is_just_eos_or_none_ends(lengths):
    """The two extremes of response_mask: every response is its EOS alone (length 1), or none ends (all 12 tokens
    real). Equal scores make the score whitening's std 0 too. The whole core stays finite."""
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]  # (B, R)
    rng = torch.Generator().manual_seed(0)
    logprobs, ref_logprobs, values = (torch.randn(8, 12, generator=rng) for _ in range(3))
    for scores in (torch.randn(8, generator=rng), torch.full((8,), -3.0)):
        rl_scores = (scores - scores.mean()) / (scores.std() + 1e-8)  # ppo.main's score whitening
        rewards, kl = ppo.compute_rewards(rl_scores, logprobs, ref_logprobs, mask, 0.05)
        advantages, returns = ppo.compute_gae(rewards, values * mask, mask, 1.0, 0.95)
        advantages = ppo.masked_whiten(advantages, mask)
        pg = ppo.policy_loss(logprobs + 0.1, logprobs, advantages, mask, 0.2)
        vf = ppo.value_loss(values + 0.5, values, returns, mask, 0.2)
        for x in (rewards, kl, advantages, returns, *pg, *vf):
            assert torch.isfinite(x).all()

@pytest.mark.parametrize("eos_logit", [30.0, -30.0], ids=["always-eos", "never-eos"])
def test_main_stays_finite_when_the_policy_always_or_never_ends(tmp_path, eos_logit):
    """The same extremes through ppo.main, with a policy that emits EOS first every time or never. The never-ending
    case is the N+ details' EOS trick (Huang et al. 2024): a response cut off at max_new_tokens gets no_eos_score
    instead of the RM's score, so the logged objective/scores is exactly no_eos_score and eos_share is 0."""
    inputs = write_inputs(tmp_path, policy=eos_policy(eos_logit, context_gain=0.0))
    cfg = tiny_config(tmp_path / "run", inputs, n_iters=1)
    result = ppo.main(cfg)
    record = iteration_records(cfg.out_dir)[0]
    assert all(math.isfinite(v) for v in record.values() if v is not None), record
    assert all(math.isfinite(v) for v in result.values() if v is not None), result
    if eos_logit > 0:
        assert record["response/eos_share"] == 1.0 and record["response/length"] == 1.0
    else:
        assert record["response/eos_share"] == 0.0 and record["response/length"] == cfg.max_new_tokens
        assert record["objective/scores"] == cfg.no_eos_score

# ----------------------------------------------------------------------------- main(): resume and evaluation

def test_gold_reward_trains_on_the_labelers_score_instead_of_the_rms(tmp_path):
    """--gold_reward puts the built-in task's labeler in the RM's place: a perfect reward model, to measure what PPO
    does when the RM is not the limit. Each iteration's logged score (what PPO maximised) is then the labeler's mean
    score of the same rollouts, which the RM's never is; a dataset without a labeler.py refuses the flag."""
    inputs = write_inputs(tmp_path, policy=eos_policy(6.0, context_gain=0.0), with_labeler=True)  # 0-3 bytes, ended
    for gold in (True, False):
        cfg = tiny_config(tmp_path / f"gold_{gold}", inputs, gold_reward=gold)
        ppo.main(cfg)
        records = iteration_records(cfg.out_dir)
        assert len(records) == cfg.n_iters and all(r["response/eos_share"] == 1.0 for r in records)
        same = [r["objective/scores"] == pytest.approx(r["objective/labeler_score"], abs=1e-6) for r in records]
        assert all(same) if gold else not any(same)
    os.makedirs(tmp_path / "real")
    with pytest.raises(ValueError, match="gold_reward.*labeler"):
        ppo.main(tiny_config(tmp_path / "real" / "run", write_inputs(tmp_path / "real"), gold_reward=True))

def test_ppo_ptx_pulls_the_policy_toward_the_pretraining_text(tmp_path):
    """PPO-ptx (InstructGPT eq. (2)) adds γ × the next-token loss on pretraining text to the policy's loss, so the
    policy keeps (here: gains) the pretraining distribution's likelihood: after the same 4 iterations, the run with
    γ = 1 predicts that text better than plain PPO (γ = 0), which never sees it; and it logs its ptx loss."""
    inputs = write_inputs(tmp_path)
    text = str(tmp_path / "pretrain_train.jsonl")
    common.write_jsonl(text, [{"text": "zq " * 20}] * 8)
    x, y = sft.make_batch(sft.load_examples(text, "pretrain", TOKENIZER, TINY["block_size"]), EOT)
    losses = {}
    for coef in (0.0, 1.0):
        run_dir = tmp_path / f"ptx_{coef}"
        ppo.main(tiny_config(run_dir, inputs, ptx_coef=coef, ptx_data=text))
        policy, _ = load_model(str(run_dir), kind="policy")
        with torch.no_grad():
            losses[coef] = sft.lm_loss(policy, x, y).item()
        ptx_logged = [r["ppo/ptx_loss"] for r in iteration_records(run_dir)]
        assert all(v is None for v in ptx_logged) if coef == 0 else all(math.isfinite(v) for v in ptx_logged)
    assert losses[1.0] < losses[0.0] - 0.5, losses  # nats per byte; measured 4.6 against 5.7 (ln 257 = 5.55)

def test_resume_reproduces_the_uninterrupted_run(ppo_run, tmp_path, monkeypatch):
    """--resume restores π, V, AdamW's state, both generators and β from the checkpoint of iteration 2, so a run
    interrupted during iteration 3 continues exactly as the uninterrupted run did: same rollouts, same losses."""
    cfg_a, result_a, _ = ppo_run
    cfg_b, rollouts = replace(cfg_a, out_dir=str(tmp_path / "B")), []

    def interrupt_third_rollout(*args, **kwargs):
        rollouts.append(1)
        if len(rollouts) == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during iteration 3, after iteration 2's checkpoint
        return generate(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(ppo, "generate", interrupt_third_rollout)  # ppo.py imported generate into its namespace
        with pytest.raises(KeyboardInterrupt):
            ppo.main(cfg_b)
    assert common.load_checkpoint(cfg_b.out_dir, "policy")["step"] == 2
    result_b = ppo.main(replace(cfg_b, resume=True))
    a, b = iteration_records(cfg_a.out_dir), iteration_records(cfg_b.out_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for record_a, record_b in zip(a, b):
        for key, value in record_a.items():
            if not key.startswith("time/") and value is not None:  # fp32 on CPU, same ops in the same order
                assert abs(value - record_b[key]) <= 1e-6, (record_a["step"], key, value, record_b[key])
    assert result_a.keys() == result_b.keys()
    assert all(result_b[k] == pytest.approx(v, abs=1e-6) for k, v in result_a.items() if v is not None)

def test_learning_rate_falls_linearly_from_lr_toward_zero(ppo_run):
    """With anneal_lr, iteration i (from 0) of n updates at lr·(1 - i/n): full steps at the start, shrinking ones at
    the end, where the policy settles. (The resume test checks that a resumed run keeps to the schedule.)"""
    cfg, _, _ = ppo_run
    lrs = [r["ppo/lr"] for r in iteration_records(cfg.out_dir)]
    assert lrs == pytest.approx([cfg.lr * (1 - i / cfg.n_iters) for i in range(cfg.n_iters)], rel=1e-12)
    assert lrs[0] == cfg.lr and lrs[-1] > 0

EVAL_KEYS = ("n_prompts", "labeler_score_sft", "labeler_score_ppo", "rm_score_sft", "rm_score_ppo", "kl_ppo_sft",
             "win_rate_labeler", "win_rate_rm", "heldout_win_rate_labeler")

def test_main_writes_eval_json_with_every_key(ppo_run):
    """eval.json compares π with π_SFT on the same val prompts and seed: by the RM, by the labeler (the gold judge,
    InstructGPT's human evaluation in miniature) and by KL(π || π_SFT) in nats per response. All keys are numbers
    here; win rates lie in [0, 1]; main returns what it wrote; and PPO beat SFT by the RM it was trained against."""
    cfg, result, _ = ppo_run
    with open(os.path.join(cfg.out_dir, "eval.json")) as f:
        written = json.load(f)
    assert written == result and set(EVAL_KEYS) <= result.keys() and result["n_prompts"] == 8
    assert all(isinstance(result[k], (int, float)) and math.isfinite(result[k]) for k in EVAL_KEYS)
    assert all(0 <= result[k] <= 1 for k in ("win_rate_rm", "win_rate_labeler", "heldout_win_rate_labeler"))
    assert result["kl_ppo_sft"] > -1e-4  # a KL estimate on π's own samples; negative only by sampling noise
    # and learning happened: 4 iterations at lr 1e-3 raise the mean score of the (random) RM that PPO maximises by
    # over a nat. (Not the win rate: over 8 prompts it is too coarse, and moved 4/8 <-> 3.5/8 with float rounding.)
    assert result["rm_score_ppo"] > result["rm_score_sft"] + 1

def test_eval_of_an_untrained_policy_is_a_tie_with_zero_kl(tmp_path):
    """With lr = 0, π stays π_SFT, so evaluation draws the very same samples from both (same seed): every RM
    comparison is a tie (win rate exactly 0.5, ties counting half), KL(π || π_SFT) is 0, and without a labeler.py
    beside the prompts the labeler's keys are null rather than made up."""
    cfg = tiny_config(tmp_path / "run", write_inputs(tmp_path), n_iters=1, lr=0.0)
    result = ppo.main(cfg)
    assert result["win_rate_rm"] == 0.5 and result["rm_score_ppo"] == result["rm_score_sft"]
    assert result["kl_ppo_sft"] == 0.0  # both log-probs come from the same full forward of identical weights
    assert all(result[k] is None for k in EVAL_KEYS if "labeler" in k)

# ----------------------------------------------------------------------------- one GPU: precision, memory, dropout

def test_bf16_autocast_log_probs_stay_within_a_hundredth_of_a_nat_of_fp32_at_gpt2_logit_scale():
    """DESIGN, "Precision": under bf16 autocast the trunk may round, but the LM head and log-softmax run in fp32,
    since PPO's ratio and KL are differences of log-probs. A GPT-2-vocabulary model (50,257 ids) whose embedding is
    scaled so its logits reach GPT-2's magnitudes (~±100): bf16 keeps 8 mantissa bits, so logits rounded to bf16
    would move log-probs by tenths of a nat (checked below, so the scale is real); ours stay within 1e-2."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(60.0)  # tied: the LM head's logits grow 60x, the trunk's inputs too
    g = torch.Generator().manual_seed(1)
    tokens, mask, P = torch.randint(50257, (4, 40), generator=g), torch.ones(4, 40, dtype=torch.bool), 24
    mask[1, :10] = False  # a left-padded row
    with torch.no_grad():
        fp32, logits = ppo.response_logprobs(model, tokens, mask, P, 0.7)  # (B, R), (B, R, V)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = ppo.response_logprobs(model, tokens, mask, P, 0.7)[0]
    assert logits.abs().max() * 0.7 > 80  # GPT-2-like logits (before the temperature)
    assert (bf16 - fp32).abs().max() < 1e-2  # nats per token; measured ~3e-3 (the bf16 trunk's share)
    rounded = token_logprobs(logits.bfloat16(), tokens[:, P:])  # what a bf16 LM head would have produced
    assert (rounded - fp32).abs().mean() > 0.05

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dropout_in_the_checkpoints_never_reaches_ppo(tmp_path, dtype):
    """N+ details (Huang et al. 2024): no dropout in any of PPO's models. SFT and RM checkpoints trained with
    --dropout=0.1 still give KL 0 and ratio exactly 1 on the first minibatch (π's train() forwards would drop
    activations otherwise), under CPU bf16 autocast too: the fp32 heads are the same code in every forward."""
    policy = eos_policy(2.0)
    policy.config.dropout = 0.1
    dropout_policy = GPT(policy.config)
    dropout_policy.load_state_dict(policy.state_dict())
    inputs = write_inputs(tmp_path, policy=dropout_policy)
    rm_ckpt = common.load_checkpoint(inputs["reward"])
    rm_ckpt["model_config"]["dropout"] = 0.1
    common.save_checkpoint(os.path.join(inputs["reward"], "ckpt.pt"), rm_ckpt)
    assert common.load_checkpoint(inputs["sft"])["model_config"]["dropout"] == 0.1
    cfg = tiny_config(tmp_path / "run", inputs, n_iters=1, dtype=dtype)
    _, log_ratios = run_with_recorded_ratios(cfg)
    assert iteration_records(cfg.out_dir)[0]["objective/kl"] == 0.0
    assert (log_ratios[0] == 0).all() and log_ratios[1].abs().max() > 1e-4

def test_micro_batches_change_memory_not_the_update(tmp_path):
    """--micro_batch_size splits each minibatch into micro-batches whose gradients accumulate, each loss weighted by
    its share of the minibatch's real tokens, and the no-grad forwards into chunks: one iteration (4 Adam steps)
    ends at the same weights and logs the same numbers as without. atol 1e-6: fp32, the same sums in another order."""
    inputs = write_inputs(tmp_path)
    runs = {}
    for micro in (0, 1, 3):  # 3 leaves a ragged last micro-batch of a 4-row minibatch
        cfg = tiny_config(tmp_path / f"micro_{micro}", inputs, n_iters=1, micro_batch_size=micro)
        ppo.main(cfg)
        runs[micro] = (common.load_checkpoint(cfg.out_dir), iteration_records(cfg.out_dir)[0])
    (ckpt, record) = runs[0]
    for micro in (1, 3):
        other_ckpt, other_record = runs[micro]
        for part in ("model", "value_model"):
            for name, weight in ckpt[part].items():
                torch.testing.assert_close(other_ckpt[part][name], weight, atol=1e-6, rtol=0, msg=f"{part}.{name}")
        for key, value in record.items():
            if not key.startswith("time/") and value is not None:
                assert other_record[key] == pytest.approx(value, abs=1e-6), (micro, key)
    assert not torch.equal(ckpt["model"]["lm_head.weight"], common.load_checkpoint(inputs["sft"])["model"]["lm_head.weight"])
