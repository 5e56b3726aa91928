"""
Sampling from a policy: a batched KV-cache `generate()` that PPO's rollouts and the evaluation use, and a CLI.
Ragged prompts are left-padded so every row's next token lands in the same cache slot, and position ids come from
the padding mask (N+ details, Huang et al. 2024), so a prompt gets the same tokens in a batch as alone.
    python sample.py --ckpt=out/sft                                   # 4 samples of the default prompt
    python sample.py --init=gpt2 --prompt="The meaning of life is"   # OpenAI's GPT-2 weights
    python sample.py --ckpt=out/ppo --prompt=FILE:data/stories/prompts_val.jsonl --num_samples=1
    python sample.py --ckpt=out/ppo --chat                            # interactive, tokens stream as sampled
    python sample.py --ckpt=out/sft --best_of=8 --reward=out/rm      # best-of-N against the reward model
    python sample.py --ckpt=out/ppo --compare=out/sft                 # same prompts and seed, both models
    echo "Write a sad story about a white cat." | python sample.py --ckpt=out/ppo --prompt=-      # from stdin
--prompt is the exact text that precedes the response (the stories prompts end in a newline: use bash's $'...\\n').
--prompt=FILE:path reads prompts from a file: a .jsonl file gives one prompt per row's "prompt" field (the format
of data/*/prompts_*.jsonl), any other file is one prompt. --prompt=- reads one prompt from standard input (echo's
newline included). An empty --prompt= samples unconditionally, starting from <|endoftext|> as GPT-2's documents
do. Text is printed with errors="replace", since a byte-level model can stop in the middle of a UTF-8 character.
"""
import codecs
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from common import check_range, get_tokenizer, read_jsonl, run, setup_device
from model import KVCache, last_token_scores, load_model

# ----------------------------------------------------------------------------- generate(): the sampler PPO uses

@dataclass
class Generation:
    """What generate() returns. Padding is found through the masks, never by token id (the pad id is eos_id,
    or 0 without one, so it can equal a real token)."""
    tokens: torch.Tensor          # (B, P+N) long: left-padded prompts, then the sampled responses
    attention_mask: torch.Tensor  # (B, P+N) bool: True for real prompt tokens and real response tokens
    response_mask: torch.Tensor   # (B, N) bool: True for sampled tokens up to and including end-of-text
    logprobs: torch.Tensor        # (B, N) float32: log-prob of each sampled token, 0 where response_mask is False
    prompt_len: int               # P: the responses are tokens[:, P:]

    @property
    def responses(self):  # (B, N)
        return self.tokens[:, self.prompt_len:]

    def trimmed(self):
        """The same generation without the trailing columns no row used (every row finished earlier): the static
        cache makes generate() return all N columns, but a forward over them (PPO's log-probs, values, updates)
        costs as much as over real tokens. One host sync, for the longest response's length."""
        R = max(1, int(self.response_mask.sum(1).max()))
        P = self.prompt_len
        return Generation(self.tokens[:, :P + R], self.attention_mask[:, :P + R], self.response_mask[:, :R],
                          self.logprobs[:, :R], P)

    def texts(self, tokenizer):
        """The responses as text, without the end-of-text: what the labeler and a reader see."""
        return [tokenizer.decode(strip_eos(r, m, tokenizer.eot_token), errors="replace")
                for r, m in zip(self.responses, self.response_mask)]

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None, u=None):
    """Draw one token per row: logits (B, V) -> tokens (B,), logprobs (B,). Tensor ops only, no host sync.
    u (B, 1), if given, holds the uniform draws in [0, 1) (generate's decode step takes them as an input).
    The log-prob is under the distribution actually sampled from: temperature-scaled, top-k/top-p renormalised,
    which is what PPO's recomputed log-probs must match (N+ details: "temperature in rollouts and training").
    temperature=0 is greedy (top_k/top_p are moot) and returns the untempered log-softmax of the argmax."""
    logits = logits.float()  # fp32: log-probs in bf16 are too coarse for PPO's ratio exp(new - old)
    if temperature == 0:
        tokens = logits.argmax(-1)  # (B,)
        return tokens, F.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the smallest set of top tokens whose mass reaches top_p,
        # i.e. drop a token when the tokens ranked above it already reach top_p. The top token is always kept.
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_logits.softmax(-1)
        is_dropped_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        is_dropped = is_dropped_sorted.scatter(-1, order, is_dropped_sorted)  # back to vocabulary order
        logits = logits.masked_fill(is_dropped, float("-inf"))
    logprobs = F.log_softmax(logits, dim=-1)  # (B, V), renormalised over the kept tokens
    # Inverse-CDF sampling: one uniform u per row, and the token is the first whose cumulative probability exceeds
    # u * total. Unlike torch.multinomial it never syncs with the host on CUDA, and it needs B random numbers where
    # the Gumbel-max trick needs B*V (much cheaper at GPT-2's vocabulary). u < 1 keeps u * total below the
    # last cumsum, and a zero-probability token adds no width to the CDF, so it is never the first to exceed it.
    cdf = logprobs.exp().cumsum(-1)  # (B, V)
    if u is None:
        u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator)  # (B, 1)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)  # (B,)
    token_logprobs = logprobs.gather(1, tokens[:, None]).squeeze(1)  # (B,)
    if top_k is not None or top_p is not None:
        # That argument is exact for a sequential sum. CUDA's cumsum is a parallel scan whose rounding could, in
        # principle, give a filtered token a sliver of width; such a draw falls back to the most likely token.
        is_slip = token_logprobs == float("-inf")
        tokens = torch.where(is_slip, logprobs.argmax(-1), tokens)
        token_logprobs = torch.where(is_slip, logprobs.max(-1).values, token_logprobs)
    return tokens, token_logprobs

def left_pad(prompts, width, pad_id):
    """Ragged token lists -> tokens (B, width) long, is_real (B, width) bool, prompts right-aligned at prompt_len."""
    P = max(map(len, prompts))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    is_real = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, prompt in enumerate(prompts):  # on the host, once per call; moved to the device in one copy each
        tokens[i, P - len(prompt):P] = torch.tensor(prompt, dtype=torch.long)
        is_real[i, P - len(prompt):P] = True
    return tokens, is_real

def prefill(model, prompt_tokens, prompt_mask, prompt_lengths, cache, dtype, min_rows=8, max_buckets=4):
    """Run the left-padded prompts (B, P) through the model, filling cache slots 0..P-1, and return the logits that
    predict the first new token (B, V). Response slots are still False in the mask, so they stay invisible.
    Padding costs as much compute as real tokens, and prefill is a real share of a generate() call at GPT-2 small,
    batch 32 (docs/experiments.md#speed). So rather than one forward over the whole padded batch, the rows, sorted
    by prompt length, go through in up to max_buckets forwards of at least min_rows rows each, each cut to its own
    longest prompt (bench.py's batch of 32 prompts of 32-64 tokens: 1,544 positions instead of 1,984). A group fills
    a small cache of its own, copied into the big one at its rows. max_buckets=1 is the single padded forward.
    prompt_lengths (B,) is a CPU tensor: the caller knows the lengths on the host, and reading them back from the
    device mask would stall a CUDA stream."""
    B, P = prompt_tokens.shape
    device = prompt_tokens.device
    n_buckets = max(1, min(max_buckets, B // min_rows))
    order = torch.argsort(prompt_lengths)  # (B,) shortest prompts first
    logits = None
    for rows in order.tensor_split(n_buckets):
        width = int(prompt_lengths[rows].max())  # the group's longest prompt: its real tokens end at slot P-1
        rows_on_device = rows.to(device)
        group_cache = KVCache(model.config, len(rows), width, device, dtype)
        group_logits = model(prompt_tokens[rows_on_device, P - width:], cache=group_cache,
                             attention_mask=prompt_mask[rows_on_device, P - width:],
                             slots=torch.arange(width, device=device), last_only=True)[:, -1]  # (b, V)
        cache.k[:, rows_on_device, :, P - width:P] = group_cache.k  # (L, b, H, width, D)
        cache.v[:, rows_on_device, :, P - width:P] = group_cache.v
        if logits is None:
            logits = group_logits.new_empty(B, group_logits.shape[-1])
        logits[rows_on_device] = group_logits
    return logits

CACHE_BUCKET = 64  # generate() sizes its cache to P + N rounded up to a multiple of this (see decode_step)

def sample_into(logits, tokens, attention_mask, logprobs, is_finished, step, u, P, sampling, eos_id, pad_id):
    """Sample token number `step` of every response from logits (B, V) and write it in place: tokens and
    attention_mask (B, S) at column P + step, logprobs (B, N) at column step; then advance step by one. step and P
    are (1,) device tensors. A row that emitted eos_id earlier gets padding (pad_id, masked out, log-prob 0)."""
    next_tokens, next_logprobs = sample_next(logits, *sampling, u=u)  # (B,), (B,)
    is_real = ~is_finished  # decided before this token, so the end-of-text itself is real
    column = step + P  # (1,)
    tokens.index_copy_(1, column, torch.where(is_real, next_tokens, pad_id)[:, None])
    logprobs.index_copy_(1, step, torch.where(is_real, next_logprobs, 0.0)[:, None])
    attention_mask.index_copy_(1, column, is_real[:, None])
    if eos_id is not None:
        is_finished |= next_tokens == eos_id
    step += 1

def decode_step(model, cache, tokens, attention_mask, logprobs, is_finished, step, u, P, sampling, eos_id, pad_id):
    """One decode step for the whole batch: feed the token sampled last (column and cache slot P + step - 1) through
    the model, then sample the next one (sample_into). Every tensor keeps its shape and storage for a whole call, the
    step lives on the device and no host value is read, so torch.compile(decode_step, fullgraph=True) traces it as
    one graph and a CUDA graph can replay it. Cache slots past P + step are masked out and hold nothing yet."""
    slot = step + (P - 1)  # (1,)
    logits = model(tokens.index_select(1, slot), attention_mask=attention_mask, cache=cache, slots=slot)[:, -1]
    sample_into(logits, tokens, attention_mask, logprobs, is_finished, step, u, P, sampling, eos_id, pad_id)

def capture_cuda_graph(run_step, state):
    """Record run_step() once into a CUDA graph and return its replay: one launch per token instead of hundreds of
    small kernels (GPT-2 small's decode is launch-bound). Warm-up runs first, on a side stream (PyTorch's CUDA-graph
    notes: cuBLAS, autocast's cast weights, the allocator); the state it writes is restored. It also writes cache
    slot P (with what the real step writes) and P + 1 (overwritten before any query sees it). Not yet measured on a
    GPU (docs/gpu.md)."""
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_step()
    for t, s in zip(state, saved):
        t.copy_(s)
    return graph.replay

@torch.no_grad()  # not inference_mode: PPO feeds these tensors to forwards that do need grad
def generate(model, prompts, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, eos_id=None,
             generator=None, on_token=None, compile_step=False, cuda_graph=False):
    """Sample max_new_tokens after each prompt (a list of token-id lists, ragged) and return a Generation.
    A row that emits eos_id is finished: its later tokens are padding (pad id = eos_id) and masked out.
    generator must live on the model's device. on_token(tokens (B,), is_real (B,)), if given, is called after
    every step (chat mode streams with it). Runs under the caller's autocast, if any.
    compile_step=True runs decode_step through torch.compile(fullgraph=True); cuda_graph=True (CUDA only) captures
    the step once for this call's batch and cache size and replays it for every token. Both give the eager step's
    tokens and log-probs (tested on CPU for compile); the eager step is the reference."""
    B, N, block_size = len(prompts), max_new_tokens, model.config.block_size
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; start it with at least one token (e.g. end-of-text)")
        if len(prompt) + N > block_size:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={N} that exceeds "
                             f"the model's context of {block_size} tokens")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    P = max(map(len, prompts))
    device = next(model.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {device}")
    pad_id = eos_id if eos_id is not None else 0
    S = min(block_size, -(-(P + N) // CACHE_BUCKET) * CACHE_BUCKET)  # cache slots: P + N rounded up to a bucket
    tokens, attention_mask = (t.to(device) for t in left_pad(prompts, S, pad_id))  # (B, S) each
    logprobs = torch.zeros(B, N, device=device)  # (B, N) float32
    # One cache for the whole call, static shapes. It stores keys/values in the dtype attention computes in:
    # autocast's when the caller enabled it, else the weights'.
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) \
        else next(model.parameters()).dtype
    cache = KVCache(model.config, B, S, device, dtype)
    is_finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    step = torch.zeros(1, dtype=torch.long, device=device)  # (1,) the step index, advanced on the device
    u = torch.zeros(B, 1, device=device)  # (B, 1) each step's uniform draws, written before the step reads them
    state = (tokens, attention_mask, logprobs, is_finished, step, u)
    sampling = (temperature, top_k, top_p)
    step_fn = torch.compile(decode_step, fullgraph=True) if compile_step else decode_step
    # P as a device tensor too, so that a compiled step serves prompts of any length (a Python int is a constant)
    prompt_len = torch.full((1,), P, device=device)
    run_step = lambda: step_fn(model, cache, *state, prompt_len, sampling, eos_id, pad_id)  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        prompt_lengths = torch.tensor([len(prompt) for prompt in prompts])  # (B,) on the host
        logits = prefill(model, tokens[:, :P], attention_mask[:, :P], prompt_lengths, cache, dtype)  # (B, V)
        for t in range(N):
            if temperature > 0:  # drawn outside the step, from the caller's generator, in the step's fixed buffer
                torch.rand(B, 1, device=device, generator=generator, out=u)
            if t == 0:  # the first token comes from the prefill's logits
                sample_into(logits, *state, prompt_len, sampling, eos_id, pad_id)
                if cuda_graph and N > 1:
                    run_step = capture_cuda_graph(run_step, state)
            else:  # decode: the token just sampled goes into cache slot P+t-1; finished rows feed padding, masked
                run_step()
            if on_token is not None:
                on_token(tokens[:, P + t], attention_mask[:, P + t])
            # sync point: every 16 steps we ask the host whether all rows are done, rather than every token.
            if eos_id is not None and t % 16 == 15 and bool(is_finished.all()):
                break  # the remaining columns already hold padding with a False mask
    finally:
        model.train(was_training)
    return Generation(tokens[:, :P + N], attention_mask[:, :P + N], attention_mask[:, P:P + N], logprobs, P)

@torch.no_grad()
def best_of_n(policy, reward_model, prompts, n, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None,
              eos_id=None, generator=None):
    """Best-of-n (rejection sampling against a reward model, as in WebGPT, Nakano et al. 2021 §3; InstructGPT
    itself does not use it): sample n responses per prompt, score each with the reward model at its last real
    token, keep the best. Returns (responses, scores): one token list per prompt without the end-of-text,
    and the chosen responses' scores (B,)."""
    repeated = [prompt for prompt in prompts for _ in range(n)]  # rows i*n .. i*n+n-1 belong to prompt i
    gen = generate(policy, repeated, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eos_id, generator=generator).trimmed()
    scores = last_token_scores(reward_model(gen.tokens, attention_mask=gen.attention_mask), gen.attention_mask)
    best_scores, best = scores.float().view(len(prompts), n).max(1)  # (B,), (B,)
    rows = torch.arange(len(prompts), device=best.device) * n + best  # (B,)
    return [strip_eos(r, m, eos_id) for r, m in zip(gen.responses[rows], gen.response_mask[rows])], best_scores

def strip_eos(response, response_mask, eos_id):
    """One row's response (N,) and mask (N,) -> its real tokens as a list, without the end-of-text."""
    ids = response[response_mask].tolist()  # sync point: once per row, after generation
    return ids[:-1] if ids and ids[-1] == eos_id else ids

# ----------------------------------------------------------------------------- the CLI

@dataclass
class Config:
    ckpt: str = "out/sft"             # the policy: a run folder or its ckpt.pt
    init: str = ""                    # sample from OpenAI's weights instead: gpt2, gpt2-medium, ... or a HF folder
    prompt: str = "Write a happy story about a green frog.\n"  # text, FILE:path, - (stdin), or empty (docstring)
    num_samples: int = 4              # samples per prompt (with --best_of: each the best of best_of draws)
    max_new_tokens: int = 200
    temperature: float = 0.7          # 0 = greedy; 0.7 is what PPO samples and is evaluated at
    top_k: Optional[int] = None       # keep only the k most likely tokens
    top_p: Optional[float] = None     # nucleus sampling: keep the top tokens holding this much probability
    seed: int = 1337
    device: str = "auto"              # auto = cuda > mps > cpu
    dtype: str = "auto"               # auto = bfloat16 on CUDA that supports it, else float32
    batch_size: int = 64              # sequences per generate() call
    chat: bool = False                # interactive: the conversation so far is the prompt; tokens stream as sampled
    best_of: int = 1                  # > 1: sample this many per prompt, print the one the reward model likes most
    reward: str = "out/rm"            # the reward model for --best_of
    compare: str = ""                 # a second checkpoint: same prompts and seed, printed next to the first

def check_config(cfg):
    """Every setting's range, checked before anything runs: one place, so new keys go here."""
    check_range(cfg, ("num_samples", "max_new_tokens", "batch_size", "best_of", "top_k"), 1)
    check_range(cfg, ("temperature",), 0)
    check_range(cfg, ("top_p",), 0, strict=True, high=1)
    if cfg.chat and (cfg.best_of > 1 or cfg.compare):
        raise ValueError("--chat samples one reply at a time: it takes neither --best_of nor --compare")
    if cfg.best_of > 1 and cfg.compare:
        raise ValueError("--best_of with --compare: give one (best-of-N ranks one model's samples)")

def main(cfg: Config) -> dict:
    check_config(cfg)
    device, _, ctx = setup_device(cfg.device, cfg.dtype)
    source = cfg.init or cfg.ckpt
    policy, ckpt = load_model(source, kind="policy")
    tok = get_tokenizer(ckpt["tokenizer"])
    generator = torch.Generator(device=device)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eos_id=tok.eot_token)
    if cfg.chat:
        return chat(policy.to(device), tok, cfg, sampling, generator.manual_seed(cfg.seed), ctx)
    texts = [cfg.prompt]
    if cfg.prompt == "-":  # the prompt from standard input: echo "Write a sad story about a cat." | ... --prompt=-
        texts = [sys.stdin.read()]
    elif cfg.prompt.startswith("FILE:"):
        path = cfg.prompt.removeprefix("FILE:")
        if path.endswith(".jsonl"):
            texts = [row["prompt"] for row in read_jsonl(path, ["prompt"])]
        else:
            with open(path, encoding="utf-8") as f:
                texts = [f.read()]
    if ckpt["tokenizer"] == "bytes" and any(text and not text.endswith("\n") for text in texts):
        # the built-in task's prompts end in a newline, and the stories start after it
        print("hint: the stories prompts end in a newline; without it the model continues the instruction instead "
              "of writing a story (in bash: --prompt=$'Write a happy story about a green frog.\\n')")
    prompts = [tok.encode_ordinary(text) if text else [tok.eot_token] for text in texts]
    decode = lambda ids: tok.decode(ids, errors="replace")  # noqa: E731
    if cfg.best_of > 1:
        reward_model, rm_ckpt = load_model(cfg.reward, kind="reward")
        if rm_ckpt["tokenizer"] != ckpt["tokenizer"]:
            raise ValueError(f"{cfg.reward}: tokenizer {rm_ckpt['tokenizer']!r} differs from {source}'s "
                             f"{ckpt['tokenizer']!r}")
        policy, reward_model = policy.to(device), reward_model.to(device)
        samples, per_call = {source: []}, max(1, cfg.batch_size // cfg.best_of)  # prompts per generate() call
        rows = [i for i in range(len(prompts)) for _ in range(cfg.num_samples)]  # num_samples bests per prompt
        generator.manual_seed(cfg.seed)
        for start in range(0, len(rows), per_call):
            with ctx:
                responses, scores = best_of_n(policy, reward_model, [prompts[i] for i in rows[start:start + per_call]],
                                              cfg.best_of, cfg.max_new_tokens, generator=generator, **sampling)
            for i, response, score in zip(rows[start:], responses, scores.tolist()):  # sync point: printing
                samples[source].append(decode(response))
                print(f"{'-' * 40} best of {cfg.best_of}, reward {score:+.3f}\n{texts[i]}{samples[source][-1]}")
        return {"samples": samples}
    # Plain sampling, from one model or two. Each gets the same seed, so differences come from the weights.
    models = {source: policy} | ({cfg.compare: load_model(cfg.compare, kind="policy")[0]} if cfg.compare else {})
    rows = [prompt for prompt in prompts for _ in range(cfg.num_samples)]  # row r is prompt r // num_samples
    samples = {}
    for name, model in models.items():
        model, samples[name] = model.to(device), []
        generator.manual_seed(cfg.seed)
        for i in range(0, len(rows), cfg.batch_size):
            with ctx:
                gen = generate(model, rows[i:i + cfg.batch_size], cfg.max_new_tokens, generator=generator,
                               **sampling)
            samples[name] += gen.texts(tok)
        model.cpu()  # free the device for the next model
    for r in range(len(rows)):
        print(f"{'=' * 40} prompt {r // cfg.num_samples}, sample {r % cfg.num_samples}\n{texts[r // cfg.num_samples]}")
        for name in models:
            print(f"{'-' * 20} {name}\n{samples[name][r]}" if len(models) > 1 else samples[name][r])
    return {"samples": samples}

def chat(model, tok, cfg, sampling, generator, ctx):
    """Interactive loop. The conversation so far (your lines, each with its newline, and the model's replies
    without their end-of-text) is one prompt, cut from the left to leave room for max_new_tokens."""
    print("chat: type a message; an empty line or Ctrl-D ends the chat")
    history, turns = [], 0
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line:
            break
        history += tok.encode_ordinary(line + "\n")
        reply, decoder = [], codecs.getincrementaldecoder("utf-8")(errors="replace")  # bytes may split characters

        def stream(next_tokens, is_real):  # (1,), (1,)
            token, real = next_tokens.item(), is_real.item()  # sync point: chat streams every token as it comes
            if real and token != tok.eot_token:
                reply.append(token)
                print(decoder.decode(tok.decode_single_token_bytes(token)), end="", flush=True)
        with ctx:
            generate(model, [history[-(model.config.block_size - cfg.max_new_tokens):]], cfg.max_new_tokens,
                     generator=generator, on_token=stream, **sampling)
        print(decoder.decode(b"", final=True))
        history, turns = history + reply, turns + 1
    return {"turns": turns}

if __name__ == "__main__":
    run(main, Config)
