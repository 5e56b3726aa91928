"""
Tests for model.py: our GPT gives Hugging Face's GPT-2 logits on the same weights (both safetensors layouts, padded
batches), survives an interrupted download, decodes a left-padded batch with the KV cache exactly, and saves and
loads checkpoints safely. Tiny seeded models on CPU; the only network is a local HTTP server on 127.0.0.1.
The reference is `transformers` (a test-only dependency), built and saved inside the tests: no binary fixtures.
    python -m pytest tests/test_model.py -q
"""
import http.server
import json
import os
import shutil
import threading
from dataclasses import asdict

import pytest
import torch

import common
from model import GPT, GPTConfig, KVCache, last_token_scores, load_model, read_safetensors

# ----------------------------------------------------------------------------- helpers: a reference GPT-2 on disk

def hf_gpt2(seed=0, vocab_size=300):
    """A random HF GPT-2 whose weights are scaled up (std 0.2, LayerNorm gains 1 ± 0.2, random biases):
    at GPT-2's own init (std 0.02, zero biases) a swapped bias or an untransposed Conv1D can hide in rounding."""
    transformers = pytest.importorskip("transformers")  # test-only dependency; the other tests run without it
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=vocab_size,
                                     bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1,
                                     attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()  # eval: HF's dropout is 0.1, ours is off
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_ln_gain = ".ln_" in name and name.endswith("weight")
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if is_ln_gain else 0.0))
    return model

def write_safetensors(path, tensors):
    """safetensors by hand: 8-byte little-endian header length, a JSON header (dtype, shape, data_offsets relative
    to the data block), then the raw little-endian fp32 bytes, back to back."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blob = t.detach().float().contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little") + header_bytes + b"".join(blobs))

def safetensors_keys(path):
    with open(path, "rb") as f:
        return set(json.loads(f.read(int.from_bytes(f.read(8), "little")))) - {"__metadata__"}

def save_hub_layout(hf, folder):
    """The file as the hub serves it: no `transformer.` prefix, no lm_head (tied), plus the causal-mask buffer
    `h.{i}.attn.bias` (1, 1, n_positions, n_positions) that old transformers versions saved with the weights."""
    os.makedirs(folder, exist_ok=True)
    hf.config.to_json_file(os.path.join(folder, "config.json"))
    n = hf.config.n_positions
    tensors = {k.removeprefix("transformer."): t for k, t in hf.state_dict().items() if k != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    return folder

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One HF GPT-2, saved in both layouts, plus a batch of ids to compare on."""
    hf = hf_gpt2()
    pretrained_dir = str(tmp_path_factory.mktemp("save_pretrained"))
    hf.save_pretrained(pretrained_dir, safe_serialization=True)
    hub_dir = save_hub_layout(hf, str(tmp_path_factory.mktemp("hub")))
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf(idx).logits
    return dict(hf=hf, dirs={"save_pretrained": pretrained_dir, "hub": hub_dir}, idx=idx, hf_logits=hf_logits)

def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16), **overrides})
    return GPT(config).eval()

def left_pad(prompts, total_len):
    """Ragged prompts -> (B, total_len) ids and a bool mask, padded on the left (as N+ details pads queries)."""
    idx = torch.zeros(len(prompts), total_len, dtype=torch.long)
    is_real = torch.zeros(len(prompts), total_len, dtype=torch.bool)
    for row, p in enumerate(prompts):
        idx[row, total_len - len(p):] = torch.tensor(p)
        is_real[row, total_len - len(p):] = True
    return idx, is_real

def make_ckpt(model, kind="policy"):
    return {"kind": kind, "model_config": asdict(model.config), "model": model.state_dict(),
            "tokenizer": "bytes", "step": 7, "config": {"lr": 3e-4}}

def one_line_error(excinfo, *must_name):
    message = str(excinfo.value)
    assert "\n" not in message, f"error spans several lines: {message!r}"
    for text in must_name:
        assert text in message, f"{text!r} not named in {message!r}"

# ----------------------------------------------------------------------------- parity with transformers

@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
def test_logits_match_transformers_gpt2_in_both_safetensors_layouts(reference, layout):
    """GPT-2 (Radford et al. 2019) as HF runs it: Conv1D weights stored [in, out], tanh GELU, LayerNorm eps 1e-5,
    tied lm_head. save_pretrained writes `transformer.`-prefixed keys without mask buffers; the hub's file has
    no prefix and carries `h.{i}.attn.bias` buffers. Both must load to the same numbers."""
    path = os.path.join(reference["dirs"][layout], "model.safetensors")
    keys = safetensors_keys(path)  # check the fixture really is the layout it claims to be
    assert any(k.startswith("transformer.") for k in keys) == (layout == "save_pretrained")
    assert ("h.0.attn.bias" in keys) == (layout == "hub")
    model = GPT.from_pretrained(reference["dirs"][layout])
    assert not model.training, "from_pretrained returns the model in eval mode (DESIGN contract)"
    with torch.no_grad():
        logits = model(reference["idx"])
    assert logits.shape == reference["hf_logits"].shape
    torch.testing.assert_close(logits, reference["hf_logits"], atol=1e-4, rtol=0)  # fp32, different kernel order

def test_left_padded_batch_matches_transformers_given_position_ids_from_the_mask(reference):
    """N+ details (Huang et al. 2024): left-padded queries need position ids computed from the mask. HF gets them
    explicitly; ours derives them from attention_mask. Only real positions are compared (padding outputs are junk)."""
    model = GPT.from_pretrained(reference["dirs"]["hub"])
    g = torch.Generator().manual_seed(2)
    idx, is_real = left_pad([torch.randint(0, 300, (n,), generator=g).tolist() for n in (12, 5, 9)], 12)
    position_ids = (is_real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(idx, attention_mask=is_real)
        theirs = reference["hf"](idx, attention_mask=is_real.long(), position_ids=position_ids).logits
    torch.testing.assert_close(ours[is_real], theirs[is_real], atol=1e-4, rtol=0)  # fp32, different kernel order

def test_gpt2_sized_model_reads_real_gpt2_tokens_and_text_round_trips(gpt2_tokenizer):
    """The `gpt2` tokenizer is byte-level BPE: decode(encode(x)) == x for any text, and its 50257 ids index a
    GPT-2-vocab model's embedding and come back as (B, T, 50257) logits."""
    enc = gpt2_tokenizer
    assert (enc.n_vocab, enc.eot_token) == (50257, 50256)
    texts = ["Write a happy story about a green frog.", "Naïve café, 日本語 and 🐸!\n\n\tDone."]
    ids = [enc.encode_ordinary(t) for t in texts]
    assert [enc.decode(i) for i in ids] == texts
    T = max(map(len, ids))
    idx = torch.tensor([i + [enc.eot_token] * (T - len(i)) for i in ids])  # right-pad with end-of-text
    model = tiny_gpt(vocab_size=50257, n_layer=1, n_embd=16, block_size=64)
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (2, T, 50257) and torch.isfinite(logits).all()

# ----------------------------------------------------------------------------- download from the hub's URL layout

@pytest.fixture
def local_hub(reference, monkeypatch):
    """A stand-in for huggingface.co on 127.0.0.1 serving `/openai-community/gpt2/resolve/main/{file}`.
    Paths put in `cut_once` get their next response cut off halfway (full Content-Length, then the socket closes)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # urllib would send even loopback to a configured proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    folder = reference["dirs"]["hub"]
    files = {f"/openai-community/gpt2/resolve/main/{name}": open(os.path.join(folder, name), "rb").read()
             for name in ("config.json", "model.safetensors")}
    cut_once = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                return self.send_error(404)
            body = files[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in cut_once:
                cut_once.discard(self.path)
                body = body[:len(body) // 2]
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):  # keep pytest's output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", cut_once
    server.shutdown()
    server.server_close()

def test_gpt2_downloads_from_hub_url_layout_and_matches_transformers(reference, local_hub, tmp_path):
    """`GPT.from_pretrained("gpt2")` fetches config.json and model.safetensors from the hub's resolve/main URLs."""
    base_url, _ = local_hub
    model = GPT.from_pretrained("gpt2", cache_dir=str(tmp_path), base_url=base_url)
    assert sorted(os.listdir(tmp_path / "gpt2")) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        torch.testing.assert_close(model(reference["idx"]), reference["hf_logits"], atol=1e-4, rtol=0)  # as above

def test_interrupted_download_leaves_no_complete_looking_file_and_a_rerun_finishes(reference, local_hub, tmp_path):
    """A dropped connection must not leave a model.safetensors that a later run would trust (bytes go to `.part`,
    renamed only when complete); running again downloads the whole file and loads."""
    base_url, cut_once = local_hub
    cut_once.add("/openai-community/gpt2/resolve/main/model.safetensors")
    with pytest.raises(OSError) as excinfo:
        GPT.from_pretrained("gpt2", cache_dir=str(tmp_path), base_url=base_url)
    one_line_error(excinfo, "model.safetensors")
    assert set(os.listdir(tmp_path / "gpt2")) <= {"config.json", "model.safetensors.part"}
    model = GPT.from_pretrained("gpt2", cache_dir=str(tmp_path), base_url=base_url)
    assert not os.path.exists(tmp_path / "gpt2" / "model.safetensors.part")
    with torch.no_grad():
        torch.testing.assert_close(model(reference["idx"]), reference["hf_logits"], atol=1e-4, rtol=0)  # as above

# ----------------------------------------------------------------------------- KV cache and padding

def test_logits_in_vocabulary_slices_equal_one_gemm_and_train_the_tied_embedding(monkeypatch):
    """On CPU a large vocabulary's logits are computed slice by slice (model.LOGITS_CHUNK): the logits and the
    gradient reaching the tied token embedding are those of the single nn.Linear."""
    import model as model_module
    gpt = tiny_gpt(vocab_size=10_000, n_layer=1, n_embd=16)
    idx = torch.randint(0, 10_000, (3, 7), generator=torch.Generator().manual_seed(0))
    results, default_chunk = [], model_module.LOGITS_CHUNK
    assert 4 * default_chunk < 10_000  # so the first pass takes the sliced path
    for chunk in (default_chunk, 10**9):  # sliced (the default), then one GEMM
        monkeypatch.setattr(model_module, "LOGITS_CHUNK", chunk)
        gpt.zero_grad()
        logits = gpt(idx)
        logits.logsumexp(-1).sum().backward()
        results.append((logits.detach(), gpt.transformer.wte.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=0)

def test_kv_cache_decode_matches_full_forward_on_left_padded_batch():
    """Prefill a left-padded ragged batch into the cache, then feed one token at a time: every real position's
    logits equal one full forward over the whole sequence. This is what lets PPO score rollouts with a single
    forward (N+ details: left padding, position ids from the mask)."""
    model = tiny_gpt()
    g = torch.Generator().manual_seed(3)
    P, N = 7, 5
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (7, 2, 4)]
    prompt_idx, prompt_real = left_pad(prompts, P)
    idx = torch.cat([prompt_idx, torch.randint(0, 50, (3, N), generator=g)], 1)  # (B, P+N), teacher-forced
    is_real = torch.cat([prompt_real, torch.ones(3, N, dtype=torch.bool)], 1)
    with torch.no_grad():
        full = model(idx, attention_mask=is_real)  # (B, P+N, V)
        cache = KVCache(model.config, batch_size=3, max_len=P + N, device="cpu")
        steps = [model(idx[:, :P], attention_mask=is_real, cache=cache, slots=torch.arange(P))]
        for t in range(P, P + N):
            steps.append(model(idx[:, t:t + 1], attention_mask=is_real, cache=cache, slots=torch.tensor([t])))
    cached = torch.cat(steps, 1)
    torch.testing.assert_close(cached[is_real], full[is_real], atol=1e-5, rtol=0)  # fp32, same math, other shapes

def test_left_padded_prompt_gives_the_same_logits_as_the_prompt_alone():
    """Padding must be invisible: masked keys get zero attention and positions restart at 0 at the first real token,
    so a short prompt in a padded batch scores exactly as it does alone."""
    model = tiny_gpt()
    g = torch.Generator().manual_seed(4)
    short, long_ = torch.randint(0, 50, (4,), generator=g).tolist(), torch.randint(0, 50, (11,), generator=g).tolist()
    idx, is_real = left_pad([short, long_], 11)
    with torch.no_grad():
        batched = model(idx, attention_mask=is_real)
        alone = model(torch.tensor([short]))  # no mask at all: the plain causal path
    torch.testing.assert_close(batched[0, -4:], alone[0], atol=1e-5, rtol=0)  # fp32, masked vs is_causal kernel

def test_scalar_head_gives_left_padded_and_unpadded_sequences_the_same_scores_at_every_position():
    """The scalar head reads each token's final state and that of its sequence's previous real token. Left padding
    must stay invisible there too: the first real token has no previous one (as at position 0 alone), not the
    padding slot before it. PPO's value model scores left-padded rollouts at every position."""
    model = tiny_gpt(scalar_head=True)
    torch.nn.init.normal_(model.score_head.weight, std=1.0)  # scores that differ by more than rounding
    g = torch.Generator().manual_seed(5)
    short, long_ = torch.randint(0, 50, (4,), generator=g).tolist(), torch.randint(0, 50, (11,), generator=g).tolist()
    idx, is_real = left_pad([short, long_], 11)
    with torch.no_grad():
        batched = model(idx, attention_mask=is_real)  # (2, 11)
        alone = model(torch.tensor([short]))  # (1, 4)
        assert alone[0].std() > 0.1  # the scores differ, so matching them is not vacuous
        torch.testing.assert_close(batched[0, -4:], alone[0], atol=1e-5, rtol=0)  # fp32, masked vs is_causal kernel
        # and the previous token's state really is read: with the head's first half (h_t) zeroed, the last score
        # still moves when the token before the last changes
        model.score_head.weight[:, :model.config.n_embd] = 0
        changed = torch.tensor([short[:2] + [(short[2] + 1) % 50] + short[3:]])
        assert (model(changed)[0, -1] - model(torch.tensor([short]))[0, -1]).abs() > 1e-3

# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_gives_identical_logits_and_loads_weights_only(tmp_path):
    """DESIGN: ckpt.pt loads with torch.load(weights_only=True) (no pickled code) and rebuilds the same model."""
    model, path = tiny_gpt(), str(tmp_path / "run" / "ckpt.pt")
    common.save_checkpoint(path, make_ckpt(model))
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == "policy" and raw["step"] == 7 and raw["model_config"] == asdict(model.config)
    restored, _ = load_model(str(tmp_path / "run"))  # a run folder works as well as the file
    idx = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(restored(idx), model(idx))  # same weights, same ops: bit-identical
    assert not restored.training

def test_reward_checkpoint_where_policy_expected_is_a_one_line_error(tmp_path):
    """Checkpoints carry their kind (policy / reward / value); mixing them up must say so, not fail later."""
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, make_ckpt(tiny_gpt(scalar_head=True), kind="reward"))
    with pytest.raises(ValueError) as excinfo:
        load_model(path, kind="policy")
    one_line_error(excinfo, path, "reward", "policy")

@pytest.mark.parametrize("mismatch", ["shape", "head"])
def test_checkpoint_whose_weights_do_not_fit_its_config_is_a_one_line_error(tmp_path, mismatch):
    """A state dict from another architecture (wider, or a scalar head where logits are expected) is a clear error."""
    ckpt = make_ckpt(tiny_gpt(n_embd=32) if mismatch == "shape" else tiny_gpt(scalar_head=True))
    ckpt["model_config"] = asdict(tiny_gpt().config)  # claims n_embd=16, lm_head
    with pytest.raises(ValueError) as excinfo:
        GPT.from_checkpoint(ckpt, "out/x/ckpt.pt")
    one_line_error(excinfo, "out/x/ckpt.pt", "model_config")

def corrupt(folder, how):
    """Damage a copy of a hub-layout model.safetensors in one of three ways."""
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    if how == "truncated":
        data = data[:len(data) - 1000]
    elif how == "bad header":
        data = data[:8] + b"{not json" + data[17:]
    elif how == "missing tensor":
        return write_safetensors(path, {k: t for k, t in read_safetensors(path).items() if k != "ln_f.weight"})
    open(path, "wb").write(data)

@pytest.mark.parametrize("how, says", [("truncated", "truncated"), ("bad header", "header"),
                                       ("missing tensor", "'ln_f.weight' missing")])
def test_damaged_safetensors_is_a_one_line_error_naming_the_file(reference, tmp_path, how, says):
    """Half-downloaded or hand-edited weight files fail at load time with the file's name, never load garbage."""
    folder = str(tmp_path / "gpt2")
    shutil.copytree(reference["dirs"]["hub"], folder)
    corrupt(folder, how)
    with pytest.raises(ValueError) as excinfo:
        GPT.from_pretrained(folder)
    one_line_error(excinfo, os.path.join(folder, "model.safetensors"), says)

def test_scalar_head_scores_every_position_and_last_token_ignores_right_padding():
    """InstructGPT §3.5: the reward model is the LM with a scalar head; its score is read at the last real token.
    More right padding must not change which token that is (trl #1893 read a padding slot)."""
    model = tiny_gpt(scalar_head=True)
    seq = torch.randint(0, 50, (5,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        alone = model(seq[None])  # (1, 5)
        assert alone.shape == (1, 5)
        for pad in (0, 1, 6):
            idx = torch.cat([seq, torch.zeros(pad, dtype=torch.long)])[None].repeat(2, 1)  # (2, 5 + pad)
            is_real = idx.new_ones(idx.shape, dtype=torch.bool)
            is_real[:, 5:] = False
            scores = model(idx, attention_mask=is_real)
            assert scores.shape == (2, 5 + pad)
            torch.testing.assert_close(last_token_scores(scores, is_real), alone[:, -1].expand(2),
                                       atol=1e-5, rtol=0)  # fp32, masked vs is_causal kernel

@pytest.mark.parametrize("scalar_head", [False, True], ids=["lm-head", "scalar-head"])
def test_heads_from_a_position_on_equal_the_full_forward_and_checkpointing_keeps_the_gradients(scalar_head):
    """logits_from=p runs the LM (or scalar) head only at positions p.. (PPO reads a response's log-probs and values
    from P-1 on), with the numbers of the full forward sliced there, on a left-padded batch; and activation
    checkpointing (--grad_checkpoint) recomputes each block in the backward pass without changing a gradient."""
    model = tiny_gpt(scalar_head=scalar_head).train()
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :5] = False
    full = model(idx, attention_mask=mask)
    torch.testing.assert_close(model(idx, attention_mask=mask, logits_from=7), full[:, 7:], atol=1e-6, rtol=0)  # fp32
    grads = []
    for checkpointed in (False, True):
        model.zero_grad()
        model.grad_checkpoint = checkpointed
        model(idx, attention_mask=mask, logits_from=7).float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-7, rtol=0)  # same ops recomputed, dropout is 0
