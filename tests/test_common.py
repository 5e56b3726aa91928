"""
Tests for common.py, the plumbing every stage shares: `--key=value` config parsing, the byte tokenizer, JSON lines
with errors that say `file:line: field`, atomic checkpoints and the lr schedule. Each error is one line naming its
culprit.
    python -m pytest tests/test_common.py -q
"""
import errno
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import common

@dataclass
class Config:
    learning_rate: float = 3e-4    # a float given as an int on the command line becomes a float
    max_steps: int = 100
    eval_every: Optional[int] = None
    seed: int | None = 1           # the PEP 604 spelling of Optional[int]
    compile: bool = False
    out_dir: str = "out/sft"

def parse_error(argv):
    with pytest.raises(ValueError) as excinfo:
        common.parse_config(Config, argv)
    message = str(excinfo.value)
    assert "\n" not in message, f"error spans several lines: {message!r}"
    return message

# ----------------------------------------------------------------------------- config parsing (STYLE rule 2)

def test_unknown_key_is_an_error_that_suggests_the_closest_field():
    """nanoGPT's exec configurator silently accepts typos; ours names the key and offers the nearest one."""
    assert parse_error(["--lerning_rate=1"]) == "unknown key --lerning_rate; did you mean --learning_rate?"
    assert parse_error(["--zzz=1"]) == "unknown key --zzz"  # nothing close: no made-up suggestion

def test_value_of_the_wrong_type_is_an_error_naming_the_key():
    for argv in (["--max_steps=1.5"], ["--max_steps=ten"], ["--compile=yes"], ["--learning_rate=[1]"]):
        key = argv[0].split("=")[0]
        assert parse_error(argv).startswith(f"{key}="), argv
    assert "expected int" in parse_error(["--max_steps=1.5"])
    assert "must look like --key=value" in parse_error(["max_steps=3"])

def test_int_is_coerced_to_float_and_other_types_are_kept():
    cfg = common.parse_config(Config, ["--learning_rate=1", "--max_steps=2000"])
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float
    assert cfg.max_steps == 2000 and type(cfg.max_steps) is int
    assert common.parse_config(Config, ["--learning_rate=6e-4"]).learning_rate == 6e-4
    assert common.parse_config(Config, []) == Config()  # no arguments: the defaults, untouched

@pytest.mark.parametrize("key", ["eval_every", "seed"])
def test_optional_int_takes_none_or_an_int_from_the_annotation(key):
    """nanoGPT can't override a None default (its type is guessed from the value); we read the annotation."""
    assert getattr(common.parse_config(Config, [f"--{key}=None"]), key) is None
    assert getattr(common.parse_config(Config, [f"--{key}=250"]), key) == 250
    assert parse_error([f"--{key}=2.5"]).startswith(f"--{key}=2.5")

def test_bools_accept_true_false_one_zero_and_a_bare_flag():
    for text, expected in [("True", True), ("False", False), ("1", True), ("0", False)]:
        assert common.parse_config(Config, [f"--compile={text}"]).compile is expected
    assert common.parse_config(Config, ["--compile"]).compile is True

def test_strings_need_no_quotes():
    assert common.parse_config(Config, ["--out_dir=out/my run"]).out_dir == "out/my run"
    assert common.parse_config(Config, ["--out_dir=123"]).out_dir == "123"  # stays text, not literal_eval'd
    assert common.parse_config(Config, ["--out_dir=a=b"]).out_dir == "a=b"  # only the first '=' splits

# ----------------------------------------------------------------------------- the byte tokenizer

def test_byte_tokenizer_round_trips_any_text_including_newlines_and_non_ascii():
    """One token per UTF-8 byte: every string survives encode -> decode. A too-narrow split pattern would silently
    drop what it doesn't match (DESIGN: `.` loses newlines), so newlines and tabs are in the test text."""
    enc = common.get_tokenizer("bytes")
    assert (enc.n_vocab, enc.eot_token) == (257, 256)
    text = "Once upon a time.\n\nA frog said: «naïve café» 日本語 🐸\r\n\t  end  \n"
    ids = enc.encode_ordinary(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert enc.decode(ids) == text
    assert enc.decode([*enc.encode_ordinary("x"), enc.eot_token]) == "x<|endoftext|>"

def test_literal_end_of_text_in_user_text_never_becomes_the_eot_id():
    """Data may contain the string "<|endoftext|>"; encode_ordinary keeps it as bytes, so no user can end a
    response early or inject a document boundary (DESIGN: tokenizer pitfalls)."""
    enc = common.get_tokenizer("bytes")
    ids = enc.encode_ordinary("before <|endoftext|> after")
    assert 256 not in ids
    assert enc.decode(ids) == "before <|endoftext|> after"
    with pytest.raises(ValueError):  # plain encode refuses instead of silently converting
        enc.encode("<|endoftext|>")
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt3'"):
        common.get_tokenizer("gpt3")

# ----------------------------------------------------------------------------- JSON lines

def test_jsonl_round_trips_and_blank_lines_are_skipped(tmp_path):
    path = str(tmp_path / "sft_train.jsonl")
    rows = [{"prompt": "Écris une histoire.", "response": " Il était une fois\n…"},
            {"prompt": "a", "response": "b"}]
    common.write_jsonl(path, rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")
    assert common.read_jsonl(path, fields=("prompt", "response")) == rows

@pytest.mark.parametrize("bad_line, says", [
    ('{"prompt": "a", "response": ', "not valid JSON"),
    ('{"prompt": "a"}', "field 'response' missing"),
    ('{"prompt": "a", "response": 3}', "field 'response' must be a string"),
    ('["a", "b"]', "expected a JSON object"),
])
def test_bad_jsonl_line_is_a_one_line_error_with_file_and_line_number(tmp_path, bad_line, says):
    """STYLE rule 10: `data/x.jsonl:17: field 'chosen' missing`, so the user can open the file at that line."""
    path = str(tmp_path / "sft_train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"prompt": "ok", "response": "ok"}\n\n' + bad_line + "\n")  # the bad row is line 3
    with pytest.raises(ValueError) as excinfo:
        common.read_jsonl(path, fields=("prompt", "response"))
    message = str(excinfo.value)
    assert message.startswith(f"{path}:3: {says}") and "\n" not in message

# ----------------------------------------------------------------------------- checkpoints

def test_the_val_file_sits_beside_the_train_file_whatever_its_folder_is_called():
    """Each stage finds its val split by the file name (prefs_train.jsonl -> prefs_val.jsonl); a folder named like
    a split is not a file name and must not be rewritten (it was: "runs/my_train/..." looked in "runs/my_val/")."""
    assert common.val_path_for("data/stories/prefs_train.jsonl") == os.path.join("data/stories", "prefs_val.jsonl")
    assert common.val_path_for("/x/my_train/prompts_train.jsonl") == os.path.join("/x/my_train", "prompts_val.jsonl")

def test_crash_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    """DESIGN: checkpoints are written to a temp file and renamed over the old one, so dying mid-write (disk full,
    Ctrl-C, preemption) never corrupts the last good checkpoint."""
    path = str(tmp_path / "run" / "ckpt.pt")
    common.save_checkpoint(path, {"kind": "policy", "step": 1, "model": {"w": torch.ones(3)}})

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="No space left on device") as excinfo:
        common.save_checkpoint(path, {"kind": "policy", "step": 2, "model": {"w": torch.zeros(3)}})
    assert excinfo.value.filename == path  # named as the checkpoint, not its temp file
    monkeypatch.undo()
    ckpt = common.load_checkpoint(path, "policy")
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]  # and the half-written temp file is cleaned up

# ----------------------------------------------------------------------------- the lr schedule

def test_lr_warms_up_linearly_then_decays_by_cosine_to_its_floor():
    """nanoGPT's schedule: linear warmup to max_lr, a half cosine down to min_lr_ratio * max_lr, then flat."""
    def lr(step):
        return common.get_lr(step, max_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert [lr(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # halfway through the cosine: the midpoint of max and min
    assert lr(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    decay = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # never goes back up
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)

@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_any_cuda_device_gets_bf16_and_keeps_tf32_off_for_the_fp32_heads(device, monkeypatch):
    """DESIGN, precision: dtype auto is bf16 on a CUDA device with bf16 support, whichever device index it names
    (`--device=cuda:0` once ran fp32). Under bf16 the only fp32 matmuls are the LM and scalar heads, kept fp32 on
    purpose, so TF32 stays off. (No GPU here: bf16 support is faked; autocast on CUDA then disables itself.)"""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with warnings.catch_warnings():  # without a GPU: "CUDA is not available ... Disabling autocast"
        warnings.simplefilter("ignore", UserWarning)
        assert common.setup_device(device, "auto")[:2] == (device, "bfloat16")
    assert torch.backends.cuda.matmul.allow_tf32 is False
