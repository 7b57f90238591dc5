"""Protocol cards and the contamination check (`cavmae_sync.protocol`, nbs/34_protocol.ipynb): a planted duplicate is
found by id and by content (a renamed copy of a clip), a clean split reports none, the card's JSON round-trips, the
check stays cheap at the paper's scale, and the retrieval and classification notebooks write the card beside their
real-data table and announce a contaminated gallery."""

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
from torch.utils.data import Subset

from cavmae_sync.checkpoint import file_sha256
from cavmae_sync.data import ClipSource, DatafileDataset, read_datafile
from cavmae_sync.protocol import (
    ContaminationCheck,
    ContaminationWarning,
    ProtocolCard,
    card_path,
    classification_card,
    contamination_check,
    print_card,
    published_results,
    retrieval_card,
)
from cavmae_sync.retrieval import DIRECTIONS, STRATEGIES, list_subset
from test_notebooks import data_env, notebook_text, real_like, run_notebook, with_paper_ids  # noqa: F401 (fixtures)


def absolute_rows(datafile: Path) -> list[dict]:
    "The rows of a datafile with absolute media paths, so that a copy elsewhere names the same files."
    rows = read_datafile(datafile)
    for row in rows:
        for key in ('video_path', 'wav'):
            if row.get(key) and not Path(row[key]).is_absolute():
                row[key] = str((datafile.parent / row[key]).resolve())
    return rows


def write_datafile(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps({'data': rows}))
    return path


def planted_training_set(
    test_json: Path, train_json: Path, folder: Path, by_id: int, renamed: int
) -> Path:
    """A training datafile: `train_json`'s clips, plus the test clip `by_id` under its own id and a byte copy of the
    test clip `renamed` under a new id (its file copied to `folder`)."""
    test_rows = absolute_rows(test_json)
    duplicate = dict(test_rows[by_id])
    source = Path(test_rows[renamed]['video_path'])
    copy = folder / f'copy_of_{source.name}'
    shutil.copy(source, copy)
    renamed_row = {
        **test_rows[renamed],
        'video_id': 'a_renamed_copy',
        'video_path': str(copy),
        'wav': str(copy),
    }
    return write_datafile(
        folder / 'planted_train.json', absolute_rows(train_json) + [duplicate, renamed_row]
    )


def test_contamination_check_finds_a_planted_duplicate_by_id_and_by_content(clips, tmp_path):
    "Testbed clips: one test clip is listed in training under its id, another is there as a renamed copy of its file."
    test_ids = [row['video_id'] for row in read_datafile(clips / 'test.json')]
    train = planted_training_set(
        clips / 'test.json', clips / 'train.json', tmp_path, by_id=5, renamed=3
    )
    check = contamination_check(
        DatafileDataset(clips / 'test.json', mode='eval'), train, cache=tmp_path / 'digests.json'
    )
    assert check.by_id == [test_ids[5]]
    assert check.renamed == [test_ids[3]]  # found by its bytes alone
    assert {m.video_id: m.train_video_ids for m in check.by_content} == {
        test_ids[3]: ['a_renamed_copy'],
        test_ids[5]: [test_ids[5]],
    }
    assert check.contaminated == [test_ids[5], test_ids[3]] and check.checked == len(test_ids)
    assert check.content_compared == len(test_ids) and check.train_media_missing == 0
    assert check.warning().startswith(
        f'contaminated gallery: 2 of the {len(test_ids)} evaluation clips'
    )
    again = contamination_check(
        clips / 'test.json', train, cache=tmp_path / 'digests.json'
    )  # a datafile, cached
    assert again.contaminated == check.contaminated and again.hashed_files == 0


def test_contamination_check_reports_none_for_a_clean_split(clips, tmp_path):
    check = contamination_check(
        clips / 'test.json', clips / 'train.json', cache=tmp_path / 'digests.json'
    )
    assert check.clean and check.contaminated == [] and check.warning() is None
    assert check.content_compared == check.checked and 'none of the' in check.lines()[0]


def test_contamination_check_of_a_subset_and_a_youtube_id_spelled_otherwise(clips, tmp_path):
    "A Subset is checked as its clips; `abcdefghijk_000030` in training is the evaluation clip `abcdefghijk_30.000`."
    rows = absolute_rows(clips / 'test.json')
    rows[0]['video_id'], rows[1]['video_id'] = (
        'abcdefghijk_30.000',
        'abcdefghijk_000040',
    )  # the clip; its video
    test = write_datafile(tmp_path / 'test.json', rows)
    train = write_datafile(
        tmp_path / 'train.json',
        absolute_rows(clips / 'train.json')
        + [{'video_id': 'abcdefghijk_000030', 'video_path': '/not/here.mp4', 'labels': ''}],
    )
    check = contamination_check(
        Subset(DatafileDataset(test, mode='eval'), [0, 1, 2]), train, cache=False
    )
    assert check.checked == 3 and check.by_id == ['abcdefghijk_30.000']
    assert check.same_video == ['abcdefghijk_000040']
    assert check.train_media_missing == 1 and check.renamed == []


def test_contamination_check_is_cheap_at_the_papers_scale(tmp_path):
    "1,545 evaluation clips against a 200,000-row training datafile: ids by set lookup, the datafile's digest cached."
    ids = [f'{k:011d}_{k % 10:06d}' for k in range(200_000)]
    rows = [
        {
            'video_id': i,
            'wav': f'/nowhere/{i}.wav',
            'video_path': f'/nowhere/{i}.mp4',
            'labels': '/m/0',
        }
        for i in ids
    ]
    train = write_datafile(tmp_path / 'train.json', rows)
    gallery = [
        ClipSource(ids[k] if k % 100 == 0 else f'held_out_{k}', video=Path(f'/nowhere/e{k}.mp4'))
        for k in range(1545)
    ]
    started = time.time()
    check = contamination_check(gallery, train, cache=tmp_path / 'digests.json')
    first = time.time() - started
    started = time.time()
    again = contamination_check(gallery, train, cache=tmp_path / 'digests.json')
    cached = time.time() - started
    print(
        f'1,545 clips against 200,000: {first:.1f} s, then {cached:.1f} s with the cached datafile digest'
    )
    assert (
        len(check.by_id) == 16
        and again.by_id == check.by_id
        and again.train_digest == check.train_digest
    )
    assert check.train_media_missing == 200_000 and check.content.startswith('not compared')
    assert first < 90 and cached < 45  # a loaded 2-core machine: about 21 s and 5 s


def retrieval_results(clips: int, model: str = 'CAV-MAE Sync (tiny.pt)') -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                'model': model,
                'strategy': s,
                'direction': d,
                'R@1': 10.0,
                'R@5': 30.0,
                'R@10': 50.0,
                'MR': 9.0,
                'ties': 0,
                'clips': clips,
            }
            for s in STRATEGIES
            for d in DIRECTIONS
        ]
    )


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory) -> Path:
    from cavmae_sync.checkpoint import save_checkpoint
    from cavmae_sync.model import CAVMAESync, tiny

    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny.pt', CAVMAESync(tiny()))


def test_retrieval_card_json_round_trips(clips, tmp_path, tiny_checkpoint):
    test_ids = [row['video_id'] for row in read_datafile(clips / 'test.json')]
    (tmp_path / 'list.txt').write_text('\n'.join(test_ids[:6] + ['missing_one', 'missing_two']))
    subset = list_subset(tmp_path / 'list.txt', test_ids)
    train = planted_training_set(
        clips / 'test.json', clips / 'train.json', tmp_path, by_id=1, renamed=2
    )
    check = contamination_check(clips / 'test.json', train, cache=False)
    card = retrieval_card(
        retrieval_results(6),
        'vggsound',
        tiny_checkpoint,
        clips / 'test.json',
        subset,
        test_ids[:6],
        'cpu',
        contamination=check,
    )
    path = card.write(tmp_path / 'retrieval_vggsound.csv')
    assert (
        path
        == card_path(tmp_path / 'retrieval_vggsound.csv')
        == tmp_path / 'retrieval_vggsound_card.json'
    )
    back = ProtocolCard.read(path)
    assert back == dataclasses.replace(card, table='retrieval_vggsound.csv')
    assert (
        isinstance(back.contamination, ContaminationCheck)
        and back.contamination.contaminated == check.contaminated
    )
    assert (back.gallery.clips, back.gallery.missing, back.gallery.listed) == (6, 2, 8)
    assert (
        back.checkpoint.sha256 == file_sha256(tiny_checkpoint) and back.strategy == 'diagonal_mean'
    )
    paper = published_results('vggsound')
    sync_a2v = paper.set_index(['method', 'direction', 'metric'])['value'][
        ('CAV-MAE Sync', 'audio_to_video', 'R@1')
    ]
    compared = {(c.reference, c.measure): c for c in back.comparisons}
    assert compared[('paper (CAV-MAE Sync)', 'audio_to_video R@1')].theirs == sync_a2v
    assert (
        compared[('TG-DP', 'audio_to_video R@1')].theirs == 30.3
        and ('TG-DP', 'audio_to_video R@5') not in compared
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        print_card(back)
    assert [type(w.message) for w in caught] == [ContaminationWarning]
    assert 'contaminated gallery: 2 of' in str(caught[0].message)


def test_classification_card_json_round_trips(clips, tmp_path, tiny_checkpoint):
    n = len(read_datafile(clips / 'test.json'))
    runs = (('linear_probe', '100 probe epochs'), ('finetune', '2 epochs'))
    table = pd.DataFrame(
        [
            {
                'model': 'checkpoint tiny.pt',
                'method': m,
                'metric_name': 'accuracy',
                'metric': 40.0,
                'test_clips': n,
                'budget': b,
                'seconds': 1.0,
            }
            for m, b in runs
        ]
    )
    card = classification_card(table, 'vggsound', tiny_checkpoint, clips / 'test.json', 'cpu')
    back = ProtocolCard.read(card.write(tmp_path / 'classification_vggsound.csv'))
    assert (
        back == dataclasses.replace(card, table='classification_vggsound.csv')
        and back.contamination is None
    )
    assert [(e.protocol, e.precision) for e in back.evaluations] == [
        (m, 'fp32 on cpu') for m, _ in runs
    ]
    probe = [
        c
        for c in back.comparisons
        if c.model == 'checkpoint tiny.pt' and 'frozen_encoder' in c.measure
    ]
    assert [(c.reference, c.theirs, c.difference) for c in probe] == [
        ('CAV-MAE Sync', 52.7, 40.0 - 52.7)
    ]
    assert any('not checked' in c for c in back.caveats)


def test_retrieval_notebook_writes_the_card_and_warns_of_a_contaminated_gallery(
    real_like, tmp_path
):
    """A papermill run on the fake real data with -p train_data: the card lies beside both tables and records the check,
    and the planted duplicates (one by id, one renamed copy) are announced as a warning with the count."""
    root, checkpoint, _, _ = real_like
    present = with_paper_ids(root, tmp_path / 'vggsound', 6)
    train = planted_training_set(
        tmp_path / 'vggsound' / 'test.json', root / 'train.json', tmp_path, by_id=0, renamed=4
    )
    notebook = run_notebook(
        'retrieval',
        tmp_path,
        dataset='vggsound',
        data_root=str(tmp_path / 'vggsound'),
        checkpoint=str(checkpoint),
        train_data=str(train),
        figures_dir=str(tmp_path),
        batch_size=4,
        num_workers=0,
    )
    card = ProtocolCard.read(tmp_path / 'retrieval_vggsound_card.json')
    assert card.table == 'retrieval_vggsound.csv' and card.gallery.video_ids == present
    assert (card.gallery.source, card.gallery.missing, card.gallery.listed) == (
        'paper list',
        1545 - 6,
        1545,
    )
    assert card.contamination.by_id == [present[0]] and card.contamination.renamed == [present[4]]
    assert (
        card.checkpoint.sha256 == file_sha256(checkpoint)
        and card.evaluations[0].precision == 'fp32 on cpu'
    )
    beside_side = ProtocolCard.read(tmp_path / 'retrieval_vs_paper_vggsound_card.json')
    assert beside_side.table == 'retrieval_vs_paper_vggsound.csv'
    text = notebook_text(notebook)
    assert 'ContaminationWarning: contaminated gallery: 2 of the 6 evaluation clips' in text
    assert (
        'Protocol card of retrieval_vggsound.csv' in text
        and 'vs TG-DP' in text
        and 'checks passed' in text
    )


def test_classification_notebook_writes_the_card_of_a_finetuned_checkpoint(real_like, tmp_path):
    "A fine-tuned checkpoint on the fake real data, -p train_data a training set holding one test clip: card, warning."
    root, _, classifier, num_test = real_like
    data_root = tmp_path / 'audioset'
    data_root.mkdir()
    for name in ('test.json', 'class_labels_indices.csv'):
        shutil.copy(root / name, data_root / name)
    test_rows = absolute_rows(root / 'test.json')
    train = write_datafile(
        tmp_path / 'pretrain.json', absolute_rows(root / 'train.json') + [test_rows[2]]
    )
    notebook = run_notebook(
        'classification',
        tmp_path,
        dataset='audioset',
        data_root=str(data_root),
        checkpoint=str(classifier),
        train_data=str(train),
        figures_dir=str(tmp_path),
        batch_size=4,
        num_workers=0,
    )
    card = ProtocolCard.read(tmp_path / 'classification_audioset_card.json')
    assert card.gallery.clips == num_test and card.contamination.contaminated == [
        test_rows[2]['video_id']
    ]
    assert [e.protocol for e in card.evaluations] == ['fine-tuned checkpoint']
    assert 'fine-tuned classifier' in card.checkpoint.kind
    assert any(
        c.reference == 'CAV-MAE Scale+' and 'audioset_20k' in c.measure for c in card.comparisons
    )
    text = notebook_text(notebook)
    assert (
        'ContaminationWarning: contaminated gallery: 1 of the' in text and 'checks passed' in text
    )
