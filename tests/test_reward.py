"""
Tests for reward.py, step 2 of InstructGPT (Ouyang et al. 2022, §3.5): the pairwise loss of eq. (1), a K-way ranking
as its C(K,2) pairs, both preference file formats, the score read at the end-of-text token whatever the padding,
the bias shift that makes demonstrations score 0, and a tiny run that learns. Tiny seeded models on CPU, no network.
    python -m pytest tests/test_reward.py -q
"""
import math
import os
import random
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import common
import reward
from model import GPT, GPTConfig

TOKENIZER = common.get_tokenizer("bytes")
EOT = TOKENIZER.eot_token
TINY = dict(block_size=64, vocab_size=TOKENIZER.n_vocab, n_layer=2, n_head=2, n_embd=32)

def tiny_rm(seed=0):
    """A random scalar-head GPT; the head is widened (std 1) so that scores differ by more than rounding."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY, scalar_head=True)).eval()
    torch.nn.init.normal_(model.score_head.weight, std=1.0)
    return model

def one_line_error(excinfo, *must_name):
    message = str(excinfo.value)
    assert "\n" not in message, f"error spans several lines: {message!r}"
    for text in must_name:
        assert text in message, f"{text!r} not named in {message!r}"

# ----------------------------------------------------------------------------- the math: eq. (1) and its pairs

def test_pairwise_loss_is_log2_when_rewards_tie_and_matches_its_closed_form():
    """InstructGPT eq. (1): loss = -log σ(r(x, y_w) - r(x, y_l)), averaged over pairs. A tie gives log 2 whatever
    the reward's offset (only differences matter); other values match the formula written out with exp."""
    r = torch.tensor([-3.0, 0.0, 5.0])
    assert reward.pairwise_loss(r, r).item() == pytest.approx(math.log(2), abs=1e-6)  # fp32 rounding of log 2
    r_chosen, r_rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.5, 0.5])
    by_hand = sum(math.log(1 + math.exp(-(a - b))) for a, b in zip(r_chosen.tolist(), r_rejected.tolist())) / 3
    assert reward.pairwise_loss(r_chosen, r_rejected).item() == pytest.approx(by_hand, abs=1e-6)  # fp32

def test_pairwise_loss_stays_finite_with_correct_gradient_for_huge_margins():
    """With margins of ±1e4, log(sigmoid(.)) would be log(0) = -inf; logsigmoid gives ~0 for a right ranking and
    ~margin for a wrong one, with gradient d/dr_chosen = -σ(r_rejected - r_chosen) / N: 0 and -1/N here."""
    r_chosen = torch.tensor([1e4, -1e4], requires_grad=True)
    r_rejected = torch.zeros(2, requires_grad=True)
    loss = reward.pairwise_loss(r_chosen, r_rejected)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx((0 + 1e4) / 2, rel=1e-6)
    torch.testing.assert_close(r_chosen.grad, torch.tensor([0.0, -0.5]), atol=1e-6, rtol=0)  # σ(-1e4) is 0 in fp32
    torch.testing.assert_close(r_rejected.grad, -r_chosen.grad, atol=0, rtol=0)  # the loss sees only r_w - r_l

def test_four_way_ranking_yields_six_pairs_best_first():
    """InstructGPT §3.5: labelers rank K responses, giving C(K,2) comparisons; i < j means response i is preferred."""
    assert reward.ranking_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert reward.ranking_pairs(2) == [(0, 1)]
    assert len(reward.ranking_pairs(9)) == math.comb(9, 2)  # InstructGPT's largest K

def test_ranking_loss_is_the_mean_over_pairs_and_each_ranking_weighs_the_same():
    """eq. (1) has the 1/C(K,2) factor: a K=4 ranking's loss is the mean of its 6 pairwise losses, computed here
    by hand from reward.score on the same sequences, and a batch averages rankings, not pairs (K=2 and K=4 weigh
    the same). Accuracy counts the pairs the model orders like the labeler: 7 here, not 2 rankings."""
    model = tiny_rm()
    prompt = "Tell me about the cat.\n"
    ranking4 = ["The cat is happy.", "The cat is here.", "A cat.", "The cat is sad and alone."]
    ranking2 = ["A dog is happy.", "No."]
    with torch.no_grad():
        loss, n_correct, n_pairs = reward.ranking_loss(model, TOKENIZER, [(prompt, ranking4), ("Hi.\n", ranking2)],
                                                       64, "cpu")
        tokens, mask = reward.encode_for_scoring(TOKENIZER, [prompt] * 4 + ["Hi.\n"] * 2, ranking4 + ranking2,
                                                 64, "cpu")
        s = reward.score(model, tokens, mask).tolist()
    pair_losses = [-math.log(1 / (1 + math.exp(-(s[i] - s[j])))) for i, j in reward.ranking_pairs(4)]
    loss2 = -math.log(1 / (1 + math.exp(-(s[4] - s[5]))))
    assert loss.item() == pytest.approx((sum(pair_losses) / 6 + loss2) / 2, abs=1e-5)  # fp32 vs fp64 by hand
    n_right = sum(s[i] > s[j] for i, j in reward.ranking_pairs(4)) + (s[4] > s[5])
    assert int(n_correct) == n_right and n_pairs == 7
    assert 0 < n_right < 7  # a random model gets some pairs wrong, so the checks above are not vacuous

# ----------------------------------------------------------------------------- data: both formats, clear errors

def test_load_rankings_accepts_chosen_rejected_pairs_and_k_way_rankings(tmp_path):
    """A pair file (the TL;DR / HH-RLHF format) is a ranking with K = 2; InstructGPT's own data has K = 4..9."""
    path = str(tmp_path / "prefs_train.jsonl")
    common.write_jsonl(path, [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
                              {"prompt": "p2", "ranking": ["best", "middle", "worst"]}])
    assert reward.load_rankings(path) == [("p1", ["good", "bad"]), ("p2", ["best", "middle", "worst"])]

@pytest.mark.parametrize("bad_row, says", [
    ('{"prompt": "p", "ranking": ["only one"]}', "'ranking'"),
    ('{"prompt": "p", "ranking": "not a list"}', "'ranking'"),
    ('{"prompt": "p", "chosen": "good"}', "'rejected'"),
    ('{"chosen": "good", "rejected": "bad"}', "'prompt'"),
])
def test_bad_ranking_is_a_one_line_error_naming_file_and_line(tmp_path, bad_row, says):
    """STYLE rule 10: `prefs.jsonl:3: ...`, counting lines of the file (the blank line 2 included), not rows."""
    path = str(tmp_path / "prefs_train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n' + bad_row + "\n")
    with pytest.raises(ValueError) as excinfo:
        reward.load_rankings(path)
    one_line_error(excinfo, f"{path}:3:", says)

# ----------------------------------------------------------------------------- the score: at EOS, blind to padding

def test_score_is_read_at_the_end_of_text_token_and_ignores_right_padding():
    """InstructGPT §3.5: the RM outputs a scalar for (prompt, response); we read it at the response's EOS. Batching a
    sequence with longer ones adds right padding, which must change neither the token read (trl #1893 read a
    padding slot) nor the score: it equals the last position of the sequence scored alone, unpadded."""
    model = tiny_rm()
    prompt, response = "Tell me about the fox.\n", "The fox is happy."
    longer = ["The fox is happy and sings all day by the sea.", "The fox is happy" + " and glad" * 3 + "."]
    with torch.no_grad():
        tokens, mask = reward.encode_for_scoring(TOKENIZER, [prompt], [response], 64, "cpu")
        alone = model(tokens)[0, -1]  # no mask, no padding: the EOS is the last position
        assert tokens[0, -1] == EOT and mask.all()
        for n in (1, 2):
            tokens, mask = reward.encode_for_scoring(TOKENIZER, [prompt] * (n + 1), [response] + longer[:n],
                                                     64, "cpu")
            n_real = int(mask[0].sum())
            assert tokens.shape[1] > n_real and tokens[0, n_real - 1] == EOT  # padded, and the last real one is EOS
            scores = reward.score(model, tokens, mask)
            assert scores.shape == (n + 1,)
            assert abs(scores[0] - alone) < 1e-5  # fp32; the masked and unmasked kernels round differently

def test_a_response_packed_after_its_shared_prompt_scores_exactly_as_it_would_alone():
    """Training packs each ranking into one row (the prompt once, then its K responses) and runs the prompt once
    instead of K times. The mask and positions must make that invisible: every response scores as it does alone in
    encode_for_scoring (the form PPO scores in), whatever K, the other rankings in the batch, and the padding; an
    empty response's end-of-text follows the prompt, not the response packed before it."""
    model = tiny_rm()
    batch = [("Tell me about the cat.\n", ["The cat is happy.", "A cat.", "The cat is sad and alone.", "Cats!", ""]),
             ("Hi.\n", ["A dog is happy and glad all day.", "No."])]
    with torch.no_grad():
        tokens, _, ends = reward.encode_rankings(TOKENIZER, batch, 64, "cpu")
        packed = reward.score_rankings(model, TOKENIZER, batch, 64, "cpu")
        prompts, responses = [p for p, r in batch for _ in r], [x for _, r in batch for x in r]
        alone = reward.score(model, *reward.encode_for_scoring(TOKENIZER, prompts, responses, 64, "cpu"))
    assert tokens.shape == (2, len("Tell me about the cat.\n") + sum(len(r) + 1 for r in batch[0][1]))
    assert (tokens.flatten()[ends] == EOT).all() and len(ends) == 7
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)  # fp32; differently shaped kernels round apart
    assert alone.std() > 0.1  # the scores differ, so matching them is not vacuous

def test_packed_rankings_too_long_for_the_context_keep_their_ends_and_stay_inside_it():
    """As encode_example, a too-long input keeps its end: the shared prompt loses its start so that it and the
    longest response fit the context (each response's last position stays below block_size), and a response
    longer than the context alone keeps its last block_size tokens, end-of-text included."""
    prompt, ranking = "An instruction that is rather long.\n", ["Short.", "A somewhat longer response here."]
    for block_size, kept_prompt in ((40, 40 - 33), (20, 0)):
        tokens, sees, ends = reward.encode_rankings(TOKENIZER, [(prompt, ranking)], block_size, "cpu")
        positions = sees.sum(-1) - 1  # (1, T): what the model will use
        assert positions.max() < block_size
        assert TOKENIZER.decode(tokens[0, :kept_prompt].tolist()) == prompt[len(prompt) - kept_prompt:]
        assert (tokens.flatten()[ends] == EOT).all() and positions.flatten()[ends].max() == block_size - 1

# ----------------------------------------------------------------------------- main(): a tiny run on an easy task

ANIMALS = ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "yak")
# A stand-in gold judge for the agreement check. Any labeler.py beside the prompts file is found by
# common.load_labeler; this one scores every text differently, even an untrained policy's random bytes, so the
# check has pairs to compare (the stories labeler gives random bytes 0, and all-tied pairs make agreement nan).
LABELER = '''def score(prompt, response):
    return float(sum(response.encode()))
'''

def write_preferences(path, n, seed):
    """An easy preference set: the happy story beats the sad one. Half the rows are pairs, half K = 3 rankings."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        a, verb = rng.choice(ANIMALS), rng.choice(("is", "was", "felt", "seemed"))
        happy, sad = f"The {a} {verb} happy.", f"The {a} {verb} sad."
        prompt = f"Tell me about the {a}.\n"
        rows.append({"prompt": prompt, "chosen": happy, "rejected": sad} if i % 2 else
                    {"prompt": prompt, "ranking": [happy, f"The {a} {verb} here.", sad]})
    common.write_jsonl(str(path), rows)

@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """reward.main on a random tiny policy (the SFT init) and the easy preferences: ~1 s. Returns (cfg, result)."""
    data = tmp_path_factory.mktemp("data")
    write_preferences(data / "prefs_train.jsonl", 128, seed=0)
    write_preferences(data / "prefs_val.jsonl", 32, seed=1)
    common.write_jsonl(str(data / "sft_train.jsonl"),
                       [{"prompt": f"Tell me about the {a}.\n", "response": f"The {a} is here."} for a in ANIMALS])
    common.write_jsonl(str(data / "prompts.jsonl"), [{"prompt": f"Tell me about the {a}.\n"} for a in ANIMALS * 2])
    (data / "labeler.py").write_text(LABELER)
    torch.manual_seed(0)
    policy = GPT(GPTConfig(**TINY))
    init = str(data / "sft" / "ckpt.pt")
    common.save_checkpoint(init, {"kind": "policy", "model_config": asdict(policy.config),
                                  "model": policy.state_dict(), "tokenizer": "bytes", "step": 0, "config": {}})
    cfg = reward.Config(out_dir=str(data / "rm"), init=init, data=str(data / "prefs_train.jsonl"),
                        sft_data=str(data / "sft_train.jsonl"), n_normalize=8, prompts=str(data / "prompts.jsonl"),
                        n_agreement=16, batch_size=8, freeze_layers=1, group_by_length=4, lr=3e-3, warmup_steps=2,
                        eval_interval=8, max_new_tokens=8, device="cpu", dtype="float32")
    return cfg, reward.main(cfg)

def test_tiny_reward_model_run_learns_the_preference(rm_run):
    """Smoke test that asserts learning: after one epoch (InstructGPT trains its RM for one), the RM orders held-out
    pairs well above chance (0.5), and the agreement with the labeler on fresh policy samples is a real number."""
    cfg, result = rm_run
    assert result["val_accuracy"] > 0.8
    assert 0.0 <= result["labeler_agreement"] <= 1.0  # nan (no decided pairs) would fail both comparisons
    ckpt = common.load_checkpoint(cfg.out_dir, "reward")
    assert ckpt["val_accuracy"] == result["val_accuracy"] and ckpt["model_config"]["scalar_head"]

def test_frozen_lower_blocks_keep_their_sft_weights_and_the_top_block_learns(rm_run):
    """The RM trains only its top blocks (freeze_layers): the embeddings and the lowest block come out of training
    bit-identical to the SFT model they started from, while the top block has moved."""
    cfg, _ = rm_run
    sft = common.load_checkpoint(cfg.init, "policy")["model"]
    rm = common.load_checkpoint(cfg.out_dir, "reward")["model"]
    frozen = [k for k in rm if k.startswith(("transformer.wte.", "transformer.wpe.", "transformer.h.0."))]
    trained = [k for k in rm if k.startswith("transformer.h.1.") and k.endswith(".weight")]
    assert frozen and trained
    assert all(torch.equal(rm[k], sft[k]) for k in frozen)
    assert not any(torch.equal(rm[k], sft[k]) for k in trained)

def test_freezing_every_block_is_a_one_line_error(rm_run):
    cfg, _ = rm_run
    with pytest.raises(ValueError) as excinfo:
        reward.main(replace(cfg, freeze_layers=TINY["n_layer"], out_dir=cfg.out_dir + "_frozen"))
    one_line_error(excinfo, "freeze_layers=2")

def test_length_grouped_batches_keep_every_ranking_once_and_need_less_padding():
    """Length grouping reorders, never drops or repeats: the batches hold each index once. Batches cut from sorted
    groups pad less than a plain cut of the same shuffled order, and group=0 is that plain cut."""
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(200)]
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0)).tolist()
    padding = lambda batches: sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    plain = reward.length_grouped_batches(order, lengths, 8, 0, torch.Generator().manual_seed(0))
    grouped = reward.length_grouped_batches(order, lengths, 8, 8, torch.Generator().manual_seed(0))
    assert plain == [order[i:i + 8] for i in range(0, 200, 8)]
    assert sorted(i for b in grouped for i in b) == list(range(200)) and all(len(b) == 8 for b in grouped)
    assert padding(grouped) < 0.5 * padding(plain)

def test_reward_normalisation_makes_demonstrations_score_zero_on_average(rm_run):
    """InstructGPT §3.5: the RM's bias is shifted so that the SFT demonstrations average a reward of 0 (the loss
    sees only differences, so the offset is free). Checked where it is used: the saved checkpoint's scores."""
    cfg, result = rm_run
    ckpt = common.load_checkpoint(cfg.out_dir, "reward")
    assert ckpt["reward_shift"] == result["reward_shift"] != 0.0
    model = GPT.from_checkpoint(ckpt)
    demos = common.read_jsonl(cfg.sft_data, ["prompt", "response"])[:cfg.n_normalize]
    with torch.no_grad():
        tokens, mask = reward.encode_for_scoring(TOKENIZER, [d["prompt"] for d in demos],
                                                 [d["response"] for d in demos], 64, "cpu")
        scores = reward.score(model, tokens, mask)
    assert abs(scores.mean().item()) < 1e-4  # fp32 mean of 8 scores of size ~1
    assert scores.std() > 1e-3  # the shift moved the mean; it did not collapse the scores

def test_defaults_come_from_the_data_folder_and_a_missing_file_stops_before_training(rm_run, tmp_path):
    """Real data never falls back on the stories task's files: the demonstrations the RM is normalised on
    (InstructGPT §3.5) default to the sft_train.jsonl beside --data, and a missing one is an error before training."""
    cfg, _ = rm_run
    folder = tmp_path / "real"
    folder.mkdir()
    for name in ("prefs_train.jsonl", "prefs_val.jsonl"):
        shutil.copy(Path(cfg.data).parent / name, folder / name)
    real = replace(cfg, out_dir=str(tmp_path / "rm"), data=str(folder / "prefs_train.jsonl"), sft_data="", prompts="")
    with pytest.raises(FileNotFoundError, match="real/sft_train.jsonl: no such file"):
        reward.main(real)
    assert not {"ckpt.pt", "log.jsonl"} & set(os.listdir(tmp_path / "rm"))  # nothing trained, nothing logged
    shutil.copy(cfg.sft_data, folder / "sft_train.jsonl")
    result = reward.main(real)  # no labeler.py and no prompts_val.jsonl beside it: no agreement check, no error
    assert result["labeler_agreement"] is None
    assert common.load_checkpoint(real.out_dir, "reward")["reward_shift"] == result["reward_shift"]

def test_micro_batches_change_memory_not_the_reward_models_training(rm_run, tmp_path):
    """--micro_batch_size splits each batch of rankings into micro-batches whose gradients accumulate, each mean
    weighted by its share of the batch's rankings: all 16 steps log the same losses (atol 1e-5: fp32, the same sums
    in another order) and end at the same weights. Except three kinds of weights eq. (1) cannot see, since each
    shifts every score (or, for attention's key biases, every attention logit of a query) by the same amount: their
    exact gradient is 0, and Adam's normalisation turns the rounding noise left there into full-size steps."""
    cfg, _ = rm_run
    micro_cfg = replace(cfg, out_dir=str(tmp_path / "rm_micro"), micro_batch_size=3)  # 3 + 3 + 2 of 8 rankings
    reward.main(micro_cfg)
    losses = [[r["train/loss"] for r in common.read_jsonl(os.path.join(c.out_dir, "log.jsonl")) if "train/loss" in r]
              for c in (cfg, micro_cfg)]
    assert len(losses[0]) == 16 and losses[1] == pytest.approx(losses[0], abs=1e-5)
    weights = [common.load_checkpoint(c.out_dir)["model"] for c in (cfg, micro_cfg)]
    for name, weight in weights[0].items():
        other = weights[1][name]
        if name in ("score_head.bias", "transformer.ln_f.bias"):
            continue
        if name.endswith("attn.c_attn.bias"):  # [query; key; value] biases: drop the key third
            C = len(weight) // 3
            weight, other = torch.cat([weight[:C], weight[2 * C:]]), torch.cat([other[:C], other[2 * C:]])
        torch.testing.assert_close(other, weight, atol=1e-5, rtol=0, msg=name)
