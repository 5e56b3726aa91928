"""
Step 2 of InstructGPT (Ouyang et al. 2022, §3.5 "Reward modeling"): a reward model r_θ(x, y) trained on rankings.
It starts from the SFT model with the LM head replaced by a scalar head; the reward of (prompt, response) is the
scalar at the response's end-of-text token. A K-way ranking becomes all C(K,2) (chosen, rejected) pairs, kept
together in one batch element: each response is scored once (K forward passes instead of 2·C(K,2)), and the paper
found that treating the pairs as separate examples over-fits in one epoch. We go one step further: a ranking's K
responses share their prompt, so it is packed into one row and the prompt is run once (encode_rankings).
    python reward.py --init=out/sft --data=data/stories/prefs_train.jsonl --out_dir=out/rm
    torchrun --standalone --nproc_per_node=8 reward.py ...   # several GPUs: DDP, one process each
"""
import itertools
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (all_reduce_sum, check_finite, check_range, get_lr, get_tokenizer, load_labeler, log, peak_memory,
                    prepare_run_dir, read_jsonl, run, save_checkpoint, set_seed, setup_device, setup_distributed,
                    sync_gradients, val_path_for, wrap_ddp)
from model import GPT, last_token_scores, load_model
from sample import generate
from sft import encode_example, is_too_long

@dataclass
class Config:
    out_dir: str = "out/rm"
    init: str = "out/sft"             # the SFT checkpoint the RM starts from (InstructGPT: the 6B SFT model)
    data: str = "data/stories/prefs_train.jsonl"
    val_data: str = ""                # default: data with _train replaced by _val
    sft_data: str = ""                # demonstrations the reward is shifted to average 0 on; default: the
                                      # sft_train.jsonl beside --data (real data never falls back on the stories')
    n_normalize: int = 512            # how many demonstrations to average for that shift
    prompts: str = ""                 # for RM-vs-labeler agreement on fresh SFT samples, when a labeler.py is
                                      # beside them (built-in task only); default: the prompts_val.jsonl beside --data
    n_agreement: int = 128            # prompts sampled for that check (0 = skip)
    batch_size: int = 4               # rankings per step and process (each holds K responses and C(K,2) pairs); under
                                      # torchrun with N processes a step's global batch is N * batch_size rankings
    freeze_layers: int = 1            # the embeddings and this many lowest blocks keep their SFT weights
    group_by_length: int = 8          # batches per length-sorted group, to cut padding (0 = plain shuffle)
    epochs: int = 1                   # InstructGPT trains the RM for one epoch: more over-fits
    max_steps: int = 0                # stop after this many batches (0 = all epochs); run.sh's SMOKE=1 check
    lr: float = 5e-4                  # InstructGPT's 6B RM used 9e-6; our tiny byte model wants far more
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 500          # steps between val-accuracy evals (each scores every val ranking)
    max_new_tokens: int = 128         # response length for the agreement samples
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False             # torch.compile the training forward (evaluation and sampling stay eager)
    micro_batch_size: int = 0         # rankings per forward and backward (0 = the whole batch): changes memory, not
                                      # results (gradients accumulate over a batch's micro-batches)
    grad_checkpoint: bool = False     # recompute each block's activations in the backward pass, to save memory
    overwrite: bool = False           # replace the RM in out_dir (without it, a saved one is refused)

def check_config(cfg):
    """Every setting's range, checked before anything runs: one place, so new keys go here."""
    check_range(cfg, ("n_normalize", "batch_size", "epochs", "eval_interval", "max_new_tokens"), 1)
    check_range(cfg, ("lr", "n_agreement", "freeze_layers", "group_by_length", "warmup_steps", "weight_decay",
                      "grad_clip", "micro_batch_size", "max_steps"), 0)

# ----------------------------------------------------------------------------- the math (tests import these)

def ranking_pairs(k):
    """All C(k,2) (chosen, rejected) index pairs of a ranking listed best first: i < j means i is preferred."""
    return list(itertools.combinations(range(k), 2))

def pairwise_loss(r_chosen, r_rejected):  # (N,), (N,) -> ()
    # InstructGPT eq. (1): loss = -E[log σ(r(x, y_w) - r(x, y_l))]. logsigmoid stays finite for huge margins,
    # where log(sigmoid(.)) would give log(0) = -inf.
    return -F.logsigmoid(r_chosen - r_rejected).mean()

def load_rankings(path):
    """Each row -> (prompt, [responses best first]). Accepts {"prompt","chosen","rejected"} (K = 2) or
    {"prompt","ranking": [best, ..., worst]} (K >= 2)."""
    rankings = []
    for lineno, row in read_jsonl(path, ["prompt"], with_lineno=True):
        if "ranking" in row:
            ranking = row["ranking"]
            if not (isinstance(ranking, list) and len(ranking) >= 2 and all(isinstance(r, str) for r in ranking)):
                raise ValueError(f"{path}:{lineno}: field 'ranking' must be a list of at least 2 strings")
        elif isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
            ranking = [row["chosen"], row["rejected"]]
        else:
            raise ValueError(f"{path}:{lineno}: needs 'chosen' and 'rejected' strings, or a 'ranking' list")
        rankings.append((row["prompt"], ranking))
    return rankings

def encode_for_scoring(tokenizer, prompts, responses, block_size, device):
    """Right-padded (B, T) tokens of prompt + response + <|endoftext|> and their attention mask (B, T). With right
    padding, last_token_scores finds each response's end-of-text token from the mask."""
    seqs = [encode_example(tokenizer, p, r, block_size - 1)[0] for p, r in zip(prompts, responses)]
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), tokenizer.eot_token, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), True
    return tokens.to(device), mask.to(device)

def encode_rankings(tokenizer, batch, block_size, device):
    """Pack each ranking into one row: its prompt once, then its K responses, each ended by <|endoftext|>. A response
    sees the prompt and its own earlier tokens, never another response (the mask), and sits at the positions it
    would have right after the prompt, so it scores exactly as it would alone (encode_for_scoring) while the prompt
    is run once instead of K times: on the built-in task ~half of all positions are prompt. Returns tokens (B, T),
    the mask (B, T, T) of which keys each query sees, and each response's end-of-text as an index into the
    flattened (B * T) row-major positions, (sum of K,). Too long? As encode_example, keep the end: the start of the
    shared prompt is cut so that it and the longest response fit the context."""
    rows, segments, end_rows, end_columns = [], [], [], []
    for i, (prompt, ranking) in enumerate(batch):
        prompt_ids = tokenizer.encode_ordinary(prompt)
        response_ids = [tokenizer.encode_ordinary(r) + [tokenizer.eot_token] for r in ranking]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + max(map(len, response_ids)) - block_size):]
        response_ids = [r[-(block_size - len(prompt_ids)):] for r in response_ids]  # a response alone too long
        row, segment = list(prompt_ids), [0] * len(prompt_ids)  # segment 0 = the prompt, k = the k-th response
        for k, r in enumerate(response_ids, 1):
            row, segment = row + r, segment + [k] * len(r)
            end_rows.append(i)
            end_columns.append(len(row) - 1)
        rows.append(row)
        segments.append(segment)
    T = max(map(len, rows))
    tokens = torch.full((len(rows), T), tokenizer.eot_token, dtype=torch.long)
    segment_ids = torch.full((len(rows), T), -1, dtype=torch.long)  # -1 = padding
    for i, (row, segment) in enumerate(zip(rows, segments)):
        tokens[i, :len(row)], segment_ids[i, :len(row)] = torch.tensor(row), torch.tensor(segment)
    ends = torch.tensor(end_rows) * T + torch.tensor(end_columns)  # (sum of K,) into the flattened (B * T)
    segment_ids = segment_ids.to(device)
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]  # (B, T, 1), (B, 1, T)
    is_causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    sees = is_causal & ((key == query) | (key == 0)) & (key >= 0)  # (B, T, T)
    sees |= torch.eye(T, dtype=torch.bool, device=device)  # padding queries see themselves: finite softmax
    return tokens.to(device), sees, ends.to(device)

def score_rankings(reward_model, tokenizer, batch, block_size, device):
    """r_θ(x, y) of every response of a batch of rankings, each ranking packed into one row. -> (sum of K,)"""
    tokens, sees, ends = encode_rankings(tokenizer, batch, block_size, device)
    return reward_model(tokens, attention_mask=sees).flatten()[ends]  # the scalar at each response's end-of-text

def score(reward_model, tokens, attention_mask):
    """r_θ(x, y): the reward model's scalar at each sequence's last real token. (B, T), (B, T) -> (B,)"""
    return last_token_scores(reward_model(tokens, attention_mask=attention_mask), attention_mask)

def ranking_pairs_loss(scores, batch):
    """The pairwise loss over all C(K,2) pairs of each ranking, given every response's score (sum of K,) in the
    batch's order (best first within a ranking). Each ranking weighs the same in the loss, whatever its K (InstructGPT
    eq. (1) has the 1/C(K,2) factor). Returns the loss and r_chosen, r_rejected of every pair the loss saw (N,) each.
    DPO (dpo.py) calls this with its implicit rewards as the scores."""
    losses, chosen, rejected, offset = [], [], [], 0
    for _, ranking in batch:
        pairs = torch.tensor(ranking_pairs(len(ranking)), device=scores.device) + offset  # (C(K,2), 2)
        # Identical responses in one ranking are ties the labeler could not order: they carry no preference.
        is_tie = torch.tensor([ranking[i] == ranking[j] for i, j in ranking_pairs(len(ranking))], device=scores.device)
        if (~is_tie).any():
            chosen.append(scores[pairs[~is_tie, 0]])
            rejected.append(scores[pairs[~is_tie, 1]])
            losses.append(pairwise_loss(chosen[-1], rejected[-1]))
        offset += len(ranking)
    if not losses:  # a batch of nothing but ties: no preference to learn, a zero loss that still backpropagates
        return scores.sum() * 0, scores[:0], scores[:0]
    return torch.stack(losses).mean(), torch.cat(chosen), torch.cat(rejected)

def ranking_loss(reward_model, tokenizer, batch, block_size, device):
    """Loss, and how many of how many pairs the RM orders as the ranking does, for a batch of rankings: every response
    scored once, then all C(K,2) pairs of each ranking compared (ranking_pairs_loss); accuracy counts pairs."""
    scores = score_rankings(reward_model, tokenizer, batch, block_size, device)  # (sum of K,)
    loss, r_chosen, r_rejected = ranking_pairs_loss(scores, batch)
    return loss, (r_chosen > r_rejected).sum(), len(r_chosen)

def length_grouped_batches(order, lengths, batch_size, group, generator):
    """Cut `order` (a shuffled list of indices) into batches that need less padding: every run of `group` batches'
    worth of indices is sorted by length before it is cut, then all batches are shuffled, so a batch holds
    rankings of similar length but the batch order stays random (HF Trainer's group_by_length does the same).
    Every index lands in exactly one batch. group <= 1 is the plain cut."""
    if group <= 1:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    chunk = batch_size * group
    groups = [sorted(order[i:i + chunk], key=lambda j: lengths[j]) for i in range(0, len(order), chunk)]
    batches = [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

# ----------------------------------------------------------------------------- config -> data -> model -> loop -> save

def main(cfg: Config) -> dict:
    check_config(cfg)
    rank, world_size, device = setup_distributed(cfg.device)
    master = rank == 0  # rank 0 alone prints, logs, normalises and saves
    prepare_run_dir(cfg.out_dir, overwrite=cfg.overwrite)
    set_seed(cfg.seed + rank)
    device, dtype, ctx = setup_device(device, cfg.dtype, cfg.compile)

    # -- the reward model: the SFT trunk, with a fresh scalar head in place of the LM head
    policy, sft_ckpt = load_model(cfg.init, kind="policy")
    tokenizer = get_tokenizer(sft_ckpt["tokenizer"])
    model = GPT(replace(policy.config, scalar_head=True))
    trunk = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head.")}
    model.load_state_dict(trunk, strict=False)  # only score_head.* is new
    # N+ details (Huang et al. 2024) init the head with std 1/sqrt(fan_in + 1) so initial rewards have unit-ish scale.
    torch.nn.init.normal_(model.score_head.weight, std=1 / (model.score_head.in_features + 1) ** 0.5)
    # Only the top blocks train. The lowest one already reads bytes into words for SFT, and a frozen block needs no
    # backward pass, so the RM reads more rankings in its time budget, which is what its accuracy grows with; how
    # many blocks to freeze is measured in docs/experiments.md#reward-model.
    if not 0 <= cfg.freeze_layers < model.config.n_layer:
        raise ValueError(f"--freeze_layers={cfg.freeze_layers}: must leave at least one of the model's "
                         f"{model.config.n_layer} blocks to train")
    if cfg.freeze_layers:
        for module in [model.transformer.wte, model.transformer.wpe, *model.transformer.h[:cfg.freeze_layers]]:
            module.requires_grad_(False)
    model.grad_checkpoint = cfg.grad_checkpoint
    model.to(device).train()
    block_size = model.config.block_size
    if master:
        print(f"parameters: reward model {model.num_params():,}")

    # -- data: every file is read (and checked) now, so that a missing or bad one stops us before training, not
    # after it. Defaults come from --data's folder: a dataset's files sit side by side (DESIGN, prepared data).
    train = load_rankings(cfg.data)
    val_path = cfg.val_data or val_path_for(cfg.data)
    val = load_rankings(val_path)
    for path, rankings in ((cfg.data, train), (val_path, val)):  # never silently: a cut prompt loses its start
        n_cut = sum(any(is_too_long(tokenizer, [p, r], block_size) for r in ranking) for p, ranking in rankings)
        if n_cut:
            print(f"{path}: cut {n_cut:,} of {len(rankings):,} rankings to the {block_size}-token context")
    sft_path = cfg.sft_data or os.path.join(os.path.dirname(cfg.data), "sft_train.jsonl")
    demos = read_jsonl(sft_path, ["prompt", "response"])[:cfg.n_normalize]
    prompts_path = cfg.prompts or os.path.join(os.path.dirname(cfg.data), "prompts_val.jsonl")
    labeler = load_labeler(prompts_path) if cfg.n_agreement > 0 else None  # real data has no gold judge
    agreement_prompts = [r["prompt"] for r in read_jsonl(prompts_path, ["prompt"])][:cfg.n_agreement] if labeler else []
    if master:
        print(f"data: {len(train):,} train / {len(val):,} val rankings, K = {sorted({len(r) for _, r in train})}, "
              f"{len(demos):,} demonstrations to normalise on from {sft_path}")

    @torch.no_grad()
    def evaluate(rankings):
        model.eval()
        rankings = rankings[rank::world_size]  # several processes: each counts its share, the counts are summed
        counts = torch.zeros(2, device=device)  # pairs ordered right, pairs
        for i in range(0, len(rankings), cfg.batch_size):
            with ctx:
                _, batch_correct, batch_pairs = ranking_loss(model, tokenizer, rankings[i:i + cfg.batch_size],
                                                             block_size, device)
            counts += torch.stack([batch_correct.float(), torch.tensor(float(batch_pairs), device=device)])
        n_correct, n_pairs = all_reduce_sum(counts).tolist()  # sync point: eval only
        model.train()
        return n_correct / max(1, n_pairs)  # a share of pairs, counted exactly

    # -- training: one pass over shuffled rankings
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay)
    rng = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(len(train), generator=rng) for _ in range(cfg.epochs)]).tolist()
    # A batch is padded to its longest sequence, so batches are cut from length-sorted groups. Lengths in characters
    # (a proxy for tokens) save tokenizing the data twice: the batches are encoded in ranking_loss.
    lengths = [max(len(p) + len(r) for r in ranking) for p, ranking in train]
    # The batches are cut at the global size, the same on every process (the same seed); each process then takes
    # its own contiguous slice, so N processes of batch b step exactly as one process of batch N * b. A last batch
    # with fewer rankings than processes would leave one with nothing to backpropagate, and is dropped.
    batches = length_grouped_batches(order, lengths, world_size * cfg.batch_size, cfg.group_by_length, rng)
    batches = [batch_idx for batch_idx in batches if len(batch_idx) >= world_size]
    batches = batches[:cfg.max_steps] if cfg.max_steps > 0 else batches
    ddp_model = wrap_ddp(model, device)  # several processes: gradients averaged over them in backward
    # --compile: the training forward only; `model` stays the raw module for evaluation and saving
    train_model = torch.compile(ddp_model, dynamic=True) if cfg.compile else ddp_model

    def n_ranked(batch_idx):  # rankings that carry a preference: the loss is their mean (all ties carry none)
        return sum(len(set(train[i][1])) > 1 for i in batch_idx)

    bar = tqdm(batches, desc="reward", dynamic_ncols=True, disable=not master)
    for step, batch_idx in enumerate(bar, 1):
        t0 = time.time()
        lr = get_lr(step - 1, cfg.lr, cfg.warmup_steps, len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr
        my_idx = batch_idx[rank * len(batch_idx) // world_size:(rank + 1) * len(batch_idx) // world_size]
        # The step's loss is the mean over the global batch's rankings: each micro-batch's mean, weighted by its
        # share of them, times world_size because DDP averages the processes' gradients (1 in one process). Summed
        # over micro-batches, the gradients are those of the whole batch: micro-batching changes memory only.
        # Rankings of identical responses carry no preference (no loss, no accuracy): left out of the forwards, so that
        # no micro-batch is all ties; a process left with none still runs one (zero) backward, as DDP needs of all.
        ranked_idx = [i for i in my_idx if n_ranked([i])] or my_idx
        size = cfg.micro_batch_size or len(ranked_idx)
        micro_batches = [ranked_idx[i:i + size] for i in range(0, len(ranked_idx), size)]
        loss, n_correct, n_pairs = 0.0, 0, 0
        for micro_step, micro_idx in enumerate(micro_batches):
            sync_gradients(ddp_model, micro_step == len(micro_batches) - 1)  # several processes: once per step
            with ctx:
                micro_loss, micro_correct, micro_pairs = ranking_loss(train_model, tokenizer,
                                                                      [train[i] for i in micro_idx], block_size, device)
            micro_loss = micro_loss * (len(micro_idx) * world_size / max(1, n_ranked(batch_idx)))
            micro_loss.backward()
            loss, n_correct, n_pairs = loss + micro_loss.detach(), n_correct + micro_correct, n_pairs + micro_pairs
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the logged loss and accuracy are the global batch's: summed over the processes
        step_loss, n_correct, n_pairs = all_reduce_sum(torch.stack([torch.as_tensor(x, device=device).float() for x in (
            loss / world_size, n_correct, n_pairs)]))
        record = {"step": step, "train/loss": step_loss.item(),
                  "train/accuracy": n_correct.item() / max(1, n_pairs.item()), "lr": lr,
                  **peak_memory(device)}  # sync point
        check_finite(f"step {step}", record)
        bar.set_postfix_str(f"loss {record['train/loss']:.3f} | acc {record['train/accuracy']:.2f} | "
                            f"{(time.time() - t0) * 1000:.0f}ms" + (f" | peak {record['memory/peak_gib']:.1f} GiB"
                                                                    if "memory/peak_gib" in record else ""))
        if step % cfg.eval_interval == 0 or step == len(batches):
            record["val/accuracy"] = evaluate(val)
            if master:
                tqdm.write(f"step {step}/{len(batches)} | loss {record['train/loss']:.3f} | "
                           f"val accuracy {record['val/accuracy']:.3f}")
        if master:
            log(cfg.out_dir, record)
    val_accuracy = record["val/accuracy"]
    model.eval()
    if not master:  # what follows (the bias shift, the agreement check, the checkpoint) is rank 0's
        return {"val_accuracy": val_accuracy}

    # -- normalisation (InstructGPT §3.5): shift the bias so that demonstrations score 0 on average. The loss only
    # sees differences, so the offset is arbitrary; fixing it makes PPO's rewards start near zero.
    with torch.no_grad(), ctx:
        demo_scores = torch.cat([score(model, *encode_for_scoring(tokenizer, [d["prompt"] for d in chunk],
                                                                   [d["response"] for d in chunk], block_size, device))
                                 for chunk in (demos[i:i + 64] for i in range(0, len(demos), 64))])
    reward_shift = demo_scores.float().mean().item()
    with torch.no_grad():
        model.score_head.bias -= reward_shift
    print(f"reward shift {reward_shift:+.3f}: demonstrations now score 0 on average (std {demo_scores.std():.3f})")

    def save(agreement):  # the RM is saved as soon as it is finished, before any extra check that could fail
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
            "kind": "reward", "model_config": asdict(model.config), "model": model.state_dict(),
            "tokenizer": sft_ckpt["tokenizer"], "step": len(batches), "config": asdict(cfg),
            "reward_shift": reward_shift, "val_accuracy": val_accuracy, "labeler_agreement": agreement})
    save(None)

    # -- does the RM agree with the gold labeler on fresh samples from the SFT policy? (built-in task only)
    agreement = None
    if labeler is not None:
        prompts = agreement_prompts
        gen_rng = torch.Generator(device=device).manual_seed(cfg.seed)
        policy.to(device)
        texts = []  # two samples per prompt, compared with each other by the RM and by the labeler
        for _ in range(2):
            with ctx:
                out = generate(policy, [tokenizer.encode_ordinary(p) for p in prompts], cfg.max_new_tokens,
                               eos_id=tokenizer.eot_token, generator=gen_rng)
            texts.append(out.texts(tokenizer))  # sync point: eval only
        with torch.no_grad(), ctx:
            rm = [score(model, *encode_for_scoring(tokenizer, prompts, t, block_size, device)) for t in texts]
        gold = [torch.tensor([labeler.score(p, r) for p, r in zip(prompts, t)]) for t in texts]
        is_decided = gold[0] != gold[1]  # the labeler's ties say nothing about order
        agree = ((rm[0] > rm[1]).cpu() == (gold[0] > gold[1]))[is_decided]
        agreement = agree.float().mean().item() if len(agree) else float("nan")
        print(f"RM agrees with the labeler on {agreement:.1%} of {len(agree)} pairs of fresh SFT samples")
        save(agreement)
    result = {"val_accuracy": val_accuracy, "reward_shift": reward_shift, "labeler_agreement": agreement}
    log(cfg.out_dir, {"final": result})
    return result

if __name__ == "__main__":
    run(main, Config)
