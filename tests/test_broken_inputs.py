"""Broken inputs fail loudly, naming the file or value, and lose nothing: one test per finding of the
hostile-input review."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cavmae_sync import clip_cache, pretraining, train, train_config, training_data
from cavmae_sync.config import MediaError, PreprocessConfig
from cavmae_sync.data import DatafileDataset, count_extracted_frames, load_clip, prepare_dataset
from cavmae_sync.model import tiny

MINI = dict(
    embed_dim=32,
    num_heads=2,
    modality_depth=1,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
    image_size=32,
    audio_length=64,
    num_frames=4,
    num_registers=2,
)


def mini_config(clips: Path, out: Path, **overrides) -> train_config.PretrainConfig:
    return train_config.PretrainConfig(
        model=tiny(**MINI),
        train_data=str(clips / 'train.json'),
        eval_data='',
        output_dir=str(out),
        batch_size=4,
        lr=1e-3,
        lr_reference_batch=4,
        epochs=1,
        log_every=1,
        progress=False,
        tensorboard=False,
        seed=3,
        **overrides,
    )


def copy_set(clips: Path, dest: Path) -> Path:
    shutil.copytree(clips, dest)
    datafile = json.loads((dest / 'train.json').read_text())
    for row in datafile['data']:
        row['video_path'] = str(dest / Path(row['video_path']).relative_to(clips))
    (dest / 'train.json').write_text(json.dumps(datafile))
    return dest


def test_a_missing_frame_folder_is_named_not_read_around(clips, tmp_path):
    prepared = prepare_dataset(
        clips / 'clips' if (clips / 'clips').is_dir() else clips,
        out=tmp_path / 'layout',
        extract=True,
        config=PreprocessConfig(num_frames=8, image_size=32),
        workers=1,
        progress=False,
    )
    frames = tmp_path / 'layout' / 'frames'
    assert count_extracted_frames(frames) == 8
    shutil.rmtree(frames / 'frame_5')
    with pytest.raises(MediaError, match='frame_5') as error:
        count_extracted_frames(frames)
    assert 'missing' in str(error.value)
    dataset = DatafileDataset(
        prepared.datafile,
        mode='eval',
        config=PreprocessConfig(num_frames=8, image_size=32, window=64),
    )
    with pytest.raises(MediaError, match='frame_5'):
        dataset[0]


def test_extracting_another_frame_count_into_an_old_layout_is_refused(clips, tmp_path):
    videos = clips / 'clips' if (clips / 'clips').is_dir() else clips
    prepare_dataset(
        videos,
        out=tmp_path / 'layout',
        extract=True,
        config=PreprocessConfig(num_frames=8, image_size=32),
        workers=1,
        progress=False,
    )
    with pytest.raises(ValueError, match='8 frames per clip') as error:
        prepare_dataset(
            videos,
            out=tmp_path / 'layout',
            extract=True,
            config=PreprocessConfig(num_frames=4, image_size=32),
            workers=1,
            progress=False,
        )
    assert str(tmp_path / 'layout' / 'frames') in str(error.value)
    assert (
        count_extracted_frames(tmp_path / 'layout' / 'frames') == 8
    )  # nothing of the old extraction was touched


def test_the_decode_cache_takes_labels_from_the_data_set_and_notices_replaced_files(
    clips, tmp_path
):
    root = copy_set(clips, tmp_path / 'set')
    config = mini_config(root, tmp_path / 'unused')
    first = training_data.clip_dataset(config, root / 'train.json', 'eval')
    assert isinstance(first, clip_cache.DecodedClips)
    labels = pd.read_csv(root / 'labels.csv')
    datafile = json.loads((root / 'train.json').read_text())
    datafile['data'][0]['labels'] = labels['mid'].iloc[-1]  # a corrected label for clip 0
    (root / 'train.json').write_text(json.dumps(datafile))
    second = training_data.clip_dataset(config, root / 'train.json', 'eval')
    expected = torch.zeros(len(labels))
    expected[-1] = 1
    assert torch.equal(second[0]['labels'], expected) and not torch.equal(
        first[0]['labels'], expected
    )
    # a media file replaced under the same name is decoded again
    video = Path(datafile['data'][0]['video_path'])
    other = Path(datafile['data'][1]['video_path'])
    before = second[0]['frames']
    shutil.copyfile(other, video)
    os.utime(video, ns=(1, 1))
    third = training_data.clip_dataset(config, root / 'train.json', 'eval')
    assert torch.equal(third[0]['frames'], third[1]['frames']) and not torch.equal(
        third[0]['frames'], before
    )


def test_unlabelled_rows_of_a_labelled_set_are_refused(clips, tmp_path):
    root = copy_set(clips, tmp_path / 'set')
    datafile = json.loads((root / 'train.json').read_text())
    datafile['data'][2]['labels'] = ''
    (root / 'train.json').write_text(json.dumps(datafile))
    video_id = datafile['data'][2]['video_id']
    with pytest.raises(ValueError, match='has no labels') as error:
        DatafileDataset(root / 'train.json', root / 'labels.csv')
    assert 'row 2' in str(error.value) and video_id in str(error.value)
    DatafileDataset(root / 'train.json')  # without classes the rows need no labels


def test_audio_that_starts_late_is_aligned_to_the_frames_and_named(tmp_path):
    from cavmae_sync.video import write_video

    tone = (
        0.3 * np.sin(2 * np.pi * 440 * np.arange(6 * 16_000) / 16_000)[None]
    )  # (1, S): 6 s of 440 Hz
    path = write_video(
        tmp_path / 'late.mp4', np.zeros((80, 48, 64, 3), np.uint8), 10, tone, audio_start=2.0
    )  # 8 s of video
    config = PreprocessConfig(num_frames=4, window=64, image_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        clip = load_clip(path, config=config)
    assert any(str(path) in str(w.message) and 'starts +1.9' in str(w.message) for w in caught)
    # window 0 is centred at 0 s: silence (the sound starts at 2 s); window 2 (centre 4 s) hears the tone
    assert clip.audio[0].std() < 1e-3 < clip.audio[2].std()


def test_two_runs_into_one_output_dir_cannot_interleave(clips, tmp_path):
    out = tmp_path / 'run'
    with train.output_dir_lock(out):
        with pytest.raises(FileExistsError, match='another run is writing') as error:
            pretraining.pretrain(mini_config(clips, out))
        assert str(out) in str(error.value)
    assert not (out / 'last.pt').exists()
    # a lock left by a killed run of this host is taken over
    dead = subprocess.run(
        [sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True
    ).stdout.strip()
    import socket

    (out / '.lock').write_text(f'{socket.gethostname()} {dead}')
    result = pretraining.pretrain(mini_config(clips, out))
    assert result.checkpoint_path.is_file() and not (out / '.lock').exists()


def test_skip_errors_survives_an_unreadable_first_clip_and_lists_it(clips, tmp_path):
    root = copy_set(clips, tmp_path / 'set')
    first = Path(json.loads((root / 'train.json').read_text())['data'][0]['video_path'])
    first.write_bytes(b'not a video at all')
    out = tmp_path / 'run'
    result = pretraining.pretrain(
        mini_config(root, out, skip_errors=True)
    )  # default cache ('auto')
    listed = (out / 'skipped_files.tsv').read_text().splitlines()
    assert (
        len(listed) == 1 and listed[0].startswith(str(first)) and result.checkpoint_path.is_file()
    )
    with pytest.raises(MediaError, match=str(first)):
        pretraining.pretrain(mini_config(root, tmp_path / 'strict'))


def test_cache_budget_is_the_running_total(clips, capsys):
    config = mini_config(
        clips, Path('unused'), cache_max_gb=1e-4
    )  # 100 KiB: less than two decoded clips
    dataset = training_data.clip_dataset(config, clips / 'train.json', 'train')
    assert not isinstance(dataset, clip_cache.DecodedClips)
    assert 'not kept in memory' in capsys.readouterr().out
    assert isinstance(
        training_data.clip_dataset(
            mini_config(clips, Path('unused')), clips / 'train.json', 'train'
        ),
        clip_cache.DecodedClips,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Issue 28, findings 5-8, 10 and the search-index part of 11: the search index, the model-file loader and the
# reproduction notebooks' parameters under bad input (issue 25, items 3 and 5, with them).
# ---------------------------------------------------------------------------------------------------------------------
import contextlib
import io
import socket
import time

from cavmae_sync.checkpoint import (
    CheckpointError,
    load_model_file,
    load_official,
    save_checkpoint,
)
from cavmae_sync.model import CAVMAESync
from cavmae_sync.search import ClipIndex, build_index, index_cli, search_cli, search_files

SEARCH_MODEL = dict(num_frames=4, audio_length=64, image_size=32)
ROOT = Path(__file__).resolve().parents[1]


def random_clip(path, seed, seconds=3.0, size=32):
    from cavmae_sync.video import write_video

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (int(seconds * 8), size, size, 3), dtype=np.uint8)
    audio = (0.3 * rng.standard_normal((1, int(seconds * 16000)))).astype(np.float32)
    return write_video(path, frames, fps=8, audio=audio)


@pytest.fixture(scope='module')
def search_model():
    torch.manual_seed(0)
    return CAVMAESync(tiny(**SEARCH_MODEL)).eval()


@pytest.fixture
def three_clips(tmp_path):
    folder = tmp_path / 'clips'
    folder.mkdir()
    for i in range(3):
        random_clip(folder / f'clip{i}.mp4', i)
    return folder


def run_cli(cli, argv):
    "A command's exit status, stdout and stderr (argparse exits through SystemExit)."
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_search_never_returns_a_deleted_or_replaced_clip(three_clips, search_model, tmp_path):
    "Finding 5: the files about to be printed are checked against the size and time recorded when they were embedded."
    checkpoint = save_checkpoint(tmp_path / 'model.pt', search_model)
    assert run_cli(index_cli, [three_clips, '--checkpoint', checkpoint])[0] == 0
    (three_clips / 'clip1.mp4').unlink()
    random_clip(three_clips / 'clip2.mp4', 99)
    os.utime(three_clips / 'clip2.mp4', ns=(1, 1))  # replaced, same name
    code, out, err = run_cli(
        search_cli, [three_clips / 'cavmae_sync.index', '--audio', three_clips / 'clip0.mp4']
    )
    printed = [line.split('\t')[2] for line in out.splitlines()]
    assert code == 0 and printed == [str(three_clips / 'clip0.mp4')]
    assert 'clip1.mp4 (missing)' in err and 'clip2.mp4 (changed since it was indexed)' in err
    assert len(err.strip().splitlines()) == 1 and err.startswith('cavmae-sync-search: warning:')
    # a rerun of the indexer brings the replaced clip back, with its new embedding
    assert run_cli(index_cli, [three_clips, '--checkpoint', checkpoint])[0] == 0
    index = ClipIndex.load(three_clips / 'cavmae_sync.index')
    from cavmae_sync.embeddings import embed_video

    assert index.paths == ['clip0.mp4', 'clip2.mp4']
    assert torch.allclose(
        index.video[1].float(),
        embed_video(three_clips / 'clip2.mp4', search_model).video,
        atol=2e-3,
    )


def test_nan_embeddings_are_never_ranked_and_nan_models_index_nothing(
    three_clips, search_model, tmp_path
):
    "Finding 6: a NaN row never tops a query; a model with NaN weights fails indexing, naming its file."
    index = build_index(three_clips, search_model, progress=False)
    payload = torch.load(three_clips / 'cavmae_sync.index', weights_only=True)
    payload['video'][0] = float('nan')
    torch.save(payload, three_clips / 'cavmae_sync.index')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        reread = ClipIndex.load(three_clips / 'cavmae_sync.index')
        hits = search_files(reread, search_model, audio=three_clips / 'clip1.mp4')
    assert [h.path for h in hits if h.path == 'clip0.mp4'] == [] and len(hits) == 2
    assert any('clip0.mp4' in str(w.message) and 'NaN' in str(w.message) for w in caught)
    nan_scores = torch.tensor([float('nan'), 0.2, 0.1])
    assert [h.path for h in index.top(nan_scores, 3, check_files=False)] == [
        'clip1.mp4',
        'clip2.mp4',
    ]
    broken = CAVMAESync(search_model.config).eval()
    with torch.no_grad():
        broken.blocks_a[0].mlp.fc1.weight.fill_(float('nan'))
    nan_file = save_checkpoint(tmp_path / 'nan_model.pt', broken)
    code, out, err = run_cli(
        index_cli, [three_clips, '--checkpoint', nan_file, '--out', tmp_path / 'nan.index']
    )
    assert code == 2 and str(nan_file) in err and 'blocks_a.0.mlp.fc1.weight' in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'nan.index').exists()
    with pytest.raises(ValueError, match='NaN'):
        build_index(three_clips, broken, tmp_path / 'nan2.index', progress=False)
    # the offset tool with that model blames the model file, not the clip
    from cavmae_sync.sync import offset_cli

    code, _, err = run_cli(offset_cli, [three_clips / 'clip0.mp4', '--checkpoint', nan_file])
    assert code == 2 and str(nan_file) in err and 'NaN' in err and 'too short' not in err


def test_a_model_file_is_read_as_what_its_shapes_say_or_refused(tmp_path):
    "Finding 7 / issue 25.3: heads never guessed, float32 returned, safetensors read, float64 and int32 named."
    from safetensors.torch import save_file

    torch.manual_seed(1)
    three_heads = CAVMAESync(tiny(modality_depth=1, decoder_depth=1)).eval()  # 192 wide, 3 heads
    audio, video = torch.randn(2, 256, 128), torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = three_heads.encode(audio, video).video_global

    def same_outputs(model, atol=1e-5):
        with torch.no_grad():
            return (model.encode(audio, video).video_global - expected).abs().max() < atol

    state = three_heads.state_dict()
    torch.save(state, tmp_path / 'tiny32.pth')
    with pytest.raises(CheckpointError, match='192 wide') as error:
        load_model_file(tmp_path / 'tiny32.pth')
    assert str(tmp_path / 'tiny32.pth') in str(error.value) and 'num_heads' in str(error.value)
    assert same_outputs(load_model_file(tmp_path / 'tiny32.pth', num_heads=3, decoder_num_heads=4))
    half = {k: v.half() for k, v in state.items()}
    torch.save(half, tmp_path / 'tiny16.pth')
    save_file(half, str(tmp_path / 'tiny16.safetensors'))
    for name in ('tiny16.pth', 'tiny16.safetensors'):
        model = load_model_file(tmp_path / name, num_heads=3, decoder_num_heads=4)
        assert {p.dtype for p in model.parameters()} == {torch.float32} and same_outputs(
            model, atol=2e-2
        ), name
        assert model.model_file.sha256 and 'stored in float16, loaded as float32' in str(
            model.model_file
        )
    torch.save({k: v.double() for k, v in state.items()}, tmp_path / 'tiny64.pth')
    with pytest.warns(UserWarning, match='tiny64.pth.*float64'):
        assert same_outputs(
            load_model_file(tmp_path / 'tiny64.pth', num_heads=3, decoder_num_heads=4)
        )
    torch.save({k: v.int() for k, v in state.items()}, tmp_path / 'tiny_int.pth')
    with pytest.raises(CheckpointError, match='tiny_int.pth.*int32'):
        load_model_file(tmp_path / 'tiny_int.pth', num_heads=3, decoder_num_heads=4)
    # the shipped testbed models (float16 compact copies) through either call: their recorded heads, float32
    for shipped in sorted((ROOT / 'checkpoints' / 'testbed').glob('*/model.pt')):
        for model in (load_model_file(shipped), load_official(shipped, verbose=False)):
            assert {p.dtype for p in model.parameters()} == {
                torch.float32
            } and model.config.num_heads == 3
            assert (
                model.model_file.sha256 in str(model.model_file)
                and 'architecture' in model.model_file.architecture
            )


def test_indexing_follows_symlinked_folders_lists_skips_and_locks_the_index(
    three_clips, search_model, tmp_path
):
    "Finding 8: symlinked sub-folders indexed (a loop read once), special files and broken links listed, one indexer."
    other = tmp_path / 'elsewhere'
    other.mkdir()
    random_clip(other / 'far.mp4', 5)
    os.symlink(other, three_clips / 'linked')
    os.symlink(three_clips, three_clips / 'linked_back')  # a loop
    os.symlink(tmp_path / 'gone.mp4', three_clips / 'dangling.mp4')
    os.mkfifo(three_clips / 'pipe.mp4')
    os.symlink(three_clips / 'pipe.mp4', three_clips / 'to_pipe.mp4')
    index = build_index(three_clips, search_model, progress=False)
    assert index.paths == ['clip0.mp4', 'clip1.mp4', 'clip2.mp4', 'linked/far.mp4']
    skipped = dict(map(tuple, index.skipped))
    assert set(skipped) == {'dangling.mp4', 'linked_back', 'pipe.mp4', 'to_pipe.mp4'}
    assert 'broken symlink' in skipped['dangling.mp4'] and 'loop' in skipped['linked_back']
    assert 'FIFO' in skipped['pipe.mp4'] and 'symlink' in skipped['to_pipe.mp4']
    # a second indexer of the same index file, while the first runs: refused, naming the first; nothing written
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        out = tmp_path / 'shared.index'
        (tmp_path / '.shared.index.lock').write_text(f'{socket.gethostname()} {holder.pid}')
        checkpoint = save_checkpoint(tmp_path / 'model.pt', search_model)
        code, _, err = run_cli(index_cli, [three_clips, '--checkpoint', checkpoint, '--out', out])
        assert code == 2 and f'process {holder.pid}' in err and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, out_text, _ = run_cli(
        index_cli, [three_clips, '--checkpoint', checkpoint, '--out', out]
    )  # holder gone
    assert (
        code == 0
        and 'skipped\tpipe.mp4' in out_text
        and not (tmp_path / '.shared.index.lock').exists()
    )


def test_a_damaged_index_a_full_disk_and_a_short_query_are_named(
    three_clips, search_model, tmp_path, monkeypatch
):
    "Finding 11 (the index): each ends in one line naming the file and what is wrong, or a warning saying so."
    checkpoint = save_checkpoint(tmp_path / 'model.pt', search_model)
    assert run_cli(index_cli, [three_clips, '--checkpoint', checkpoint])[0] == 0
    payload = torch.load(three_clips / 'cavmae_sync.index', weights_only=True)
    for name, damage, message in (
        ('short.index', {'paths': payload['paths'][:2]}, "'paths' has 2 entries"),
        ('number.index', {'paths': [0, 1, 2]}, "'paths' holds a int"),
        ('flat.index', {'audio': payload['audio'][:, 0]}, "'audio' is a 2-d"),
    ):
        torch.save({**payload, **damage}, tmp_path / name)
        code, _, err = run_cli(search_cli, [tmp_path / name, '--audio', three_clips / 'clip0.mp4'])
        assert (
            code == 2
            and str(tmp_path / name) in err
            and message in err
            and len(err.strip().splitlines()) == 1
        ), err

    # disk full while the index is written: the message names the index file
    def disk_full(obj, f, *args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    code, _, err = run_cli(
        index_cli, [three_clips, '--checkpoint', checkpoint, '--out', tmp_path / 'full.index']
    )
    assert code == 2 and 'No space left on device' in err and str(tmp_path / 'full.index') in err
    monkeypatch.undo()
    # a 50 ms sound: answered, with a warning giving its length and what it was padded to
    import soundfile

    soundfile.write(
        str(tmp_path / 'blip.wav'), 0.3 * np.random.default_rng(0).standard_normal(800), 16000
    )
    index = three_clips / 'cavmae_sync.index'
    code, out, err = run_cli(search_cli, [index, '--audio', tmp_path / 'blip.wav', '-k', '1'])
    assert code == 0 and len(out.splitlines()) == 1
    assert (
        '0.05 s of sound' in err
        and '0.64 s audio window' in err
        and 'padded with silence to 10.24 s' in err
    )


NOTEBOOKS = ['retrieval', 'classification', 'localization', 'ablations']


@pytest.mark.parametrize('notebook', NOTEBOOKS)
def test_each_reproduction_notebook_checks_its_parameters_first(notebook):
    "Finding 10 / issue 25.5: the first code cell after the parameters calls `check_parameters` before any work."
    notebook_cells = json.loads((ROOT / 'nbs' / f'{notebook}.ipynb').read_text())['cells']
    cells = [c for c in notebook_cells if c['cell_type'] == 'code']
    first = next(i for i, c in enumerate(cells) if 'parameters' in c['metadata'].get('tags', []))
    source = ''.join(cells[first + 1]['source'])
    assert (
        'check_parameters(' in source and 'device' in source and 'train_steps=train_steps' in source
    )
    assert 'synthetic_testbed' not in source and 'testbed_checkpoints' not in source


def test_notebook_parameters_are_checked_before_any_work(tmp_path, monkeypatch):
    "Finding 10: train_steps, checkpoint (also on the synthetic set), device and the data root, each named."
    from cavmae_sync.config import data_dir
    from cavmae_sync.reproduce import check_parameters

    supported = ['synthetic', 'vggsound']
    with pytest.raises(ValueError, match='train_steps=-1'):
        check_parameters('retrieval', 'synthetic', supported, train_steps=-1)
    with pytest.raises(FileNotFoundError, match="checkpoint='/nonexistent'"):
        check_parameters(
            'retrieval', 'synthetic', supported, checkpoint='/nonexistent', train_steps=1500
        )
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        check_parameters('retrieval', 'imagenet', supported)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            check_parameters('retrieval', 'synthetic', supported, 'cuda')
    monkeypatch.setenv('CAVMAE_SYNC_DATA', str(tmp_path / 'nonexistent' / 'data'))
    with pytest.raises(FileNotFoundError, match='nonexistent/data'):
        data_dir()
    with pytest.raises(FileNotFoundError, match='CAVMAE_SYNC_DATA'):
        check_parameters('retrieval', 'synthetic', supported)
    assert not (tmp_path / 'nonexistent').exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without a CUDA GPU')
def test_papermill_with_device_cuda_on_a_cpu_machine_fails_within_a_minute_naming_it(
    tmp_path, monkeypatch
):
    "Finding 10 / issue 25.5: `-p device cuda` stops in the parameter check, before the testbed is generated."
    papermill = pytest.importorskip('papermill')
    monkeypatch.setenv('CAVMAE_SYNC_DATA', str(tmp_path / 'data'))
    monkeypatch.delenv('IN_TEST', raising=False)
    started = time.time()
    with pytest.raises(papermill.PapermillExecutionError) as error:
        papermill.execute_notebook(
            str(ROOT / 'nbs' / 'retrieval.ipynb'),
            str(tmp_path / 'out.ipynb'),
            parameters={'device': 'cuda'},
            kernel_name='python3',
            cwd=str(ROOT),
            progress_bar=False,
        )
    assert time.time() - started < 60
    assert "device='cuda'" in str(error.value) and 'no usable CUDA GPU' in str(error.value)
    assert not (tmp_path / 'data').exists()  # no testbed was generated


@pytest.mark.slow
@pytest.mark.parametrize(
    'notebook, parameters, message',
    [
        ('classification', {'train_steps': -1}, 'train_steps=-1'),
        (
            'localization',
            {'checkpoint': '/nonexistent.pth'},
            "checkpoint='/nonexistent.pth': no such file",
        ),
        ('ablations', {'train_batch_size': 0}, 'train_batch_size=0'),
    ],
)
def test_papermill_bad_parameters_stop_the_other_notebooks(
    notebook, parameters, message, tmp_path, monkeypatch
):
    "Finding 10: the same check in every reproduction notebook, before the testbed is generated (about 10 s each)."
    papermill = pytest.importorskip('papermill')
    monkeypatch.setenv('CAVMAE_SYNC_DATA', str(tmp_path / 'data'))
    monkeypatch.delenv('IN_TEST', raising=False)
    with pytest.raises(papermill.PapermillExecutionError, match=message):
        papermill.execute_notebook(
            str(ROOT / 'nbs' / f'{notebook}.ipynb'),
            str(tmp_path / 'out.ipynb'),
            parameters=parameters,
            kernel_name='python3',
            cwd=str(ROOT),
            progress_bar=False,
        )
    assert not (tmp_path / 'data').exists()


# --- shards (issue 28: findings 1, 3, 4 and the shard index of 11) ---------------------------------------------

SHARD_CONFIG = PreprocessConfig(num_frames=4, image_size=32, window=64, frame_preset='released')
PREPARE = [
    '--num-frames',
    '4',
    '--image-size',
    '32',
    '--shard-gb',
    '1e-7',
    '--no-progress',
]  # 100 B: a clip a shard


def small_videos(folder: Path, count: int) -> Path:
    "`count` 2-s clips (numbered frames, tones): what `cavmae-sync-prepare --shards` reads."
    from media_factory import write_clip

    for k in range(count):
        write_clip(folder / f'clip{k}.mp4', seconds=2.0)
    return folder


def prepare(capsys, *argv) -> tuple[int, str]:
    "`cavmae-sync-prepare` in this process: (exit status, what it printed on stderr)."
    from cavmae_sync.prepare import prepare_cli

    capsys.readouterr()
    code = prepare_cli([str(a) for a in argv])
    return code, capsys.readouterr().err


def pretrain_exit(capsys, shards: Path, out: Path) -> tuple[int | None, str]:
    "`cavmae-sync-pretrain` on a shard folder, in this process: (exit status, stderr); None: it trained and returned."
    from training_setup import MINI_MODEL

    args = [
        *MINI_MODEL,
        '--model.frame_preset',
        'released',
        '--train_data',
        str(shards),
        '--output_dir',
        str(out),
        '--batch_size',
        '2',
        '--lr_reference_batch',
        '2',
        '--max_steps',
        '1',
        '--num_workers',
        '0',
        '--progress',
        'false',
        '--tensorboard',
        'false',
        '--device',
        'cpu',
    ]
    capsys.readouterr()
    try:
        pretraining.pretrain_cli(args)
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    return None, capsys.readouterr().err


def read_ids(shards) -> list[str]:
    from cavmae_sync.shards import ShardDataset

    return sorted(item['video_id'] for item in ShardDataset(shards, 'eval', SHARD_CONFIG))


def test_a_part_of_another_split_does_not_overwrite_the_first(tmp_path, capsys):
    "Finding 1: --part 0/2 and 1/2, then --part 0/4 into the same folder overwrote part 0/2's tars with other clips."
    import hashlib

    videos, shards = (
        small_videos(tmp_path / 'videos', 6),
        tmp_path / 'shards',
    )  # 0/2: clips 0, 2, 4; 0/4: 0, 4
    for part in ('0/2', '1/2'):
        assert prepare(capsys, videos, '--shards', shards, '--part', part, *PREPARE)[0] == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards.iterdir()}
    code, err = prepare(capsys, videos, '--shards', shards, '--part', '0/4', *PREPARE)
    assert {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards.iterdir()
    } == before  # nothing written
    assert (
        code == 1
        and len(err.splitlines()) == 1
        and 'another split' in err
        and 'part0000-of-0002.json' in err
    ), err
    assert read_ids(shards) == [f'clip{k}' for k in range(6)]  # every clip once
    assert all(
        '-of-0002-' in name for name in before if name.endswith('.tar')
    )  # and N is in every shard's name


class Killed(BaseException):
    "A writer killed between two shards (what SIGKILL does to it, without killing the test)."


def test_a_part_killed_after_its_first_shard_stops_pretraining(tmp_path, capsys, monkeypatch):
    """Finding 3: a part killed after its first shard left an index without a completion mark, and pretraining trained
    on the clips it found and exited 0. Now every reader refuses the part, naming its index; a rerun finishes it."""
    from cavmae_sync import shards as shard_module

    videos, shards = small_videos(tmp_path / 'videos', 6), tmp_path / 'shards'
    assert prepare(capsys, videos, '--shards', shards, '--part', '0/2', *PREPARE)[0] == 0
    made = shard_module.clip_sample
    calls = []

    def killed_at_the_third_clip(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Killed()  # the first shard is in the index, the second never lands
        return made(*args, **kwargs)

    monkeypatch.setattr(shard_module, 'clip_sample', killed_at_the_third_clip)
    with pytest.raises(Killed):
        prepare(capsys, videos, '--shards', shards, '--part', '1/2', *PREPARE)
    monkeypatch.setattr(shard_module, 'clip_sample', made)
    assert len(json.loads((shards / 'part0001-of-0002.json').read_text())['shards']) == 1
    code, err = pretrain_exit(capsys, shards, tmp_path / 'run')
    assert code == 1 and len(err.splitlines()) == 1, err
    assert 'part0001-of-0002.json' in err and 'incomplete' in err and '--part 1/2' in err, err
    with pytest.raises(MediaError, match='part0001-of-0002.json'):
        read_ids(shards)
    assert (
        prepare(capsys, videos, '--shards', shards, '--part', '1/2', *PREPARE)[0] == 0
    )  # a rerun finishes it
    assert read_ids(shards) == [f'clip{k}' for k in range(6)]


def test_a_tar_named_twice_or_left_empty_is_named(tmp_path, capsys):
    """Finding 4: two part indexes naming the same tar read one clip twice and lost another; a 0-byte tar was read as an
    empty shard (7 of 8 clips read while `len()` said 8)."""
    from cavmae_sync.shards import ShardDataset

    videos, shards = small_videos(tmp_path / 'videos', 4), tmp_path / 'shards'
    for part in ('0/2', '1/2'):
        assert prepare(capsys, videos, '--shards', shards, '--part', part, *PREPARE)[0] == 0
    first, second = shards / 'part0000-of-0002.json', shards / 'part0001-of-0002.json'
    saved = second.read_text()
    index = json.loads(saved)
    twice = json.loads(first.read_text())['shards'][0]['name']
    index['shards'][0]['name'] = twice  # part 1 names part 0's first tar
    second.write_text(json.dumps(index))
    with pytest.raises(MediaError, match=twice) as error:
        read_ids(shards)
    assert first.name in str(error.value) and second.name in str(error.value)
    second.write_text(saved)
    empty = shards / twice
    empty.write_bytes(b'')
    assert len(ShardDataset(shards, 'eval', SHARD_CONFIG)) == 4
    with pytest.raises(MediaError, match=twice) as error:
        read_ids(shards)
    assert '0 bytes' in str(error.value)
    with pytest.raises(MediaError, match='0 bytes'):
        list(ShardDataset([empty], 'eval', SHARD_CONFIG))  # no index too


def test_a_damaged_shard_index_is_a_one_line_error(tmp_path, capsys):
    "Finding 11 (shards): a shard index of the wrong JSON shape, or not UTF-8, ended in a traceback (TypeError, ...)."
    from cavmae_sync.shards import ShardDataset

    videos, shards = small_videos(tmp_path / 'videos', 2), tmp_path / 'shards'
    assert prepare(capsys, videos, '--shards', shards, *PREPARE)[0] == 0
    index = shards / 'part0000-of-0001.json'
    for damage, reason in (
        (json.dumps({'part': 0, 'parts': 1, 'shards': 'x', 'skipped': []}).encode(), "'shards'"),
        (json.dumps([0, 1]).encode(), 'not an object'),
        (b'{"part": 0, \xff\xfe}', 'not UTF-8'),
    ):
        index.write_bytes(damage)
        code, err = prepare(
            capsys, videos, '--shards', shards, *PREPARE
        )  # the writer resumes from the index
        assert code == 1 and len(err.splitlines()) == 1 and index.name in err and reason in err, err
        with pytest.raises(MediaError, match=index.name):
            ShardDataset(shards, 'eval', SHARD_CONFIG)
        code, err = pretrain_exit(capsys, shards, tmp_path / 'run')
        assert code == 1 and len(err.splitlines()) == 1 and index.name in err and reason in err, err


# --- the offset tool (issue 28: findings 2 and 9) ---------------------------------------------------------------


def test_the_offset_tool_refuses_offsets_the_clip_cannot_hold(tmp_path, monkeypatch):
    """Finding 2: `cavmae-sync-offset clip.mp4 --max-offset 1e6` grew to 24 GB; 1e9 and inf ended in tracebacks. Now a
    max_offset the clip cannot support is refused, naming the value and the clip's length, before a grid is built."""
    import contextlib
    import io
    from cavmae_sync import sync
    from cavmae_sync.checkpoint import save_checkpoint
    from cavmae_sync.model import CAVMAESync

    clip = sync.time_coded_clip(tmp_path / 'clip.mp4', duration=12.0)
    checkpoint = save_checkpoint(
        tmp_path / 'model.pt', CAVMAESync(tiny(num_frames=4, audio_length=64, image_size=32))
    )
    built = []

    # no grid beyond the clip: it is what took the memory
    def bounded_grid(max_offset=2.0, step=0.04):
        assert max_offset <= 12.0, f'a grid of +-{max_offset} s was built for a 12 s clip'
        built.append(max_offset)
        return grid(max_offset, step)

    grid = sync.offset_grid
    monkeypatch.setattr(sync, 'offset_grid', bounded_grid)

    def run(max_offset):
        out, err, code = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                sync.offset_cli(
                    [str(clip), '--checkpoint', str(checkpoint), '--max-offset', max_offset]
                )
            except SystemExit as e:
                code = e.code
        return code, out.getvalue(), err.getvalue()

    for max_offset, shown in (('1e6', '1e+06'), ('1e9', '1e+09'), ('60', '60')):
        code, out, _ = run(max_offset)
        assert code == 1 and len(out.splitlines()) == 1, out
        assert (
            f'max_offset={shown} s is more than this clip can support' in out
            and 'it lasts 12.0' in out
        ), out
    for max_offset in ('inf', 'nan'):
        code, out, err = run(max_offset)
        assert (
            code == 2
            and out == ''
            and len(err.splitlines()) == 1
            and 'finite number of seconds' in err
        ), err
    code, out, _ = run('2')
    assert code == 0 and 'confidence' in out and built == [2.0]  # good input: as before


def test_an_offset_seen_by_few_frames_does_not_win(tmp_path, monkeypatch):
    """Finding 9: with a wide --max-offset and --step 0.01 the tiny testbed model answered from 4 or 5 of 16 frames (a
    frame at the clip's edge, whose window fits only there) at twice the confidence of the default run. Now an answer
    needs two thirds of the frames of the best-supported offset; the wide search finds what the default run finds."""
    from cavmae_sync.checkpoint import load_model_file
    from cavmae_sync.synthetic import make_synthetic
    from cavmae_sync.sync import av_offset, cached_tiny_model

    monkeypatch.setenv(
        'CAVMAE_SYNC_DATA', str(tmp_path / 'no cache')
    )  # the shipped model, not a local one
    checkpoint = cached_tiny_model('sync')
    if checkpoint is None:
        pytest.skip('no tiny model shipped in checkpoints/testbed')
    make_synthetic(
        tmp_path / 'set', num_train=0, num_test=5, seed=1, image_size=64, duration=12.0, workers=1
    )
    clip = sorted((tmp_path / 'set').rglob('test_00004.mp4'))[
        0
    ]  # 12 s: the old rule answered +8.48 s
    model = load_model_file(checkpoint)
    default, wide = av_offset(clip, model), av_offset(clip, model, max_offset=8.5, step=0.01)
    answer = int((wide.offsets - wide.offset).abs().argmin())
    assert int(wide.frames_used[answer]) * 3 >= 2 * int(wide.frames_used.max()), wide.summary()
    assert abs(wide.offset - default.offset) <= 0.2, (wide.summary(), default.summary())


def test_frames_that_all_carry_one_timestamp_are_named(tmp_path):
    """Finding 9: a video whose frames all carry timestamp 0 was accepted without a warning, as 16 copies of one frame.
    Now it is named (broken timestamps) and read at its declared frame rate."""
    import av
    from cavmae_sync.model import CAVMAESync
    from cavmae_sync.sync import av_offset
    from cavmae_sync.video import read_frames
    from media_factory import frame_number, write_clip

    source = write_clip(tmp_path / 'source.mp4', seconds=4.0)
    stuck = tmp_path / 'stuck.mp4'
    with av.open(str(source)) as src, av.open(str(stuck), 'w') as dst:
        video = dst.add_stream_from_template(src.streams.video[0])
        audio = dst.add_stream_from_template(src.streams.audio[0])
        for packet in src.demux(src.streams.video[0], src.streams.audio[0]):
            if packet.dts is None:
                continue
            if packet.stream.type == 'video':
                packet.pts = packet.dts = 0
            packet.stream = video if packet.stream.type == 'video' else audio
            dst.mux(packet)
    model = CAVMAESync(tiny(num_frames=4, audio_length=64, image_size=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = av_offset(stuck, model, max_offset=0.4, step=0.1)
    named = [w for w in caught if 'broken timestamps' in str(w.message)]
    assert (
        named
        and str(stuck) in str(named[0].message)
        and named[0].category.__name__ == 'BrokenTimestampsWarning'
    )
    assert len(set(result.frame_times.tolist())) == 4  # four frames, four times
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        frames = read_frames(stuck, 16).frames
    assert len({frame_number(f.numpy()) for f in frames}) == 16  # not 16 copies of one frame
