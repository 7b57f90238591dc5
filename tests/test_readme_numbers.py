"""The numbers of the README and docs/ are the ones the notebooks wrote.

Results sit in generated blocks (`<!-- generated: NAME -->`, made by `cavmae_sync.report` from figures/*.csv and the
shipped models' logs). Here: every block equals a fresh rendering; independently of `report`, every number of the
README's verdict table and localization row is read back and compared, rounded as printed, with the CSV files; every
number elsewhere in the README's results section is one the files hold; and the two notebooks that judge claim (a)
agree on it. After a full notebook run refreshed figures/, `python3 -c "from cavmae_sync.report import refresh_docs;
refresh_docs()"` rewrites the blocks.
"""

from __future__ import annotations
import ast
import json
import re
from pathlib import Path

import pandas as pd

from cavmae_sync import report

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / 'figures'
ARROW = {'a→v': 'audio_to_video', 'v→a': 'video_to_audio'}


def block(name: str, page: str = 'README.md') -> str:
    found = [body for n, body in report.generated_blocks((ROOT / page).read_text()) if n == name]
    assert len(found) == 1, f'{page}: {len(found)} generated blocks named {name!r}, expected one'
    return found[0]


def table_rows(text: str) -> list[list[str]]:
    "The body rows of the first Markdown table of `text`, as stripped cells."
    rows = [
        [c.strip() for c in line.strip().strip('|').split('|')]
        for line in text.splitlines()
        if line.startswith('|')
    ]
    return rows[2:]


def shown(value: float) -> str:
    return f'{value:+.1f}'


def test_generated_blocks_are_what_the_files_give():
    stale = report.stale_blocks(ROOT)
    assert not stale, (
        f'generated blocks differ from figures/ and the shipped models: '
        f'{ {str(p.relative_to(ROOT)): n for p, n in stale.items()} }; run `python3 -c '
        '"from cavmae_sync.report import refresh_docs; refresh_docs()"` and commit the pages'
    )


def test_verdict_table_numbers_are_the_csv_files():
    rows = table_rows(block('verdicts'))
    seen = set()
    for claim_cell, outcome, gains, checks, file_cell in rows:
        claim = re.sub(r'^\([a-z]\) ', '', claim_cell)
        file = re.fullmatch(r'\[([\w.]+)\]\(figures/\1\)', file_cell)[1]
        written = pd.read_csv(FIGURES / file)
        mine = written[written['claim'] == claim]
        assert len(mine), f'README verdict table: {claim!r} is not a claim of figures/{file}'
        assert outcome.strip('*') == mine['outcome'].iloc[0], (claim, outcome)
        gate = 'all passed checks' if 'all passed checks' in written else 'all left chance'
        assert checks == ('yes' if mine[gate].all() else 'no'), (claim, checks)
        parsed = re.findall(r'(.+?) ([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\](?:; |$)', gains)
        assert len(parsed) == len(mine), (
            f'{claim}: {gains!r} has {len(parsed)} measures, figures/{file} {len(mine)}'
        )
        for (measure, gain, low, high), (_, r) in zip(parsed, mine.iterrows()):
            for arrow, direction in ARROW.items():
                measure = measure.replace(arrow, direction)
            assert measure == r['measure'], (measure, r['measure'])
            written_gain = (shown(r['gain']), shown(r['gain 95% low']), shown(r['gain 95% high']))
            assert (gain, low, high) == written_gain, (claim, measure)
        seen.add(claim)
    every = {c for f in report.VERDICT_FILES for c in pd.read_csv(FIGURES / f)['claim']}
    assert seen == every, (
        f'claims the notebooks judged that the README leaves out: {sorted(every - seen)}'
    )
    assert len(rows) == len(every)


def test_localization_row_is_the_csv_file():
    body = block('localization')
    header = [c.strip() for c in body.splitlines()[0].strip('|').split('|')]
    (row,) = table_rows(body)
    model = row[0]
    written = pd.read_csv(FIGURES / 'localization.csv').set_index('model')
    source = {
        'mAP': (model, 'mAP'),
        'mIoU': (model, 'mIoU'),
        'pointing accuracy': (model, 'pointing_accuracy'),
        'brightness map': ('brightness (audio-free control)', 'pointing_accuracy'),
        'its sound-averaged map': (f'{model} (audio-free control)', 'pointing_accuracy'),
        'every pixel': ('every pixel (reference)', 'pointing_accuracy'),
        'peaks on the played object': (model, 'prompted_share'),
        'audio-free map': (f'{model} (audio-free control)', 'prompted_share'),
    }
    assert header[1:] == list(source), header
    for name, cell in zip(header[1:], row[1:]):
        assert cell == f'{written.loc[source[name]]:.1f}', (name, cell, written.loc[source[name]])
    prompts = re.search(r'Percent of (\d+) prompts', body)[1]
    assert int(prompts) == int(written.loc[model, 'prompts'])


def test_shipped_models_table_is_their_logs():
    rows = table_rows(block('shipped-models', 'docs/testbed.md'))
    assert len(rows) == len(list((ROOT / 'checkpoints' / 'testbed').glob('*/model.pt')))
    for name, folder_cell, budget, minutes, loss, recall in rows:
        run = ROOT / 'checkpoints' / 'testbed' / re.match(r'\[(\w+)\]', folder_cell)[1]
        config = json.loads((run / 'config.json').read_text())['config']
        log, last = pd.read_csv(run / 'train_log.csv'), pd.read_csv(run / 'eval_log.csv').iloc[-1]
        assert budget == f"{int(log['step'].iloc[-1])} x {config['batch_size']}"
        sessions = log['time'][
            log['time'].shift(-1, fill_value=-1.0) < log['time']
        ]  # `time` restarts on resume
        assert minutes == f'{sessions.sum() / 60:.1f}'
        assert loss.split(' ')[0] == f"{log['contrastive_loss'].iloc[-1]:.2f}"
        assert recall == f"{last['a2v_R@1']:.1f} / {last['v2a_R@1']:.1f}"


def known_numbers() -> set[str]:
    "Every number the files hold, as the pages may print it: figures/*.csv, the notebooks' parameters, shipped configs."
    values = []
    for csv in FIGURES.glob('*.csv'):
        for column in pd.read_csv(csv).select_dtypes('number'):
            values += list(pd.read_csv(csv)[column].dropna())
    for notebook in ('retrieval', 'classification', 'localization', 'ablations'):
        cells = json.loads((ROOT / 'nbs' / f'{notebook}.ipynb').read_text())['cells']
        cell = next(c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', []))
        for node in ast.parse(''.join(cell['source'])).body:
            value = ast.literal_eval(node.value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.append(value)
    for config in (ROOT / 'checkpoints' / 'testbed').glob('*/config.json'):
        values += [
            v
            for v in json.loads(config.read_text())['config'].values()
            if isinstance(v, (int, float))
        ]
    known = set()
    for v in values:
        known |= {
            f'{v:.0f}',
            f'{v:.1f}',
            f'{v:.2f}',
            f'{abs(v):.1f}',
            f'{abs(v):.0f}',
            f'{abs(v):.2f}',
        }
    return known


def test_results_section_quotes_only_numbers_of_the_files():
    text = (ROOT / 'README.md').read_text()
    section = re.search(r'^## What the default run shows\n(.*?)^## ', text, re.S | re.M)
    assert section, 'README.md: no "## What the default run shows" section'
    prose = report.BLOCK.sub('', section[1])  # generated blocks: tested above
    prose = re.sub(r'`[^`]*`|\]\([^)]*\)', ' ', prose)  # code spans and link targets
    numbers = re.findall(r'(?<![\w.@-])[+-]?\d+(?:[.,]\d+)*(?![\w@])', prose)
    unknown = [n for n in numbers if n.replace(',', '').lstrip('+-') not in known_numbers()]
    assert not unknown, (
        f"README results section: {unknown} are not numbers of figures/, the notebooks' parameters "
        'or the shipped models'
    )


def test_claim_a_is_judged_alike_by_retrieval_and_ablations():
    "ablations.ipynb judges claim (a) again on the same models: both files must say the same (else one is stale)."
    assert report.verdict_disagreements(ROOT) == []
