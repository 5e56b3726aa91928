#!/usr/bin/env bash
# The whole InstructGPT pipeline on the built-in stories task, on a laptop CPU (~8-10 min on 2 cores):
#     bash run.sh          # prepare -> pretrain -> SFT -> reward model -> PPO -> evaluation -> out/report.md
#     bash run.sh full     # also PPO-ptx, PPO against the labeler, a sweep over β (over-optimisation), ~17 min more
#     bash run.sh gpt2     # GPT-2 small on Alpaca/Dolly + HH-RLHF, for one GPU (see the README)
# Finished stages are skipped and interrupted ones resumed: delete out/<stage> to redo one. Device: automatic.
set -euo pipefail
cd "$(dirname "$0")"
MODE=${1:-quick}
D=data/stories
# An interrupted stage picks up from its last checkpoint when run.sh is run again (same data order, same RNG state).
resume() { [ -f "$1/ckpt.pt" ] && echo --resume || true; }

if [ "$MODE" = gpt2 ]; then
    # GPT-2 small on real data, on one GPU (untested here: this recipe's time and numbers are not measured yet)
    python data/alpaca/prepare.py && python data/hh_rlhf/prepare.py
    python sft.py --init=gpt2 --data=data/alpaca/sft_train.jsonl --out_dir=out/gpt2_sft --lr=2e-5 --max_steps=3000 \
        --batch_size=16 --grad_accum=4 --warmup_steps=100 --eval_interval=250
    python reward.py --init=out/gpt2_sft --data=data/hh_rlhf/prefs_train.jsonl --out_dir=out/gpt2_rm --lr=1e-5 \
        --sft_data=data/hh_rlhf/sft_train.jsonl --prompts=data/hh_rlhf/prompts_val.jsonl --batch_size=32
    python ppo.py --sft=out/gpt2_sft --reward=out/gpt2_rm --prompts=data/hh_rlhf/prompts_train.jsonl \
        --out_dir=out/gpt2_ppo --skip_long_prompts --max_new_tokens=128 --temperature=0.7 --lr=1e-6 \
        --target_kl=6 --n_iters=500 --batch_size=64 --ppo_epochs=4 --eval_interval=50 --n_eval=256
    exit 0
fi

# -- data: instructions, noisy demonstrations, K=4 rankings by the scripted labeler, prompts (deterministic)
python $D/prepare.py
# -- a "base model": next-token pretraining on unconditioned stories (stands in for GPT-3), packed into 256-byte chunks
python sft.py --mode=pretrain --data=$D/pretrain_train.jsonl --out_dir=out/base --max_steps=600 --batch_size=8 \
    --lr=6e-3 $(resume out/base)
# -- step 1, SFT: loss on the demonstrations' response tokens only
python sft.py --init=out/base --data=$D/sft_train.jsonl --out_dir=out/sft --max_steps=300 --lr=1e-3 \
    --warmup_steps=20 $(resume out/sft)
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
fi
python eval.py --report
