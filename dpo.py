"""
Direct Preference Optimization (Rafailov et al. 2023): the policy learns from the rankings themselves, with no reward
model and no sampling. DPO's insight (§4) is that the KL-regularised RLHF objective that PPO climbs has a closed-form
optimum, π*(y|x) ∝ π_ref(y|x) exp(r(x, y) / β); read backwards, every policy defines an implicit reward
    r(x, y) = β log π(y|x) / π_ref(y|x)   (+ β log Z(x), the same for every response to x, so it cancels in a pair)
and fitting that reward to the rankings with the reward model's own pairwise loss (InstructGPT eq. (1)) is eq. (7):
    L_DPO = -E[log σ(β log π(y_w|x)/π_ref(y_w|x) - β log π(y_l|x)/π_ref(y_l|x))].
So dpo.py is reward.py with the scalar head replaced by that log-ratio: the same preference files, and a K-way ranking
read as its C(K,2) pairs in one batch element (reward.ranking_pairs_loss). π starts as the SFT model, and π_ref is
the SFT model, frozen (DPO §4: π_ref = π_SFT when there is one). The log-probs are computed in fp32 (model.py).
Held-out check: the implicit reward margin (r_w - r_l, mean over prefs_val's pairs) and the share of pairs it orders
as the labeler did; both start at 0 (π = π_ref), and evaluation against SFT is eval.py's, as for PPO.
How ours differs from the paper: Adam with warmup and cosine decay instead of RMSprop at a constant lr, and one pass
over the rankings, as our reward model takes. There is no DDP path yet (single process).
    python dpo.py --sft=out/sft --data=data/stories/prefs_train.jsonl --out_dir=out/dpo
"""
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from common import (check_finite, check_range, get_lr, get_tokenizer, log, one_process_only, prepare_run_dir, run,
                    save_checkpoint, set_seed, setup_device, val_path_for)
from model import load_model, token_logprobs
from reward import length_grouped_batches, load_rankings, ranking_pairs_loss
from sft import encode_example, make_batch

@dataclass
class Config:
    out_dir: str = "out/dpo"
    sft: str = "out/sft"              # the SFT policy: initialises π and is the frozen reference π_ref
    data: str = "data/stories/prefs_train.jsonl"   # the reward model's rankings (or chosen/rejected pairs)
    val_data: str = ""                # default: data with _train replaced by _val (the held-out pairs)
    beta: float = 0.1                 # DPO's β, the KL coefficient of the objective it solves (the paper's usual 0.1)
    batch_size: int = 8               # rankings per step (each holds K responses and C(K,2) pairs)
    group_by_length: int = 8          # batches per length-sorted group, to cut padding (0 = plain shuffle)
    epochs: int = 1                   # passes over the rankings, as the reward model makes
    lr: float = 2.4e-4                # peak lr: PPO's policy lr, not tuned for DPO; warmup, then cosine decay
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 200          # steps between held-out evals
    n_val: int = 300                  # held-out rankings scored at each eval
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    overwrite: bool = False           # replace the run in out_dir (without it, a saved one is refused)

def check_config(cfg):
    """Every setting's range and every input file, checked before anything runs: one place, so new keys go here."""
    check_range(cfg, ("batch_size", "epochs", "eval_interval", "n_val"), 1)
    check_range(cfg, ("lr", "group_by_length", "warmup_steps", "weight_decay", "grad_clip"), 0)
    check_range(cfg, ("beta",), 0, strict=True)  # β divides the reward in DPO's optimal policy
    for path in (cfg.data, cfg.val_data or val_path_for(cfg.data)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")

# ----------------------------------------------------------------------------- the math (tests import these)

def encode_responses(tokenizer, batch, block_size, device):
    """Every response of a batch of rankings as one right-padded row: inputs x (N, T) and targets y (N, T), -1 on
    prompt and padding (sft.make_batch, the SFT loss mask). N = sum of K, in the batch's order, best first. Also the
    first column where any target is a response token: the columns before it are prompt in every row."""
    examples = [encode_example(tokenizer, prompt, response, block_size) for prompt, ranking in batch
                for response in ranking]
    x, y = make_batch(examples, tokenizer.eot_token)
    start = max(0, min(n_prompt for _, n_prompt in examples) - 1)  # y[t] is token t+1: the first response target
    return x.to(device), y.to(device), start

def sequence_logprobs(model, x, y, start=0):  # (N, T), (N, T) -> (N,)
    """log π(y|x): the sum of the response's token log-probs, its end-of-text included (the policy's choice to stop
    is part of the response, as in PPO). model.py's LM head runs in fp32 (GPT.lm_logits) and token_logprobs too, so
    the log-ratio, a difference of two sums of ~100 log-probs, does not lose its small first steps to bf16 rounding;
    as PPO's response_logprobs does, the head skips the columns before `start`, which are prompt in every row (at
    GPT-2's vocabulary it costs a third of the forward). Right padding needs no attention mask."""
    targets = y[:, start:]  # (N, T - start)
    logprobs = token_logprobs(model(x, logits_from=start), targets.clamp(min=0))  # padding reads id 0, then is masked
    return (logprobs * (targets != -1)).sum(1)

def implicit_rewards(logprobs, ref_logprobs, beta):  # (N,), (N,) -> (N,)
    # DPO eq. (5) without β log Z(x), which cancels in every pair: r(x, y) = β log π(y|x) / π_ref(y|x).
    return beta * (logprobs - ref_logprobs)

def dpo_loss(policy, ref_policy, tokenizer, batch, beta, block_size, device):
    """DPO eq. (7) over all C(K,2) pairs of each ranking, each ranking weighing the same (reward.ranking_pairs_loss).
    Returns the loss and the implicit rewards of every pair's chosen and rejected response, (N,) each."""
    x, y, start = encode_responses(tokenizer, batch, block_size, device)
    logprobs = sequence_logprobs(policy, x, y, start)  # (sum of K,)
    with torch.no_grad():  # π_ref is frozen: no graph, and half the memory
        ref_logprobs = sequence_logprobs(ref_policy, x, y, start)
    return ranking_pairs_loss(implicit_rewards(logprobs, ref_logprobs, beta), batch)

# ----------------------------------------------------------------------------- config -> data -> model -> loop -> save

def main(cfg: Config) -> dict:
    one_process_only("dpo.py")
    check_config(cfg)
    prepare_run_dir(cfg.out_dir, overwrite=cfg.overwrite)
    set_seed(cfg.seed)
    device, dtype, ctx = setup_device(cfg.device, cfg.dtype, cfg.compile)

    # -- the two models: π (trained) and π_ref (frozen), both the SFT model at the start
    policy, sft_ckpt = load_model(cfg.sft, kind="policy")
    ref_policy, _ = load_model(cfg.sft, kind="policy")
    ref_policy.to(device).eval().requires_grad_(False)
    policy.to(device).train()  # dropout is 0 (N+ details), so train() and eval() give the same log-probs
    tokenizer = get_tokenizer(sft_ckpt["tokenizer"])
    block_size = policy.config.block_size
    train_policy = torch.compile(policy) if cfg.compile else policy  # the training forward only

    # -- data: the same files as reward.py reads
    train = load_rankings(cfg.data)
    val = load_rankings(cfg.val_data or val_path_for(cfg.data))[:cfg.n_val]  # an empty file is an error there
    print(f"data: {len(train):,} train / {len(val):,} held-out rankings, K = {sorted({len(r) for _, r in train})}")

    @torch.no_grad()
    def evaluate():
        """The implicit reward margin r_w - r_l, averaged over held-out pairs, and the share of pairs ordered right."""
        policy.eval()
        margins = []
        for i in range(0, len(val), cfg.batch_size):
            with ctx:
                _, r_chosen, r_rejected = dpo_loss(policy, ref_policy, tokenizer, val[i:i + cfg.batch_size],
                                                   cfg.beta, block_size, device)
            margins.append((r_chosen - r_rejected).float())
        policy.train()
        margins = torch.cat(margins)
        return margins.mean().item(), (margins > 0).float().mean().item()  # sync point: eval only

    # -- training: passes over shuffled rankings, cut into length-grouped batches (as in reward.py)
    optimizer = policy.configure_optimizer(cfg.lr, cfg.weight_decay)
    rng = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(len(train), generator=rng) for _ in range(cfg.epochs)]).tolist()
    lengths = [max(len(p) + len(r) for r in ranking) for p, ranking in train]  # characters, a proxy for tokens
    batches = length_grouped_batches(order, lengths, cfg.batch_size, cfg.group_by_length, rng)
    margin_start, accuracy_start = evaluate()  # both 0 while π = π_ref: the baseline the run must beat
    log(cfg.out_dir, {"step": 0, "val/margin": margin_start, "val/accuracy": accuracy_start})
    bar = tqdm(batches, desc="dpo", dynamic_ncols=True)
    for step, batch_idx in enumerate(bar, 1):
        t0 = time.time()
        lr = get_lr(step - 1, cfg.lr, cfg.warmup_steps, len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr
        with ctx:
            loss, r_chosen, r_rejected = dpo_loss(train_policy, ref_policy, tokenizer, [train[i] for i in batch_idx],
                                                  cfg.beta, block_size, device)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        margins = (r_chosen - r_rejected).detach().float()
        # trl's DPO metric names, so curves line up with theirs; sync point: one per step, for the log
        record = {"step": step, "train/loss": loss.item(), "rewards/chosen": r_chosen.mean().item(),
                  "rewards/rejected": r_rejected.mean().item(), "rewards/margins": margins.mean().item(),
                  "rewards/accuracies": (margins > 0).float().mean().item(), "lr": lr, "grad_norm": grad_norm.item()}
        check_finite(f"step {step}", record)
        bar.set_postfix_str(f"loss {record['train/loss']:.3f} | margin {record['rewards/margins']:+.3f} | "
                            f"{(time.time() - t0) * 1000:.0f}ms")
        if step % cfg.eval_interval == 0 or step == len(batches):
            record["val/margin"], record["val/accuracy"] = evaluate()
            tqdm.write(f"step {step}/{len(batches)} | loss {record['train/loss']:.3f} | held-out margin "
                       f"{record['val/margin']:+.3f} | accuracy {record['val/accuracy']:.3f}")
        log(cfg.out_dir, record)
    bar.close()

    # -- save: a policy checkpoint, read by eval.py (and export.py) like sft.py's and ppo.py's
    result = {"val_margin": record["val/margin"], "val_accuracy": record["val/accuracy"],
              "val_margin_start": margin_start, "val_accuracy_start": accuracy_start}
    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
        "kind": "policy", "model_config": asdict(policy.config), "model": policy.state_dict(),
        "tokenizer": sft_ckpt["tokenizer"], "step": len(batches), "config": asdict(cfg),
        "optimizer": optimizer.state_dict(), **result})
    log(cfg.out_dir, {"final": result})
    return result

if __name__ == "__main__":
    run(main, Config)
