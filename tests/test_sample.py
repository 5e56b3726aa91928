"""
The sampler against obvious references: a loop that re-runs the whole sequence for every token, one prompt at a
time, and a fresh full forward for the log-probs. Tiny seeded models on CPU, no network.
    python -m pytest tests/test_sample.py -q
"""
import io
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sample
from common import get_tokenizer, save_checkpoint
from model import GPT, GPTConfig

PROMPTS = [[5, 17, 200, 3, 9, 44, 12], [101], [7, 7, 7, 60]]  # ragged on purpose: left padding of 0, 6 and 3

def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32), **overrides})
    return GPT(config).eval()

def save_tiny_checkpoint(model, path, kind="policy"):
    """A checkpoint of a tiny byte-level model, as the CLI loads it."""
    save_checkpoint(str(path), dict(kind=kind, model_config=asdict(model.config), model=model.state_dict(),
                                    tokenizer="bytes", step=0, config={}))

def greedy_by_full_recompute(model, prompt, n):
    """The obvious reference: one prompt, no padding, no cache; re-run the whole sequence for every token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(prompt):]

def test_greedy_with_kv_cache_matches_full_recompute_on_ragged_batch():
    """Left padding, mask-derived positions and the cache together give exactly the tokens of a no-cache loop."""
    model = tiny_model()
    gen = sample.generate(model, PROMPTS, 20, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        assert gen.responses[i].tolist() == greedy_by_full_recompute(model, prompt, 20), f"prompt {i}"
    assert gen.response_mask.all() and gen.tokens.shape == (3, 7 + 20) and gen.prompt_len == 7

def test_batch_equals_prompts_one_at_a_time():
    """Padding is invisible: each row's tokens and log-probs are those it gets alone (batch of 1, no padding)."""
    model = tiny_model()
    gen = sample.generate(model, PROMPTS, 12, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        alone = sample.generate(model, [prompt], 12, temperature=0)
        assert gen.responses[i].tolist() == alone.responses[0].tolist()
        torch.testing.assert_close(gen.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=0)  # fp32, padded shapes

def test_prefill_in_length_buckets_equals_one_padded_prefill():
    """Prefilling length-sorted groups of rows, each cut to its own longest prompt, fills the cache and predicts the
    first token as one forward over the whole left-padded batch does (padding slots aside: they stay masked)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(257, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (32,), generator=g)]
    tokens, is_real = sample.left_pad(prompts, 30, 0)
    P = max(map(len, prompts))
    caches = [sample.KVCache(model.config, 32, 40, "cpu") for _ in range(2)]
    with torch.no_grad():
        lengths = torch.tensor([len(prompt) for prompt in prompts])
        one = sample.prefill(model, tokens[:, :P], is_real[:, :P], lengths, caches[0], torch.float32, max_buckets=1)
        bucketed = sample.prefill(model, tokens[:, :P], is_real[:, :P], lengths, caches[1], torch.float32)  # 4 x 8
    torch.testing.assert_close(bucketed, one, atol=1e-5, rtol=0)
    is_filled = is_real[:, :P][None, :, None, :, None]  # (1, B, 1, P, 1): the real prompt slots
    for bucketed_kv, one_kv in ((caches[1].k, caches[0].k), (caches[1].v, caches[0].v)):
        torch.testing.assert_close(bucketed_kv[..., :P, :] * is_filled, one_kv[..., :P, :] * is_filled,
                                   atol=1e-5, rtol=0)
        assert (bucketed_kv[..., P:, :] == 0).all()  # response slots untouched
    # and through generate(): a batch of 32 (4 buckets) still equals its prompts one at a time
    gen = sample.generate(model, prompts, 6, temperature=0)
    for i in (0, 13, 31):
        assert gen.responses[i].tolist() == sample.generate(model, [prompts[i]], 6, temperature=0).responses[0].tolist()

def test_top_k_one_and_tiny_top_p_equal_greedy():
    """top_k=1 and a nucleus of tiny mass both leave only the most likely token, whatever the temperature."""
    model = tiny_model()
    greedy = sample.generate(model, PROMPTS, 10, temperature=0).tokens
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample.generate(model, PROMPTS, 10, temperature=1.5, top_k=1, generator=g).tokens, greedy)
    assert torch.equal(sample.generate(model, PROMPTS, 10, temperature=1.5, top_p=1e-6, generator=g).tokens, greedy)

def test_seeded_sampling_is_reproducible():
    """All randomness flows through the generator: same seed, same tokens; another seed, other tokens."""
    model = tiny_model()
    run = lambda seed: sample.generate(model, PROMPTS, 16, generator=torch.Generator().manual_seed(seed)).tokens
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))

@pytest.mark.parametrize("temperature, top_k", [(0.7, None), (1.3, 5)])
def test_logprobs_match_fresh_full_forward(temperature, top_k):
    """The returned log-probs are those PPO recomputes: log-softmax of logits/temperature (renormalised over the
    top k) from one full forward over prompt + response, at the sampled tokens (N+ details: temperature)."""
    model = tiny_model()
    gen = sample.generate(model, PROMPTS, 16, temperature=temperature, top_k=top_k,
                          generator=torch.Generator().manual_seed(0))
    P = gen.prompt_len
    logits = model(gen.tokens, attention_mask=gen.attention_mask)[:, P - 1:-1] / temperature  # (B, N, V)
    if top_k is not None:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    expected = F.log_softmax(logits, -1).gather(-1, gen.responses[..., None]).squeeze(-1)  # (B, N)
    # 1e-5: fp32 throughout; cache and full forward only sum the same terms in a different order.
    torch.testing.assert_close(gen.logprobs, expected, atol=1e-5, rtol=0)

def test_nothing_after_end_of_text_is_unmasked():
    """Once a row emits end-of-text it is finished: the EOS is in the mask, later tokens are padding, masked,
    with log-prob 0; the attention mask agrees. The EOS is a token row 0 samples at step 3 (same seed)."""
    model = tiny_model()
    free = sample.generate(model, PROMPTS, 24, generator=torch.Generator().manual_seed(3))
    eos = free.responses[0, 3].item()
    gen = sample.generate(model, PROMPTS, 24, eos_id=eos, generator=torch.Generator().manual_seed(3))
    for i in range(len(PROMPTS)):
        response = gen.responses[i].tolist()
        end = response.index(eos) + 1 if eos in response else len(response)  # up to and including the EOS
        assert gen.response_mask[i].tolist() == [True] * end + [False] * (len(response) - end)
        assert response[end:] == [eos] * (len(response) - end) and (gen.logprobs[i, end:] == 0).all()
    assert gen.response_mask[0].sum() <= 4
    assert torch.equal(gen.attention_mask[:, gen.prompt_len:], gen.response_mask)

def test_trimmed_drops_only_columns_no_row_used():
    """PPO trims the static N columns to the longest response before its forwards: nothing real is lost (tokens,
    masks, log-probs, texts), the longest row keeps all of its tokens, and a forward sees the same logits."""
    model, tokenizer = tiny_model(), get_tokenizer("bytes")
    eos = tokenizer.eot_token
    with torch.no_grad():  # end-of-text's logit +4 everywhere: rows end after a few tokens
        w = model.transformer.wte.weight[eos]
        model.transformer.ln_f.bias.add_(w * 4 / w.dot(w))
    gen = sample.generate(model, PROMPTS, 24, eos_id=eos, generator=torch.Generator().manual_seed(0))
    cut = gen.trimmed()
    lengths = gen.response_mask.sum(1).tolist()
    R = max(lengths)
    T = gen.prompt_len + R
    assert cut.response_mask.shape == (3, R) and R < 24  # columns were dropped
    assert cut.response_mask.sum(1).tolist() == lengths and cut.prompt_len == gen.prompt_len
    assert torch.equal(cut.tokens, gen.tokens[:, :T]) and torch.equal(cut.attention_mask, gen.attention_mask[:, :T])
    assert torch.equal(cut.logprobs, gen.logprobs[:, :R])
    assert cut.texts(tokenizer) == gen.texts(tokenizer)
    torch.testing.assert_close(model(cut.tokens, attention_mask=cut.attention_mask),
                               model(gen.tokens, attention_mask=gen.attention_mask)[:, :T], atol=1e-5, rtol=0)

def test_prompt_too_long_or_empty_is_a_clear_error():
    """A prompt that leaves no room for max_new_tokens in the context names itself and the lengths."""
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt 1 has 60 tokens; with max_new_tokens=8 .* context of 64"):
        sample.generate(model, [[1, 2], [3] * 60], 8)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sample.generate(model, [[]], 8)

def test_best_of_n_keeps_the_highest_scoring_sample():
    """Best-of-n returns, per prompt, the sample the reward model scores highest at its last real token."""
    policy, reward_model = tiny_model(0), tiny_model(1, scalar_head=True)
    responses, scores = sample.best_of_n(policy, reward_model, PROMPTS[:2], 4, 8,
                                         generator=torch.Generator().manual_seed(0))
    gen = sample.generate(policy, [p for p in PROMPTS[:2] for _ in range(4)], 8,
                          generator=torch.Generator().manual_seed(0))  # the same draws, all kept
    all_scores = reward_model(gen.tokens, attention_mask=gen.attention_mask)[:, -1].view(2, 4)  # no EOS: last slot
    torch.testing.assert_close(scores, all_scores.max(1).values)
    assert responses[1] == gen.responses[4 + all_scores[1].argmax()].tolist()

def test_cli_samples_compares_and_picks_best_of_n_from_a_checkpoint(tmp_path, capsys):
    """`python sample.py --ckpt=...` prints prompt and text for each sample; --compare and --best_of run too."""
    for kind, seed in (("policy", 0), ("reward", 1)):
        save_tiny_checkpoint(tiny_model(seed, scalar_head=kind == "reward"), tmp_path / kind / "ckpt.pt", kind)
    cfg = sample.Config(ckpt=str(tmp_path / "policy"), prompt="Once upon", num_samples=2, max_new_tokens=30,
                        device="cpu", dtype="float32")
    result = sample.main(cfg)
    samples = result["samples"][cfg.ckpt]
    assert len(samples) == 2 and sum(map(len, samples)) > 0
    assert capsys.readouterr().out.count("Once upon") == 2
    cfg.compare = str(tmp_path / "policy" / "ckpt.pt")  # the same weights under another name
    assert sample.main(cfg)["samples"] == {cfg.ckpt: samples, cfg.compare: samples}  # same seed: same text
    cfg.compare, cfg.best_of, cfg.reward = "", 3, str(tmp_path / "reward")
    assert len(sample.main(cfg)["samples"][cfg.ckpt]) == 2  # --num_samples is honoured: two bests of 3 each
    assert capsys.readouterr().out.count("best of 3, reward") == 2

def test_cli_reads_the_prompt_from_stdin(tmp_path, capsys, monkeypatch):
    """`--prompt=-` samples from the text on standard input exactly as if it had been given inline."""
    save_tiny_checkpoint(tiny_model(), tmp_path / "ckpt.pt")
    cfg = sample.Config(ckpt=str(tmp_path), prompt="Once upon\n", num_samples=2, max_new_tokens=20, device="cpu",
                        dtype="float32")
    inline = sample.main(cfg)["samples"][cfg.ckpt]
    monkeypatch.setattr("sys.stdin", io.StringIO("Once upon\n"))
    cfg.prompt = "-"
    assert sample.main(cfg)["samples"][cfg.ckpt] == inline
    assert capsys.readouterr().out.count("Once upon\n") == 4

def test_chat_streams_the_same_text_generate_returns(tmp_path, capsys, monkeypatch):
    """Chat mode prints each token as it is sampled; the streamed reply is exactly the text generate() returns
    for the conversation so far (the typed line plus its newline). Ctrl-D (EOFError) ends the chat."""
    model = tiny_model()
    save_tiny_checkpoint(model, tmp_path / "ckpt.pt")
    lines = ["Once upon"]
    def fake_input(prompt=""):
        if not lines:
            raise EOFError
        return lines.pop(0)
    monkeypatch.setattr("builtins.input", fake_input)
    cfg = sample.Config(ckpt=str(tmp_path), chat=True, max_new_tokens=20, device="cpu", dtype="float32")
    assert sample.main(cfg) == {"turns": 1}
    tok = sample.get_tokenizer("bytes")
    gen = sample.generate(model, [tok.encode_ordinary("Once upon\n")], 20, temperature=cfg.temperature,
                          eos_id=tok.eot_token, generator=torch.Generator().manual_seed(cfg.seed))
    reply = tok.decode(sample.strip_eos(gen.responses[0], gen.response_mask[0], tok.eot_token), errors="replace")
    assert capsys.readouterr().out.endswith(reply + "\n")

def test_compiled_decode_step_gives_the_eager_tokens_and_log_probs_on_a_ragged_batch(tmp_path, monkeypatch):
    """generate()'s decode step has fixed shapes for a whole call (a bucketed cache; the step index and write slot
    are device tensors; no host value read inside), so torch.compile(decode_step, fullgraph=True) traces it as one
    graph, the form CUDA graphs capture. Compiled (inductor, C++ on CPU) and eager give the same tokens, and
    log-probs within 1e-5 (fp32; inductor fuses the log-softmax's sums in another order). Compiled kernels are
    cached in tests/.cache: the first run compiles for ~30-80 s on 2 cores, later runs load them."""
    pytest.importorskip("torch._inductor", reason="inductor unavailable: torch.compile cannot build the step")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).parent / ".cache" / "inductor"))
    monkeypatch.setattr("torch._inductor.config.compile_threads", 1)  # no worker pool for a few tiny kernels
    model = tiny_model()
    runs = [sample.generate(model, PROMPTS, 12, temperature=0.8, top_k=20, eos_id=256, compile_step=compiled,
                            generator=torch.Generator().manual_seed(1)) for compiled in (False, True)]
    assert torch.equal(runs[1].tokens, runs[0].tokens) and torch.equal(runs[1].response_mask, runs[0].response_mask)
    torch.testing.assert_close(runs[1].logprobs, runs[0].logprobs, atol=1e-5, rtol=0)
    assert runs[0].tokens.shape == (3, 7 + 12) and runs[0].response_mask.any(1).all()
