"""
export.py and GPT.save_pretrained: a policy leaves nanoInstruct as a Hugging Face GPT-2 folder that transformers loads
with our logits, and that GPT.from_pretrained reads back unchanged.
    python -m pytest tests/test_export.py -q
"""
import json
from dataclasses import asdict

import pytest
import torch

import export
from common import save_checkpoint
from model import GPT, GPTConfig, read_safetensors


def tiny_policy_checkpoint(path, kind="policy", seed=0):
    """A seeded 2-layer byte-level model with every weight random (biases and LayerNorms too, so a swapped or
    untransposed tensor cannot hide behind a zero or a one)."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32, scalar_head=kind != "policy")
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    save_checkpoint(str(path), {"kind": kind, "model_config": asdict(config), "model": model.state_dict(),
                                "tokenizer": "bytes", "step": 7, "config": {}})
    return model.eval()


def test_exported_policy_loads_in_transformers_with_equal_logits(tmp_path):
    """Hub layout: no `transformer.` prefix, Conv1D weights [in, out], lm_head tied to wte (DESIGN, GPT-2 weights)."""
    transformers = pytest.importorskip("transformers")
    ours = tiny_policy_checkpoint(tmp_path / "ckpt.pt")
    export.main(export.Config(ckpt=str(tmp_path / "ckpt.pt"), out_dir=str(tmp_path / "hf")))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    idx = torch.randint(257, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ours(idx), theirs(idx).logits
    assert got.shape == expected.shape == (3, 40, 257)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # fp32, same math, different op order
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["nanoinstruct_tokenizer"] == "bytes" and config["vocab_size"] == 257
    assert config["eos_token_id"] == 256  # the byte tokenizer's <|endoftext|>


def test_save_pretrained_round_trips_through_from_pretrained(tmp_path):
    ours = tiny_policy_checkpoint(tmp_path / "ckpt.pt", seed=2)
    ours.save_pretrained(str(tmp_path / "hf"), tokenizer="bytes")
    tensors = read_safetensors(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and "wte.weight" in tensors  # tied, as on the hub
    assert tensors["h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D: [in, out]
    back = GPT.from_pretrained(str(tmp_path / "hf"))
    assert back.config == ours.config
    for (name, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name  # fp32 bytes written and read back: bit-exact


def test_exporting_a_reward_model_is_a_one_line_error(tmp_path):
    tiny_policy_checkpoint(tmp_path / "rm.pt", kind="reward")
    with pytest.raises(ValueError, match="reward checkpoint; only policies export"):
        export.main(export.Config(ckpt=str(tmp_path / "rm.pt"), out_dir=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()


def test_export_never_overwrites_without_being_asked(tmp_path):
    tiny_policy_checkpoint(tmp_path / "ckpt.pt")
    cfg = export.Config(ckpt=str(tmp_path / "ckpt.pt"), out_dir=str(tmp_path / "hf"))
    export.main(cfg)
    with pytest.raises(ValueError, match="already exists"):
        export.main(cfg)
    export.main(export.Config(ckpt=cfg.ckpt, out_dir=cfg.out_dir, overwrite=True))
