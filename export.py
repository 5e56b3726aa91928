"""
Export a trained policy (SFT, PPO or DPO: any `kind: policy` checkpoint) as a Hugging Face GPT-2 folder, so the model
can leave nanoInstruct: `config.json` + `model.safetensors`, written by hand in the hub's layout (model.py,
GPT.save_pretrained), which `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads with the same logits.
    python export.py --ckpt=out/gpt2_ppo --out_dir=export/gpt2_ppo
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('export/gpt2_ppo')"
Only policies: a reward or value model is our trunk plus a scalar head that reads two positions (model.py), which
no standard Hugging Face class computes, so exporting one is an error rather than a folder that loads wrong.
The tokenizer is not written. A `gpt2` model uses GPT-2's own (`GPT2TokenizerFast.from_pretrained("gpt2")`, or
tiktoken's "gpt2"). A byte-level model (the built-in task) says so in config.json, `"nanoinstruct_tokenizer": "bytes"`:
its ids are the UTF-8 bytes, 0-255, and 256 is <|endoftext|> (common.get_tokenizer("bytes")).
"""
import os
from dataclasses import dataclass

from common import load_checkpoint, run
from model import GPT

@dataclass
class Config:
    ckpt: str = "out/ppo"        # a policy checkpoint: a ckpt.pt, or the run folder holding one
    out_dir: str = "export/ppo"  # the Hugging Face folder to write
    overwrite: bool = False      # replace an export already in out_dir

def main(cfg: Config) -> dict:
    ckpt = load_checkpoint(cfg.ckpt)
    if ckpt["kind"] != "policy":
        raise ValueError(f"{cfg.ckpt}: is a {ckpt['kind']} checkpoint; only policies export (its scalar head has no "
                         f"standard Hugging Face equivalent)")
    # Never write over an earlier export without being asked (as a run folder is never overwritten).
    weights_path = os.path.join(cfg.out_dir, "model.safetensors")
    if os.path.exists(weights_path) and not cfg.overwrite:
        raise ValueError(f"{weights_path}: already exists (--overwrite replaces it)")
    model = GPT.from_checkpoint(ckpt, cfg.ckpt)
    model.save_pretrained(cfg.out_dir, tokenizer=ckpt["tokenizer"])
    c = model.config
    print(f"wrote {cfg.out_dir}: GPT-2 layout, {model.num_params():,} parameters ({c.n_layer} layers, {c.n_embd} wide, "
          f"context {c.block_size}), tokenizer {ckpt['tokenizer']}, step {ckpt.get('step')} of {cfg.ckpt}")
    return {"out_dir": cfg.out_dir, "tokenizer": ckpt["tokenizer"], "n_params": model.num_params()}

if __name__ == "__main__":
    run(main, Config)
