"""Test helper (not a test): a training command killed right after the checkpoint of a given step, as a crash would.

`python killed_training.py STEP COMMAND [settings...]`, alone or under `torchrun`: runs the console script COMMAND
(`cavmae-sync-pretrain` or `cavmae-sync-finetune`) on the settings, and every process ends with `os._exit(137)` (no
cleanup, as when a process is killed) as soon as the checkpoint of optimizer step STEP is written; under torchrun
after a barrier, so that the file is on disk before any process dies. Resume tests kill a run at a known step with it
(`killed_cli`). Nothing here is product code: it wraps `train.TrainLoop.checkpoint`, which every rank calls.
"""

import os
import sys
from pathlib import Path

import torch.distributed as dist

from cavmae_sync import finetuning, pretraining, train

HERE = Path(__file__).resolve().parent
COMMANDS = {
    'cavmae-sync-pretrain': pretraining.pretrain_cli,
    'cavmae-sync-finetune': finetuning.finetune_cli,
}


def killed_cli(step: int, command: str = 'cavmae-sync-pretrain') -> list[str]:
    "The program (an executable and its first arguments) that runs `command` and dies after the checkpoint of `step`."
    return [sys.executable, str(HERE / 'killed_training.py'), str(step), command]


def die_after_checkpoint(step: int):
    "From now on, every training process of this interpreter ends right after the checkpoint of `step`."
    checkpoint = train.TrainLoop.checkpoint

    def checkpoint_then_die(loop):
        checkpoint(loop)
        if loop.step != step:
            return
        if loop.ctx.distributed:
            dist.barrier()  # the checkpoint is on disk before any process dies
        os._exit(137)

    train.TrainLoop.checkpoint = checkpoint_then_die


if __name__ == '__main__':
    die_after_checkpoint(int(sys.argv[1]))
    COMMANDS[sys.argv[2]](sys.argv[3:])
