"""
The GPT behind every model in nanoInstruct: the policy, the frozen reference, the reward model and the value model.
It is GPT-2 (Radford et al. 2019) as nanoGPT writes it, plus three things RLHF needs:
  - logits for *every* position (PPO and the reward model read all of them, not just the last);
  - explicit attention masks, position ids and a preallocated KV cache, so a left-padded batch of ragged prompts
    decodes incrementally with the same numbers as one full forward (N+ details, Huang et al. 2024: position ids
    must come from the padding mask);
  - a scalar head variant (one number per position) for the reward and value models (InstructGPT §3.5), which
    reads each token's final state together with that of the token before it (see GPT.__init__).
It loads OpenAI's GPT-2 weights from a Hugging Face `model.safetensors`, parsed by hand (no pickle, no transformers),
and saves a policy back in that layout (export.py).

Glossary of shape letters: B batch, T time (query positions), S key slots (T, or the cache length),
C n_embd, V vocab, H heads, D head dim (C // H).
"""
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from common import atomic_write, download, load_checkpoint, write_json

@dataclass
class GPTConfig:
    block_size: int = 256      # context length (GPT-2: 1024)
    vocab_size: int = 257      # 257 = the byte tokenizer; GPT-2 uses 50257
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0       # 0 for RLHF: log-probs must be deterministic (N+ details: "disable dropout")
    scalar_head: bool = False  # True for reward and value models: one scalar per position instead of logits
    ln_eps: float = 1e-5       # GPT-2's LayerNorm epsilon

LOGITS_CHUNK = 2048  # vocabulary slice per GEMM for logits on CPU (see GPT.forward)

class KVCache:
    """Keys and values of every layer, preallocated once for the whole generation: (L, B, H, S, D).
    Static shapes mean the decode step can be captured by torch.compile / CUDA graphs; new entries are
    written in place at the slots the caller names."""
    def __init__(self, config, batch_size, max_len, device, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x, attn_mask, cache, layer, slots):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            # Write this step's keys/values into their slots, then attend over the whole cache; the mask hides
            # slots that are padding or not yet written.
            k = cache.k[layer].index_copy_(2, slots, k.to(cache.k.dtype))  # (B, H, S, D)
            v = cache.v[layer].index_copy_(2, slots, v.to(cache.v.dtype))
            q = q.to(k.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # the plain causal case (pretraining): lets SDPA pick its fastest kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        elif T == 1 and q.device.type == "cpu":
            # One-token decode on CPU: two plain matmuls beat SDPA's CPU kernel (docs/experiments.md#speed).
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))  # (B, H, 1, S)
            y = att.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1) @ v  # (B, H, 1, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return F.dropout(self.c_proj(y), dropout_p, self.training)

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2 uses the tanh approximation of GELU
        return F.dropout(self.c_proj(x), self.dropout, self.training)

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.ln_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.ln_eps)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, cache, layer, slots):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer, slots)  # pre-LN residual blocks (GPT-2 §2.3)
        return x + self.mlp(self.ln_2(x))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.ln_eps),
        ))
        if config.scalar_head:
            # The reward is read at the response's end-of-text token, but in a causal LM that token's own state has
            # never been trained to judge the response: nothing follows it in pretraining or SFT. The judgement the
            # LM did learn, "is this a good place to stop?", sits in the final state of the token before it, one
            # block too late for the end-of-text token to attend to it. So the head reads both: a linear function of
            # [h_t ; h_prev(t)], prev(t) = the sequence's previous real token. On the built-in task this is what let
            # the RM tell a right sentence count from a wrong one (docs/experiments.md#reward-model).
            self.score_head = nn.Linear(2 * config.n_embd, 1)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.grad_checkpoint = False  # set True by a script's --grad_checkpoint (see forward)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 §2.3: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, attention_mask=None, cache=None, slots=None, last_only=False, logits_from=0):
        """idx (B, T) token ids -> logits (B, T, V), or scores (B, T) with the scalar head.

        attention_mask (B, S) bool, True where the key slot holds a real token (False for left padding). Without
        a cache S = T; with a cache S is the cache length and `slots` (T,) says which cache slots idx fills.
        Or, for packed rows (no cache), attention_mask (B, T, T) bool: which keys each query sees (see below).
        last_only=True returns only the last position's output (B, 1, ...): a sampler's prefill needs no more, and
        at GPT-2's vocabulary the full (B, T, V) logits of a long prompt batch cost more than the trunk.
        logits_from=p returns positions p.. only (B, T - p, ...): PPO reads a response's log-probs and values from
        positions P-1 on, and the LM head over a 500-token prompt would cost ~5x the response's (see lm_logits).
        Position ids are derived from the mask (a token's position = number of real tokens before it), so a
        left-padded prompt gets exactly the positions it would have alone."""
        B, T = idx.shape
        S = cache.k.shape[3] if cache is not None else T
        is_packed = attention_mask is not None and attention_mask.dim() == 3
        if S > self.config.block_size and not is_packed:  # checked on shapes (no host sync), or wpe fails cryptically
            raise ValueError(f"{S} positions exceed the model's context of {self.config.block_size}")
        if slots is None:
            slots = torch.arange(T, device=idx.device)
        if is_packed:
            # Several sequences packed in one row (reward.py: a prompt once, then its K responses). attention_mask
            # (B, T, T) says which keys each query sees, causal order included, and a token's position is the number
            # of keys it sees before itself: each response gets the positions it would have right after the prompt.
            # The packer keeps those positions inside the context.
            attn_mask, pos = attention_mask[:, None], attention_mask.sum(-1) - 1  # (B, 1, T, T), (B, T)
        elif attention_mask is None and cache is None:
            attn_mask, pos = None, slots  # plain causal attention over an unpadded batch
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, S, dtype=torch.bool, device=idx.device)
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, S)
            pos = positions[:, slots]  # (B, T)
            key_slots = torch.arange(S, device=idx.device)
            is_visible = (key_slots[None, :] <= slots[:, None])[None] & attention_mask[:, None, :]  # (B, T, S)
            # A padding query sees no real key; let every query see its own slot so its softmax stays finite.
            is_visible = is_visible | (key_slots[None, :] == slots[:, None])[None]
            attn_mask = is_visible[:, None]  # (B, 1, T, S), broadcast over heads
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled() and cache is None:
                # Activation checkpointing: keep only each block's input and recompute its insides in the backward
                # pass, ~1/3 more compute for a fraction of the activation memory. Same numbers as without.
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, cache, layer, slots, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache, layer, slots)
        start = T - 1 if last_only else logits_from
        if self.config.scalar_head:
            if cache is not None or last_only:
                raise ValueError("a scalar-head model scores whole sequences: no KV cache, no last_only")
            # prev(t): the latest key before t that query t sees (its sequence's previous real token), else none
            earlier = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril(-1)[None, start:]  # (1, T', T)
            if attn_mask is not None:
                earlier = earlier & attn_mask[:, 0, start:]  # (B, T', T): padding and other packed sequences hidden
            prev = torch.where(earlier, torch.arange(T, device=idx.device), -1).amax(-1).expand(B, T - start)
            with torch.autocast(idx.device.type, enabled=False):  # the score in fp32, as every log-prob (DESIGN)
                x = self.transformer.ln_f(x.float())  # (B, T, C)
                x_prev = x.gather(1, prev.clamp(min=0)[..., None].expand(*prev.shape, x.shape[-1]))  # (B, T', C)
                x_prev = x_prev * (prev >= 0)[..., None]  # the first token has no previous one: zeros
                return self.score_head(torch.cat([x[:, start:], x_prev], -1)).squeeze(-1)  # (B, T')
        return self.lm_logits(x[:, start:])  # (B, T', V)

    def lm_logits(self, x):
        """Final-block states (B, T, C) -> logits (B, T, V), in fp32 even under bf16 autocast: ln_f and the LM head
        run with autocast off. bf16 keeps 8 bits of mantissa, so a logit near 100 would be rounded by up to 0.25,
        and every PPO ratio, KL and DPO log-ratio is a difference of log-probs that such rounding drowns (DESIGN,
        "Precision"). The trunk below may stay bf16: its rounding is relative to far smaller activations."""
        with torch.autocast(x.device.type, enabled=False):
            x = self.transformer.ln_f(x.float())
            if x.device.type == "cpu" and self.config.vocab_size > 4 * LOGITS_CHUNK:
                # On CPU, one GEMM 50257 outputs wide ran slower than the same GEMM cut into 2048-wide slices of the
                # vocabulary (docs/experiments.md#speed). Same dot products, so the same logits; at batch 32 the LM
                # head is a large share of a GPT-2-small decode step.
                return torch.cat([F.linear(x, w) for w in self.lm_head.weight.split(LOGITS_CHUNK)], -1)
            return self.lm_head(x)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), eps=1e-8):
        """AdamW with weight decay on matrices only: biases, LayerNorm gains and the like are not decayed
        (as in nanoGPT and GPT-2). The tied embedding counts once."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_checkpoint(cls, ckpt, path="checkpoint"):
        """Rebuild a model from a checkpoint dict (see common.save_checkpoint) and put it in eval mode."""
        known = {f.name for f in fields(GPTConfig)}
        config = GPTConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})
        model = cls(config)
        try:
            missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        except RuntimeError as e:  # shape mismatches raise even with strict=False, one message line per tensor
            first = str(e).splitlines()[1].strip()
            raise ValueError(f"{path}: weights do not fit its model_config ({first}, ...)") from None
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit its model_config (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return model.eval()

    @classmethod
    def from_pretrained(cls, name_or_dir, scalar_head=False, cache_dir=None, base_url=None):
        """OpenAI's GPT-2 (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, downloaded once into cache_dir) or a local
        folder with `model.safetensors` + `config.json` (HF GPT-2 keys). Returns the model in eval mode."""
        if os.path.isdir(name_or_dir):
            folder = name_or_dir
        elif name_or_dir in GPT2_NAMES:
            base_url = base_url or os.environ.get("NANOINSTRUCT_HF_URL", "https://huggingface.co")
            folder = os.path.join(cache_dir or os.path.expanduser("~/.cache/nanoinstruct"), name_or_dir)
            for file in ("config.json", "model.safetensors"):
                download(f"{base_url}/openai-community/{name_or_dir}/resolve/main/{file}", os.path.join(folder, file))
        else:
            raise ValueError(f"{name_or_dir}: not a folder and not one of {', '.join(GPT2_NAMES)}")
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{config_path}: no such file (HF GPT-2 config needed beside model.safetensors)")
        with open(config_path) as f:
            hf = json.load(f)
        if hf.get("activation_function", "gelu_new") != "gelu_new":
            raise ValueError(f"{config_path}: activation_function {hf['activation_function']!r} is not GPT-2's")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], ln_eps=hf.get("layer_norm_epsilon", 1e-5),
                           scalar_head=scalar_head)
        model = cls(config)
        path = os.path.join(folder, "model.safetensors")
        tensors = read_safetensors(path)
        # Two layouts are found in the wild: the hub's (no prefix, with `attn.bias` mask buffers) and
        # save_pretrained's (`transformer.` prefix). Mask buffers and the tied lm_head are not weights here.
        tensors = {k.removeprefix("transformer."): t for k, t in tensors.items()
                   if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for name, param in model.transformer.named_parameters():
                if name not in tensors:
                    raise ValueError(f"{path}: tensor {name!r} missing")
                src = tensors[name].t() if name.endswith(conv1d) else tensors[name]  # HF Conv1D stores [in, out]
                if src.shape != param.shape:
                    raise ValueError(f"{path}: tensor {name!r} has shape {list(src.shape)}, "
                                     f"config.json implies {list(param.shape)}")
                param.copy_(src)
        return model.eval()

    def save_pretrained(self, folder, tokenizer="gpt2"):
        """The mirror of from_pretrained: write a Hugging Face GPT-2 folder (`config.json` + `model.safetensors`,
        hub key names, the four Conv1D weights as [in, out]) that transformers' GPT2LMHeadModel loads as is.
        `tokenizer` is recorded in config.json, since a byte-level model's ids mean nothing to GPT-2's tokenizer."""
        if self.config.scalar_head:
            raise ValueError("a scalar-head (reward or value) model has no standard Hugging Face GPT-2 equivalent")
        eot = 50256 if tokenizer == "gpt2" else 256  # <|endoftext|> in gpt2 and in the byte tokenizer
        c = self.config
        hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
              "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": c.ln_eps,
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
              "initializer_range": 0.02, "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True,
              "nanoinstruct_tokenizer": tokenizer}  # our key: "gpt2", or "bytes" (257 ids, see common.py)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        tensors = {name: p.t() if name.endswith(conv1d) else p for name, p in self.transformer.named_parameters()}
        os.makedirs(folder, exist_ok=True)
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
        write_json(os.path.join(folder, "config.json"), hf)

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

def read_safetensors(path):
    """Parse a .safetensors file: 8-byte little-endian header length, a JSON header mapping each name to
    {dtype, shape, data_offsets (relative to the data block)}, then the raw little-endian bytes."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if size < 8 or header_len > size - 8:
            raise ValueError(f"{path}: bad safetensors header (length {header_len:,} in a {size:,}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: bad safetensors header (not JSON)") from None
        if not isinstance(header, dict) or not all(isinstance(v, dict) and "data_offsets" in v and "shape" in v
                                                   for k, v in header.items() if k != "__metadata__"):
            raise ValueError(f"{path}: bad safetensors header (each tensor needs dtype, shape, data_offsets)")
        data = bytearray(f.read())  # a writable buffer, so torch.frombuffer needs no copy or warning
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        numel = math.prod(info["shape"])
        if end > len(data):
            raise ValueError(f"{path}: truncated (tensor {name!r} ends at byte {end:,} of a {len(data):,}-byte block)")
        if end - start != numel * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - start:,} bytes for shape {info['shape']}")
        tensors[name] = torch.frombuffer(data, dtype=dtype, count=numel, offset=start).view(info["shape"]).float()
    return tensors

def write_safetensors(path, tensors, metadata=None):
    """The writer for read_safetensors' format, all tensors as fp32: the JSON header (padded with spaces to a multiple
    of 8 bytes, as the reference writer does, so the data block stays aligned), then each tensor's little-endian bytes.
    Written atomically (common.atomic_write), like every checkpoint."""
    header, blobs, offset = {"__metadata__": metadata or {}}, [], 0
    for name, t in tensors.items():
        blob = t.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_write(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for blob in blobs:
            f.write(blob)

def load_model(source, kind="policy"):
    """A model from a GPT-2 name, a HF folder, or a nanoInstruct checkpoint (file or run folder).
    Returns (model, ckpt); for GPT-2 weights ckpt is a stub {"kind": "policy", "tokenizer": "gpt2"}."""
    is_run = os.path.isfile(source) or os.path.isfile(os.path.join(source, "ckpt.pt"))
    is_hf = source in GPT2_NAMES or os.path.isfile(os.path.join(source, "model.safetensors"))
    if not (is_run or is_hf):
        raise FileNotFoundError(f"{source}: no checkpoint there (expected a ckpt.pt, a run folder holding one, "
                                f"a folder with model.safetensors, or one of {', '.join(GPT2_NAMES)})")
    if not is_run:
        if kind != "policy":
            raise ValueError(f"{source}: GPT-2 weights are a language model, expected a {kind} checkpoint")
        return GPT.from_pretrained(source), {"kind": "policy", "tokenizer": "gpt2"}
    ckpt = load_checkpoint(source, kind)
    return GPT.from_checkpoint(ckpt, source), ckpt

def disable_dropout(model):
    """Set every dropout probability in model to 0 and return it. N+ details (Huang et al. 2024): RLHF uses no
    dropout in any model, since PPO's ratio and KL compare log-probs of two forwards that must agree; a checkpoint
    trained with --dropout=0.1 would otherwise bring its dropout into the policy's train() forwards."""
    model.config.dropout = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, (CausalSelfAttention, MLP)):
            module.dropout = 0.0
    return model

def token_logprobs(logits, tokens):
    """log π(token) under the distribution the logits define: (B, T, V), (B, T) -> (B, T).
    Computed in fp32: PPO's ratio exp(new - old) is sensitive to bf16 rounding."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

def response_logprobs(model, tokens, attention_mask, P, temperature):
    """log π(a_t) of each response token at the rollout's temperature (N+ details: recomputing at another
    temperature than the one sampled at silently changes the ratio). Returns (B, R) and the logits (B, R, V).
    PPO's and evaluation's log-probs go through here, DPO's through the same pieces: the LM head in fp32
    (GPT.lm_logits), only at the positions that predict response tokens (logits_from), then token_logprobs."""
    logits = model(tokens, attention_mask=attention_mask, logits_from=P - 1)[:, :-1] / temperature  # (B, R, V)
    return token_logprobs(logits, tokens[:, P:]), logits

def response_values(value_model, tokens, attention_mask, P):
    """V(s_t) of the state before each response token: the scalar head at positions P-1 .. T-2, in fp32.
    (B, P+R) -> (B, R)"""
    return value_model(tokens, attention_mask=attention_mask, logits_from=P - 1)[:, :-1]

def last_token_scores(scores, attention_mask):
    """The scalar head's output at each sequence's last real token: (B, T), (B, T) bool -> (B,).
    For a reward model that is the response's end-of-text token, never a padding slot (trl #1893 read padding)."""
    T = attention_mask.shape[1]
    last = (attention_mask.long() * torch.arange(1, T + 1, device=attention_mask.device)).argmax(1)  # (B,)
    return scores.gather(1, last[:, None]).squeeze(1)
