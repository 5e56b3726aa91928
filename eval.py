"""
Evaluation: a policy against the SFT model on the same val prompts and seed, as InstructGPT's §4 compares its models
with the 175B SFT baseline. Three judges: the labeler (the built-in task's scripted gold judge, our stand-in for the
paper's human evaluation), the reward model (the proxy PPO optimised), and KL(π || π_SFT) (how far π moved).
Writes DIR/eval.json; ppo.py calls evaluate() at its evaluations, and --report gathers every run into out/report.md.
    python eval.py --policy=out/ppo --sft=out/sft --reward=out/rm --prompts=data/stories/prompts_val.jsonl \
        --out_dir=out/eval_ppo
    python eval.py --report
    python eval.py --seeds_of='out/eval_ppo_seed*'     # mean ± standard error over training seeds
The report's other rows: the base model zero-shot and few-shot (--few_shot=K demonstrations before each prompt, as
InstructGPT prompts GPT-3 in its "GPT-3 prompted" baseline), best-of-N sampling from SFT ranked by the RM, DPO,
critic-free PPO, PPO from the base model; and the labeling-budget figure (run.sh budget).
"""
import glob
import hashlib
import json
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import (atomic_write, check_range, get_tokenizer, load_labeler, one_process_only, read_json, read_jsonl,
                    run, set_seed, setup_device, write_json)
from model import load_model, response_logprobs
from reward import encode_for_scoring, score
from sample import best_of_n, generate

@dataclass
class Config:
    policy: str = ""                   # the policy judged (default: the SFT model itself)
    sft: str = "out/sft"               # the baseline every policy is compared with
    reward: str = "out/rm"             # the reward model (the proxy judge)
    prompts: str = "data/stories/prompts_val.jsonl"  # a labeler.py beside it makes the gold judge available
    out_dir: str = "out/eval"          # eval.json goes here; --report reads the folder above it
    n_eval: int = 200                  # the first n_eval prompts
    few_shot: int = 0                  # prompt the policy with this many demonstrations (sft_train.jsonl) first
    best_of: int = 1                   # best-of-N sampling from the policy, ranked by the reward model
    max_new_tokens: int = 120
    temperature: float = 0.7           # the same as PPO's rollouts
    report: bool = False               # gather out/*/eval.json into out/report.md instead
    seeds_of: str = ""                 # instead: a glob of run folders, one per training seed: mean ± s.e.
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"

def check_config(cfg):
    """Every setting's range, checked before anything runs: one place, so new keys go here."""
    check_range(cfg, ("n_eval", "best_of", "max_new_tokens"), 1)
    check_range(cfg, ("few_shot",), 0)
    check_range(cfg, ("temperature",), 0, strict=True)  # KL(π || π_SFT) reads log-probs at this temperature

# ----------------------------------------------------------------------------- the judges

def win_rate(a, b):
    """Share of pairs where a beats b, ties counting half: (N,), (N,) -> float."""
    return ((a > b).float() + 0.5 * (a == b).float()).mean().item() if len(a) else float("nan")

@torch.no_grad()
def sample_and_score(model, reward_model, tokenizer, prompts, cfg, ctx, prefix="", best_of=1):
    """One response per prompt, and the RM's score of it. Every model draws with the same generator seed, so two
    identical models give identical samples. Returns (texts, RM scores (N,), the Generation, or None when the text
    is not exactly what the model sampled from the plain prompt)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 12345)  # the same draws for every model
    prompt_ids = [tokenizer.encode_ordinary(prefix + p) for p in prompts]
    with ctx:
        if best_of > 1:
            responses, best_scores = best_of_n(model, reward_model, prompt_ids, best_of, cfg.max_new_tokens,
                                               temperature=cfg.temperature, eos_id=tokenizer.eot_token,
                                               generator=generator)
            texts = [tokenizer.decode(r, errors="replace") for r in responses]
            if not prefix:
                # the scores best_of_n ranked by, on the sequences sampled, as the other arm is scored (decoding and
                # re-encoding could change invalid UTF-8, and adds an end-of-text to a response cut at the limit)
                return texts, best_scores.cpu(), None
        else:
            out = generate(model, prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature,
                           eos_id=tokenizer.eot_token, generator=generator).trimmed()
            texts = out.texts(tokenizer)
            if not prefix:  # exactly the sequences sampled, as PPO's rollouts are scored
                return texts, score(reward_model, out.tokens, out.attention_mask).float().cpu(), out
        # the RM reads the plain prompt (no few-shot prefix) and the response, closed by end-of-text
        return texts, score(reward_model, *encode_for_scoring(
            tokenizer, prompts, texts, reward_model.config.block_size, device)).float().cpu(), None

def sft_side_cached(sft_policy, reward_model, tokenizer, prompts, cfg, ctx, sft_source, reward_source):
    """The SFT model's side of an evaluation, (texts, RM scores (N,)), read from a cache file beside the SFT checkpoint
    when one was written for the same two checkpoint files, prompts and sampling settings: PPO's evaluations and
    each report row all compare with the very same SFT samples, so run.sh generates them once. The key holds each
    checkpoint's size and modification time, so retraining a model invalidates it; a change to the sampler's code
    does not (delete the cache files then). GPT-2 weights by name have no file to key on and are not cached."""
    files = [s if os.path.isfile(s) else os.path.join(s, "ckpt.pt") for s in (sft_source, reward_source)]
    if not all(os.path.isfile(f) for f in files):
        return sample_and_score(sft_policy, reward_model, tokenizer, prompts, cfg, ctx)[:2]
    device = next(sft_policy.parameters()).device
    key = [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files] + [
        prompts, cfg.seed, cfg.max_new_tokens, cfg.temperature, str(device), cfg.dtype]
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
    path = os.path.join(os.path.dirname(files[0]), f"eval_sft_{digest}.json")
    if os.path.exists(path):
        cached = read_json(path)
        return cached["texts"], torch.tensor(cached["rm_scores"])  # float32, as computed: the same numbers
    texts, rm_scores, _ = sample_and_score(sft_policy, reward_model, tokenizer, prompts, cfg, ctx)
    write_json(path, {"texts": texts, "rm_scores": rm_scores.tolist()}, indent=None)  # a reader never sees half
    return texts, rm_scores

KL_CHUNK = 64  # rows per forward of the KL estimate: n_eval rows of GPT-2-sized logits at once may not fit a GPU

@torch.no_grad()
def evaluate(policy, sft_policy, reward_model, tokenizer, prompts, labeler, cfg, ctx, prefix="", best_of=1,
             sft_side=None):
    """Generate from π and from the SFT model with the same settings and seed, and compare them: by the RM, by the
    labeler (the gold judge, built-in task only), and by KL. Returns eval.json's dict and the sample texts.
    The SFT model's side never changes within a run: pass sft_side (from sft_side_cached, or sample_and_score's
    first two results), computed once, to skip regenerating it. π may be prompted with a few-shot `prefix`, or be
    best-of-`best_of` sampling; KL is then not estimated (null), since π's own log-probs are not those of the text
    it returned. When π is the SFT model itself, its samples are the SFT side's and KL is 0."""
    sft_texts, sft_scores = sft_side or sample_and_score(sft_policy, reward_model, tokenizer, prompts, cfg, ctx)[:2]
    result = {"n_prompts": len(prompts), "kl_ppo_sft": None}
    if policy is sft_policy and not prefix and best_of == 1:  # the SFT row: the same seed draws the same samples
        ppo_texts, ppo_scores, out = sft_texts, sft_scores, None
        result["kl_ppo_sft"] = 0.0
    else:  # each side draws from its own generator, so the order of the two calls changes nothing
        ppo_texts, ppo_scores, out = sample_and_score(policy, reward_model, tokenizer, prompts, cfg, ctx, prefix,
                                                      best_of)
    if out is not None:  # KL(π || π_sft) on π's samples, per sequence
        chunks = [slice(i, i + KL_CHUNK) for i in range(0, len(out.tokens), KL_CHUNK)]  # memory, not results
        with ctx:
            logprobs = [torch.cat([response_logprobs(m, out.tokens[c], out.attention_mask[c], out.prompt_len,
                                                     cfg.temperature)[0] for c in chunks])
                        for m in (policy, sft_policy)]  # the same code path for both, as in training
        result["kl_ppo_sft"] = ((logprobs[0] - logprobs[1]) * out.response_mask).sum(1).mean().item()
    texts, rm_scores, gold = {"ppo": ppo_texts, "sft": sft_texts}, {"ppo": ppo_scores, "sft": sft_scores}, {}
    for name in ("ppo", "sft"):
        result[f"rm_score_{name}"] = rm_scores[name].mean().item()  # sync point: eval only
        if labeler is not None:
            gold[name] = torch.tensor([labeler.score(p, t) for p, t in zip(prompts, texts[name])])
        result[f"labeler_score_{name}"] = gold[name].mean().item() if labeler else None
    result["win_rate_rm"] = win_rate(rm_scores["ppo"], rm_scores["sft"])
    result["win_rate_labeler"] = win_rate(gold["ppo"], gold["sft"]) if labeler else None
    is_heldout = torch.tensor([bool(labeler.is_heldout(p)) for p in prompts]) if labeler else None
    result["heldout_win_rate_labeler"] = (win_rate(gold["ppo"][is_heldout], gold["sft"][is_heldout])
                                          if labeler and is_heldout.any() else None)
    return result, texts

def save_eval(out_dir, result, texts, prompts, n_show=3):
    """eval.json and samples.json into out_dir, and the first few samples side by side on stdout."""
    write_json(os.path.join(out_dir, "eval.json"), result)
    write_json(os.path.join(out_dir, "samples.json"), {"prompts": prompts, **texts}, indent=1)
    for i in range(min(n_show, len(prompts))):  # reading samples is the best RLHF debugger
        tqdm.write(f"  prompt: {prompts[i].strip()}\n    SFT: {texts['sft'][i]}\n    PPO: {texts['ppo'][i]}")

# ----------------------------------------------------------------------------- seeds and the report

SEED_KEYS = ("labeler_score_ppo", "win_rate_labeler", "heldout_win_rate_labeler", "rm_score_ppo", "kl_ppo_sft")

def seed_spread(pattern):
    """Mean, standard error and count over the eval.json of every folder matching the glob `pattern`, one folder per
    training seed: {key: (mean, s.e., n)} for each of SEED_KEYS that two or more runs have. s.e. = the sample standard
    deviation / sqrt(n): how far the mean itself may be off, the number a claim "A beats B" must beat."""
    runs = [read_json(path) for path in sorted(glob.glob(os.path.join(pattern, "eval.json")))]
    spread = {}
    for key in SEED_KEYS:
        values = [result[key] for result in runs if result.get(key) is not None]
        if len(values) >= 2:
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            spread[key] = (mean, std / len(values) ** 0.5, len(values))
    return spread

def budget_splits(out_root):
    """run.sh budget's runs: (share of the budget spent on demonstrations in %, demonstrations, rankings, eval.json)
    for every out/budget_d<share>/ that has been evaluated, by share."""
    splits = []
    for path in glob.glob(os.path.join(out_root, "budget_d*", "eval", "eval.json")):
        folder = os.path.dirname(os.path.dirname(path))
        share = os.path.basename(folder)[len("budget_d"):]
        counts = [len(read_jsonl(os.path.join(folder, "data", f"{kind}_train.jsonl"))) for kind in ("sft", "prefs")]
        if share.isdigit():
            splits.append((int(share), *counts, read_json(path)))
    return sorted(splits, key=lambda split: split[0])

def write_report(out_root="out"):
    """InstructGPT's Figure 1 in miniature: every evaluated policy against SFT on the same val prompts, judged by the
    labeler (gold) and the RM (proxy), plus PPO's curves and the β sweep when matplotlib is there."""
    rows = [("base model, zero-shot", "eval_base"), ("base model, 1-shot prompt", "eval_fewshot"), ("SFT", "eval_sft"),
            ("best-of-N from SFT, ranked by the RM", "eval_bon"), ("PPO", "ppo"), ("PPO-ptx", "ppo_ptx"),
            ("PPO against the labeler itself (a perfect RM)", "ppo_gold")]
    rows += [(f"PPO, fixed β = {beta}", f"sweep_beta{beta}") for beta in ("0.1", "0.02", "0")]
    rows += [("DPO", "eval_dpo"), ("critic-free PPO (RLOO)", "ppo_rloo"), ("PPO from the base model (no SFT)",
                                                                           "eval_ppo_base")]
    # run.sh seeds: each of these rows re-run on several training seeds, all evaluated at the same evaluation seed
    seed_runs = {"ppo": "eval_ppo_seed*", "eval_dpo": "eval_dpo_seed*", "ppo_rloo": "eval_ppo_rloo_seed*"}
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["# nanoInstruct report (built-in stories task, val prompts)", "",
             "| policy | labeler score | win rate vs SFT (labeler) | held-out win rate | RM score | KL to SFT | "
             "over training seeds: labeler score / win rate (mean ± s.e.) |", "|---|---|---|---|---|---|---|"]
    sweep = []
    for name, run_name in rows:
        path = os.path.join(out_root, run_name, "eval.json")
        spread = seed_spread(os.path.join(out_root, seed_runs[run_name])) if run_name in seed_runs else {}
        over_seeds = (" / ".join(f"{spread[k][0]:.3f} ± {spread[k][1]:.3f}" for k in SEED_KEYS[:2])
                      + f" ({spread[SEED_KEYS[0]][2]} seeds)") if SEED_KEYS[1] in spread else "—"
        if os.path.exists(path):
            e = read_json(path)
            lines.append(f"| {name} | {fmt(e['labeler_score_ppo'])} | {fmt(e['win_rate_labeler'])} | "
                         f"{fmt(e['heldout_win_rate_labeler'])} | {fmt(e['rm_score_ppo'])} | {fmt(e['kl_ppo_sft'])} | "
                         f"{over_seeds} |")
            if run_name.startswith("sweep") or run_name in ("eval_sft", "ppo"):  # SFT is the sweep's KL = 0 end
                sweep.append((e["kl_ppo_sft"], e["rm_score_ppo"], e["labeler_score_ppo"]))
    budget = budget_splits(out_root)
    if budget:
        lines += ["", "## One labeling budget: demonstrations or rankings? (run.sh budget)", "",
                  "Assumed costs: a demonstration 1, a K = 4 ranking 2/3 (reading four stories against writing one).",
                  "",
                  "| budget on demonstrations | demonstrations | K = 4 rankings | PPO labeler score | win rate vs SFT |",
                  "|---|---|---|---|---|"]
        lines += [f"| {share}% | {n_demos:,} | {n_prefs:,} | {fmt(e['labeler_score_ppo'])} | "
                  f"{fmt(e['win_rate_labeler'])} |" for share, n_demos, n_prefs, e in budget]
    samples_path = os.path.join(out_root, "ppo", "samples.json")
    if os.path.exists(samples_path):
        samples = read_json(samples_path)
        lines += ["", "## Side by side (same prompt, same seed)", ""]
        for i in range(min(5, len(samples["prompts"]))):
            lines += [f"- **{samples['prompts'][i].strip()}**", f"  - SFT: {samples['sft'][i]}",
                      f"  - PPO: {samples['ppo'][i]}"]
    try:  # figures are optional: without matplotlib the numbers above are the report
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        log_path = os.path.join(out_root, "ppo", "log.jsonl")
        if os.path.exists(log_path):
            with open(log_path) as f:
                records = [r for r in map(json.loads, f) if "objective/kl" in r]
            fig, axes = plt.subplots(1, 3, figsize=(12, 3))
            for ax, key in zip(axes, ("objective/scores", "objective/labeler_score", "objective/kl")):
                ax.plot([r["step"] for r in records], [r.get(key) for r in records])
                ax.set(title=key, xlabel="PPO iteration")
            fig.tight_layout()
            with atomic_write(os.path.join(out_root, "ppo_curves.png"), "wb") as f:
                fig.savefig(f, format="png")
            lines += ["", "![PPO curves](ppo_curves.png)"]
        if len(sweep) > 2:  # SFT and PPO alone are no sweep
            sweep.sort()
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot([s[0] for s in sweep], [s[1] for s in sweep], "o-", label="RM score (proxy)")
            ax2 = ax.twinx()
            ax2.plot([s[0] for s in sweep], [s[2] for s in sweep], "s-", color="C1", label="labeler score (gold)")
            ax.set(xlabel="KL(PPO || SFT), nats", ylabel="RM score")
            ax2.set(ylabel="labeler score")
            fig.legend(loc="upper center")
            fig.tight_layout()
            with atomic_write(os.path.join(out_root, "overoptimization.png"), "wb") as f:
                fig.savefig(f, format="png")
            lines += ["", "![over-optimisation](overoptimization.png)"]
        if len(budget) > 1:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot([b[0] for b in budget], [b[3]["labeler_score_ppo"] for b in budget], "o-")
            ax.set(xlabel="share of the labeling budget spent on demonstrations (%)",
                   ylabel="labeler score of the final PPO policy", title="a fixed budget: demonstrations vs rankings")
            fig.tight_layout()
            with atomic_write(os.path.join(out_root, "budget.png"), "wb") as f:
                fig.savefig(f, format="png")
            lines += ["", "![labeling budget](budget.png)"]
    except ImportError:
        lines += ["", "(install matplotlib for figures)"]
    text = "\n".join(lines) + "\n"
    with atomic_write(os.path.join(out_root, "report.md")) as f:
        f.write(text)
    print(text)

# ----------------------------------------------------------------------------- config -> models -> data -> judge

def main(cfg: Config) -> dict:
    one_process_only("eval.py")
    if cfg.report:
        return write_report(os.path.dirname(cfg.out_dir) or "out")
    if cfg.seeds_of:  # one line per judge: what a claim about this row may rest on
        spread = seed_spread(cfg.seeds_of)
        if not spread:
            raise ValueError(f"--seeds_of={cfg.seeds_of}: fewer than two run folders with an eval.json match it")
        for key, (mean, se, n) in spread.items():
            print(f"{key:<26} {mean:.3f} ± {se:.3f}  (mean ± standard error over {n} training seeds)")
        return spread
    check_config(cfg)
    set_seed(cfg.seed)
    device, dtype, ctx = setup_device(cfg.device, cfg.dtype)
    os.makedirs(cfg.out_dir, exist_ok=True)
    sft_policy, sft_ckpt = load_model(cfg.sft, kind="policy")
    is_sft = not cfg.policy or os.path.normpath(cfg.policy) == os.path.normpath(cfg.sft)
    policy = sft_policy if is_sft else load_model(cfg.policy, kind="policy")[0]
    reward_model, rm_ckpt = load_model(cfg.reward, kind="reward")
    if rm_ckpt["tokenizer"] != sft_ckpt["tokenizer"]:
        raise ValueError(f"{cfg.reward}: tokenizer {rm_ckpt['tokenizer']} differs from {cfg.sft}'s "
                         f"{sft_ckpt['tokenizer']}")
    for model in (sft_policy, policy, reward_model):
        model.to(device).eval().requires_grad_(False)
    tokenizer = get_tokenizer(sft_ckpt["tokenizer"])
    prompts = [r["prompt"] for r in read_jsonl(cfg.prompts, ["prompt"])][:cfg.n_eval]
    demos = (read_jsonl(os.path.join(os.path.dirname(cfg.prompts), "sft_train.jsonl"), ["prompt", "response"])
             if cfg.few_shot > 0 else [])  # the few-shot examples: the first demonstrations, then a blank line
    prefix = "".join(d["prompt"] + d["response"] + "\n\n" for d in demos[:cfg.few_shot])
    sft_side = sft_side_cached(sft_policy, reward_model, tokenizer, prompts, cfg, ctx, cfg.sft, cfg.reward)
    result, texts = evaluate(policy, sft_policy, reward_model, tokenizer, prompts, load_labeler(cfg.prompts), cfg,
                             ctx, prefix=prefix, best_of=cfg.best_of, sft_side=sft_side)
    save_eval(cfg.out_dir, result, texts, prompts)
    print(json.dumps(result))
    return result

if __name__ == "__main__":
    run(main, Config)
