"""End-to-end runs of the papermill reproduction notebooks (nbs/retrieval, classification, localization, ablations) with small
sizes: a 24 + 12 clip synthetic testbed, tiny models trained for seconds. Each run must finish and write sane tables; a real
data set that is missing must stop with one message that says what is expected and how to make it."""
import json, shutil
from pathlib import Path

import pandas as pd
import pytest

papermill = pytest.importorskip('papermill')

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
NUM_TEST = 12
# small sizes shared by every run, so the testbed and the two tiny models are made once and reused (as on a real machine)
SMALL = dict(num_train=48, num_test=NUM_TEST, train_minutes=0.2, train_batch_size=8, batch_size=4, num_workers=0,
             pretrain_overrides={'eval_data': ''}, progress=False)
RECALLS = ['R@1', 'R@5', 'R@10']


@pytest.fixture(scope='session')
def data_env(tmp_path_factory):
    "A private data folder (`CAVMAE_SYNC_DATA`), set in this process's environment so that papermill's kernels inherit it."
    data = tmp_path_factory.mktemp('cavmae_data')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('CAVMAE_SYNC_DATA', str(data))
        yield data


def run_notebook(name: str, out_dir: Path, **parameters) -> Path:
    "Execute nbs/<name>.ipynb with papermill into `out_dir`; returns the executed notebook."
    out = out_dir / f'{name}.out.ipynb'
    papermill.execute_notebook(str(NBS / f'{name}.ipynb'), str(out), parameters=parameters, kernel_name='python3',
                               cwd=str(ROOT), progress_bar=False)
    return out


def notebook_text(path: Path) -> str:
    "Everything the executed notebook printed or displayed as text."
    cells = json.loads(path.read_text())['cells']
    chunks = []
    for cell in cells:
        for output in cell.get('outputs', []):
            chunks.append(''.join(output.get('text', '')))
            chunks.append(''.join(output.get('data', {}).get('text/markdown', '')))
    return '\n'.join(chunks)


def check_recalls(table: pd.DataFrame, clips: int):
    "R@k are percentages of `clips` queries, non-decreasing in k; MR is a rank among `clips`."
    for k in RECALLS:
        assert table[k].between(0, 100).all(), table[k]
        counts = table[k] * clips / 100                              # the CSV keeps two decimals
        assert ((counts - counts.round()).abs() < 0.01).all(), f'{k} is not a share of {clips} queries'
    assert (table['R@1'] <= table['R@5'] + 1e-6).all() and (table['R@5'] <= table['R@10'] + 1e-6).all()
    assert table['MR'].between(1, clips).all()


@pytest.fixture(scope='session')
def retrieval_run(data_env, tmp_path_factory):
    "The retrieval notebook on the small testbed; it generates the testbed and trains both tiny models, which later runs reuse."
    figures = tmp_path_factory.mktemp('figures_retrieval')
    notebook = run_notebook('retrieval', figures, figures_dir=str(figures), **SMALL)
    finish_tiny_models(data_env)
    return figures, notebook


def finish_tiny_models(data_env: Path):
    """`pretrained_tiny` stops a training that runs over 1.5x its budget (a busy machine) and finishes it on the next call;
    finish both here, with the notebooks' own arguments, so that every later notebook reuses the same two models."""
    from cavmae_sync.train import pretrained_tiny
    testbed = next(p for p in data_env.iterdir() if p.name.startswith('synthetic_') and p.is_dir())
    for kind in ('cavmae', 'sync'):
        for _ in range(10):
            path = pretrained_tiny(kind, testbed, minutes=SMALL['train_minutes'], progress=False, batch_size=SMALL['train_batch_size'],
                                   **SMALL['pretrain_overrides'])
            if path.name == 'model.pt': break
        assert path.name == 'model.pt', f'{kind}: training did not finish'


def test_retrieval_notebook(retrieval_run, data_env):
    figures, notebook = retrieval_run
    results = pd.read_csv(figures / 'retrieval.csv')
    assert list(results.columns) == ['model', 'strategy', 'direction', *RECALLS, 'MR', 'clips']
    models = ['CAV-MAE Sync (tiny)', 'CAV-MAE (tiny), 1 frame', 'CAV-MAE (tiny), 16 frames']
    assert list(dict.fromkeys(results['model'])) == models
    assert len(results) == 3 * 4 * 2
    assert set(results['strategy']) == {'diagonal_mean', 'diagonal_max', 'mean', 'max'}
    assert set(results['direction']) == {'audio_to_video', 'video_to_audio'}
    assert (results['clips'] == NUM_TEST).all()
    check_recalls(results, NUM_TEST)
    # with one audio embedding per clip, averaging over frames pairs or all pairs is the same: the baseline's rows must agree
    baseline = results[results['model'] == models[2]].set_index(['strategy', 'direction'])[RECALLS]
    pd.testing.assert_frame_equal(baseline.loc['diagonal_mean'], baseline.loc['mean'])

    side = pd.read_csv(figures / 'retrieval_vs_paper.csv')
    paper = pd.read_csv(ROOT / 'data' / 'paper_retrieval.csv')
    paper = paper[paper['method'].isin(['CAV-MAE', 'CAV-MAE Sync'])]
    assert len(side) == len(paper) + 3 * 2
    ours = side[side['source'] == 'ours: synthetic testbed']
    assert set(ours['method']) == set(models)
    sync_paper = side[(side['source'] == 'paper: vggsound') & (side['method'] == 'CAV-MAE Sync') & (side['direction'] == 'audio_to_video')]
    assert sync_paper['R1'].item() == paper[(paper['dataset'] == 'vggsound') & (paper['method'] == 'CAV-MAE Sync')
                                            & (paper['direction'] == 'audio_to_video')]['R1'].item()

    verdict = pd.read_csv(figures / 'retrieval_verdict.csv')
    assert len(verdict) == 2
    assert (verdict['gain 95% low'] <= verdict['gain'] + 1e-6).all() and (verdict['gain'] <= verdict['gain 95% high'] + 1e-6).all()
    assert "the paper's claim" in notebook_text(notebook).lower()
    assert (figures / 'retrieval.png').stat().st_size > 10_000
    assert {'cavmae', 'sync'} <= {p.name.split('_')[1] for p in (data_env / 'models').iterdir()}


def fake_real_dataset(data_env: Path, tmp_path: Path) -> Path:
    "A 'real' data set folder made from the small testbed: test.json / train.json and class_labels_indices.csv."
    testbed = next(p for p in data_env.iterdir() if p.name.startswith('synthetic_') and p.is_dir())
    root = tmp_path / 'real'
    root.mkdir()
    for name in ('test.json', 'train.json'): shutil.copy(testbed / name, root / name)
    shutil.copy(testbed / 'labels.csv', root / 'class_labels_indices.csv')
    return root


def test_retrieval_notebook_on_present_data(retrieval_run, data_env, tmp_path):
    "With the files present, the real-data path loads the checkpoint, draws the per-class subset and compares with the paper."
    root = fake_real_dataset(data_env, tmp_path)
    checkpoint = next((data_env / 'models').glob('tiny_sync_*/model.pt'))
    run_notebook('retrieval', tmp_path, dataset='vggsound', data_root=str(root), checkpoint=str(checkpoint), per_class=1,
                 figures_dir=str(tmp_path), batch_size=4, num_workers=0)
    results = pd.read_csv(tmp_path / 'retrieval_vggsound.csv')
    assert len(results) == 4 * 2
    clips = int(results['clips'].iloc[0])
    assert 1 <= clips <= NUM_TEST
    check_recalls(results, clips)
    side = pd.read_csv(tmp_path / 'retrieval_vs_paper_vggsound.csv')
    assert len(side) == 2 * 3 and set(side['compared with']) == {'CAV-MAE Sync'}
    assert ((side['ours - paper'] - (side['ours'] - side['paper CAV-MAE Sync'])).abs() < 0.011).all()


def test_classification_notebook(retrieval_run, data_env, tmp_path):
    notebook = run_notebook('classification', tmp_path, figures_dir=str(tmp_path), probe_epochs=10, finetune_epochs=1,
                            finetune_batch_size=8, include_random_init=False, **SMALL)
    results = pd.read_csv(tmp_path / 'classification.csv')
    assert list(results.columns) == ['model', 'method', 'metric_name', 'metric', 'seconds']
    assert set(zip(results['model'], results['method'])) == {
        ('CAV-MAE (tiny)', 'linear_probe'), ('CAV-MAE (tiny)', 'finetune'), ('CAV-MAE Sync (tiny)', 'linear_probe'),
        ('CAV-MAE Sync (tiny)', 'finetune')}
    assert (results['metric_name'] == 'mAP').all()                  # the testbed is multi-label
    assert results['metric'].between(0, 100).all()
    assert "the paper's claim" in notebook_text(notebook).lower()
    assert (tmp_path / 'classification.png').exists()
    # a fine-tuned checkpoint on a 'real' multi-label set is evaluated as it is
    finetuned = next((data_env / 'runs').glob('finetune_cav-mae_sync_*/model.pt'))
    root = fake_real_dataset(data_env, tmp_path)
    run_notebook('classification', tmp_path, dataset='audioset', data_root=str(root), checkpoint=str(finetuned), figures_dir=str(tmp_path),
                 batch_size=4, num_workers=0)
    real = pd.read_csv(tmp_path / 'classification_audioset.csv')
    assert len(real) == 1 and real['method'].item() == 'fine-tuned checkpoint' and real['metric_name'].item() == 'mAP'
    assert real['test_clips'].item() == NUM_TEST and 0 <= real['metric'].item() <= 100


def test_localization_notebook(retrieval_run, data_env, tmp_path):
    notebook = run_notebook('localization', tmp_path, figures_dir=str(tmp_path), grid_clips=2, grid_frames=3, **SMALL)
    results = pd.read_csv(tmp_path / 'localization.csv')
    assert list(results['model']) == ['CAV-MAE Sync (tiny)', 'CAV-MAE (tiny)', 'every pixel (reference)']
    assert results[['mAP', 'mIoU']].stack().between(0, 100).all()
    assert results['pointing_accuracy'].iloc[:2].between(0, 100).all()
    frames = results['maps'].iloc[0]
    assert (results['maps'] == frames).all() and 0 < frames <= NUM_TEST * 16       # frames with a sounding source
    per_class = pd.read_csv(tmp_path / 'localization_per_class.csv')
    assert {'class', 'name', 'images', 'positive_pixels', 'ap', 'iou', 'model'} <= set(per_class.columns)
    assert per_class.groupby('model')['images'].sum().eq(frames).all()
    verdict = pd.read_csv(tmp_path / 'localization_verdict.csv')
    assert list(verdict['metric']) == ['mAP', 'mIoU', 'pointing_accuracy']
    assert "the paper's claim" in notebook_text(notebook).lower()
    assert (tmp_path / 'localization_maps.png').stat().st_size > 10_000


def test_ablations_notebook(retrieval_run, data_env, tmp_path):
    notebook = run_notebook('ablations', tmp_path, figures_dir=str(tmp_path), ablation_minutes=SMALL['train_minutes'],
                            variants={'window 128': {'audio_length': 128}}, eval_frames=[1, 16], **SMALL)
    results = pd.read_csv(tmp_path / 'ablations.csv')
    assert {'ablation', 'variant', 'direction', 'strategy', *RECALLS, 'MR', 'clips', 'frames'} <= set(results.columns)
    variants = results.groupby('ablation', sort=False)['variant'].unique().map(list).to_dict()
    assert variants == {'method': ['CAV-MAE Sync', 'CAV-MAE, 1 frame', 'CAV-MAE, 16 frames'], 'reference': ['reference'],
                        'window': ['window 128'], 'frames at evaluation': ['T=1', 'T=16'],
                        'strategy': ['diagonal_mean', 'diagonal_max', 'mean', 'max']}
    assert len(results) == 2 * sum(len(v) for v in variants.values())
    check_recalls(results, NUM_TEST)
    frames = results[results['ablation'] == 'frames at evaluation'].set_index('variant')['frames']
    assert frames.loc['T=1'].tolist() == [1, 1] and frames.loc['T=16'].tolist() == [16, 16]
    # the reference variant had the main model's settings and budget: it is the same cached model, so the same numbers
    reference = results[results['variant'] == 'reference'][RECALLS].to_numpy()
    main = results[results['variant'] == 'CAV-MAE Sync'][RECALLS].to_numpy()
    assert (reference == main).all()
    gains = pd.read_csv(tmp_path / 'ablations_gains.csv')
    assert ((gains['gain 95% low'] <= gains['gain'] + 1e-6) & (gains['gain'] <= gains['gain 95% high'] + 1e-6)).all()
    assert 'claims on the testbed' in notebook_text(notebook).lower()
    assert (tmp_path / 'ablations.png').exists()


@pytest.mark.parametrize('name, dataset', [('retrieval', 'vggsound'), ('classification', 'vggsound'), ('ablations', 'audioset'),
                                           ('localization', 'ade20k_sound')])
def test_missing_real_data_stops_with_one_message(name, dataset, data_env, tmp_path):
    missing = tmp_path / 'no_such_folder'
    with pytest.raises(papermill.PapermillExecutionError) as error:
        run_notebook(name, tmp_path, dataset=dataset, data_root=str(missing), figures_dir=str(tmp_path))
    assert error.value.ename == 'FileNotFoundError'
    message = error.value.evalue
    assert str(missing) in message and 'checkpoint' in message
    if dataset == 'ade20k_sound': assert 'prompted_segmentation.csv' in message
    else:
        assert 'test.json' in message and 'class_labels_indices.csv' in message and 'cavmae-sync-prepare' in message
    assert error.value.exec_count <= 3          # stopped right after the parameters, before any work
    assert not list(tmp_path.glob('*.csv'))
