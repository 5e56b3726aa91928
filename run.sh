#!/usr/bin/env bash
# The whole InstructGPT pipeline on the built-in stories task, on a laptop CPU (sized to stay under 10 min on 2 cores):
#     bash run.sh          # prepare -> pretrain -> SFT -> reward model -> PPO -> evaluation -> out/report.md
#     bash run.sh full     # + PPO-ptx, PPO vs the labeler, a β sweep (over-optimisation); DPO, RLOO, PPO from base
#     bash run.sh seeds    # PPO, DPO and critic-free PPO again on training seeds 1..${SEEDS:-3}: mean ± s.e. per row
#     bash run.sh budget   # one labeling budget split five ways between demonstrations and rankings: out/budget.png
#     bash run.sh gpt2     # GPT-2 small on HH-RLHF, for one GPU;  bash run.sh tldr: on OpenAI's TL;DR
# Finished stages are skipped and interrupted ones resumed: delete out/<stage> to redo one. Device: automatic.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-quick}
D=data/stories
# An interrupted stage picks up from its last checkpoint when run.sh is run again (same data order, same RNG state).
resume() { [ -f "$1/ckpt.pt" ] && echo --resume || true; }

# -- real data, GPT-2 on one GPU: prepare -> SFT -> RM -> PPO (its eval.json has the labeler keys null). Env: MODEL
# (GPT-2 name or HF folder), DATA_DIR (raw copies in DATA_DIR/<dataset>; unset: download), OUT, SMOKE=1 (CI).
real() {  # RECIPE DATASET SFT_FLAGS RM_FLAGS PPO_FLAGS; one template renders the demos', pairs' and PPO's prompts
    local R=${OUT:-out}/$1 D=${OUT:-out}/data/$2 S=("" "" "")
    [ "${SMOKE:-0}" = 1 ] && S=("--max_steps=4 --batch_size=2 --grad_accum=1 --eval_interval=2 --eval_batches=1" \
        "--max_steps=3 --batch_size=2 --n_normalize=4" "--n_iters=2 --batch_size=4 --n_minibatches=2 --ppo_epochs=1 \
        --micro_batch_size=1 --max_new_tokens=8 --n_eval=4 --eval_interval=2")  # a few steps each: the plumbing
    [ -f $D/prompts_train.jsonl ] || python data/$2/prepare.py --out=$D ${DATA_DIR:+--source=$DATA_DIR/$2}
    python sft.py --init=${MODEL:-gpt2} --data=$D/sft_train.jsonl --out_dir=${R}_sft $3 ${S[0]} $(resume ${R}_sft)
    [ -f ${R}_rm/ckpt.pt ] || python reward.py --init=${R}_sft --data=$D/prefs_train.jsonl --out_dir=${R}_rm $4 ${S[1]}
    python ppo.py --sft=${R}_sft --reward=${R}_rm --prompts=$D/prompts_train.jsonl --out_dir=${R}_ppo \
        --skip_long_prompts $5 ${S[2]} $(resume ${R}_ppo)
}
# SFT: the N+ details' sft.py defaults (Huang et al. 2024, for pythia-160m, GPT-2 small's size): lr 3e-6, cosine to 0,
# no warmup, batch 128, one epoch. HH (Bai et al. 2022): RM as lm-human-preferences' GPT-2 (124M) one, lr 5e-5, batch
# 32; PPO as trl's GPT-2 example (lr 1.41e-5 annealed, β 0.2 adapted to 6 nats over 10,000 rollouts, 4 epochs, λ 0.95)
# and lm-human-preferences (temperature 0.7, whitened scores, -1 without end-of-text); 128-token replies as the N+
# details' HH data. TL;DR (Stiennon et al. 2020), the N+ details: RM lr 3e-6, batch 64; PPO lr 3e-6, fixed β 0.05,
# 4 epochs, λ 0.95, raw scores, temperature 0.7, -1 without end-of-text, 53 tokens. Both: RMs train every layer, one
# epoch; PPO on batches of 512 in one minibatch (all three), in micro-batches that fit one GPU; HH ~one pass over its
# prompts (80 iterations), TL;DR 128k episodes (the N+ details ran 1M on 8 GPUs).
SFT="--lr=3e-6 --min_lr_ratio=0 --warmup_steps=0 --batch_size=16 --grad_accum=8 --eval_interval=100"
PPO="--ppo_epochs=4 --lam=0.95 --temperature=0.7 --no_eos_score=-1 --batch_size=512 --n_minibatches=1 --n_eval=256"
case $MODE in  # --micro_batch_size: rows per forward and backward, memory only (the updates are the same)
    gpt2) real gpt2 hh_rlhf "$SFT --max_steps=320" "--lr=5e-5 --batch_size=32 --micro_batch_size=8 --freeze_layers=0" \
              "$PPO --lr=1.41e-5 --init_kl_coef=0.2 --target_kl=6 --kl_horizon=10000 --max_new_tokens=128 \
              --n_iters=80 --micro_batch_size=16 --eval_interval=20"
          exit 0;;
    tldr) real tldr tldr "$SFT --max_steps=900" "--lr=3e-6 --batch_size=64 --micro_batch_size=8 --freeze_layers=0" \
              "$PPO --lr=3e-6 --adaptive_kl=False --init_kl_coef=0.05 --whiten_rewards=False --max_new_tokens=53 \
              --n_iters=250 --micro_batch_size=32 --eval_interval=50"
          exit 0;;
esac

# -- data: instructions, noisy demonstrations, K=4 rankings by the scripted labeler, prompts (deterministic)
python $D/prepare.py
# -- a "base model": next-token pretraining on unconditioned stories (stands in for GPT-3), packed into 256-byte chunks
python sft.py --mode=pretrain --data=$D/pretrain_train.jsonl --out_dir=out/base --max_steps=600 --batch_size=8 \
    --lr=6e-3 $(resume out/base)
# -- step 1, SFT: loss on the demonstrations' response tokens only
SFT="--init=out/base --max_steps=300 --lr=1e-3 --warmup_steps=20"  # the budget's SFT runs are the same
python sft.py $SFT --data=$D/sft_train.jsonl --out_dir=out/sft $(resume out/sft)
# -- step 2, the reward model: SFT trunk + scalar head, trained on all C(4,2) pairs of each ranking
[ -f out/rm/ckpt.pt ] || python reward.py --init=out/sft --data=$D/prefs_train.jsonl --out_dir=out/rm
# -- step 3, PPO against the RM with a KL penalty to the SFT model
python ppo.py --sft=out/sft --reward=out/rm --prompts=$D/prompts_train.jsonl --out_dir=out/ppo $(resume out/ppo)
# -- the report's other rows, each judged against SFT on the same val prompts
EVAL="python eval.py --sft=out/sft --reward=out/rm --prompts=$D/prompts_val.jsonl"
[ -f out/eval_base/eval.json ] || $EVAL --policy=out/base --out_dir=out/eval_base
# (1-shot: the first demonstration, ~120 bytes, before each prompt leaves ~80 of the model's 256 positions)
[ -f out/eval_fewshot/eval.json ] || $EVAL --policy=out/base --few_shot=1 --max_new_tokens=80 \
    --out_dir=out/eval_fewshot
[ -f out/eval_sft/eval.json ] || $EVAL --out_dir=out/eval_sft
[ -f out/eval_bon/eval.json ] || $EVAL --best_of=8 --out_dir=out/eval_bon
if [ "$MODE" = full ]; then
    # PPO-ptx (InstructGPT eq. 2): the pretraining loss mixed into the policy update
    python ppo.py --sft=out/sft --reward=out/rm --out_dir=out/ppo_ptx --ptx_coef=1.0 $(resume out/ppo_ptx)
    # the same PPO with the labeler as its reward: what a perfect reward model would give (the RM still evaluates)
    python ppo.py --sft=out/sft --reward=out/rm --out_dir=out/ppo_gold --gold_reward $(resume out/ppo_gold)
    # over-optimisation (Gao et al. 2022): the looser the KL leash, the higher the proxy reward... A fixed β each
    # (0.02 is InstructGPT's; 0 is no leash), over 45 iterations, so that the loose ones drift far from SFT
    for BETA in 0.1 0.02 0; do
        python ppo.py --sft=out/sft --reward=out/rm --out_dir=out/sweep_beta$BETA --adaptive_kl=false \
            --init_kl_coef=$BETA --n_iters=45 $(resume out/sweep_beta$BETA)
    done
    # DPO (Rafailov et al. 2023) on the RM's rankings, from and against SFT
    [ -f out/dpo/ckpt.pt ] || python dpo.py --sft=out/sft --data=$D/prefs_train.jsonl --out_dir=out/dpo
    [ -f out/eval_dpo/eval.json ] || $EVAL --policy=out/dpo --out_dir=out/eval_dpo
    # critic-free PPO: RLOO (Ahmadian et al. 2024), 16 prompts x 4 samples, the same 64 rollouts per iteration
    python ppo.py --out_dir=out/ppo_rloo --advantage=rloo --samples_per_prompt=4 $(resume out/ppo_rloo)
    # RLHF without SFT: PPO from the base model (its reference and start), judged against SFT like every row. The RM
    # (and so the value model) is still out/rm, trained from SFT: only the policy skips the demonstrations
    python ppo.py --sft=out/base --out_dir=out/ppo_base $(resume out/ppo_base)
    [ -f out/eval_ppo_base/eval.json ] || $EVAL --policy=out/ppo_base --out_dir=out/eval_ppo_base
fi
if [ "$MODE" = seeds ]; then
    # the same SFT model and RM; each training seed changes the data order and the draws, never the evaluation seed
    for S in $(seq 1 ${SEEDS:-3}); do
        python ppo.py --out_dir=out/ppo_seed$S --seed=$S $(resume out/ppo_seed$S)
        python ppo.py --out_dir=out/ppo_rloo_seed$S --seed=$S --advantage=rloo --samples_per_prompt=4 \
            $(resume out/ppo_rloo_seed$S)
        [ -f out/dpo_seed$S/ckpt.pt ] || python dpo.py --out_dir=out/dpo_seed$S --seed=$S
        for R in ppo ppo_rloo dpo; do
            [ -f out/eval_${R}_seed$S/eval.json ] || $EVAL --policy=out/${R}_seed$S --out_dir=out/eval_${R}_seed$S
        done
    done
    for R in ppo ppo_rloo dpo; do echo "$R:"; python eval.py --seeds_of="out/eval_${R}_seed*"; done
fi
if [ "$MODE" = budget ]; then
    # The default task's labeling budget, 5,000 demonstrations + 5,000 K = 4 rankings, split five ways. Assumed costs,
    # by the words a labeler handles: a demonstration means writing one ~20-word story, a ranking reading four of
    # them and ordering them; reading runs ~6x faster than writing (~240 against ~40 words a minute), so a ranking
    # costs 4/6 = 2/3 of a demonstration. In thirds: 3 per demonstration, 2 per ranking, 25,000 in all.
    for SHARE in 10 30 60 80 95; do  # % of the budget on demonstrations (60 is the default task's split)
        B=out/budget_d$SHARE N=$(( 25000 * SHARE / 300 ))
        python $D/prepare.py --out $B/data --n_demos=$N --n_prefs=$(( (25000 - 3 * N) / 2 ))
        python sft.py $SFT --data=$B/data/sft_train.jsonl --out_dir=$B/sft $(resume $B/sft)
        [ -f $B/rm/ckpt.pt ] || python reward.py --init=$B/sft --data=$B/data/prefs_train.jsonl --out_dir=$B/rm
        python ppo.py --sft=$B/sft --reward=$B/rm --out_dir=$B/ppo $(resume $B/ppo)  # the default task's prompts
        [ -f $B/eval/eval.json ] || $EVAL --policy=$B/ppo --out_dir=$B/eval
    done
fi
python eval.py --report
