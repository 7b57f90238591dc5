"""Test helper (not a test): run `pretrain` or `finetune` and record what each process did.

`python distributed_driver.py pretrain|finetune RECORD_DIR [settings...]`, alone or under `torchrun`. Every process
writes `RECORD_DIR/rank{R}.json` (per optimizer step, the `(clip index, frame index)` of each sample it trained on)
and `RECORD_DIR/rank{R}.pt` (its model weights after the run). Tests compare these across ranks and with a
1-process run (`recorded_run`, imported in-process). Nothing here is product code: it wraps `train.fit`.
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from cavmae_sync import finetuning, pretraining, train, train_config


def recorded_run(kind: str, record_dir, argv: list[str]):
    """Run `pretraining.pretrain` / `finetuning.finetune` on the settings `argv`; write this rank's
    samples and final weights to `record_dir`."""
    record, fit = {'steps': [], 'initial': None}, train.fit

    def fit_recording(config, task, ctx=None, desc='train'):
        compute = task.compute_losses

        def compute_losses(model, batch):
            frames = batch.get('frame_index')
            record['steps'].append(
                [
                    [int(i), int(frames[k]) if frames is not None else -1]
                    for k, i in enumerate(batch['index'])
                ]
            )
            return compute(model, batch)

        record['initial'] = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
        fitted = fit(config, dataclasses.replace(task, compute_losses=compute_losses), ctx, desc)
        record['weights'] = {
            k: v.detach().cpu().clone() for k, v in task.model.state_dict().items()
        }
        return fitted

    for runner in (pretraining, finetuning):
        runner.fit = fit_recording
    try:
        cls, run = (
            (train_config.PretrainConfig, pretraining.pretrain)
            if kind == 'pretrain'
            else (train_config.FinetuneConfig, finetuning.finetune)
        )
        result = run(train_config.config_from_args(cls, argv))
    finally:
        for runner in (pretraining, finetuning):
            runner.fit = fit
    rank, out = int(os.environ.get('RANK', 0)), Path(record_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'rank{rank}.json').write_text(
        json.dumps(
            {
                'rank': rank,
                'world_size': int(os.environ.get('WORLD_SIZE', 1)),
                'steps': record['steps'],
            }
        )
    )
    torch.save({'weights': record['weights'], 'initial': record['initial']}, out / f'rank{rank}.pt')
    return result


if __name__ == '__main__':
    torch.set_num_threads(1)
    recorded_run(sys.argv[1], sys.argv[2], sys.argv[3:])
