"""
Step 3 of InstructGPT (Ouyang et al. 2022, §3.5 "Reinforcement learning"): PPO against the reward model, with a
per-token KL penalty to the frozen SFT model, and optionally the pretraining loss mixed in ("PPO-ptx", eq. (2)).
Four models: the policy π (trained, from SFT), the reference π_ref (frozen SFT), the reward model r (frozen), and
the value model V (trained, initialised from the reward model as in the paper). One iteration:
  rollout (sample.generate) -> score (RM, EOS trick) -> rewards (score - β·KL per token) -> GAE -> PPO epochs.
Critic-free (--advantage=rloo or grpo): no value model; each prompt gets --samples_per_prompt responses, each one's
advantage its reward against its siblings' (critic_free_advantages), in the same PPO epochs (not RLOO's REINFORCE).
At its evaluations, eval.py's evaluate() compares π with the SFT model on val prompts (out/<run>/eval.json).
    python ppo.py --sft=out/sft --reward=out/rm --prompts=data/stories/prompts_train.jsonl --out_dir=out/ppo
    torchrun --standalone --nproc_per_node=8 ppo.py ...   # several GPUs: each process samples its own rollouts

Shape letters: B rollouts per iteration, P (padded) prompt length, R response length, V vocab.
How ours differs from the paper: InstructGPT's β is fixed at 0.02; ours defaults to the adaptive controller of
Ziegler et al. (2019), because the right β depends on the reward model's scale, which for our tiny RM is not theirs.
Under torchrun (DDP) only π and V are wrapped; what makes PPO what it is stays global: reward and advantage whitening,
the mean KL that sets β, the logged metrics. Evaluation runs on rank 0 alone, the others wait at the next all-reduce.
"""
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (all_reduce_sum, check_finite, check_range, get_tokenizer, load_labeler, log, peak_memory,
                    prepare_run_dir, read_json, read_jsonl, resume_checkpoint, run, save_checkpoint, set_seed,
                    setup_device, setup_distributed, sync_gradients, val_path_for, wrap_ddp)
from eval import evaluate, save_eval, sft_side_cached
from model import GPT, disable_dropout, load_model, response_logprobs, response_values
from reward import score
from sample import generate
from sft import lm_loss, load_examples, make_batch

@dataclass
class Config:
    out_dir: str = "out/ppo"
    sft: str = "out/sft"               # the SFT policy: initialises π and is the frozen reference π_ref
    reward: str = "out/rm"             # the reward model: scores rollouts, and initialises the value model
    prompts: str = "data/stories/prompts_train.jsonl"
    skip_long_prompts: bool = False    # drop (and count) prompts with no room for max_new_tokens, instead of stopping
    val_prompts: str = ""              # default: prompts with _train replaced by _val
    # rollouts
    n_iters: int = 60                  # PPO iterations (each: one batch of rollouts, then ppo_epochs of updates);
                                       # sized to the CPU budget of run.sh (docs/experiments.md#ppo-settings)
    batch_size: int = 64               # rollouts per iteration and process: N processes sample N * batch_size
    max_new_tokens: int = 120          # responses longer than this are cut, and get no_eos_score
    temperature: float = 0.7           # sampling temperature; the log-probs are recomputed at the same one
    # the reward
    init_kl_coef: float = 0.3          # β at the start (InstructGPT: 0.02, fixed, on their RM's scale). With λ = 1
                                       # PPO moves fast, and a low start overshoots the target before β catches up
    adaptive_kl: bool = True           # adapt β toward target_kl (Ziegler et al. 2019 §2.2)
    target_kl: float = 3.0             # nats per sequence. Where the labeler's score peaks depends on the RM: a
                                       # better RM can be followed further (docs/experiments.md#kl-target)
    kl_horizon: int = 500              # how fast β adapts (in rollouts; Ziegler et al. used 10,000 over far more)
    no_eos_score: float = -3.0         # N+ details: a response that never ends gets this instead of the RM's score
    whiten_rewards: bool = True        # N+ details: whiten RM scores per batch (β and the value clip see unit scale)
    gold_reward: bool = False          # built-in task: score rollouts with the labeler itself, a perfect RM, to see
                                       # how far PPO gets when the RM is not what limits it (the RM still evaluates)
    # the advantage: GAE on a learned value model (InstructGPT), or a critic-free baseline from sibling samples
    advantage: str = "gae"             # "gae", "rloo" (Ahmadian et al. 2024) or "grpo" (Shao et al. 2024)
    samples_per_prompt: int = 1        # k responses to each prompt per batch (batch_size / k prompts); rloo and
                                       # grpo need k >= 2, and compare each response with the other k - 1
    # PPO
    ppo_epochs: int = 2                # passes over each batch (N+ details use 4; 2 halves our CPU time)
    n_minibatches: int = 2             # per epoch: 2 of 32 rollouts, 4 optimizer steps per iteration. Fewer, less
                                       # noisy steps drift less from the rollouts (docs/experiments.md#minibatches)
    lr: float = 2.4e-4                 # the first iteration's; annealed, the run's mean lr is half of it
    anneal_lr: bool = True             # lr falls linearly toward 0 over the run (as in CleanRL's ppo.py), so the
                                       # policy settles instead of jittering around what the RM rewards
                                       # (docs/experiments.md#learning-rate)
    gamma: float = 1.0                 # no discounting within a response, as in the N+ details and trl
    lam: float = 1.0                   # GAE λ. Not the N+ details' 0.95 (docs/experiments.md#lambda): our value
                                       # model explains little of the returns for the first part of a run (it must
                                       # learn the RM's verdict on a whole story), and with V ≈ 0, λ = 0.95 weighs a
                                       # byte 50 before the end by 0.95^50 ≈ 0.08: the first sentence (animal,
                                       # colour, mood) gets little credit
    cliprange: float = 0.2             # PPO's ε for the policy ratio
    cliprange_value: float = 0.2       # and for the value function
    vf_coef: float = 0.1
    grad_clip: float = 1.0
    # PPO-ptx (InstructGPT eq. (2)): γ × the pretraining loss added to the policy loss
    ptx_coef: float = 0.0
    ptx_data: str = ""                 # default: the pretrain_train.jsonl beside --prompts (never another task's)
    ptx_batch_size: int = 4            # packed pretraining chunks per minibatch (4 x 256 bytes: ~18 stories)
    # evaluation and plumbing
    eval_interval: int = 30
    n_eval: int = 200                  # val prompts used for evaluation
    save_interval: int = 10
    seed: int = 1337
    resume: bool = False
    overwrite: bool = False            # replace the run in out_dir (without it or --resume, a saved run is refused)
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False              # torch.compile the training forwards of π and V (sampling stays eager);
                                       # their kernels round unlike π_ref's: KL at step 0 ~1e-7, not 0
    cuda_graph: bool = False           # CUDA only: replay the rollouts' decode step as a CUDA graph (sample.py)
    micro_batch_size: int = 0          # rows per forward and backward (0 = a whole minibatch): changes memory,
                                       # not results (gradients accumulate over a minibatch's micro-batches)
    grad_checkpoint: bool = False      # recompute each block's activations in the backward pass, to save memory

def check_config(cfg):
    """Every setting's range, checked before anything runs: one place, so new keys go here."""
    check_range(cfg, ("n_iters", "batch_size", "max_new_tokens", "kl_horizon", "ppo_epochs", "n_minibatches",
                      "ptx_batch_size", "eval_interval", "n_eval", "save_interval"), 1)
    # temperature 0 (greedy) has no log-probs to take a ratio of: the recomputed ones divide by it
    check_range(cfg, ("temperature", "target_kl", "cliprange", "cliprange_value"), 0, strict=True)
    check_range(cfg, ("lr", "init_kl_coef", "vf_coef", "grad_clip", "ptx_coef", "micro_batch_size"), 0)
    check_range(cfg, ("gamma", "lam"), 0, high=1)
    if cfg.batch_size % cfg.n_minibatches:  # every minibatch the same size, none left over
        raise ValueError(f"--n_minibatches={cfg.n_minibatches}: must divide --batch_size={cfg.batch_size}")
    if cfg.advantage not in ("gae", "rloo", "grpo"):
        raise ValueError(f"--advantage={cfg.advantage}: expected gae, rloo or grpo")
    k = cfg.samples_per_prompt  # a critic-free baseline compares each response with the other k - 1
    if k < (1 if cfg.advantage == "gae" else 2) or cfg.batch_size % k:
        raise ValueError(f"--samples_per_prompt={k}: must divide --batch_size={cfg.batch_size}, and be >= 2 for "
                         f"--advantage={cfg.advantage}")

# ----------------------------------------------------------------------------- the math (tests import these)

def masked_mean(x, mask, dim=None):
    """Mean of x over the True entries of mask. An empty mask gives 0, not NaN (nanochat #590)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)

def masked_moments(x, mask):
    """Mean and variance of x over the True entries of mask, in the global batch: under torchrun the sums are
    all-reduced, so every process gets the statistics of all processes' rollouts. Two passes (sum and count, then the
    squared deviations from that mean), steadier than a sum of squares."""
    mask = mask.to(x.dtype)
    total, count = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()])).unbind()
    mean = total / count.clamp(min=1)
    return mean, all_reduce_sum(((x - mean) ** 2 * mask).sum()) / count.clamp(min=1)

def masked_whiten(x, mask, shift_mean=True):
    """Normalise x to zero mean and unit variance over the real tokens only (padding must not move the stats), with
    the global batch's statistics (masked_moments)."""
    mean, var = masked_moments(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask

def compute_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef):
    """InstructGPT eq. (2) as a per-token reward: r_t = -β (log π(a_t) - log π_ref(a_t)) at every token, plus the
    RM's score on the last real token. (B,), (B, R), (B, R), (B, R) -> rewards (B, R), kl (B, R)."""
    kl = (logprobs - ref_logprobs) * response_mask
    rewards = -kl_coef * kl
    last = (response_mask.sum(1) - 1).clamp(min=0)  # (B,) index of the last real token (EOS, or the cut-off end)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * response_mask, kl

def compute_gae(rewards, values, response_mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016, eq. (16)), backwards over the response:
    δ_t = r_t + γ V(s_{t+1}) - V(s_t),  A_t = δ_t + γλ A_{t+1}; the value after the last real token is 0.
    (B, R) each -> advantages (B, R), returns (B, R) = A + V (the value targets)."""
    values = values * response_mask  # no bootstrapping from padding
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    R = rewards.shape[1]
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # masking inside the scan: nothing from padding leaks into the last real token's advantage
        next_advantage = (delta + gamma * lam * next_advantage) * response_mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, advantages + values

def loo_baseline(seq_rewards, k):  # (B,) in groups of k consecutive samples of one prompt -> (B,)
    """RLOO's baseline (Ahmadian et al. 2024, after Kool et al. 2019): each sample's is the mean reward of the
    other k - 1 samples of its prompt. Leaving the sample out keeps the baseline independent of its own action, so
    the policy gradient stays unbiased; as a sum: (group total - own reward) / (k - 1)."""
    grouped = seq_rewards.view(-1, k)  # (B/k, k)
    return ((grouped.sum(1, keepdim=True) - grouped) / (k - 1)).flatten()

def critic_free_advantages(seq_rewards, k, kind):  # (B,) in groups of k -> (B,), one advantage per response
    """The whole response is one action (Ahmadian et al. 2024), so its advantage is one number, which the
    caller broadcasts over its tokens. rloo: R - the leave-one-out baseline. grpo: the group's z-score (R - mean) / std
    (Shao et al. 2024, §4.1.2, "outcome supervision"). Our "GRPO" differs from theirs in two ways, to change only the
    advantage between our arms: the KL to π_ref stays in the reward (theirs is a k3 term in the loss), and the loss
    averages over all tokens of the batch (theirs over each response's tokens, then over responses)."""
    if kind == "rloo":
        return seq_rewards - loo_baseline(seq_rewards, k)
    grouped = seq_rewards.view(-1, k)  # (B/k, k)
    return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-8)).flatten()

def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. (7)), as a loss to minimise, plus stats."""
    ratio = torch.exp(logprobs - old_logprobs)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    clipfrac = masked_mean((ratio - 1).abs() > cliprange, mask)
    approxkl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return masked_mean(losses, mask), clipfrac, approxkl

def value_loss(values, old_values, returns, mask, cliprange_value):
    """Clipped value loss (as in OpenAI's baselines and the N+ details): the new value may move at most
    cliprange_value from the rollout's value before the loss stops rewarding the move."""
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    losses = torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    clipfrac = masked_mean((values - returns) ** 2 < (values_clipped - returns) ** 2, mask)
    return 0.5 * masked_mean(losses, mask), clipfrac

def adapt_kl_coef(kl_coef, mean_kl, target_kl, n_rollouts, horizon):
    """Ziegler et al. (2019) §2.2's adaptive KL controller: β grows when the KL is above target and shrinks below it,
    the proportional error clipped to ±0.2, at a speed of n_rollouts / horizon per batch."""
    proportional_error = max(-0.2, min(0.2, mean_kl / target_kl - 1))
    return kl_coef * (1 + proportional_error * n_rollouts / horizon)

def explained_variance(returns, values, mask):
    """1 - Var(returns - V) / Var(returns) over the real tokens: 1 = V predicts the returns, 0 = no better than
    their mean (N+ details' ppo/val/explained_variance)."""
    residual, _ = masked_moments((returns - values) ** 2, mask)  # global, as it is logged
    return 1 - residual / masked_moments(returns, mask)[1].clamp(min=1e-8)

# ----------------------------------------------------------------------------- plumbing: models and prompts

def load_models(cfg, device):
    """The four models: π and π_ref from the SFT checkpoint, the RM, and V from the RM (None with a critic-free
    --advantage: no value model is built at all). -> models, tokenizer name."""
    ref_policy, sft_ckpt = load_model(cfg.sft, kind="policy")
    policy, _ = load_model(cfg.sft, kind="policy")
    reward_model, rm_ckpt = load_model(cfg.reward, kind="reward")
    if rm_ckpt["tokenizer"] != sft_ckpt["tokenizer"]:
        raise ValueError(f"{cfg.reward}: tokenizer {rm_ckpt['tokenizer']} differs from {cfg.sft}'s "
                         f"{sft_ckpt['tokenizer']}")
    value_model = None
    if cfg.advantage == "gae":
        value_model = GPT.from_checkpoint(rm_ckpt, cfg.reward)  # InstructGPT §3.5: the value function starts as the RM
        # Deviation: we keep the RM's trunk but zero its head. The RM's head was trained only at end-of-text tokens and
        # on the RM's raw scale; with whitened scores its outputs elsewhere are noise GAE would turn into advantages.
        torch.nn.init.zeros_(value_model.score_head.weight)
        torch.nn.init.zeros_(value_model.score_head.bias)
    # N+ details: no dropout in any of the four models, whatever the checkpoints were trained with, so train() and
    # eval() compute the same log-probs and the first minibatch's ratio is exactly 1
    models = {"policy": policy, "reference": ref_policy, "reward": reward_model, "value": value_model}
    for model in models.values():
        if model is not None:
            disable_dropout(model).grad_checkpoint = cfg.grad_checkpoint
    for model in (ref_policy, reward_model):
        model.to(device).eval().requires_grad_(False)
    for model in (policy, value_model):
        if model is not None:
            model.to(device).train()
    print("parameters: " + " | ".join(f"{name} {m.num_params():,}" for name, m in models.items() if m is not None))
    return policy, ref_policy, reward_model, value_model, sft_ckpt["tokenizer"]

def load_prompts(path, tokenizer, cfg, block_size, limit=None):
    """A prompts file's prompts, checked now rather than at the first rollout or eval: a prompt that leaves no room
    for max_new_tokens is an error, or with --skip_long_prompts dropped and counted."""
    prompts = [r["prompt"] for r in read_jsonl(path, ["prompt"])][:limit]
    too_long = [i for i, p in enumerate(prompts) if len(tokenizer.encode_ordinary(p)) + cfg.max_new_tokens >
                block_size]
    if too_long and (not cfg.skip_long_prompts or len(too_long) == len(prompts)):
        raise ValueError(f"{path}:{too_long[0] + 1}: prompt leaves no room for {cfg.max_new_tokens} new "
                         f"tokens in a {block_size}-token context ({len(too_long):,} such prompts;"
                         f" --skip_long_prompts drops them)")
    if too_long:
        print(f"{path}: skipped {len(too_long):,} of {len(prompts):,} prompts too long for the context")
    is_long = set(too_long)
    return [p for i, p in enumerate(prompts) if i not in is_long]

def save_run(path, cfg, tokenizer_name, policy, value_model, optimizer, rngs, kl_coef, iteration):
    """Everything --resume needs to continue exactly where the run stopped: both models, Adam, the RNGs and β."""
    save_checkpoint(path, {
        "kind": "policy", "model_config": asdict(policy.config), "model": policy.state_dict(),
        "tokenizer": tokenizer_name, "step": iteration, "config": asdict(cfg), "optimizer": optimizer.state_dict(),
        **({"value_model": value_model.state_dict()} if value_model is not None else {}),  # none when critic-free
        **{k: g.get_state() for k, g in rngs.items()}, "kl_coef": kl_coef})

def resume_run(out_dir, policy, value_model, optimizer, rngs):
    """Load what save_run wrote into the models, Adam and the RNGs; returns (β, the iteration to continue from).
    Another stage's policy checkpoint (no value model) is a one-line error, not a KeyError."""
    ckpt = resume_checkpoint(out_dir, ("value_model",) * (value_model is not None) + ("kl_coef", *rngs))
    policy.load_state_dict(ckpt["model"])
    if value_model is not None:
        value_model.load_state_dict(ckpt["value_model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    for k, generator in rngs.items():
        generator.set_state(ckpt[k])
    print(f"resumed from {out_dir} at iteration {ckpt['step']}")
    return ckpt["kl_coef"], ckpt["step"]

# ----------------------------------------------------------------------------- one iteration: experience, updates

def make_experience(cfg, rollout, batch_prompts, texts, models, labeler, kl_coef, eot_id, ctx):
    """Steps 2-4 of an iteration, without gradients: log π, log π_ref and V(s_t) over the rollouts, their scores, the
    per-token rewards of eq. (2) and the advantages. -> a dict of the batch's tensors, (B, R) unless noted."""
    train_policy, ref_policy, reward_model, train_value = models
    tokens, attention_mask, P = rollout.tokens, rollout.attention_mask, rollout.prompt_len  # (B, P+R)
    response_mask = rollout.response_mask  # (B, R) real tokens up to and including EOS
    rows = cfg.micro_batch_size or len(tokens)  # rows per forward: memory only, the numbers are the same
    def no_grad_forward(fn):
        return torch.cat([fn(tokens[i:i + rows], attention_mask[i:i + rows]) for i in range(0, len(tokens), rows)])
    with torch.no_grad(), ctx:
        # Recompute log π with a full forward (not the sampler's numbers) so old and new log-probs come from the same
        # code path; at step 0 the ratio is then exactly 1.
        old_logprobs = no_grad_forward(lambda t, m: response_logprobs(train_policy, t, m, P, cfg.temperature)[0])
        ref_logprobs = no_grad_forward(lambda t, m: response_logprobs(ref_policy, t, m, P, cfg.temperature)[0])
        old_values = None if train_value is None else no_grad_forward(  # (B, R) V(s_t)
            lambda t, m: response_values(train_value, t, m, P))
        if cfg.gold_reward:  # the labeler in the RM's place (its scores are in [0, 1]; whitening rescales them)
            scores = torch.tensor(list(map(labeler.score, batch_prompts, texts)), device=tokens.device)  # (B,)
        else:
            scores = no_grad_forward(lambda t, m: score(reward_model, t, m)).float()  # (B,) r(x, y) at the end
    # N+ details "EOS trick": a response cut off before end-of-text gets a fixed low score.
    has_eos = ((tokens[:, P:] == eot_id) & response_mask).any(1)  # (B,)
    scores = torch.where(has_eos, scores, torch.full_like(scores, cfg.no_eos_score))
    # the RL reward: optionally whitened over the (global) batch (the logs keep the raw scores, the RM's view)
    rl_scores = masked_whiten(scores, torch.ones_like(scores)) if cfg.whiten_rewards else scores
    rewards, kl = compute_rewards(rl_scores, old_logprobs, ref_logprobs, response_mask, kl_coef)  # (B, R)
    returns = None
    if train_value is not None:
        advantages, returns = compute_gae(rewards, old_values, response_mask, cfg.gamma, cfg.lam)
    else:  # as in Ahmadian et al.'s RLOO: the sequence's reward, score - β·KL(whole response), is one action's
        advantages = critic_free_advantages(rewards.sum(1), cfg.samples_per_prompt, cfg.advantage)[:, None] \
            * response_mask  # (B, R)
    # N+ details: whitened per batch over real tokens; critic-free too, so that our arms differ in the baseline only
    return {"tokens": tokens, "attention_mask": attention_mask, "P": P, "response_mask": response_mask,
            "old_logprobs": old_logprobs, "old_values": old_values, "returns": returns, "scores": scores, "kl": kl,
            "has_eos": has_eos, "advantages": masked_whiten(advantages, response_mask)}

def ppo_update(cfg, exp, train_policy, train_value, trained, optimizer, shuffle_rng, next_ptx_batch, ctx):
    """Step 5: ppo_epochs passes over the batch, each in n_minibatches shuffled minibatches, one optimizer step per
    minibatch; each step's gradient accumulates over micro-batches of micro_batch_size rows (memory falls, the update
    doesn't). next_ptx_batch is None, or draws PPO-ptx's pretraining batch. -> lists of minibatch stats."""
    tokens, attention_mask, P, response_mask = exp["tokens"], exp["attention_mask"], exp["P"], exp["response_mask"]
    mb_size = cfg.batch_size // cfg.n_minibatches
    micro_size = cfg.micro_batch_size or mb_size
    # the N+ details' metric names, less their "ppo/" prefix; lists of minibatch values (logged null when empty)
    stats = {"ptx_loss": [], "loss/value_avg": [], "val/clipfrac_avg": []}
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(cfg.batch_size, generator=shuffle_rng)
        for start in range(0, cfg.batch_size, mb_size):
            mb = perm[start:start + mb_size]
            n_tokens = response_mask[mb].sum().clamp(min=1)  # the minibatch's real response tokens
            optimizer.zero_grad(set_to_none=True)
            mb_stats = {}
            micro_batches = mb.split(micro_size)
            for i, micro in enumerate(micro_batches):
                last = i == len(micro_batches) - 1  # DDP: sync gradients in each model's last backward
                sync_gradients(train_policy, last and next_ptx_batch is None)
                sync_gradients(train_value, last)
                mb_mask = response_mask[micro]
                # Each loss is a masked mean over the micro-batch; weighted by the micro-batch's share of the
                # minibatch's real tokens, the summed losses (and gradients) are the minibatch's masked means.
                weight = mb_mask.sum() / n_tokens
                with ctx:
                    mb_logprobs, mb_logits = response_logprobs(train_policy, tokens[micro], attention_mask[micro], P,
                                                               cfg.temperature)
                    pg_loss, clipfrac, approxkl = policy_loss(mb_logprobs, exp["old_logprobs"][micro],
                                                              exp["advantages"][micro], mb_mask, cfg.cliprange)
                    loss, micro_stats = pg_loss, {"loss/policy_avg": pg_loss}
                    if train_value is not None:
                        mb_values = response_values(train_value, tokens[micro], attention_mask[micro], P)
                        vf_loss, vf_clipfrac = value_loss(mb_values, exp["old_values"][micro], exp["returns"][micro],
                                                          mb_mask, cfg.cliprange_value)
                        loss = loss + cfg.vf_coef * vf_loss
                        micro_stats.update({"loss/value_avg": vf_loss, "val/clipfrac_avg": vf_clipfrac})
                (loss * weight).backward()
                with torch.no_grad():
                    entropy = -(F.softmax(mb_logits, -1) * F.log_softmax(mb_logits, -1)).sum(-1)  # (micro, R)
                micro_stats.update({"policy/entropy_avg": masked_mean(entropy, mb_mask),
                                    "policy/clipfrac_avg": clipfrac, "policy/approxkl_avg": approxkl})
                for key, v in micro_stats.items():
                    mb_stats[key] = mb_stats.get(key, 0) + v.detach() * weight
            if next_ptx_batch is not None:  # PPO-ptx: keep the pretraining distribution's likelihood up (eq. (2))
                x, y = next_ptx_batch()
                sync_gradients(train_policy, True)  # π's last backward of the minibatch
                with ctx:
                    ptx_loss = lm_loss(train_policy, x, y)
                (cfg.ptx_coef * ptx_loss).backward()
                stats["ptx_loss"].append(ptx_loss.detach())
            # clip each model on its own: the value loss's large early gradients must not shrink π's step
            for model in trained:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            for key, v in mb_stats.items():
                stats.setdefault(key, []).append(v)
    return stats

def batch_metrics(exp, stats, kl_coef, labeler, batch_prompts, texts, world_size):
    """The iteration's logged means (the N+ details' metric names) over the global batch. Each is a mean over this
    process's rollouts, and every process has as many: one all-reduce averages them into the global batch's. The mean
    KL that sets β is one of them, so β is the same on every process, always."""
    scores, kl, response_mask = exp["scores"], exp["kl"], exp["response_mask"]
    means = {"objective/kl": kl.sum(1).mean(), "objective/scores": scores.mean(),
             "objective/rlhf_reward": (scores - kl_coef * kl.sum(1)).mean(),  # the β that built these rewards
             **{f"ppo/{key}": torch.stack(v).mean() for key, v in stats.items() if v},
             "response/length": response_mask.sum(1).float().mean(),
             "response/eos_share": exp["has_eos"].float().mean()}
    if labeler is not None:  # the gold judge's view of the same samples (the policy sees it only with gold_reward)
        means["objective/labeler_score"] = torch.tensor(sum(map(labeler.score, batch_prompts, texts)) / len(texts))
    global_means = all_reduce_sum(torch.stack([v.float().to(scores.device) for v in means.values()])) / world_size
    return dict(zip(means, global_means.tolist()))  # sync point: once per iteration

# ----------------------------------------------------------------------------- config -> models -> data -> loop -> save

def main(cfg: Config) -> dict:
    check_config(cfg)
    has_critic, k = cfg.advantage == "gae", cfg.samples_per_prompt
    rank, world_size, device = setup_distributed(cfg.device)
    master = rank == 0  # rank 0 alone prints, logs, evaluates and saves
    prepare_run_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    set_seed(cfg.seed + rank)
    device, dtype, ctx = setup_device(device, cfg.dtype, cfg.compile)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    policy, ref_policy, reward_model, value_model, tokenizer_name = load_models(cfg, device)
    tokenizer, block_size = get_tokenizer(tokenizer_name), policy.config.block_size

    # -- data
    prompts = load_prompts(cfg.prompts, tokenizer, cfg, block_size)
    val_path = cfg.val_prompts or val_path_for(cfg.prompts)
    val_prompts = load_prompts(val_path, tokenizer, cfg, block_size, limit=cfg.n_eval)
    ptx_path = cfg.ptx_data or os.path.join(os.path.dirname(cfg.prompts), "pretrain_train.jsonl")
    ptx = load_examples(ptx_path, "pretrain", tokenizer, block_size) if cfg.ptx_coef > 0 else []
    labeler = load_labeler(val_path)
    if cfg.gold_reward and labeler is None:
        raise ValueError(f"--gold_reward: no labeler.py beside {val_path}; only a built-in task has a gold judge")
    if master:
        print(f"data: {len(prompts):,} train / {len(val_prompts):,} val prompts" + (f", {len(ptx):,} pretraining "
              f"chunks for PPO-ptx" if ptx else "") + (", labeler found" if labeler else ""))

    # -- optimizer and the state we resume from. One Adam over π and V: their losses are added (vf_coef weighs V).
    trained = [policy] + ([value_model] if has_critic else [])
    optimizer = torch.optim.AdamW([p for m in trained for p in m.parameters()], lr=cfg.lr, eps=1e-5, weight_decay=0.0)
    # which prompts (each process takes its slice of one global draw), which minibatches: the same on every process;
    # the sampler's draws differ per process, so no two sample the same noise
    prompt_rng = torch.Generator().manual_seed(cfg.seed)
    gen_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank)
    rngs = {"prompt_rng": prompt_rng, "gen_rng": gen_rng}
    kl_coef, start_iter = cfg.init_kl_coef, 0
    if cfg.resume:
        kl_coef, start_iter = resume_run(cfg.out_dir, policy, value_model, optimizer, rngs)
        if rank > 0:  # the checkpoint holds rank 0's sampler; the others' follow from seed, rank and iteration, so a
            gen_rng.manual_seed(cfg.seed + 1 + rank + 1000 * start_iter)  # run saved under any N resumes under any N

    # the SFT model's side of every evaluation: the same samples each time, so generated once (or read from cache)
    sft_side = (sft_side_cached(ref_policy, reward_model, tokenizer, val_prompts, cfg, ctx, cfg.sft, cfg.reward)
                if master else None)

    def run_eval(iteration):
        policy.eval()
        result, texts = evaluate(policy, ref_policy, reward_model, tokenizer, val_prompts, labeler, cfg, ctx,
                                 sft_side=sft_side)
        policy.train()
        result["iteration"] = iteration
        log(cfg.out_dir, {"step": iteration, **{f"eval/{k}": v for k, v in result.items()}})
        tqdm.write(f"eval @ {iteration}: " + " | ".join(f"{k} {v:.3f}" for k, v in result.items()
                                                        if isinstance(v, float)))
        save_eval(cfg.out_dir, result, texts, val_prompts)

    # --compile wraps the training forwards; sampling (changing shapes) and saving use the raw modules. Under torchrun
    # DDP wraps the trained models: it averages their gradients over the processes in backward.
    train_policy, train_value = (wrap_ddp(torch.compile(m, dynamic=True) if cfg.compile else m, device)
                                 if m is not None else None for m in (policy, value_model))
    def next_ptx_batch():  # PPO-ptx: this process's slice of one global draw of packed pretraining chunks
        idx = torch.randint(len(ptx), (world_size * cfg.ptx_batch_size,), generator=prompt_rng)
        x, y = make_batch([ptx[i] for i in idx[rank * cfg.ptx_batch_size:(rank + 1) * cfg.ptx_batch_size]],
                          tokenizer.eot_token)
        return x.to(device), y.to(device)
    bar = tqdm(range(start_iter, cfg.n_iters), initial=start_iter, total=cfg.n_iters, desc="ppo", dynamic_ncols=True,
               disable=not master)
    for iteration in bar:
        t0 = time.time()
        if cfg.anneal_lr:  # set from the iteration alone, so --resume picks up the schedule where it stopped
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * (1 - iteration / cfg.n_iters)
        # ------------------------------------------------------------ 1. rollouts
        # batch_size / k prompts, each k times in a row (k = 1 draws exactly the prompts it always did)
        prompt_idx = torch.randint(len(prompts), (world_size * cfg.batch_size // k,), generator=prompt_rng)
        prompt_idx = prompt_idx[rank * cfg.batch_size // k:(rank + 1) * cfg.batch_size // k].repeat_interleave(k)
        batch_prompts = [prompts[i] for i in prompt_idx]
        policy.eval()
        with ctx:
            rollout = generate(policy, [tokenizer.encode_ordinary(p) for p in batch_prompts], cfg.max_new_tokens,
                               temperature=cfg.temperature, eos_id=tokenizer.eot_token, generator=gen_rng,
                               cuda_graph=cfg.cuda_graph, compile_step=cfg.cuda_graph and cfg.compile).trimmed()
        policy.train()
        t_rollout = time.time() - t0
        texts = rollout.texts(tokenizer) if labeler is not None else None  # built-in task: what the labeler reads
        # ------------------------------------------------------------ 2. score, 3. rewards, 4. advantages
        exp = make_experience(cfg, rollout, batch_prompts, texts, (train_policy, ref_policy, reward_model,
                              train_value), labeler, kl_coef, tokenizer.eot_token, ctx)
        # ------------------------------------------------------------ 5. PPO epochs over minibatches
        stats = ppo_update(cfg, exp, train_policy, train_value, trained, optimizer, prompt_rng,
                           next_ptx_batch if ptx else None, ctx)
        # ------------------------------------------------------------ logging (the N+ details' metric names)
        record = {"step": iteration + 1, **{f"ppo/{key}": None for key in stats},
                  **batch_metrics(exp, stats, kl_coef, labeler, batch_prompts, texts, world_size)}
        if cfg.adaptive_kl:  # Ziegler et al. (2019) §2.2, at the pace of all processes' rollouts
            kl_coef = adapt_kl_coef(kl_coef, record["objective/kl"], cfg.target_kl, world_size * cfg.batch_size,
                                    cfg.kl_horizon)
        record.update({"objective/kl_coef": kl_coef, "ppo/lr": optimizer.param_groups[0]["lr"],
                       "ppo/val/explained_variance": explained_variance(exp["returns"], exp["old_values"],
                                                                        exp["response_mask"]).item()
                       if has_critic else None, "time/rollout_s": t_rollout, "time/iteration_s": time.time() - t0,
                       **peak_memory(device)})
        check_finite(f"iteration {iteration + 1}", record)  # before this iteration's model can be saved
        bar.set_postfix_str(f"score {record['objective/scores']:+.2f} | kl {record['objective/kl']:.2f} | "
                            f"β {kl_coef:.3f}"
                            + (f" | gold {record['objective/labeler_score']:.3f}" if labeler else "")
                            + (f" | peak {record['memory/peak_gib']:.1f} GiB" if "memory/peak_gib" in record else ""))
        if not master:
            continue
        if (iteration + 1) % cfg.eval_interval == 0 or iteration + 1 == cfg.n_iters:
            run_eval(iteration + 1)
        log(cfg.out_dir, record)
        if (iteration + 1) % cfg.save_interval == 0 or iteration + 1 == cfg.n_iters:
            save_run(ckpt_path, cfg, tokenizer_name, policy, value_model, optimizer, rngs, kl_coef, iteration + 1)
    bar.close()
    return read_json(os.path.join(cfg.out_dir, "eval.json")) if master else {}  # eval.json is rank 0's

if __name__ == "__main__":
    run(main, Config)
