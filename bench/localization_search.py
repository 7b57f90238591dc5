"""The search for a recipe inside the paper's method that makes localization emerge in the tiny CAV-MAE Sync
(issue 24, item 4): train the Sync model with one of the paper's knobs changed, on a testbed whose decoys are not always
active with their source (`decoy_coupling`), and read early signals on the prompted frames.

Every variant is the tiny recipe of `testbed.tiny_pretrain_config` with one change; the budget is steps, the seed fixed,
the same for every variant of a search. Runs are cached under data/models by `testbed.pretrained_tiny` (a stopped run,
e.g. by --max-minutes or the end of a session, resumes on the next call), and every finished variant is appended to
`bench/localization_search.jsonl`, the record of what was tried. Variants marked `extension` are not the paper's method.

Signals per variant (held-out prompted frames, `testbed_localization`):
- pointing accuracy, the share of on-object peaks on the prompted object (audio-free: 25%), the swap test;
- `common_share`: % of the map's spatial variance common to all of an image's sounds (100: ignores the audio);
- `object_contrast`: mean map value on the prompted object minus that on the image's other objects, in units of the
  map's spatial standard deviation (> 0: follows the sound; < 0: inverted);
- `inverted_pointing`: the pointing accuracy of the negated map (a high value flags inverted maps; never used to
  flip a map);
- retrieval on the test clips (R@1 and the rank test of `claims.trained_check`) and the training losses.

    python bench/localization_search.py --variants default bidirectional --steps 500 [--coupling 0.5]
        [--num-train 400] [--num-test 60] [--seed 0] [--max-minutes 60]
Prints one JSON object per variant (and appends it to bench/localization_search.jsonl when the run finished).
"""

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

VARIANTS = {  # name: (ModelConfig fields it changes, whether it is the paper's method)
    'default': ({}, True),
    'bidirectional': ({'bidirectional_contrast': True}, True),
    'temperature 0.1': ({'temperature': 0.1}, True),
    'temperature 0.02': ({'temperature': 0.02}, True),
    'contrastive weight 0.1': ({'contrastive_weight': 0.1}, True),
    'contrastive weight 3': ({'contrastive_weight': 3.0}, True),
    'mask 0.5': ({'mask_ratio_audio': 0.5, 'mask_ratio_video': 0.5}, True),
    'registers 0': ({'num_registers': 0}, True),
    # the paper's own ablation (claim b): the contrast on mean-pooled patch tokens
    'no global tokens': ({'global_tokens': False}, True),
    'registers 8': ({'num_registers': 8}, True),
    'contrastive heads': ({'contrastive_heads': True}, True),
    'global_local_contrast': ({'global_local_contrast': True}, False),
}
RECORD = Path(__file__).with_name('localization_search.jsonl')


def object_contrast(maps, own, any_object):
    """Mean over maps (M, S, S) of (map on the own object - map on the other objects), both (M, S, S) bool masks, in
    units of the map's spatial std."""
    flat = maps.flatten(1).double()  # (M, S*S)
    own = own.flatten(1)  # (M, S*S) bool
    others = any_object.flatten(1) & ~own
    on_own = (flat * own).sum(1) / own.sum(1).clamp(min=1)
    on_others = (flat * others).sum(1) / others.sum(1).clamp(min=1)
    return float(((on_own - on_others) / flat.std(1).clamp(min=1e-12)).mean())


def evaluate(name, checkpoint, root, seed):
    "Early signals of one trained variant on the prompted frames and the test clips."
    import numpy as np
    from cavmae_sync.checkpoint import load_model_file
    from cavmae_sync.claims import trained_check
    from cavmae_sync.data import DatafileDataset
    from cavmae_sync.embeddings import model_preprocess_config
    from cavmae_sync.localization import localization_maps
    from cavmae_sync.reproduce import pretraining_summary
    from cavmae_sync.retrieval import run_retrieval
    from cavmae_sync.testbed_localization import (
        localization_evidence,
        peak_counts,
        pointing_hits,
        prompted_set,
    )

    model = load_model_file(checkpoint)
    config = model_preprocess_config(model)
    prompted = prompted_set(root, config)
    maps = localization_maps(model, prompted.for_model(config), progress=False)
    evidence = localization_evidence(name, maps, prompted, seed)
    peaks = peak_counts(maps.maps, prompted)
    clips = DatafileDataset(root / 'test.json', root / 'labels.csv', mode='eval', config=config)
    run = run_retrieval({name: (model, clips, False)}, f'search_{root.name}', 16, 0)
    summary = pretraining_summary(checkpoint)
    check = trained_check(run.evidence(name), summary)
    return {
        'pointing': round(peaks.pointing, 2),
        'prompted_share': round(peaks.prompted_share, 2),
        'swap_passed': evidence.swap.passed,
        'controls_passed': evidence.controls_passed,
        'common_share': round(evidence.common_share, 1),
        'object_contrast': round(
            object_contrast(maps.maps, prompted.masks, prompted.any_object), 3
        ),
        'inverted_pointing': round(
            float(pointing_hits(-maps.maps, prompted.masks).mean() * 100), 2
        ),
        'r1': {d: round(float(np.mean(h)) * 100, 2) for d, h in run.evidence(name).hits.items()},
        'has_trained': check.passed,
        'trained_line': check.line,
        'contrastive_loss': [
            round(summary.contrastive_start, 3),
            round(summary.contrastive_end, 3),
        ],
        'mae_loss': [round(summary.mae_loss_audio, 3), round(summary.mae_loss_video, 3)],
        'minutes': round(summary.minutes, 1),
        'prompts': len(prompted),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variants', nargs='+', default=['default'], choices=list(VARIANTS))
    parser.add_argument(
        '--steps', type=int, default=500, help='optimizer steps of every variant (the budget)'
    )
    parser.add_argument(
        '--coupling', type=float, default=0.5, help="testbed decoy_coupling (1: version 2's decoys)"
    )
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-test', type=int, default=60)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--max-minutes', type=float, default=None, help='guard per variant; a later call resumes'
    )
    parser.add_argument(
        '--record',
        type=Path,
        default=RECORD,
        help='JSON lines file finished variants are appended to',
    )
    args = parser.parse_args()
    import warnings
    from cavmae_sync.config import data_dir
    from cavmae_sync.synthetic import default_synthetic
    from cavmae_sync.testbed import pretrained_tiny, tiny_pretrain_config

    root = default_synthetic(
        data_dir() / f'synthetic_search_{args.num_train}x{args.num_test}_coupling{args.coupling:g}',
        args.num_train,
        args.num_test,
        args.seed,
        decoy_coupling=args.coupling,
    )
    for name in args.variants:
        fields, paper = VARIANTS[name]
        model = dataclasses.replace(tiny_pretrain_config('sync', root).model, **fields)
        started = time.time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            checkpoint = pretrained_tiny(
                'sync',
                root,
                steps=args.steps,
                seed=args.seed,
                evaluations=1,
                max_minutes=args.max_minutes,
                progress=False,
                model=model,
            )
        unfinished = [str(w.message) for w in caught if 'stopped by max_minutes' in str(w.message)]
        result = {
            'variant': name,
            'changes': fields,
            'paper_method': paper,
            'steps': args.steps,
            'seed': args.seed,
            'decoy_coupling': args.coupling,
            'testbed': f'{args.num_train}x{args.num_test}',
            'finished': not unfinished,
            'machine': f'{platform.machine()}, {__import__("os").cpu_count()} cores',
            'wall_minutes': round((time.time() - started) / 60, 1),
        }
        if not unfinished:
            result.update(evaluate(name, checkpoint, root, args.seed))
            with open(args.record, 'a') as record:
                record.write(json.dumps(result) + '\n')
        print(json.dumps(result))


if __name__ == '__main__':
    main()
