"""
Issue 27's bad-input list, run whole: every case either succeeds correctly or exits non-zero with exactly one line on
stderr naming the file, line or key. Tallied over the module: 0 tracebacks, 0 silent data losses (a file that was in a
case's run folder before an erroring run is byte-identical after it), 0 non-finite checkpoints. Each case calls the
script's `common.run(main, Config)` in-process with sys.argv patched; a lock held by a live process and a kill -9
mid-run use real subprocesses. docs/bad_inputs.md is the table of these cases. The tally prints at the end:
    python -m pytest -q tests/test_bad_input.py
"""
import errno
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import pytest
import torch
from tqdm import tqdm

import common
from model import GPT, GPTConfig

TINY = dict(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=16)
CPU = ["--device=cpu", "--dtype=float32"]
LABELER = "def score(prompt, response):\n    return float(len(response) % 3 == 0)\n" \
          "def is_heldout(prompt):\n    return False\n"

@dataclass
class Case:
    name: str
    script: str
    argv: list                          # {d} = the data folder, {w} = the world folder, {out} = this case's out_dir
    says: str = ""                      # the error line must hold this; "" = the run must succeed
    check: Optional[Callable] = None    # for a success: check(out_dir, stdout) asserts what it must have done
    setup: Optional[Callable] = None    # setup(out_dir, world, monkeypatch) before the run

# ----------------------------------------------------------------------------- the world: tiny data and checkpoints

def tiny_checkpoint(path, kind, **extra):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, scalar_head=kind == "reward"))
    common.save_checkpoint(str(path), {"kind": kind, "model_config": asdict(model.config), "model": model.state_dict(),
                                       "tokenizer": "bytes", "step": 0, "config": {}, **extra})

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    d = w / "data"
    animals = ("cat", "dog", "owl", "fox")
    for split, n in (("train", 16), ("val", 8)):
        common.write_jsonl(str(d / f"sft_{split}.jsonl"), [{"prompt": f"About the {a}.\n", "response": f"The {a} sat."}
                                                           for a in animals * (n // 4)])
        common.write_jsonl(str(d / f"prefs_{split}.jsonl"), [{"prompt": f"About the {animals[i % 4]}.\n",
                                                              "ranking": ["It is here.", "It was.", "No."]}
                                                             for i in range(n)])
        common.write_jsonl(str(d / f"prompts_{split}.jsonl"), [{"prompt": f"About the {a}.\n"} for a in animals])
    common.write_jsonl(str(d / "pretrain_train.jsonl"), [{"text": "The cat sat on the mat."}] * 8)
    (d / "labeler.py").write_text(LABELER)
    bad = w / "bad"
    bad.mkdir()
    (bad / "empty_train.jsonl").write_text("")
    (bad / "blank_train.jsonl").write_text("\n\n")
    (bad / "utf8_train.jsonl").write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    (bad / "json_train.jsonl").write_text('{"prompt": "a", "response": \n')
    (bad / "array_train.jsonl").write_text('["a", "b"]\n')
    common.write_jsonl(str(bad / "nofield_train.jsonl"), [{"prompt": "a"}])
    common.write_jsonl(str(bad / "number_train.jsonl"), [{"prompt": "a", "response": 3}])
    common.write_jsonl(str(bad / "mydemos.jsonl"), [{"prompt": "a", "response": "b"}])
    common.write_jsonl(str(bad / "myprefs.jsonl"), [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    common.write_jsonl(str(bad / "long_train.jsonl"), [{"prompt": "x" * 300, "response": "y"}] +
                       [{"prompt": "a\n", "response": "b"}] * 4)
    common.write_jsonl(str(bad / "long_val.jsonl"), [{"prompt": "a\n", "response": "b"}] * 4)
    common.write_jsonl(str(bad / "oneway_train.jsonl"), [{"prompt": "a", "ranking": ["only one"]}])
    common.write_jsonl(str(bad / "longrank_train.jsonl"), [{"prompt": "x" * 100, "chosen": "y", "rejected": "z"}] +
                       [{"prompt": "a\n", "chosen": "b", "rejected": "c"}] * 3)
    common.write_jsonl(str(bad / "longrank_val.jsonl"), [{"prompt": "a\n", "chosen": "b", "rejected": "c"}] * 4)
    common.write_jsonl(str(bad / "longprompt_train.jsonl"), [{"prompt": "x" * 100}])
    common.write_jsonl(str(bad / "prompts.jsonl"), [{"prompt": "a\n"}])
    tiny_checkpoint(w / "sft" / "ckpt.pt", "policy", optimizer={}, data_rng=torch.Generator().get_state(),
                    best_val_loss=9.9)
    tiny_checkpoint(w / "rm" / "ckpt.pt", "reward")
    (w / "junk").mkdir()
    (w / "junk" / "ckpt.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    return w

def sft_args(data="{d}/sft_train.jsonl", *extra):
    return [f"--data={data}", "--out_dir={out}", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=64",
            "--batch_size=4", "--max_steps=2", "--eval_interval=1", "--eval_batches=1", "--warmup_steps=1", *CPU,
            *extra]

def rm_args(*extra, data="{d}/prefs_train.jsonl"):
    return ["--init={w}/sft", f"--data={data}", "--out_dir={out}", "--batch_size=4", "--n_normalize=4",
            "--freeze_layers=0", "--n_agreement=2", "--prompts={d}/prompts_val.jsonl", "--max_new_tokens=8",
            "--eval_interval=100", "--warmup_steps=1", *CPU, *extra]

def ppo_args(*extra, prompts="{d}/prompts_train.jsonl"):
    return ["--sft={w}/sft", "--reward={w}/rm", f"--prompts={prompts}", "--out_dir={out}", "--n_iters=1",
            "--batch_size=4", "--n_minibatches=2", "--ppo_epochs=1", "--max_new_tokens=8", "--n_eval=2",
            "--eval_interval=1", "--save_interval=1", *CPU, *extra]

def sample_args(*extra):
    return ["--ckpt={w}/sft", "--num_samples=1", "--max_new_tokens=4", *CPU, *extra]

def eval_args(*extra):
    return ["--policy={w}/sft", "--sft={w}/sft", "--reward={w}/rm", "--prompts={d}/prompts_val.jsonl",
            "--out_dir={out}", "--n_eval=2", "--max_new_tokens=4", *CPU, *extra]

def dpo_args(*extra, data="{d}/prefs_train.jsonl"):
    return ["--sft={w}/sft", f"--data={data}", "--out_dir={out}", "--batch_size=4", "--n_val=4", "--eval_interval=100",
            "--warmup_steps=1", *CPU, *extra]

# ----------------------------------------------------------------------------- set-ups and checks the cases share

def finished_run(out_dir, world, monkeypatch):  # a run folder holding a checkpoint and its log
    tiny_checkpoint(out_dir / "ckpt.pt", "policy", step=2)
    common.write_jsonl(str(out_dir / "log.jsonl"), [{"step": 1}, {"step": 2}])

def ppo_checkpoint(out_dir, world, monkeypatch):
    tiny_checkpoint(out_dir / "ckpt.pt", "policy", value_model={}, optimizer={}, kl_coef=0.1, step=1)

def disk_full(out_dir, world, monkeypatch):
    def full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)

def read_only(out_dir, world, monkeypatch):
    def refused(obj, f, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(torch, "save", refused)

def json_disk_full(out_dir, world, monkeypatch):
    real_dump = json.dump
    def full(obj, f, **kwargs):
        if f.name.startswith(str(out_dir)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_dump(obj, f, **kwargs)
    monkeypatch.setattr(json, "dump", full)

def log_disk_full(out_dir, world, monkeypatch):  # the disk fills on an append to log.jsonl
    class Full:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *args):
            self.f.close()
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    def full_log(path, mode="r", **kwargs):
        f = open(path, mode, **kwargs)
        return Full(f) if str(path).endswith("log.jsonl") and mode == "a" else f
    monkeypatch.setattr(common, "open", full_log, raising=False)  # common's open, before the builtin

def nan_rewards(out_dir, world, monkeypatch):  # the rewards go nan: the update makes π nan; it must not be saved
    import ppo
    real = ppo.compute_rewards
    monkeypatch.setattr(ppo, "compute_rewards", lambda *args: tuple(t * float("nan") for t in real(*args)))

def nan_loss(out_dir, world, monkeypatch):  # the SFT loss goes nan at the first step
    import sft
    real = sft.lm_loss
    monkeypatch.setattr(sft, "lm_loss", lambda model, x, y: real(model, x, y) * float("nan"))

def stale_temp_and_lock(out_dir, world, monkeypatch):
    out_dir.mkdir(parents=True, exist_ok=True)
    dead = dead_pid()
    (out_dir / f"ckpt.pt.tmp{dead}").write_bytes(b"half a checkpoint from a killed run")
    (out_dir / "ckpt.pt.tmp1").write_bytes(b"pid 1 is alive: its temp file is left alone")
    (out_dir / "run.lock").write_text(str(dead))

def truncated_eval_json(out_dir, world, monkeypatch):
    (out_dir.parent / "ppo").mkdir(parents=True, exist_ok=True)
    (out_dir.parent / "ppo" / "eval.json").write_text('{"n_prompts": 4, "labeler_sc')

def dead_pid():
    """The pid of a process that has exited (and been reaped), so no live process has it."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid

def saved(out_dir, stdout):
    assert common.load_checkpoint(str(out_dir))["step"] >= 1

def overwritten(out_dir, stdout):  # the old run's log lines are gone, not interleaved with the new run's
    saved(out_dir, stdout)
    assert log_steps(out_dir) == [1, 2] and common.load_checkpoint(str(out_dir))["config"]["overwrite"]

def cleaned(out_dir, stdout):  # the dead run's temp file and lock are gone, a live process's temp file stays
    prints("no longer running")(out_dir, stdout)
    saved(out_dir, stdout)
    assert sorted(p.name for p in out_dir.iterdir() if ".tmp" in p.name) == ["ckpt.pt.tmp1"]

def prints(text):
    def check(out_dir, stdout):
        assert text in stdout, stdout[-500:]
    return check

def log_steps(out_dir):  # a line still being written (or cut by a kill) has no newline yet
    with open(out_dir / "log.jsonl") as f:
        return [json.loads(line).get("step") for line in f if line.endswith("\n")]

# ----------------------------------------------------------------------------- the list

CASES = [
    # -- sft.py: settings
    Case("sft_batch_size_0", "sft", sft_args("{d}/sft_train.jsonl", "--batch_size=0"), "--batch_size=0: must be >= 1"),
    Case("sft_grad_accum_0", "sft", sft_args("{d}/sft_train.jsonl", "--grad_accum=0"), "--grad_accum=0"),
    Case("sft_eval_interval_0", "sft", sft_args("{d}/sft_train.jsonl", "--eval_interval=0"), "--eval_interval=0"),
    Case("sft_max_steps_0", "sft", sft_args("{d}/sft_train.jsonl", "--max_steps=0"), "--max_steps=0"),
    Case("sft_max_steps_negative", "sft", sft_args("{d}/sft_train.jsonl", "--max_steps=-3"), "--max_steps=-3"),
    Case("sft_lr_negative", "sft", sft_args("{d}/sft_train.jsonl", "--lr=-0.1"), "--lr=-0.1: must be >= 0"),
    Case("sft_lr_inf", "sft", sft_args("{d}/sft_train.jsonl", "--lr=1e999"), "--lr=1e999: expected a finite number"),
    Case("sft_lr_nan", "sft", sft_args("{d}/sft_train.jsonl", "--lr=nan"), "--lr=nan: expected float"),
    Case("sft_unknown_key", "sft", sft_args("{d}/sft_train.jsonl", "--bach_size=4"), "did you mean --batch_size?"),
    Case("sft_not_an_int", "sft", sft_args("{d}/sft_train.jsonl", "--batch_size=abc"), "--batch_size=abc"),
    Case("sft_bad_mode", "sft", sft_args("{d}/sft_train.jsonl", "--mode=chat"), "--mode=chat"),
    Case("sft_dropout_over_1", "sft", sft_args("{d}/sft_train.jsonl", "--dropout=1.5"), "--dropout=1.5"),
    Case("sft_resume_and_overwrite", "sft", sft_args("{d}/sft_train.jsonl", "--resume", "--overwrite"),
         "--resume and --overwrite"),
    # -- sft.py: data
    Case("sft_empty_file", "sft", sft_args("{w}/bad/empty_train.jsonl"), "empty_train.jsonl: no rows"),
    Case("sft_blank_lines_only", "sft", sft_args("{w}/bad/blank_train.jsonl"), "blank_train.jsonl: no rows"),
    Case("sft_invalid_utf8", "sft", sft_args("{w}/bad/utf8_train.jsonl"), "utf8_train.jsonl:2: not valid UTF-8"),
    Case("sft_invalid_json", "sft", sft_args("{w}/bad/json_train.jsonl"), "json_train.jsonl:1: not valid JSON"),
    Case("sft_row_not_object", "sft", sft_args("{w}/bad/array_train.jsonl"), "array_train.jsonl:1: expected a JSON"),
    Case("sft_field_missing", "sft", sft_args("{w}/bad/nofield_train.jsonl"), ":1: field 'response' missing"),
    Case("sft_field_not_string", "sft", sft_args("{w}/bad/number_train.jsonl"), "field 'response' must be a string"),
    Case("sft_data_missing", "sft", sft_args("{w}/bad/nope_train.jsonl"), "nope_train.jsonl: no such file"),
    Case("sft_val_data_missing", "sft", sft_args("{d}/sft_train.jsonl", "--val_data={w}/bad/nope_val.jsonl"),
         "nope_val.jsonl: no such file"),
    Case("sft_name_without_train", "sft", sft_args("{w}/bad/mydemos.jsonl"), "mydemos.jsonl: the name has no '_train'"),
    Case("sft_name_without_train_and_val_data", "sft",
         sft_args("{w}/bad/mydemos.jsonl", "--val_data={d}/sft_val.jsonl"), check=saved),
    Case("sft_example_longer_than_context", "sft", sft_args("{w}/bad/long_train.jsonl"),
         check=prints("long_train.jsonl: cut 1 of 5 examples to the 64-token context")),
    Case("sft_init_missing", "sft", sft_args("{d}/sft_train.jsonl", "--init={w}/nothing"), "nothing: no checkpoint"),
    Case("sft_init_reward_model", "sft", sft_args("{d}/sft_train.jsonl", "--init={w}/rm"),
         "is a reward checkpoint, expected policy"),
    # -- sft.py: run folders
    Case("sft_rerun_into_finished_run", "sft", sft_args(), "a run is saved here; pass --resume", setup=finished_run),
    Case("sft_overwrite_clears_the_old_log", "sft", sft_args("{d}/sft_train.jsonl", "--overwrite"), setup=finished_run,
         check=overwritten),
    Case("sft_resume_without_checkpoint", "sft", sft_args("{d}/sft_train.jsonl", "--resume"), "no such checkpoint"),
    Case("sft_resume_ppo_checkpoint", "sft", sft_args("{d}/sft_train.jsonl", "--resume"), "has no 'data_rng'",
         setup=ppo_checkpoint),
    Case("sft_resume_corrupt_checkpoint", "sft", sft_args("{d}/sft_train.jsonl", "--resume"),
         "not a nanoInstruct checkpoint", setup=lambda out, w, mp: (out / "ckpt.pt").write_bytes(b"\x80\x04garbage")),
    Case("sft_stale_temp_and_lock_cleaned", "sft", sft_args(), setup=stale_temp_and_lock, check=cleaned),
    Case("sft_disk_full_during_save", "sft", sft_args(), "ckpt.pt: no space left on device", setup=disk_full),
    Case("sft_read_only_out_dir", "sft", sft_args(), "ckpt.pt: read-only file system", setup=read_only),
    Case("sft_disk_full_during_log", "sft", sft_args(), "log.jsonl: no space left on device", setup=log_disk_full),
    Case("sft_loss_goes_nan", "sft", sft_args(), "step 1: train/loss is nan; stopped before saving", setup=nan_loss),
    # -- reward.py
    Case("rm_batch_size_0", "reward", rm_args("--batch_size=0"), "--batch_size=0"),
    Case("rm_epochs_0", "reward", rm_args("--epochs=0"), "--epochs=0"),
    Case("rm_eval_interval_0", "reward", rm_args("--eval_interval=0"), "--eval_interval=0"),
    Case("rm_lr_negative", "reward", rm_args("--lr=-1.0"), "--lr=-1.0"),
    Case("rm_max_steps_negative", "reward", rm_args("--max_steps=-1"), "--max_steps=-1: must be >= 0"),
    Case("rm_freeze_every_block", "reward", rm_args("--freeze_layers=1"), "--freeze_layers=1: must leave"),
    Case("rm_empty_file", "reward", rm_args(data="{w}/bad/empty_train.jsonl"), "empty_train.jsonl: no rows"),
    Case("rm_invalid_utf8", "reward", rm_args(data="{w}/bad/utf8_train.jsonl"), "utf8_train.jsonl:2: not valid UTF-8"),
    Case("rm_one_way_ranking", "reward", rm_args("--val_data={d}/prefs_val.jsonl", data="{w}/bad/oneway_train.jsonl"),
         "oneway_train.jsonl:1: field 'ranking' must be a list of at least 2"),
    Case("rm_sft_data_missing", "reward", rm_args("--sft_data={w}/bad/typo.jsonl"), "typo.jsonl: no such file"),
    Case("rm_val_data_missing", "reward", rm_args("--val_data={w}/bad/nope.jsonl"), "nope.jsonl: no such file"),
    Case("rm_name_without_train", "reward", rm_args(data="{w}/bad/myprefs.jsonl"), "the name has no '_train'"),
    Case("dpo_name_without_train", "dpo", dpo_args(data="{w}/bad/myprefs.jsonl"), "the name has no '_train'"),
    Case("rm_init_is_reward_model", "reward", rm_args("--init={w}/rm"), "is a reward checkpoint, expected policy"),
    Case("rm_rerun_into_finished_run", "reward", rm_args(), "a run is saved here; pass --overwrite",
         setup=finished_run),
    Case("rm_ranking_longer_than_context", "reward",
         rm_args("--sft_data={d}/sft_train.jsonl", data="{w}/bad/longrank_train.jsonl"),
         check=prints("longrank_train.jsonl: cut 1 of 4 rankings to the 64-token context")),
    Case("rm_agreement_check_fails_after_training", "reward", rm_args("--max_new_tokens=64"),
         "exceeds the model's context", check=saved),
    # -- ppo.py: settings
    Case("ppo_temperature_0", "ppo", ppo_args("--temperature=0"), "--temperature=0.0: must be > 0"),
    Case("ppo_temperature_negative", "ppo", ppo_args("--temperature=-1"), "--temperature=-1.0"),
    Case("ppo_target_kl_0", "ppo", ppo_args("--target_kl=0"), "--target_kl=0.0: must be > 0"),
    Case("ppo_n_minibatches_0", "ppo", ppo_args("--n_minibatches=0"), "--n_minibatches=0: must be >= 1"),
    Case("ppo_n_minibatches_over_batch", "ppo", ppo_args("--n_minibatches=8"), "--n_minibatches=8: must divide"),
    Case("ppo_n_iters_0", "ppo", ppo_args("--n_iters=0"), "--n_iters=0"),
    Case("ppo_max_new_tokens_0", "ppo", ppo_args("--max_new_tokens=0"), "--max_new_tokens=0"),
    Case("ppo_max_new_tokens_negative", "ppo", ppo_args("--max_new_tokens=-5"), "--max_new_tokens=-5"),
    Case("ppo_save_interval_0", "ppo", ppo_args("--save_interval=0"), "--save_interval=0"),
    Case("ppo_eval_interval_0", "ppo", ppo_args("--eval_interval=0"), "--eval_interval=0"),
    Case("ppo_n_eval_0", "ppo", ppo_args("--n_eval=0"), "--n_eval=0"),
    Case("ppo_batch_size_0", "ppo", ppo_args("--batch_size=0"), "--batch_size=0"),
    Case("ppo_ppo_epochs_0", "ppo", ppo_args("--ppo_epochs=0"), "--ppo_epochs=0"),
    Case("ppo_lam_over_1", "ppo", ppo_args("--lam=1.5"), "--lam=1.5: must be >= 0 and <= 1"),
    # -- ppo.py: data, checkpoints, run folders
    Case("ppo_empty_prompts", "ppo", ppo_args(prompts="{w}/bad/empty_train.jsonl"), "empty_train.jsonl: no rows"),
    Case("ppo_prompts_without_train", "ppo", ppo_args(prompts="{w}/bad/prompts.jsonl"), "the name has no '_train'"),
    Case("ppo_prompt_too_long", "ppo", ppo_args("--val_prompts={d}/prompts_val.jsonl",
                                                prompts="{w}/bad/longprompt_train.jsonl"),
         "longprompt_train.jsonl:1: prompt leaves no room"),
    Case("ppo_reward_is_a_policy", "ppo", ppo_args("--reward={w}/sft"), "is a policy checkpoint, expected reward"),
    Case("ppo_sft_is_a_reward_model", "ppo", ppo_args("--sft={w}/rm"), "is a reward checkpoint, expected policy"),
    Case("ppo_resume_sft_checkpoint", "ppo", ppo_args("--resume"), "has no 'value_model'", setup=finished_run),
    Case("ppo_rerun_into_finished_run", "ppo", ppo_args(), "a run is saved here", setup=finished_run),
    Case("ppo_nan_rewards", "ppo", ppo_args(), "is nan; stopped before saving it", setup=nan_rewards),
    Case("ppo_eval_json_disk_full", "ppo", ppo_args(), "eval.json: no space left on device", setup=json_disk_full),
    Case("ppo_runs", "ppo", ppo_args(), check=lambda out, stdout: saved(out, stdout) or
         common.read_json(str(out / "eval.json"))["n_prompts"] == 2),
    # -- sample.py
    Case("sample_temperature_negative", "sample", sample_args("--temperature=-1"), "--temperature=-1.0"),
    Case("sample_num_samples_0", "sample", sample_args("--num_samples=0"), "--num_samples=0"),
    Case("sample_max_new_tokens_0", "sample", sample_args("--max_new_tokens=0"), "--max_new_tokens=0"),
    Case("sample_top_p_0", "sample", sample_args("--top_p=0"), "--top_p=0.0: must be > 0 and <= 1"),
    Case("sample_top_k_0", "sample", sample_args("--top_k=0"), "--top_k=0"),
    Case("sample_best_of_0", "sample", sample_args("--best_of=0"), "--best_of=0"),
    Case("sample_chat_with_best_of", "sample", sample_args("--chat", "--best_of=2"), "--chat samples one reply"),
    Case("sample_ckpt_missing", "sample", sample_args("--ckpt={w}/nothing"), "nothing: no checkpoint"),
    Case("sample_ckpt_is_reward_model", "sample", sample_args("--ckpt={w}/rm"), "is a reward checkpoint"),
    Case("sample_corrupt_checkpoint", "sample", sample_args("--ckpt={w}/junk"), "not a nanoInstruct checkpoint"),
    Case("sample_prompt_file_missing", "sample", sample_args("--prompt=FILE:{w}/bad/nope.jsonl"), "nope.jsonl"),
    Case("sample_best_of_with_num_samples", "sample",
         sample_args("--best_of=2", "--num_samples=3", "--reward={w}/rm"),
         check=lambda out, stdout: stdout.count("best of 2, reward") == 3),
    Case("sample_prompt_without_newline", "sample", sample_args("--prompt=Write a story about a cat."),
         check=prints("hint: the stories prompts end in a newline")),
    Case("sample_default_temperature_is_0.7", "sample", sample_args(),
         check=lambda out, stdout: importlib.import_module("sample").Config().temperature == 0.7),
    # -- eval.py
    Case("eval_n_eval_0", "eval", eval_args("--n_eval=0"), "--n_eval=0"),
    Case("eval_temperature_0", "eval", eval_args("--temperature=0"), "--temperature=0.0: must be > 0"),
    Case("eval_best_of_0", "eval", eval_args("--best_of=0"), "--best_of=0"),
    Case("eval_reward_is_a_policy", "eval", eval_args("--reward={w}/sft"), "expected reward"),
    Case("eval_report_reads_truncated_eval_json", "eval", ["--report", "--out_dir={out}"],
         "ppo/eval.json: not valid JSON", setup=truncated_eval_json),
    Case("eval_disk_full_writing_eval_json", "eval", eval_args(), "eval.json: no space left on device",
         setup=json_disk_full),
    Case("eval_writes_eval_json", "eval", eval_args(),
         check=lambda out, stdout: common.read_json(str(out / "eval.json"))["n_prompts"] == 2),
    # -- dpo.py
    Case("dpo_beta_0", "dpo", dpo_args("--beta=0"), "--beta=0.0: must be > 0"),
    Case("dpo_batch_size_0", "dpo", dpo_args("--batch_size=0"), "--batch_size=0"),
    Case("dpo_empty_file", "dpo", dpo_args("--val_data={d}/prefs_val.jsonl", data="{w}/bad/empty_train.jsonl"),
         "empty_train.jsonl: no rows"),
    Case("dpo_rerun_into_finished_run", "dpo", dpo_args(), "a run is saved here", setup=finished_run),
]

# ----------------------------------------------------------------------------- running a case, and the tally

@pytest.fixture(scope="module")
def tally(request):
    counts = Counter()
    yield counts
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # printed past pytest's capture, so -q shows it
        print(f"\nbad inputs: {counts['cases']} cases | {counts['one-line errors']} one-line errors | "
              f"{counts['succeeded']} succeeded | {counts['tracebacks']} tracebacks | "
              f"{counts['silent data losses']} silent data losses | "
              f"{counts['non-finite checkpoints']} non-finite checkpoints")

class QuietBar(tqdm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})

def run_script(script, argv, capsys, monkeypatch):
    """`python {script}.py {argv}` in this process: (exit status, stdout, stderr) as a shell would see them."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    for name in ("sft", "reward", "ppo", "eval", "dpo"):  # progress bars go to stderr; the line we check is the error
        monkeypatch.setattr(importlib.import_module(name), "tqdm", QuietBar)
    capsys.readouterr()
    try:
        common.run(module.main, module.Config)
        status, message = 0, ""
    except SystemExit as e:  # sys.exit("error: ...") prints the message to stderr at exit with status 1
        status, message = (1, e.code + "\n") if isinstance(e.code, str) else (e.code or 0, "")
    out, err = capsys.readouterr()
    return status, out, err + message

def snapshot(folder):
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}

def non_finite_checkpoints(folder):
    bad = 0
    for path in folder.rglob("ckpt.pt"):
        try:
            ckpt = common.load_checkpoint(str(path))
        except ValueError:  # not a checkpoint at all: a case's deliberately corrupt file
            continue
        bad += not all(torch.isfinite(t).all() for k in ("model", "value_model") for t in ckpt.get(k, {}).values()
                       if t.is_floating_point())
    return bad

@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, reading the deliberately corrupt checkpoint
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_in_one_line_or_handled(case, world, tmp_path, capsys, monkeypatch, tally):
    """Issue 27: a bad input is a one-line error naming the file, line or key, never a traceback; an erroring run
    leaves its run folder as it found it; no checkpoint ever holds nan or inf."""
    out_dir = tmp_path / "out" / case.name
    fill = lambda s: s.format(d=world / "data", w=world, out=out_dir)  # noqa: E731
    if case.setup:
        out_dir.mkdir(parents=True, exist_ok=True)
        case.setup(out_dir, world, monkeypatch)
    before = snapshot(out_dir) if out_dir.exists() else {}
    tally["cases"] += 1
    try:
        status, stdout, stderr = run_script(case.script, [fill(a) for a in case.argv], capsys, monkeypatch)
    except Exception:
        tally["tracebacks"] += 1
        raise
    monkeypatch.undo()  # the patched writes must not affect the checks below
    tally["non-finite checkpoints"] += non_finite_checkpoints(tmp_path)
    if case.says:
        lines = stderr.strip().splitlines()
        assert status != 0 and len(lines) == 1 and lines[0].startswith("error: "), (status, stderr)
        assert case.says in lines[0], lines[0]
        after = snapshot(out_dir) if out_dir.exists() else {}
        changed = [p for p, digest in before.items() if after.get(p) != digest]
        tally["silent data losses"] += len(changed)
        assert not changed, changed
        tally["one-line errors"] += 1
    else:
        assert status == 0, stderr
        tally["succeeded"] += 1
    if case.check:
        assert case.check(out_dir, stdout) is not False
    assert tally["non-finite checkpoints"] == 0

# ----------------------------------------------------------------------------- real processes

REPO = os.path.dirname(os.path.abspath(common.__file__))
# no progress bars, and one thread: tiny models on two busy cores run ~50x slower on two threads (tests/conftest.py)
QUIET_ONE_THREAD = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

def cli(script, argv, **kwargs):
    return subprocess.run([sys.executable, f"{script}.py", *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=QUIET_ONE_THREAD, **kwargs)

def test_a_run_folder_locked_by_a_live_process_is_refused_in_one_line(world, tmp_path, capsys, monkeypatch):
    """Two runs on one --out_dir would interleave log.jsonl and the last to save would win: the second is refused,
    naming the folder and the owner's pid (a real, live process), and the lock is left to its owner."""
    out_dir = tmp_path / "busy"
    out_dir.mkdir()
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (out_dir / "run.lock").write_text(str(owner.pid))
        status, _, stderr = run_script("sft", [a.format(d=world / "data", w=world, out=out_dir) for a in sft_args()],
                                       capsys, monkeypatch)
        assert status == 1 and stderr.strip().count("\n") == 0, stderr
        assert f"in use by a live run (pid {owner.pid}" in stderr
        assert (out_dir / "run.lock").read_text() == str(owner.pid) and not (out_dir / "ckpt.pt").exists()
    finally:
        owner.kill()
        owner.wait()

def test_a_run_killed_mid_training_resumes_without_repeating_log_lines(world, tmp_path, capsys, monkeypatch):
    """kill -9 of a real training process between two saves: its checkpoint is the last complete one, its lock is
    stale and taken over, and --resume cuts the log back to the checkpoint's step, so every step appears once."""
    out_dir = tmp_path / "killed"
    argv = [a.format(d=world / "data", w=world, out=out_dir) for a in sft_args()] + ["--eval_interval=5"]
    # no progress bars, and one thread: tiny models on two busy cores run far slower on two (tests/conftest.py)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "sft.py", *argv, "--max_steps=100000"], env=env,
                            cwd=os.path.dirname(os.path.abspath(common.__file__)), stdout=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and not ((out_dir / "ckpt.pt").exists() and len(log_steps(out_dir)) >= 12):
        time.sleep(0.1)
    proc.kill()  # most likely a few steps after the last save, whose log lines --resume must not repeat
    proc.wait()
    logged = log_steps(out_dir)
    assert common.load_checkpoint(str(out_dir))["step"] <= logged[-1]
    status, stdout, stderr = run_script("sft", argv + [f"--max_steps={logged[-1] + 3}", "--resume"], capsys,
                                        monkeypatch)
    assert status == 0, stderr
    assert "no longer running" in stdout
    assert log_steps(out_dir) == list(range(1, logged[-1] + 4))

def test_the_docs_table_has_one_row_per_case_in_order():
    """docs/bad_inputs.md is the table of this list: a case added here without its row (or the reverse) fails."""
    with open(os.path.join(os.path.dirname(os.path.abspath(common.__file__)), "docs", "bad_inputs.md")) as f:
        scripts = [line.split(" | ")[0][2:] for line in f if line.startswith("| ") and ".py | " in line[:14]]
    assert scripts == [f"{case.script}.py" for case in CASES]
