"""The papermill reproduction notebooks (nbs/retrieval, classification, localization, ablations)
beyond what `nbdev_test` runs.

`nbdev_test` executes the four notebooks on the synthetic default at small sizes (their `quick`
parameter follows IN_TEST) and
each ends with a Checks cell that asserts what the run wrote: tables consistent with N queries, one
row recomputed by hand
from the cached embeddings or features, the gains recomputed from the tables, and the printed
verdict sentence being the one
the rule (`cavmae_sync.reproduce`) gives for the written tables. Running the same synthetic runs
again here would train the
same models twice in CI, so this file covers what `nbdev_test` does not: the real-data paths (a data set in the official
layout and a checkpoint, through papermill parameters), the one-message stop when real data is
missing, and the gating that
keeps a papermill run at full size and a test run out of figures/."""

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

papermill = pytest.importorskip('papermill')

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
NOTEBOOKS = ['retrieval', 'classification', 'localization', 'ablations']
RECALLS = ['R@1', 'R@5', 'R@10']


@pytest.fixture(scope='session')
def data_env(tmp_path_factory):
    """A private data folder (`CAVMAE_SYNC_DATA`), set in this process's environment so that
    papermill's kernels inherit it."""
    data = tmp_path_factory.mktemp('cavmae_data')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('CAVMAE_SYNC_DATA', str(data))
        mp.delenv('IN_TEST', raising=False)
        yield data


def run_notebook(name: str, out_dir: Path, **parameters) -> Path:
    "Execute nbs/<name>.ipynb with papermill into `out_dir`; returns the executed notebook."
    out = out_dir / f'{name}.out.ipynb'
    papermill.execute_notebook(
        str(NBS / f'{name}.ipynb'),
        str(out),
        parameters=parameters,
        kernel_name='python3',
        cwd=str(ROOT),
        progress_bar=False,
    )
    return out


def notebook_text(path: Path) -> str:
    "Everything the executed notebook printed or displayed as text."
    chunks = []
    for cell in json.loads(path.read_text())['cells']:
        for output in cell.get('outputs', []):
            chunks.append(''.join(output.get('text', '')))
            chunks.append(''.join(output.get('data', {}).get('text/markdown', '')))
    return '\n'.join(chunks)


def check_recalls(table: pd.DataFrame, clips: int):
    "R@k are percentages of `clips` queries, non-decreasing in k; MR is a rank among `clips`."
    for k in RECALLS:
        assert table[k].between(0, 100).all(), table[k]
        counts = table[k] * clips / 100  # the CSV keeps two decimals
        assert ((counts - counts.round()).abs() < 0.01).all(), (
            f'{k} is not a share of {clips} queries'
        )
    assert (table['R@1'] <= table['R@5'] + 1e-6).all() and (
        table['R@5'] <= table['R@10'] + 1e-6
    ).all()
    assert table['MR'].between(1, clips).all()


@pytest.fixture(scope='session')
def real_like(data_env, tmp_path_factory):
    """A 'real' data set in the official layout (test.json / train.json / class_labels_indices.csv)
    made from the small testbed,
    an untrained tiny CAV-MAE Sync checkpoint and an untrained tiny classifier checkpoint: the
    real-data paths need files in the
    right formats, not trained weights."""
    from cavmae_sync.checkpoint import save_checkpoint
    from cavmae_sync.model import CAVMAESync, tiny
    from cavmae_sync.classifier import CAVMAESyncClassifier
    from cavmae_sync.reproduce import quick_sizes, synthetic_testbed

    sizes = quick_sizes('retrieval')
    testbed = synthetic_testbed(sizes['num_train'], sizes['num_test'])
    root = tmp_path_factory.mktemp('real')
    for name in ('test.json', 'train.json'):
        shutil.copy(testbed / name, root / name)
    shutil.copy(testbed / 'labels.csv', root / 'class_labels_indices.csv')
    classes = len(pd.read_csv(root / 'class_labels_indices.csv'))
    pretrained = save_checkpoint(root / 'tiny_sync.pt', CAVMAESync(tiny()))
    classifier = save_checkpoint(
        root / 'tiny_classifier.pt', CAVMAESyncClassifier(tiny(), num_classes=classes)
    )
    return root, pretrained, classifier, sizes['num_test']


def with_paper_ids(root: Path, target: Path, count: int) -> list[str]:
    "A copy of the 'real' set whose first `count` test clips carry ids of the paper's VGGSound retrieval list."
    target.mkdir()
    shutil.copy(root / 'class_labels_indices.csv', target / 'class_labels_indices.csv')
    paper_ids = pd.read_csv(ROOT / 'data' / 'vggsound_retrieval_subset.csv')['video_id'].tolist()[
        :count
    ]
    rows = json.loads((root / 'test.json').read_text())
    for row in rows['data']:
        row['video_path'] = str(
            (root / row['video_path']).resolve()
        )  # absolute: the datafile moves
    for row, video_id in zip(rows['data'], paper_ids):
        row['video_id'] = video_id
    (target / 'test.json').write_text(json.dumps(rows))
    return paper_ids


def test_retrieval_notebook_on_present_data(real_like, tmp_path):
    """With the files present, the real-data path loads the checkpoint, evaluates the paper's list
    (naming what is missing) and compares with the paper."""
    root, checkpoint, _, num_test = real_like
    present = with_paper_ids(root, tmp_path / 'vggsound', 6)
    notebook = run_notebook(
        'retrieval',
        tmp_path,
        dataset='vggsound',
        data_root=str(tmp_path / 'vggsound'),
        checkpoint=str(checkpoint),
        figures_dir=str(tmp_path),
        batch_size=4,
        num_workers=0,
    )
    results = pd.read_csv(tmp_path / 'retrieval_vggsound.csv')
    assert len(results) == 4 * 2
    clips = int(results['clips'].iloc[0])
    assert clips == len(present)  # exactly the list's clips that this copy has
    assert set(results['subset']) == {'paper list'} and set(results['paper clips missing']) == {
        1545 - len(present)
    }
    check_recalls(results, clips)
    side = pd.read_csv(tmp_path / 'retrieval_vs_paper_vggsound.csv')
    assert len(side) == 2 * 3 and set(side['compared with']) == {'CAV-MAE Sync'}
    assert (
        (side['ours - paper'] - (side['ours'] - side['paper CAV-MAE Sync'])).abs() < 0.011
    ).all()
    paper = pd.read_csv(ROOT / 'data' / 'paper_retrieval.csv').set_index(
        ['dataset', 'method', 'direction']
    )
    for _, row in side.iterrows():  # the paper's numbers are copied, not invented
        assert (
            row['paper CAV-MAE Sync']
            == paper.loc[
                ('vggsound', 'CAV-MAE Sync', row['direction']), row['metric'].replace('@', '')
            ]
        )
    text = notebook_text(notebook)  # a model trained here is not compared as a reproduction
    assert (
        '**Not a reproduction**' in text
        and 'is not a released checkpoint' in text
        and '**Reproduced**' not in text
    )
    assert 'checks passed' in text


def test_retrieval_notebook_refuses_weights_of_the_other_architecture(real_like, tmp_path):
    """A file whose weights are CAV-MAE Sync, evaluated as CAV-MAE (or the reverse, a mislabelled
    download), stops in the first cells."""
    root, checkpoint, _, _ = real_like
    with_paper_ids(root, tmp_path / 'vggsound', 2)
    with pytest.raises(
        papermill.PapermillExecutionError,
        match='expected CAV-MAE, but the weights have the CAV-MAE Sync architecture',
    ):
        run_notebook(
            'retrieval',
            tmp_path,
            dataset='vggsound',
            data_root=str(tmp_path / 'vggsound'),
            checkpoint=str(checkpoint),
            method='CAV-MAE',
            figures_dir=str(tmp_path),
            batch_size=4,
            num_workers=0,
        )


def test_classification_notebook_evaluates_a_finetuned_checkpoint(real_like, tmp_path):
    "A fine-tuned checkpoint on a 'real' multi-label set is evaluated as it is (no training split needed)."
    root, _, classifier, num_test = real_like
    data_root = tmp_path / 'no_train_split'
    data_root.mkdir()
    for name in ('test.json', 'class_labels_indices.csv'):
        shutil.copy(root / name, data_root / name)
    notebook = run_notebook(
        'classification',
        tmp_path,
        dataset='audioset',
        data_root=str(data_root),
        checkpoint=str(classifier),
        figures_dir=str(tmp_path),
        batch_size=4,
        num_workers=0,
    )
    real = pd.read_csv(tmp_path / 'classification_audioset.csv')
    assert (
        len(real) == 1
        and real['method'].item() == 'fine-tuned checkpoint'
        and real['metric_name'].item() == 'mAP'
    )
    assert real['test_clips'].item() == num_test and 0 <= real['metric'].item() <= 100
    assert 'checks passed' in notebook_text(notebook)


@pytest.mark.parametrize(
    'name, dataset',
    [
        ('retrieval', 'vggsound'),
        ('classification', 'vggsound'),
        ('ablations', 'audioset'),
        ('localization', 'ade20k_sound'),
    ],
)
def test_missing_real_data_stops_with_one_message(name, dataset, data_env, tmp_path):
    missing = tmp_path / 'no_such_folder'
    with pytest.raises(papermill.PapermillExecutionError) as error:
        run_notebook(
            name, tmp_path, dataset=dataset, data_root=str(missing), figures_dir=str(tmp_path)
        )
    assert error.value.ename == 'FileNotFoundError'
    message = error.value.evalue
    assert str(missing) in message and 'checkpoint' in message
    if dataset == 'ade20k_sound':
        assert 'prompted_segmentation.csv' in message
    else:
        assert (
            'test.json' in message
            and 'class_labels_indices.csv' in message
            and 'cavmae-sync-prepare' in message
        )
    assert error.value.exec_count <= 3  # stopped right after the parameters, before any work
    assert not list(tmp_path.glob('*.csv'))


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_test_runs_are_small_and_papermill_runs_full_size(name):
    """nbdev ignores papermill's parameters and papermill ignores nbdev's directives: each
    notebook's `quick` parameter is None
    (follow IN_TEST), the cell after the parameters applies this notebook's quick sizes, outputs of a quick run go to a
    temporary folder, and the full defaults stay in the parameters cell for papermill."""
    from cavmae_sync.reproduce import quick_sizes

    cells = json.loads((NBS / f'{name}.ipynb').read_text())['cells']
    index = next(
        i for i, c in enumerate(cells) if 'parameters' in c.get('metadata', {}).get('tags', [])
    )
    parameters = {}
    exec(''.join(cells[index]['source']), {}, parameters)
    assert parameters['quick'] is None and parameters['dataset'] == 'synthetic'
    small = quick_sizes(name)
    assert (
        parameters['num_test'] > small['num_test']
        and parameters['train_steps'] > small['train_steps']
    )
    # every quick size is a parameter of the notebook
    assert set(small) <= set(parameters), set(small) - set(parameters)
    following = ''.join(cells[index + 1]['source'])
    assert 'quick = in_test(quick)' in following and f"quick_sizes('{name}')" in following
    outputs = re.compile(r'Outputs\.create\(\s*figures_dir,\s*dataset,\s*scratch=quick\s*\)')
    assert any(outputs.search(''.join(c['source'])) for c in cells)
    # the last cell asserts what the run wrote
    assert 'checks passed' in ''.join(cells[-1]['source'])


def test_in_test_follows_the_environment(monkeypatch):
    from cavmae_sync.reproduce import in_test

    monkeypatch.delenv('IN_TEST', raising=False)
    assert not in_test() and in_test(True)
    monkeypatch.setenv('IN_TEST', '1')
    assert in_test() and not in_test(False)  # an explicit papermill parameter wins
