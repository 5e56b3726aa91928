"""
Tests for sft.py, step 1 of InstructGPT (Ouyang et al. 2022, §3.5): the loss is on response tokens only, the
end-of-text that stops a response is in it, padding is found by position, long examples keep their end, a resumed
run replays the uninterrupted one, and a tiny run really learns. Tiny seeded byte-level models on CPU, no network.
    python -m pytest tests/test_sft.py -q
"""
import json
import os
import random
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import common
import sft
from model import GPT, GPTConfig

TOKENIZER = common.get_tokenizer("bytes")  # 256 byte ids + <|endoftext|> = 256
EOT = TOKENIZER.eot_token
WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano")

def write_demos(path, n, seed):
    """n demonstrations of a task a tiny byte model picks up in a few dozen steps: repeat the word three times."""
    rng = random.Random(seed)
    common.write_jsonl(str(path), [{"prompt": f"Repeat: {w}\n", "response": f"{w} {w} {w}."}
                                   for w in (rng.choice(WORDS) for _ in range(n))])
    return str(path)

def tiny_config(tmp_path, **overrides):
    """sft.Config for a 2-layer, 32-wide byte model on demos written into tmp_path (val found by _train -> _val)."""
    data = tmp_path / "demos_train.jsonl"
    if not data.exists():
        write_demos(data, 64, seed=0)
        write_demos(tmp_path / "demos_val.jsonl", 16, seed=1)
    return sft.Config(**{**dict(out_dir=str(tmp_path / "run"), data=str(data), tokenizer="bytes", n_layer=2,
                                n_head=2, n_embd=32, block_size=64, batch_size=8, max_steps=12, lr=3e-3,
                                warmup_steps=2, eval_interval=4, eval_batches=2, device="cpu", dtype="float32"),
                         **overrides})

def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=TOKENIZER.n_vocab, n_layer=2, n_head=2, n_embd=32)).eval()

def read_log(run_dir):
    """log.jsonl -> {step: record}; a step logged twice (before and after a resume) keeps its last record."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}

# ----------------------------------------------------------------------------- the response-only mask

def test_response_only_loss_ignores_prompt_tokens():
    """InstructGPT §3.5 fine-tunes on the labeler's demonstration, not on the prompt: a target at a prompt position
    is -1, so changing the label of a prompt token (inputs held fixed) leaves lm_loss unchanged, while changing a
    response token's label does change it."""
    prompt, response = "Repeat: stone\n", "stone stone stone."
    tokens, n_prompt = sft.encode_example(TOKENIZER, prompt, response, block_size=64)
    other = sft.encode_example(TOKENIZER, "Repeat: river\n", "river.", block_size=64)  # a shorter row: padding
    x, y = sft.make_batch([(tokens, n_prompt), other], EOT)
    assert n_prompt == len(prompt) and (y[0, :n_prompt - 1] == -1).all()  # y[t] predicts token t+1
    assert y[0, n_prompt - 1:len(tokens) - 1].tolist() == tokens[n_prompt:]  # every response token is a target

    def loss_with_token_changed(i):  # the same inputs x, targets from the example with token i replaced
        changed = tokens.copy()
        changed[i] = ord("#")
        return sft.lm_loss(model, x, sft.make_batch([(changed, n_prompt), other], EOT)[1])

    model = tiny_gpt()
    with torch.no_grad():
        loss = sft.lm_loss(model, x, y)
        for i in (1, 5, n_prompt - 1):  # prompt tokens, the newline that ends the prompt included
            assert loss_with_token_changed(i) == loss  # exactly: -1 targets never enter the mean
        assert abs(loss_with_token_changed(n_prompt) - loss) > 1e-4  # the response's first token is learned

def test_end_of_text_is_the_last_target_of_every_example():
    """The response ends with <|endoftext|> and that token is in the loss: it is how the model learns to stop
    (GPT-2's document separator doubles as the end of a demonstration)."""
    examples = [sft.encode_example(TOKENIZER, "Repeat: " + w + "\n", " ".join([w] * n), block_size=64)
                for w, n in (("ocean", 1), ("piano", 3), ("tiger", 2))]
    x, y = sft.make_batch(examples, EOT)
    for row, (tokens, _) in enumerate(examples):
        assert tokens[-1] == EOT and y[row, len(tokens) - 2] == EOT  # the last real target
        assert (y[row, len(tokens) - 1:] == -1).all()  # then only padding

def test_padding_is_masked_by_position_not_by_token_id():
    """We pad with the end-of-text id, so a mask built from `token == pad_id` would also drop the real EOS (and
    any EOS inside a response). Here responses contain and end with EOS; every one of them stays a target, and
    lm_loss equals the mean next-token loss computed one unpadded example at a time (the slow reference)."""
    examples = [([65, 66, 67, 10, 97, EOT, 98, EOT], 4),  # prompt "ABC\n", response "a<eot>b<eot>"
                ([65, 10, EOT], 2),                        # an empty response: just the EOS
                ([70, 71, 72, 73, 10, 99, 100, 101, 102, EOT], 5)]
    x, y = sft.make_batch(examples, pad_id=EOT)
    for row, (tokens, n_prompt) in enumerate(examples):
        assert y[row, n_prompt - 1:len(tokens) - 1].tolist() == tokens[n_prompt:]  # EOS included, twice in row 0
        assert (y[row, len(tokens) - 1:] == -1).all() and (x[row, len(tokens) - 1:] == EOT).all()
    model = tiny_gpt()
    with torch.no_grad():
        nll = []
        for tokens, n_prompt in examples:
            logprobs = F.log_softmax(model(torch.tensor([tokens[:-1]]))[0], -1)  # (len - 1, V)
            nll += [-logprobs[t - 1, tokens[t]] for t in range(n_prompt, len(tokens))]
        torch.testing.assert_close(sft.lm_loss(model, x, y), torch.stack(nll).mean(),
                                   atol=1e-5, rtol=0)  # fp32; padded and unpadded forwards differ in kernel shape

def test_too_long_example_keeps_the_end_and_cuts_the_prompt_from_the_left():
    """An example longer than the context keeps its last block_size + 1 tokens: the response (with its EOS, which
    must be learned) and the most recent prompt context; n_prompt counts only the prompt tokens that survive."""
    prompt, response = "Repeat after me, please: stone\n", "stone stone."
    full = TOKENIZER.encode_ordinary(prompt + response) + [EOT]
    tokens, n_prompt = sft.encode_example(TOKENIZER, prompt, response, block_size=20)
    assert tokens == full[-21:] and tokens[-1] == EOT
    assert n_prompt == len(prompt) - (len(full) - 21)
    assert TOKENIZER.decode(tokens[:n_prompt]) == prompt[-n_prompt:]
    tokens, n_prompt = sft.encode_example(TOKENIZER, prompt, response, block_size=8)  # even the response is cut
    assert tokens == full[-9:] and n_prompt == 0

def test_pretrain_mode_packs_documents_into_chunks_with_loss_on_every_token(tmp_path):
    """The base model is trained on raw text (GPT-2 style): no prompt, so n_prompt is 0; documents, each ended by
    end-of-text, are packed into one stream cut into chunks of block_size + 1 tokens (the last may be shorter), so
    no position is padding. Every token after the first is a target exactly once, and no target is -1."""
    text = "".join(f"The {w} is here. " for w in WORDS * 3)  # 360 bytes
    path = tmp_path / "pretrain_train.jsonl"
    common.write_jsonl(str(path), [{"text": text}, {"text": "Short."}])
    examples = sft.load_examples(str(path), "pretrain", TOKENIZER, block_size=32)
    assert all(n_prompt == 0 and len(tokens) == 33 for tokens, n_prompt in examples[:-1])
    assert 2 <= len(examples[-1][0]) <= 33 and examples[-1][1] == 0
    targets = []
    for tokens, n_prompt in examples:
        x, y = sft.make_batch([(tokens, n_prompt)], EOT)
        assert (y != -1).all()
        targets += y[0].tolist()
    stream = [token for t in (text, "Short.") for token in TOKENIZER.encode_ordinary(t) + [EOT]]
    assert targets == stream[1:]  # "Short." follows the first document's end-of-text in the same chunk

def test_malformed_sft_line_is_a_one_line_error_naming_file_and_line(tmp_path):
    """STYLE rule 10: bad user data fails at load time with `path:line: what`, not mid-training."""
    path = str(tmp_path / "sft_train.jsonl")
    for bad_line, says in (('{"prompt": "a", "response": ', "not valid JSON"), ('{"prompt": "a"}', "'response'")):
        with open(path, "w", encoding="utf-8") as f:
            f.write('{"prompt": "a", "response": "b"}\n\n' + bad_line + "\n")  # line 3 (line 2 is blank)
        with pytest.raises(ValueError) as excinfo:
            sft.load_examples(path, "sft", TOKENIZER, block_size=64)
        message = str(excinfo.value)
        assert message.startswith(f"{path}:3:") and says in message and "\n" not in message

def test_reward_checkpoint_as_sft_init_is_a_one_line_error(tmp_path):
    """Checkpoints carry their kind: fine-tuning a reward model (scalar head, no logits) as a policy must say so."""
    torch.manual_seed(0)
    rm = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32, scalar_head=True))
    path = str(tmp_path / "rm" / "ckpt.pt")
    common.save_checkpoint(path, {"kind": "reward", "model_config": asdict(rm.config), "model": rm.state_dict(),
                                  "tokenizer": "bytes", "step": 0, "config": {}})
    with pytest.raises(ValueError) as excinfo:
        sft.main(tiny_config(tmp_path, init=path))
    message = str(excinfo.value)
    assert path in message and "reward" in message and "policy" in message and "\n" not in message

# ----------------------------------------------------------------------------- main(): resume and learning

def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, monkeypatch):
    """--resume restores weights, AdamW state, the data generator and the step from the last checkpoint (written
    at an eval step whose val loss improved), so an interrupted run continues exactly where it would have been."""
    sft.main(tiny_config(tmp_path, out_dir=str(tmp_path / "A")))

    def interrupt_at_step_9(step, *args):
        if step == 9:
            raise KeyboardInterrupt  # as if Ctrl-C arrived after 9 of the 12 steps
        return common.get_lr(step, *args)
    with monkeypatch.context() as patch:
        patch.setattr(sft, "get_lr", interrupt_at_step_9)  # sft.py imported get_lr into its own namespace
        with pytest.raises(KeyboardInterrupt):
            sft.main(tiny_config(tmp_path, out_dir=str(tmp_path / "B")))
    saved_step = common.load_checkpoint(str(tmp_path / "B"), "policy")["step"]
    assert saved_step in (4, 8)  # eval steps; step 4 always improves on inf
    sft.main(tiny_config(tmp_path, out_dir=str(tmp_path / "B"), resume=True))
    with open(tmp_path / "B" / "log.jsonl") as f:  # the steps after the checkpoint were redone, and logged once
        assert [json.loads(line)["step"] for line in f] == list(range(1, 13))
    a, b = read_log(tmp_path / "A"), read_log(tmp_path / "B")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        for key in ("train/loss", "val/loss"):
            assert (key in a[step]) == (key in b[step])
            if key in a[step]:  # fp32 on CPU, the same ops in the same order: equal to rounding at most
                assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])

def test_tiny_sft_run_learns_the_demonstrations(tmp_path):
    """Smoke test that asserts learning, not only exit code 0: after 40 steps the val loss on held-out demos is
    far below an untrained byte model's ln(257) = 5.55 nats and below 60% of the first eval's."""
    result = sft.main(tiny_config(tmp_path, max_steps=40, eval_interval=10, lr=1e-2))
    val = [r["val/loss"] for r in read_log(tmp_path / "run").values() if "val/loss" in r]
    assert result["step"] == 40 and len(val) == 4
    assert result["best_val_loss"] == min(val) < 0.6 * val[0]
    assert val[-1] < 2.5  # nats per response byte; the words are 8 choices, the repeats are free
    assert os.path.exists(tmp_path / "run" / "ckpt.pt")
