"What the training tests share: a few-thousand-parameter model's command-line settings and the commands' entry points."

import shutil
import sys

# a few-thousand-parameter model: a step takes milliseconds, so the tests measure the machinery, not the model
MINI_MODEL = (
    '--model tiny --model.embed_dim 32 --model.num_heads 2 --model.modality_depth 1 '
    '--model.decoder_embed_dim 32 --model.decoder_depth 1 --model.decoder_num_heads 2 '
    '--model.image_size 32 --model.audio_length 64 --model.num_frames 4 --model.num_registers 2'
).split()
# the run settings most training tests share: batch 4 at the reference lr, a log row per step, quiet, seeded
RUN_FLAGS = (
    '--batch_size 4 --lr 1e-3 --lr_reference_batch 4 --log_every 1 --progress false --tensorboard false --seed 3'
).split()


def cli(command: str) -> list[str]:
    "The installed console script, or the same entry point through the interpreter."
    exe = shutil.which(command)
    if exe:
        return [exe]
    module, function = {
        'cavmae-sync-pretrain': ('pretraining', 'pretrain_cli'),
        'cavmae-sync-finetune': ('finetuning', 'finetune_cli'),
    }[command]
    return [
        sys.executable,
        '-c',
        f'import sys; from cavmae_sync.{module} import {function}; {function}(sys.argv[1:])',
    ]
