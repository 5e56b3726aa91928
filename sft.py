"""
Step 1 of InstructGPT (Ouyang et al. 2022, §3.5 "Supervised fine-tuning"): next-token training.
Two modes share one loop:
  - pretrain: {"text"} rows, loss on every token (this is how we make the "base model" for the built-in task);
  - sft:      {"prompt", "response"} rows, loss on response tokens only. The prompt is context, not something
              to imitate, and the response ends with end-of-text, which is in the loss, so the model learns to stop.
    python sft.py --mode=pretrain --data=data/stories/pretrain_train.jsonl --out_dir=out/base
    python sft.py --init=out/base --data=data/stories/sft_train.jsonl --out_dir=out/sft
    torchrun --standalone --nproc_per_node=8 sft.py ...   # several GPUs: DDP, one process each
"""
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (all_reduce_sum, check_finite, check_range, get_lr, get_tokenizer, log, peak_memory, prepare_run_dir,
                    read_jsonl, resume_checkpoint, run, save_checkpoint, set_seed, setup_device, setup_distributed,
                    sync_gradients, val_path_for, wrap_ddp)
from model import GPT, GPTConfig, load_model

@dataclass
class Config:
    out_dir: str = "out/sft"
    mode: str = "sft"                 # "sft" (loss on responses) or "pretrain" (loss on every token)
    data: str = "data/stories/sft_train.jsonl"
    val_data: str = ""                # default: data with _train replaced by _val
    init: str = "scratch"             # "scratch", a GPT-2 name (gpt2, gpt2-medium, ...) or a checkpoint / run folder
    tokenizer: str = "bytes"          # only for init=scratch; otherwise the checkpoint says which
    # model shape, only for init=scratch (the built-in task's small byte-level GPT)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    dropout: float = 0.0
    # optimisation
    batch_size: int = 32              # rows per micro-batch, per process
    grad_accum: int = 1               # micro-batches per step; under torchrun with N processes, a step's global
                                      # batch is N * batch_size * grad_accum rows (N=2, b=16 sees what N=1, b=32 does)
    max_steps: int = 600
    lr: float = 1e-3                  # peak lr; use ~1e-5 to fine-tune GPT-2 (InstructGPT SFT: 9.65e-6 for 1.3B)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1         # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    seed: int = 1337
    resume: bool = False              # continue from out_dir/ckpt.pt (same data order, same optimizer state)
    overwrite: bool = False           # replace the run in out_dir (without it or --resume, a saved run is refused)
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False

def check_config(cfg):
    """Every setting's range and every input file, checked before anything runs: one place, so new keys go here."""
    check_range(cfg, ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_steps",
                      "eval_interval", "eval_batches"), 1)
    check_range(cfg, ("lr", "warmup_steps", "weight_decay", "grad_clip"), 0)
    check_range(cfg, ("dropout", "min_lr_ratio"), 0, high=1)
    if cfg.mode not in ("sft", "pretrain"):
        raise ValueError(f"--mode={cfg.mode}: expected 'sft' or 'pretrain'")
    for path in (cfg.data, cfg.val_data or val_path_for(cfg.data)):
        if (path == cfg.data or cfg.val_data) and not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file")

# ----------------------------------------------------------------------------- data: the response-only mask

def encode_example(tokenizer, prompt, response, block_size):
    """Tokens of prompt + response + <|endoftext|>, and how many of them are prompt. encode_ordinary keeps any
    literal "<|endoftext|>" in the data as text. Too long? Keep the end: the response and the recent context."""
    prompt_ids = tokenizer.encode_ordinary(prompt)
    tokens = prompt_ids + tokenizer.encode_ordinary(response) + [tokenizer.eot_token]
    n_cut = max(0, len(tokens) - (block_size + 1))  # +1: inputs and targets are shifted copies
    return tokens[n_cut:], max(0, len(prompt_ids) - n_cut)

def is_too_long(tokenizer, texts, n_tokens):
    """Whether texts, encoded one after another and ended by <|endoftext|>, take more than n_tokens tokens. A token
    is at least one UTF-8 byte, so text that fits in bytes fits in tokens and is not tokenized again."""
    if sum(len(t.encode("utf-8")) for t in texts) + 1 <= n_tokens:
        return False
    return sum(len(tokenizer.encode_ordinary(t)) for t in texts) + 1 > n_tokens

def load_examples(path, mode, tokenizer, block_size):
    """(tokens, n_prompt) per example. Pretraining text has no prompt: the documents are packed into one stream,
    each ended by <|endoftext|>, and cut into context-sized chunks (as GPT-2 and nanoGPT train). Packing wastes no
    compute on padding: the built-in task's stories are 30-110 bytes, and padded batches of them were ~40% padding."""
    if mode == "pretrain":
        stream = []
        for row in read_jsonl(path, ["text"]):
            stream += tokenizer.encode_ordinary(row["text"]) + [tokenizer.eot_token]
        # Chunks start every block_size tokens and so overlap by one: a chunk's last token is the next one's first
        # input, and every token after the first is a target exactly once (a chunk needs two tokens).
        return [(stream[i:i + block_size + 1], 0) for i in range(0, len(stream) - 1, block_size)]
    if mode == "sft":
        rows = read_jsonl(path, ["prompt", "response"])
        n_cut = sum(is_too_long(tokenizer, [r["prompt"], r["response"]], block_size + 1) for r in rows)
        if n_cut:  # never silently: a cut example loses the start of its prompt
            print(f"{path}: cut {n_cut:,} of {len(rows):,} examples to the {block_size}-token context")
        return [encode_example(tokenizer, r["prompt"], r["response"], block_size) for r in rows]
    raise ValueError(f"--mode={mode}: expected 'sft' or 'pretrain'")

def make_batch(examples, pad_id):
    """Right-pad a list of (tokens, n_prompt) into inputs x (B, T) and targets y (B, T). A target is -1 (ignored)
    when it is a prompt token or padding. Padding is found by position, never by token id: pad_id may equal EOS,
    and the EOS that ends a response must stay in the loss."""
    T = max(len(tokens) for tokens, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (tokens, n_prompt) in enumerate(examples):
        seq = torch.tensor(tokens)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, :len(seq) - 1] = seq[1:]
        y[i, :max(0, n_prompt - 1)] = -1  # y[t] predicts token t+1: targets before the first response token are prompt
    return x, y

def lm_loss(model, x, y):
    """Mean next-token cross-entropy over the targets that are not -1: (B, T), (B, T) -> ()."""
    logits = model(x)  # (B, T, V); right padding needs no attention mask under causal attention
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1), ignore_index=-1)

# ----------------------------------------------------------------------------- config -> data -> model -> loop -> save

def main(cfg: Config) -> dict:
    check_config(cfg)
    rank, world_size, device = setup_distributed(cfg.device)
    master = rank == 0  # rank 0 alone prints, logs and saves
    prepare_run_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    set_seed(cfg.seed + rank)  # dropout differs per process; the weights are rank 0's (DDP copies them at wrapping)
    device, dtype, ctx = setup_device(device, cfg.dtype, cfg.compile)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # -- model: from scratch, from GPT-2, or from an earlier stage's checkpoint
    resume_ckpt = resume_checkpoint(cfg.out_dir, ("data_rng", "best_val_loss")) if cfg.resume else None
    if resume_ckpt is not None:
        model, tokenizer_name = GPT.from_checkpoint(resume_ckpt, ckpt_path), resume_ckpt["tokenizer"]
    elif cfg.init == "scratch":
        tokenizer_name = cfg.tokenizer
        model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=get_tokenizer(cfg.tokenizer).n_vocab,
                              n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    else:
        model, init_ckpt = load_model(cfg.init, kind="policy")
        tokenizer_name = init_ckpt["tokenizer"]
    tokenizer = get_tokenizer(tokenizer_name)
    model.to(device).train()
    if master:
        print(f"model: {model.num_params():,} parameters | tokenizer {tokenizer_name} | "
              f"context {model.config.block_size}")

    # -- data
    val_path = cfg.val_data or val_path_for(cfg.data)
    train = load_examples(cfg.data, cfg.mode, tokenizer, model.config.block_size)
    val = load_examples(val_path, cfg.mode, tokenizer, model.config.block_size) if os.path.exists(val_path) else []
    if master:
        if not val:
            print(f"no val file {val_path}: no validation, the last model is kept")
        print(f"data: {len(train):,} train / {len(val):,} val examples ({cfg.mode}) from {cfg.data}")
    # Data order comes from one seeded generator whose state is checkpointed, so --resume replays the same batches.
    # It is the same on every process: each draws the global micro-batch and keeps its own slice of it, so no two
    # processes share a row and N processes of batch b read exactly the rows one process of batch N * b reads.
    data_rng = torch.Generator().manual_seed(cfg.seed)

    def get_batch(examples, generator):
        idx = torch.randint(len(examples), (world_size * cfg.batch_size,), generator=generator)
        idx = idx[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]  # this process's slice
        x, y = make_batch([examples[i] for i in idx], tokenizer.eot_token)
        return x.to(device), y.to(device)

    # -- optimizer (and the state we resume from)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay)
    step, best_val_loss = 0, float("inf")
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        data_rng.set_state(resume_ckpt["data_rng"])
        step, best_val_loss = resume_ckpt["step"], resume_ckpt["best_val_loss"]
        if master:
            print(f"resumed from {ckpt_path} at step {step}" + (" (--max_steps reached: nothing to do)"
                                                                 if step >= cfg.max_steps else ""))
    train_model = torch.compile(model) if cfg.compile else model  # compile wraps the training forward only
    train_model = wrap_ddp(train_model, device)  # several processes: gradients averaged over them in backward

    @torch.no_grad()
    def estimate_val_loss():
        model.eval()
        eval_rng = torch.Generator().manual_seed(cfg.seed + 1)  # the same val batches at every eval
        losses = []
        for _ in range(cfg.eval_batches):
            x, y = get_batch(val, eval_rng)  # this process's slice of the global batch
            n_targets = (y != -1).sum()
            with ctx:  # the batch's mean over all processes' targets: sum of (mean x count), over sum of counts
                total = all_reduce_sum(torch.stack([lm_loss(model, x, y).float() * n_targets, n_targets.float()]))
            losses.append((total[0] / total[1]).item())  # sync point: eval only
        model.train()
        return sum(losses) / len(losses)

    def save():  # everything --resume needs: weights, optimizer, data order, step
        save_checkpoint(ckpt_path, {
            "kind": "policy", "model_config": asdict(model.config), "model": model.state_dict(),
            "tokenizer": tokenizer_name, "step": step, "config": asdict(cfg), "best_val_loss": best_val_loss,
            "optimizer": optimizer.state_dict(), "data_rng": data_rng.get_state()})

    # -- the training loop
    train_loss = float("nan")
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.mode, dynamic_ncols=True, disable=not master)
    while step < cfg.max_steps:
        t0 = time.time()
        lr = get_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The step's loss is the mean over every target token of the global batch (all micro-batches of all
        # processes), as nanochat's SFT normalises it, so it does not depend on how the batch is split: each
        # micro-batch's mean is weighted by its share of the step's targets, times world_size because DDP averages
        # the processes' gradients. One all-reduce of the target count per step, before any backward.
        micro_batches = [get_batch(train, data_rng) for _ in range(cfg.grad_accum)]
        n_targets = all_reduce_sum(sum((y != -1).sum() for _, y in micro_batches))
        step_loss = 0.0
        for micro_step, (x, y) in enumerate(micro_batches):
            sync_gradients(train_model, micro_step == cfg.grad_accum - 1)  # several processes: once per step
            with ctx:
                loss = lm_loss(train_model, x, y) * ((y != -1).sum() * world_size / n_targets)
            loss.backward()
            step_loss += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        train_loss = all_reduce_sum(step_loss).item() / world_size  # sync point: once per step; the global mean
        dt = time.time() - t0
        record = {"step": step, "train/loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_s": int(n_targets) / dt, **peak_memory(device)}  # all processes' tokens
        bar.set_postfix_str(f"loss {train_loss:.3f} | lr {lr:.1e} | {dt * 1000:.0f}ms"
                            + (f" | peak {record['memory/peak_gib']:.1f} GiB" if "memory/peak_gib" in record else ""))
        is_eval = val and (step % cfg.eval_interval == 0 or step == cfg.max_steps)
        if is_eval:
            record["val/loss"] = val_loss = estimate_val_loss()
        check_finite(f"step {step}", record)  # before this step's model can be saved
        if master:  # logged before the save: a kill between the two leaves a line --resume cuts, not a gap
            log(cfg.out_dir, record)
        if is_eval:
            if master:
                tqdm.write(f"step {step}/{cfg.max_steps} | train loss {train_loss:.3f} | val loss {val_loss:.3f}")
            # Keep the best model by validation loss; it carries everything --resume needs.
            if val_loss < best_val_loss:
                best_val_loss = val_loss
                if master:
                    save()
    bar.close()
    if not val and master and (resume_ckpt is None or step > resume_ckpt["step"]):
        save()  # no validation: the last model is the one we keep
    return {"best_val_loss": best_val_loss, "train_loss": train_loss, "step": step}

if __name__ == "__main__":
    run(main, Config)
