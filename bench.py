"""
Throughput of what costs time, each next to a baseline measured in the same run on the same inputs. Random weights.
1. Decode: sample.generate (eager step; and captured: a CUDA graph on CUDA, with --captured on CPU the compiled step)
   against a naive loop that re-runs the whole sequence per token and `transformers`' generate with the same weights.
   Ragged prompts of 32-64 tokens, temperature 1, no end-of-text: every method makes the same tokens, prefill included.
2. One PPO iteration (ppo.main's second; the first warms up): seconds and, on CUDA, peak memory. CUDA: four GPT-2 small
   (124M) models, prompts of ~400 tokens, 128-token responses, batch 64 (gpt2 tokenizer: offline, TIKTOKEN_CACHE_DIR
   must hold it, e.g. tests/.cache/tiktoken). CPU: the small model, 64-byte prompts, 32-token responses, batch 8.
    python bench.py                   # CPU: GPT-2-small shape and the small model, batch 1, 8, 32 (~15 min, 2 cores)
    python bench.py --quick           # the small model only, 32 new tokens, small PPO iteration (~1 min)
    python bench.py --device=cuda     # GPT-2 small at batch 1, 8, 64, and the PPO iteration at full size
"""
import importlib.util
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch

import ppo
from common import get_tokenizer, read_jsonl, run, save_checkpoint, setup_device, write_jsonl
from model import GPT, GPTConfig
from sample import generate, left_pad, sample_next

@dataclass
class Config:
    quick: bool = False          # the small model only, 32 new tokens
    device: str = "cpu"          # cuda: GPT-2 small only, batch 1, 8, 64, and the full-size PPO iteration
    new_tokens: int = 64         # per decode call, for every method
    batch_sizes: str = ""        # default: 1,8,32 on CPU, 1,8,64 on CUDA
    captured: bool = False       # CPU: also time the compiled decode step (compiling takes minutes on 2 cores)
    ppo: bool = True             # time a PPO iteration
    repeats: int = 3             # each number is the fastest of this many calls
    threads: int = 0             # torch CPU threads, 0 = torch's default; 1 is faster when other jobs share the cores
    seed: int = 1337

MODELS = {  # name -> shape
    "gpt2-small": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),
    "small": GPTConfig(block_size=256, vocab_size=257, n_layer=4, n_head=4, n_embd=128),
}

@torch.no_grad()
def naive_generate(model, prompts, max_new_tokens, generator):
    """The baseline: no cache. Every step re-runs the whole left-padded batch and samples from the last logits."""
    tokens, attention_mask = (t.to(generator.device) for t in left_pad(prompts, max(map(len, prompts)), 0))
    for _ in range(max_new_tokens):
        next_tokens, _ = sample_next(model(tokens, attention_mask=attention_mask)[:, -1], generator=generator)
        tokens = torch.cat([tokens, next_tokens[:, None]], 1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
    return tokens

def to_hf(model):
    """GPT2LMHeadModel with our weights copied in (HF's Conv1D stores [in, out], hence the transposes)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, layer_norm_epsilon=c.ln_eps, resid_pdrop=0,
                                    embd_pdrop=0, attn_pdrop=0, bos_token_id=None, eos_token_id=None))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = {k: v.t() if k.endswith(conv1d) else v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing), missing
    return hf.to(next(model.parameters()).device).eval()

def hf_generate(hf, prompts, max_new_tokens, generator):
    tokens, attention_mask = left_pad(prompts, max(map(len, prompts)), 0)  # HF reads position ids from the mask
    torch.manual_seed(generator.initial_seed())  # HF draws from the global generator
    return hf.generate(tokens.to(hf.device), attention_mask=attention_mask.to(hf.device), do_sample=True, top_k=0,
                       max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None)

def fastest(call, repeats, device):
    """Seconds of the fastest of `repeats` calls (the least disturbed, as timeit), and the last call's result."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = call()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out

def throughput(fn, model, prompts, new_tokens, device, seed, repeats):
    """New tokens per second over the batch, for the fastest of `repeats` calls after a warm-up call (allocations,
    lazy init, kernel choice, compilation)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    fn(model, prompts, 2, generator)
    seconds, out = fastest(lambda: fn(model, prompts, new_tokens, generator), repeats, device)
    tokens = out.tokens if hasattr(out, "tokens") else out
    assert tokens.shape[1] == max(map(len, prompts)) + new_tokens, "every method must make the same tokens"
    return len(prompts) * new_tokens / seconds

def bench_decode(cfg, device, name, config, has_hf):
    torch.manual_seed(cfg.seed)
    model, on_cuda, N = GPT(config).to(device).eval(), device.startswith("cuda"), 32 if cfg.quick else cfg.new_tokens
    print(f"{name}: {config.n_layer} layers, {config.n_embd} wide, vocab {config.vocab_size:,}, "
          f"{model.num_params() / 1e6:.1f}M params, {N} new tokens")
    ours = {"eager": lambda m, p, n, g: generate(m, p, n, generator=g)}
    if on_cuda or cfg.captured:  # captured = one CUDA graph per call on CUDA, the compiled step on CPU
        ours["captured"] = lambda m, p, n, g: generate(m, p, n, generator=g, cuda_graph=on_cuda,  # noqa: E731
                                                       compile_step=not on_cuda)
    baselines = {"naive": (naive_generate, model)} | ({"HF generate": (hf_generate, to_hf(model))} if has_hf else {})
    for B in map(int, (cfg.batch_sizes or ("1,8,64" if on_cuda else "1,8,32")).split(",")):
        g = torch.Generator().manual_seed(cfg.seed + B)
        prompts = [torch.randint(config.vocab_size, (int(torch.randint(32, 65, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(B)]
        tok_s = {k: throughput(fn, m, prompts, N, device, cfg.seed, cfg.repeats)
                 for k, (fn, m) in ({k: (fn, model) for k, fn in ours.items()} | baselines).items()}
        best = max(tok_s[k] for k in ours)  # the faster of our steps, against each baseline
        print(f"  batch {B:3d} | " + " | ".join(f"{k} {v:8,.0f} tok/s" + (
            f" (ours {best / v:5.2f}x)" if k in baselines else "") for k, v in tok_s.items()), flush=True)

def bench_ppo(cfg, device, folder):
    """Seconds of ppo.main's second iteration, read from its log.jsonl, and its peak memory."""
    on_cuda = device.startswith("cuda")
    shape, (B, P, R) = (MODELS["gpt2-small"], (64, 400, 128)) if on_cuda else (MODELS["small"], (8, 64, 32))
    tokenizer_name = "gpt2" if shape.vocab_size == 50257 else "bytes"
    tokenizer, g = get_tokenizer(tokenizer_name), torch.Generator().manual_seed(cfg.seed)
    for run_name, kind in (("sft", "policy"), ("rm", "reward")):
        model = GPT(replace(shape, scalar_head=kind == "reward"))
        save_checkpoint(os.path.join(folder, run_name, "ckpt.pt"), {"kind": kind, "model_config": asdict(model.config),
                        "model": model.state_dict(), "tokenizer": tokenizer_name, "step": 0, "config": {}})
    low, high = (97, 123) if tokenizer_name == "bytes" else (0, 50000)  # letters, or any GPT-2 token but specials
    for split in ("train", "val"):  # random tokens as text: ~P tokens again once encoded
        write_jsonl(os.path.join(folder, f"prompts_{split}.jsonl"), [
            {"prompt": tokenizer.decode(torch.randint(low, high, (P,), generator=g).tolist())} for _ in range(B)])
    ppo_cfg = ppo.Config(out_dir=os.path.join(folder, "ppo"), sft=os.path.join(folder, "sft"),
                         reward=os.path.join(folder, "rm"), prompts=os.path.join(folder, "prompts_train.jsonl"),
                         skip_long_prompts=True, n_iters=2, batch_size=B, max_new_tokens=R, n_eval=8,
                         eval_interval=100, device=device, cuda_graph=on_cuda)
    ppo.main(ppo_cfg)
    record = [r for r in read_jsonl(os.path.join(ppo_cfg.out_dir, "log.jsonl")) if "time/iteration_s" in r][-1]
    print(f"PPO iteration, {shape.n_layer} layers x {shape.n_embd}, batch {B}, prompts ~{P} tokens, {R} new: "
          f"{record['time/iteration_s']:.2f} s ({record['time/rollout_s']:.2f} s of it rollouts)"
          + (f", peak {record['memory/peak_gib']:.1f} GiB" if "memory/peak_gib" in record else ""))

def main(cfg: Config) -> None:
    device, _, _ = setup_device(cfg.device, "float32")
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    has_hf = importlib.util.find_spec("transformers") is not None  # test-only dependency: else no HF column
    print(f"torch {torch.__version__} | {torch.get_num_threads()} CPU threads | transformers {has_hf}")
    for name in ["small"] if cfg.quick else ["gpt2-small"] if device.startswith("cuda") else MODELS:
        bench_decode(cfg, device, name, MODELS[name], has_hf)
    if cfg.ppo:
        with tempfile.TemporaryDirectory() as folder:
            bench_ppo(cfg, device, folder)

if __name__ == "__main__":
    run(main, Config)
