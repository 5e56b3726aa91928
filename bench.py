"""
Decode throughput of sample.generate (KV cache) next to baselines measured in the same run, on the same batch:
a naive loop that re-runs the whole sequence for every new token (no cache), and, if `transformers` is installed,
GPT2LMHeadModel.generate with the same weights. Random weights, ragged prompts of 32-64 tokens, sampling at
temperature 1 with no end-of-text, so every method makes exactly the same number of tokens.
Throughput = new tokens / wall time of the whole call (prefill included), summed over the batch.
    python bench.py            # GPT-2-small shape and a small model, batch 1, 8, 32 (minutes on a CPU)
    python bench.py --quick    # the small model only, 32 new tokens (seconds)
Then one reward-model training step (reward.py): the scores of 4 rankings of K = 4 responses, forward and backward,
with each ranking packed into one row (its prompt once) against one right-padded sequence per response.
"""
import random
import time
from dataclasses import dataclass, replace

import torch

import reward
from common import get_tokenizer, run, setup_device
from model import GPT, GPTConfig
from sample import generate, left_pad, sample_next

@dataclass
class Config:
    quick: bool = False          # the small model only, 32 new tokens
    device: str = "cpu"          # auto = cuda > mps > cpu
    new_tokens: int = 64
    naive_new_tokens: int = 16   # the naive loop's cost grows ~quadratically: on GPT-2-small at batch >= 8 it and
                                 # our cache are both timed at this many tokens (the ratio shown is at that length)
    batch_sizes: str = "1,8,32"
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
    tokens, attention_mask = left_pad(prompts, max(map(len, prompts)), 0)  # (B, P) each
    tokens, attention_mask = tokens.to(generator.device), attention_mask.to(generator.device)
    for _ in range(max_new_tokens):
        logits = model(tokens, attention_mask=attention_mask)[:, -1]  # (B, V)
        next_tokens, _ = sample_next(logits, generator=generator)  # same sampler as generate(): same work
        tokens = torch.cat([tokens, next_tokens[:, None]], 1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
    return tokens

def to_hf(model):
    """GPT2LMHeadModel with our weights copied in (HF's Conv1D stores [in, out], hence the transposes)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, layer_norm_epsilon=c.ln_eps, resid_pdrop=0,
                                    embd_pdrop=0, attn_pdrop=0, activation_function="gelu_new",
                                    bos_token_id=None, eos_token_id=None))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ours = {k: v.t() if k.endswith(conv1d) else v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.endswith((".attn.bias", ".attn.masked_bias")) for k in missing), missing
    return hf.to(next(model.parameters()).device).eval()

def hf_generate(hf, prompts, max_new_tokens, generator):
    tokens, attention_mask = left_pad(prompts, max(map(len, prompts)), 0)
    torch.manual_seed(generator.initial_seed())  # HF draws from the global generator
    out = hf.generate(tokens.to(hf.device), attention_mask=attention_mask.to(hf.device), do_sample=True, top_k=0,
                      max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None)
    return out

def fastest(call, repeats, device):
    """Seconds taken by the fastest of `repeats` calls of call(), and the last call's result. The fastest call is the
    one least disturbed by whatever else shares the machine (as timeit does); CUDA is synchronised around each."""
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
    """New tokens per second over the batch, for the fastest of `repeats` calls of fn (after a warm-up call on the
    same batch)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    fn(model, prompts, 2, generator)  # warm-up: allocations at this batch's shapes, lazy init, kernel choice
    seconds, out = fastest(lambda: fn(model, prompts, new_tokens, generator), repeats, device)
    tokens = out.tokens if hasattr(out, "tokens") else out
    assert tokens.shape[1] == max(map(len, prompts)) + new_tokens, "every method must make the same tokens"
    return len(prompts) * new_tokens / seconds

def reward_step_ms(scores_of, batches, repeats, device):
    """Milliseconds per forward + backward of one batch of rankings' scores (encoding included, as in training),
    from the fastest of `repeats` passes over all batches, after a warm-up pass."""
    def one_pass():
        for batch in batches:
            scores_of(batch).sum().backward()
    one_pass()  # warm-up
    seconds, _ = fastest(one_pass, repeats, device)
    return seconds / len(batches) * 1000

def bench_reward(cfg, device):
    """Rankings shaped like the built-in task's (prompts 40-70 bytes, responses 20-110), random text, random weights.
    Both ways give the same scores (tests/test_reward.py); packing runs each prompt once instead of K times."""
    rng = random.Random(cfg.seed)
    text = lambda lo, hi: "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(lo, hi)))  # noqa: E731
    batches = [[(text(40, 70) + "\n", [text(20, 110) for _ in range(4)]) for _ in range(4)] for _ in range(20)]
    tokenizer = get_tokenizer("bytes")
    torch.manual_seed(cfg.seed)
    model = GPT(replace(MODELS["small"], scalar_head=True)).to(device).train()
    block_size = model.config.block_size

    def padded(batch):
        prompts, responses = [p for p, r in batch for _ in r], [x for _, r in batch for x in r]
        return reward.score(model, *reward.encode_for_scoring(tokenizer, prompts, responses, block_size, device))

    def packed(batch):
        return reward.score_rankings(model, tokenizer, batch, block_size, device)

    ms = {name: reward_step_ms(fn, batches, cfg.repeats, device)
          for name, fn in (("padded", padded), ("packed", packed))}
    print(f"reward model step, small model, 4 rankings x K=4: padded {ms['padded']:.1f} ms | packed "
          f"{ms['packed']:.1f} ms ({ms['padded'] / ms['packed']:.2f}x)")
    return ms

def main(cfg: Config) -> dict:
    device, _, _ = setup_device(cfg.device, "float32")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"torch {torch.__version__} | {torch.get_num_threads()} CPU threads | ragged prompts of 32-64 tokens")
    try:
        import transformers  # noqa: F401  (test-only dependency: the HF column is skipped without it)
        has_hf = True
    except ImportError:
        has_hf = False
    cached = lambda model, prompts, n, g: generate(model, prompts, n, generator=g)  # noqa: E731
    results = {}
    for name, config in MODELS.items():
        if cfg.quick and name != "small":
            continue
        torch.manual_seed(cfg.seed)
        model = GPT(config).to(device).eval()
        hf = to_hf(model) if has_hf else None
        print(f"{name}: {config.n_layer} layers, {config.n_embd} wide, vocab {config.vocab_size:,}, "
              f"{model.num_params() / 1e6:.1f}M params")
        for B in map(int, cfg.batch_sizes.split(",")):
            g = torch.Generator().manual_seed(cfg.seed + B)
            prompts = [torch.randint(config.vocab_size, (int(torch.randint(32, 65, (1,), generator=g)),),
                                     generator=g).tolist() for _ in range(B)]
            N = 32 if cfg.quick else cfg.new_tokens
            row = {"cache": throughput(cached, model, prompts, N, device, cfg.seed, cfg.repeats)}
            N_naive = cfg.naive_new_tokens if name == "gpt2-small" and B >= 8 and not cfg.quick else N
            cache_at_naive = row["cache"] if N_naive == N else throughput(cached, model, prompts, N_naive, device,
                                                                           cfg.seed, cfg.repeats)
            row["naive"] = throughput(naive_generate, model, prompts, N_naive, device, cfg.seed, cfg.repeats)
            line = (f"  batch {B:3d} | cache {row['cache']:8,.0f} tok/s | naive {row['naive']:7,.0f} tok/s "
                    f"(cache {cache_at_naive / row['naive']:5.1f}x at {N_naive} tokens)")
            if hf is not None:
                row["hf"] = throughput(hf_generate, hf, prompts, N, device, cfg.seed, cfg.repeats)
                line += f" | HF generate {row['hf']:7,.0f} tok/s (cache {row['cache'] / row['hf']:4.2f}x)"
            print(line, flush=True)
            results[(name, B)] = row
    results["reward_step_ms"] = bench_reward(cfg, device)
    return results

if __name__ == "__main__":
    run(main, Config)
