"""
Tests for running the stages as several processes under torchrun (PyTorch DDP, gloo on CPU), as nanoGPT's train.py
does it: the global batch is N x batch_size, so two processes of batch b follow one process of batch 2b step for step;
rank 0 alone writes; and the statistics that make PPO what it is (whitening, the KL that sets β) are global.
The processes are started here with torch.multiprocessing.spawn and the environment torchrun would give them.
    python -m pytest tests/test_distributed.py -q
"""
import json
import os
import random
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_post_hook

import common
import dpo
import eval as evaluation
import ppo
import reward
import sft
from model import GPT, GPTConfig
from test_ppo import iteration_records, write_inputs
from test_ppo import tiny_config as ppo_config
from test_reward import write_preferences

WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "piano")

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _worker(rank, world_size, port, target, args):
    """One process as torchrun starts it: its RANK and the rendezvous in the environment, one thread."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        target(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

def run_processes(target, *args, world_size=2):
    """target(*args) in world_size processes; an exception in any of them fails the test (it is re-raised here).
    Forked, not spawned: the children start with torch already imported, in a fraction of a second instead of
    several seconds each (they run one thread, so the parent's OpenMP pool is never used after the fork)."""
    mp.start_processes(_worker, args=(world_size, free_port(), target, args), nprocs=world_size, join=True,
                       start_method="fork")

def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]

def write_stories(path, n, seed):
    """Pretraining text of uneven length, so packed chunks and padding both occur."""
    rng = random.Random(seed)
    common.write_jsonl(str(path), [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "."}
                                   for _ in range(n)])
    return str(path)

def write_demos(path, n, seed):
    """Demonstrations whose responses run from 1 to 6 words, so rows hold different numbers of response tokens."""
    rng = random.Random(seed)
    common.write_jsonl(str(path), [{"prompt": f"Say {w} {k} times:\n", "response": " ".join([w] * k) + "."}
                                   for w, k in ((rng.choice(WORDS), rng.randint(1, 6)) for _ in range(n))])
    return str(path)

def sft_config(tmp_path, run, mode="pretrain", **overrides):
    """sft.Config of a tiny byte model on stories (pretrain) or demonstrations (sft)."""
    data = tmp_path / f"{mode}_train.jsonl"
    if not data.exists():
        write = write_stories if mode == "pretrain" else write_demos
        write(data, 120, seed=0)
        write(tmp_path / f"{mode}_val.jsonl", 24, seed=1)
    return sft.Config(**{**dict(out_dir=str(tmp_path / run), mode=mode, data=str(data), tokenizer="bytes",
                                n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_steps=6, lr=3e-3,
                                warmup_steps=2, eval_interval=3, eval_batches=2, device="cpu", dtype="float32"),
                         **overrides})

# ----------------------------------------------------------------------------- SFT / pretraining

@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_two_processes_of_batch_b_log_the_losses_of_one_process_of_batch_2b(tmp_path, mode):
    """DDP averages the two processes' gradients, and each takes its own half of the same global batch, so two
    processes of batch 4 (x 2 micro-steps) take the steps one process of batch 8 (x 2) takes: every logged train
    and val loss agrees to float rounding (the sums are split differently), and rank 0 alone wrote the log. In SFT
    mode the halves hold different numbers of response tokens: the loss is the mean over all of the step's tokens.
    Were the processes' rows to overlap, or their gradients not averaged, the losses would part after one step."""
    one = sft_config(tmp_path, "one", mode, batch_size=8, grad_accum=2)
    sft.main(one)
    two = sft_config(tmp_path, "two", mode, batch_size=4, grad_accum=2)
    run_processes(sft.main, two)
    expected, got = read_log(one.out_dir), read_log(two.out_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, 7))  # one writer: no repeats
    for a, b in zip(expected, got):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)  # fp32, sums in another order
        assert b.get("val/loss", 0) == pytest.approx(a.get("val/loss", 0), abs=1e-5)
    assert abs(expected[-1]["train/loss"] - expected[0]["train/loss"]) > 1e-2  # it trained: the comparison has teeth

# ----------------------------------------------------------------------------- the reward model

def rm_config(folder, run, **overrides):
    """reward.Config on the easy preferences of test_reward (half pairs, half K = 3 rankings) and a random tiny SFT."""
    if not (folder / "sft" / "ckpt.pt").exists():
        write_preferences(folder / "prefs_train.jsonl", 60, seed=0)
        write_preferences(folder / "prefs_val.jsonl", 10, seed=1)
        common.write_jsonl(str(folder / "sft_train.jsonl"), [{"prompt": f"Tell me about the {a}.\n",
                                                              "response": f"The {a} is here."} for a in WORDS])
        torch.manual_seed(0)
        policy = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32))
        common.save_checkpoint(str(folder / "sft" / "ckpt.pt"), {
            "kind": "policy", "model_config": policy.config.__dict__, "model": policy.state_dict(),
            "tokenizer": "bytes", "step": 0, "config": {}})
    return reward.Config(**{**dict(out_dir=str(folder / run), init=str(folder / "sft"),
                                   data=str(folder / "prefs_train.jsonl"), sft_data=str(folder / "sft_train.jsonl"),
                                   n_normalize=8, n_agreement=0, batch_size=8, group_by_length=2, lr=3e-3,
                                   warmup_steps=2, eval_interval=4, device="cpu", dtype="float32"), **overrides})

def test_reward_model_on_two_processes_of_batch_b_steps_as_one_process_of_batch_2b(tmp_path):
    """InstructGPT eq. (1) averaged over a global batch of rankings, split over two processes: every step's loss,
    accuracy and (sharded) val accuracy match one process of twice the batch. 60 rankings in batches of 8 leave a
    last batch of 4, split 2 + 2."""
    one = rm_config(tmp_path, "one", batch_size=8)
    reward.main(one)
    two = rm_config(tmp_path, "two", batch_size=4)
    run_processes(reward.main, two)
    expected, got = read_log(one.out_dir), read_log(two.out_dir)
    assert len(got) == len(expected) == 9  # 8 steps and the final record, written once
    for a, b in zip(expected[:-1], got[:-1]):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)  # fp32, sums in another order
        assert b["train/accuracy"] == a["train/accuracy"] and b.get("val/accuracy") == a.get("val/accuracy")
    assert expected[-2]["train/loss"] < expected[0]["train/loss"] - 0.1  # it learned: the comparison has teeth

def test_a_process_whose_share_is_all_ties_still_steps_with_the_others(tmp_path):
    """Rankings of identical responses carry no preference and are left out of the loss, but DDP needs every process
    in every backward: with 7 tied rankings and one real one, in global batches of 2, the real one shares its step
    with a tie, so one process holds nothing to learn. It still runs a zero backward, and the run matches one
    process of batch 2 (the tie adds nothing to the loss, the accuracy or the gradient)."""
    one = rm_config(tmp_path, "one", batch_size=2, group_by_length=0, eval_interval=100)
    rows = [{"prompt": "Tell me about the cat.\n", "chosen": "The cat is here.", "rejected": "The cat is here."}] * 7
    common.write_jsonl(one.data, rows + [{"prompt": "Tell me about the cat.\n", "chosen": "The cat is happy.",
                                          "rejected": "The cat is sad."}])
    reward.main(one)
    two = rm_config(tmp_path, "two", batch_size=1, group_by_length=0, eval_interval=100)
    run_processes(reward.main, two)
    expected, got = read_log(one.out_dir)[:-1], read_log(two.out_dir)[:-1]
    assert len(got) == len(expected) == 4 and sum(r["train/loss"] > 0 for r in expected) == 1  # one step learns
    for a, b in zip(expected, got):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-6) and b["train/accuracy"] == a["train/accuracy"]

# ----------------------------------------------------------------------------- PPO

def whiten_my_half(x, mask, out):
    """masked_whiten on this process's half of a batch (rows split by rank), saved for the test to compare."""
    rank, _, _ = common.setup_distributed("cpu")
    rows = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
    torch.save(ppo.masked_whiten(x[rows], mask[rows]), f"{out}.{rank}")

def test_advantage_whitening_on_two_processes_is_the_whitening_of_the_whole_batch(tmp_path):
    """N+ details (Huang et al. 2024): advantages are whitened per batch. Under DDP the batch is all processes'
    rollouts, so each process's half, whitened with the all-reduced sums, is its half of the whole batch whitened
    in one process, padding excluded, although the two halves hold very different numbers and token counts."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(3, 5), 4 + 3 * torch.randn(3, 5)])  # (6, 5): the halves differ in mean and scale
    mask = torch.rand(6, 5) < 0.7
    run_processes(whiten_my_half, x, mask, str(tmp_path / "half"))
    got = torch.cat([torch.load(tmp_path / f"half.{r}") for r in range(2)])
    torch.testing.assert_close(got, ppo.masked_whiten(x, mask), atol=1e-6, rtol=0)  # fp32, sums split in two
    assert not torch.allclose(ppo.masked_whiten(x[:3], mask[:3]), got[:3], atol=1e-2)  # per process would differ

def record_ppo(cfg):
    """ppo.main in this process, keeping the mean KL and β of each adaptation and π's and V's weights after each
    optimizer step, saved as out_dir/rank{r}.pt (the forked process patches only its own copy of ppo)."""
    kls, betas, weights = [], [], []
    adapt = ppo.adapt_kl_coef
    ppo.adapt_kl_coef = lambda *args: kls.append(args[1]) or betas.append(adapt(*args)) or betas[-1]
    hook = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: weights.append(
        torch.cat([p.detach().flatten() for group in optimizer.param_groups for p in group["params"]])))
    try:
        ppo.main(cfg)
    finally:
        hook.remove()
        ppo.adapt_kl_coef = adapt
    torch.save({"kls": kls, "betas": betas, "weights": weights}, os.path.join(cfg.out_dir, f"rank{dist.get_rank()}.pt"))

def test_ppo_on_two_processes_keeps_beta_and_both_models_identical_on_every_rank_and_resumes_in_one(tmp_path):
    """Each process samples its own rollouts, but what PPO adapts and trains is shared: the mean KL that drives
    Ziegler et al.'s controller is all-reduced, so β is the same on both ranks after each iteration, and DDP's
    averaged gradients (synced on the last of two micro-batches, and after the PPO-ptx backward) keep π and V
    bit-identical after every optimizer step. Rank 0's checkpoint then resumes in a single process, and that one's
    under two again (rank 1's sampler reseeded from seed, rank and iteration)."""
    inputs = write_inputs(tmp_path)
    text = str(tmp_path / "pretrain_train.jsonl")
    common.write_jsonl(text, [{"text": "zq " * 20}] * 8)
    cfg = ppo_config(tmp_path / "two", inputs, n_iters=2, batch_size=4, micro_batch_size=1, ptx_coef=1.0,
                     ptx_data=text, ptx_batch_size=1)
    run_processes(record_ppo, cfg)
    ranks = [torch.load(os.path.join(cfg.out_dir, f"rank{r}.pt")) for r in range(2)]
    assert len(ranks[0]["betas"]) == 2 and ranks[0]["betas"] == ranks[1]["betas"]  # exactly
    # the KL that set β: the global mean, the same on both ranks (the controller clips its error to ±0.2, so equal
    # β alone could hide a per-rank KL), and nonzero once π has moved
    assert ranks[0]["kls"] == ranks[1]["kls"] and ranks[0]["kls"][1] > 0
    logged = iteration_records(cfg.out_dir)
    assert [r["objective/kl_coef"] for r in logged] == ranks[0]["betas"] != [cfg.init_kl_coef] * 2
    assert len(ranks[0]["weights"]) == len(ranks[1]["weights"]) == 2 * cfg.ppo_epochs * cfg.n_minibatches
    for w0, w1 in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert torch.equal(w0, w1)
    assert not torch.equal(ranks[0]["weights"][0], ranks[0]["weights"][-1])  # they trained
    ppo.main(replace(cfg, n_iters=3, resume=True))  # one process, from the two-process checkpoint
    logged = iteration_records(cfg.out_dir)
    assert [r["step"] for r in logged] == [1, 2, 3] and logged[1]["objective/kl_coef"] == ranks[0]["betas"][1]
    os.remove(os.path.join(cfg.out_dir, "run.lock"))  # the in-process run keeps its lock until pytest exits
    run_processes(record_ppo, replace(cfg, n_iters=4, resume=True))
    ranks = [torch.load(os.path.join(cfg.out_dir, f"rank{r}.pt")) for r in range(2)]
    assert [r["step"] for r in iteration_records(cfg.out_dir)] == [1, 2, 3, 4]
    assert len(ranks[0]["betas"]) == 1 and ranks[0]["betas"] == ranks[1]["betas"]
    assert all(torch.equal(w0, w1) for w0, w1 in zip(ranks[0]["weights"], ranks[1]["weights"]))

# ----------------------------------------------------------------------------- errors

def test_rank_set_without_the_rest_of_torchrun_s_environment_is_a_one_line_error(tmp_path, monkeypatch):
    """RANK by hand (or a launcher that sets only part of torchrun's variables) has no process group to join:
    every stage stops at once with one line that names what is missing and how to start several processes."""
    monkeypatch.setenv("RANK", "1")
    for name in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for main, cfg in ((sft.main, sft_config(tmp_path, "base")), (reward.main, rm_config(tmp_path, "rm"))):
        with pytest.raises(ValueError) as excinfo:
            main(cfg)
        message = str(excinfo.value)
        assert "\n" not in message and "WORLD_SIZE" in message and "torchrun" in message
        assert not dist.is_initialized() and not os.path.exists(cfg.out_dir)  # nothing started, nothing written

def test_the_one_process_scripts_refuse_torchrun_instead_of_racing(tmp_path, monkeypatch):
    """eval.py and dpo.py do not split their work: under torchrun each process would write the same eval.json or
    checkpoint. They stop at once with one line saying to start them with python, and write nothing."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for main, cfg in ((evaluation.main, evaluation.Config(out_dir=str(tmp_path / "eval"))),
                      (dpo.main, dpo.Config(out_dir=str(tmp_path / "dpo")))):
        with pytest.raises(ValueError, match="runs as one process: start it with python, not torchrun"):
            main(cfg)
        assert not os.path.exists(cfg.out_dir)
