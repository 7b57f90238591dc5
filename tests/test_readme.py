"""Every example of README.md and docs/*.md runs as printed, with shipped files standing in for the reader's.

Each page runs in a fresh temporary folder that holds, under the names the examples use, the stand-ins of
`PLACEHOLDERS` (a shipped testbed model for `cav-mae-sync.pth`, testbed clips for `my_clip.mp4`, ...), plus links to
the repository folders the examples name (`nbs/`). The page's blocks run in order, as a reader would run them:

- a ```python block is executed (one namespace per page);
- a ```bash block runs line by line, each command as `command_plan` decides: it *runs*, or is only *checked* (its
  options against the command's `--help`, torchrun's parser or the notebook's parameters cell; in the script it
  becomes `:`). Checked only: installing the package (the test runs inside it), the test suite itself, notebook runs
  that need real data or train models for tens of minutes, a command that names a path of the reader's data set or
  cluster (`/data/...`), several nodes. The main job `papermill nbs/retrieval.ipynb out.ipynb` runs with
  `-p quick True` (the small run `nbdev_test` makes; the full default run is what wrote `figures/`). `torchrun` on one
  machine runs only in the slow test (`-m slow`). A line that is one of this package's commands runs through its
  console-script entry point in this process (globs expanded, `> file` written; one interpreter start instead of one
  per command); any other line runs under `bash -euo pipefail`. Cluster variables (`$SLURM_ARRAY_TASK_ID`, ...) take
  a task's value from `VARIABLES`, and an unknown one fails;
- a ```yaml block (a Kubernetes job) and a bash block that is a SLURM script (`#SBATCH`) are checked: `#SBATCH`
  options against sbatch's, and the commands they run as above.

A path-like word of a block (a `/`, or a file extension) must be a placeholder, a file the examples write (`OUTPUTS`),
a repository path that exists, or, in a checked command only, a path of the reader's data (`/data/...`): a block that
names anything else fails, saying what to add. The test prints, for every block, what it ran and what it checked.
"""

from __future__ import annotations
import ast
import contextlib
import glob
import importlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150  # issue 25: a README read in five minutes
PAGES = ['README.md', *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / 'docs').glob('*.md'))]
SHIPPED_SYNC = ROOT / 'checkpoints' / 'testbed' / 'tiny_sync_73e3aefe336c' / 'model.pt'

# name in the examples -> (what the reader has there, what stands in for it here; None: only checked blocks name it)
PLACEHOLDERS = {
    'cav-mae-sync.pth': (
        'the released CAV-MAE Sync weights',
        'the shipped tiny CAV-MAE Sync model (model.pt)',
    ),
    'cav-mae-sync-as-ft.pth': ('the released AudioSet fine-tuned weights', None),
    'my_clip.mp4': ('a video of yours', 'a testbed test clip'),
    'query.mp4': ('a video to search with', 'another testbed clip'),
    'my_videos/': ('a folder of your videos', 'three testbed clips'),
    'barking.wav': ('a sound to search with', "a testbed clip's sound, 16 kHz wav"),
    'guitar.jpg': ('a picture to search with', 'the first frame of a testbed clip'),
    'vggsound_test_videos/': ('the VGGSound test videos', 'three testbed clips'),
    'video_labels.csv': ('their labels (video_id,labels)', 'the testbed classes of those clips'),
}
OUTPUTS = (
    'out.ipynb',
    'offsets.jsonl',
    'my_videos/cavmae_sync.index',
    'test.json',
    'my_clip.localization.mp4',
    'vggsound/',
    'my_testbed/',
    'my_shards/',
    'my_runs/',
)  # what the examples write (a folder: all under it)
READER_DATA = (
    '/data/',
    '/runs/',
    '/ckpt/',
)  # the reader's data set and cluster paths: checked commands only
VARIABLES = {
    'SLURM_ARRAY_TASK_ID': '0',
    'JOB_COMPLETION_INDEX': '0',  # a cluster's variables, as one task has them
    'NODE_RANK': '0',
    'MASTER': 'localhost',
}
LINK_INTO_WORKDIR = ('nbs',)  # repository folders the examples name relative to the repository root
PATH_LIKE = re.compile(
    r'/|\.(mp4|mkv|avi|webm|wav|jpg|jpeg|png|pth|pt|safetensors|json|jsonl|csv|ipynb|index|tar)$'
)
SBATCH_OPTIONS = {
    'array',
    'cpus-per-task',
    'mem',
    'time',
    'nodes',
    'ntasks',
    'ntasks-per-node',
    'gres',
    'gpus',
    'gpus-per-node',
    'job-name',
    'output',
    'error',
    'partition',
    'account',
    'qos',
    'exclusive',
}


# ---- the blocks of a page


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    done: list = field(default_factory=list)  # what the test did with it, one line per command
    words: list = field(
        default_factory=list
    )  # (path-like word, in a checked command?) of its commands

    @property
    def where(self) -> str:
        return f'{self.page}:{self.line} ({self.lang})'


def page_blocks(page: str) -> list[Block]:
    "The fenced blocks of a Markdown page (```lang ... ```), with the line they start on."
    blocks, lines, k = [], (ROOT / page).read_text().splitlines(), 0
    while k < len(lines):
        opening = re.match(r'^\s*```(\w*)\s*$', lines[k])
        if opening:
            end = next((j for j in range(k + 1, len(lines)) if lines[j].strip() == '```'), None)
            assert end is not None, f'{page}:{k + 1}: a code block is not closed'
            indent = len(lines[k]) - len(lines[k].lstrip())
            body = '\n'.join(
                l[indent:] if l[:indent].strip() == '' else l for l in lines[k + 1 : end]
            )
            blocks.append(Block(page, k + 1, opening[1] or 'text', body))
            k = end
        k += 1
    return blocks


def ci_test_command(page: str = 'README.md') -> str:
    "The README's test command as `.ci/run` extracts it (between the test-command markers, fences dropped)."
    text = (ROOT / page).read_text()
    inside = re.search(r'<!-- test-command -->\n(.*?)<!-- /test-command -->', text, re.S)
    return '\n'.join(
        l
        for l in (inside[1] if inside else '').splitlines()
        if l.strip() and not l.startswith('```')
    )


# ---- commands: run or check


def logical_lines(script: str) -> list[str]:
    "Shell lines with `\\` continuations joined, comment-only and empty lines dropped."
    joined, out = script.replace('\\\n', ' '), []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith('#'):
            out.append(line)
    return out


OPERATORS = {'&&', '||', ';', '|'}

REDIRECTIONS = {'>', '>>', '<'}


def split_commands(line: str) -> list:
    "A shell line as its simple commands, each (words, redirections), with the operators between them."
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, '#'
    parts, words, redirections, target = [], [], [], False
    for word in lexer:
        if word in OPERATORS:
            parts += [(words, redirections), word]
            words, redirections = [], []
        elif word in REDIRECTIONS:
            redirections.append(word)
            target = True
        elif target:
            redirections.append(word)
            target = False
        else:
            words.append(word)
    return parts + [(words, redirections)]


def expand(words: list[str], where: str) -> list[str]:
    "Words with the cluster's variables (`VARIABLES`) set to a value of one task; another variable fails."

    def value(m):
        assert m[1] in VARIABLES, (
            f'{where}: ${m[1]} is not in VARIABLES; add the value one task of the job has'
        )
        return VARIABLES[m[1]]

    return [re.sub(r'\$\{?(\w+)\}?', value, w) for w in words]


def quote(word: str) -> str:
    "A word back into shell text: globs and plain words as they are, redirections unquoted, the rest quoted."
    if re.fullmatch(r"[\w@%+=:,./*?-]+", word) or word in ('>', '>>', '<', '2>'):
        return word
    return shlex.quote(word)


def entry_point(command: str):
    "The function a console script of pyproject.toml's [project.scripts] runs (installed or not yet)."
    scripts = (
        (ROOT / 'pyproject.toml').read_text().split('[project.scripts]', 1)[1].split('\n[', 1)[0]
    )
    target = dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.]+:\w+)"', scripts, re.M)).get(command)
    assert target, f'{command}: not a command of this package (pyproject.toml [project.scripts])'
    module, function = target.split(':')
    return getattr(importlib.import_module(module), function)


_HELP = {}


def help_options(command: str) -> set[str]:
    "The options a command's `--help` lists (in-process, through its console-script entry point)."
    if command not in _HELP:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            entry_point(command)(['--help'])
        _HELP[command] = set(re.findall(r'(?<![\w-])(--?[A-Za-z][\w.-]*)', out.getvalue()))
    return _HELP[command]


def check_options(command: str, args: list[str], where: str) -> None:
    "Every option of `args` is one that `command --help` lists."
    known = help_options(command)
    for word in args:
        if word.startswith('-') and not re.fullmatch(r'-?\d+(\.\d+)?', word):
            option = word.split('=', 1)[0]
            assert option in known, (
                f'{where}: {command} has no option {option} (its --help lists {sorted(known)})'
            )


def notebook_parameters(notebook: Path) -> dict:
    "{name: default} of a papermill notebook's parameters cell."
    cells = json.loads(notebook.read_text())['cells']
    cell = next((c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', [])), None)
    assert cell is not None, f'{notebook}: no cell tagged parameters'
    tree = ast.parse(''.join(cell['source']))
    return {
        t.id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
    }


def papermill_plan(words: list[str], where: str) -> tuple[str, list[str], str]:
    "('run' | 'check', the words to run, why) of a papermill command, its notebook and parameters checked."
    assert len(words) >= 3 and not words[1].startswith('-'), (
        f'{where}: papermill NOTEBOOK OUTPUT [-p NAME VALUE]...'
    )
    notebook = ROOT / words[1]
    assert notebook.is_file(), f'{where}: {words[1]} is not a notebook of the repository'
    known, given, k = notebook_parameters(notebook), {}, 3
    while k < len(words):
        assert words[k] in ('-p', '--parameters') and k + 2 < len(words) + 1, (
            f'{where}: unexpected {words[k:]}'
        )
        name, value = words[k + 1], words[k + 2]
        assert name in known, (
            f'{where}: {words[1]} has no parameter {name!r} (its parameters: {sorted(known)})'
        )
        given[name] = value
        k += 3
    if given.get('dataset', 'synthetic') != 'synthetic':
        return 'check', words, f"needs the {given['dataset']} data set"
    if set(given) - {'quick'}:
        return 'check', words, f"trains models for tens of minutes ({', '.join(sorted(given))})"
    return (
        'run',
        words + ['-p', 'quick', 'True'],
        'at quick sizes (the full default run wrote figures/)',
    )


def torchrun_plan(words: list[str], where: str) -> tuple[str, str]:
    "('slow' | 'check', why) of a torchrun command; its options and the training command's are checked."
    from torch.distributed.run import get_args_parser

    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            args = get_args_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f'{where}: torchrun refuses {shlex.join(words)}: {err.getvalue()}')
    ours = args.no_python and args.training_script.startswith('cavmae-sync-')
    assert ours, f'{where}: torchrun runs one of our commands (--no-python cavmae-sync-...)'
    check_options(args.training_script, args.training_script_args, where)
    if str(args.nnodes) not in ('1', '1:1'):
        return 'check', f'{args.nnodes} nodes'
    return 'slow', 'several processes on this machine (slow test)'


def command_plan(words: list[str], where: str) -> tuple[str, list[str], str]:
    "What the test does with one simple command: ('run' | 'slow' | 'check', the words to run, why)."
    words = expand(words, where)
    name = words[0]
    if words[:4] == ['python3', '-m', 'pip', 'install']:
        spec = words[4:]
        assert spec in (['-e', '.'], ['-e', '.[dev]']), (
            f'{where}: installs {spec}, not this checkout'
        )
        return 'check', words, 'installs this checkout, which the test runs in'
    if name in ('nbdev_test', 'nbdev-test'):
        return 'check', words, "runs every notebook (CI's own step)"
    if words[:3] == ['python3', '-m', 'pytest']:
        return 'check', words, 'the test suite itself'
    if name == 'papermill':
        return papermill_plan(words, where)
    if name == 'torchrun':
        plan, why = torchrun_plan(words, where)
        return plan, words, why
    if name.startswith('cavmae-sync-'):
        check_options(name, words[1:], where)
        reader = [w for w in words if w.startswith(READER_DATA)]
        return (
            ('check', words, f'names the reader data {reader[0]}') if reader else ('run', words, '')
        )
    pytest.fail(f'{where}: no rule for the command {name!r}; add one to command_plan')


# ---- path-like words


def path_words(block: Block) -> list[tuple[str, bool]]:
    "(word, only in a checked command?) for the path-like words of a block, options and variables left out."
    if block.lang == 'python':
        tree = ast.parse(block.text)
        strings = [
            n.value
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        return [(s, False) for s in strings if PATH_LIKE.search(s) and ' ' not in s]
    return block.words


def check_path_words(block: Block) -> None:
    for word, checked in path_words(block):
        if word.startswith('-') or '$' in word or re.fullmatch(r'\d+/\d+', word) or '://' in word:
            continue
        if word in PLACEHOLDERS or word.rstrip('/') + '/' in PLACEHOLDERS:
            continue
        if any(word.startswith(folder) for folder in PLACEHOLDERS if folder.endswith('/')):
            continue  # files in one
        if any(word in (o, o.rstrip('/')) or word.startswith(o.rstrip('/') + '/') for o in OUTPUTS):
            continue
        if (ROOT / word).exists():
            continue
        if word.startswith(READER_DATA):
            assert checked, (
                f'{block.where}: {word} is the reader\'s data, but its command would run here'
            )
            continue
        pytest.fail(
            f"{block.where}: {word!r} is not in PLACEHOLDERS (a file of the reader's with a stand-in here) or "
            "OUTPUTS (a file the examples write), nor a path of the repository: add it, or use a known name"
        )


# ---- running a page


def make_stand_ins(folder: Path) -> dict:
    "{placeholder: path}: testbed clips, a wav, a jpg, a labels CSV and the shipped model, made once."
    import av
    import soundfile
    from cavmae_sync.audio import load_audio
    from cavmae_sync.synthetic import make_synthetic

    testbed = make_synthetic(
        folder / 'testbed', num_train=0, num_test=5, seed=0, image_size=96, workers=1
    )
    clips = sorted((testbed.root / 'videos').glob('*.mp4'))
    names = {
        row.split(',')[1]: row.split(',', 2)[2].strip('"')  # mid -> display name
        for row in (testbed.root / 'labels.csv').read_text().splitlines()[1:]
    }
    labels = {
        e['video_id']: [names[mid] for mid in e['labels'].split(',')]
        for e in json.loads((testbed.root / 'test.json').read_text())['data']
    }
    made = folder / 'made'
    made.mkdir()
    soundfile.write(made / 'barking.wav', load_audio(clips[3]).numpy(), 16_000)
    with av.open(str(clips[4])) as container:
        next(container.decode(video=0)).to_image().save(made / 'guitar.jpg')
    rows = ['video_id,labels', *[f'{c.stem},"{",".join(labels[c.stem])}"' for c in clips[:3]]]
    (made / 'video_labels.csv').write_text('\n'.join(rows) + '\n')
    return {
        'cav-mae-sync.pth': SHIPPED_SYNC,
        'my_clip.mp4': clips[0],
        'query.mp4': clips[1],
        'my_videos/': clips[2:5],
        'vggsound_test_videos/': clips[:3],
        'barking.wav': made / 'barking.wav',
        'guitar.jpg': made / 'guitar.jpg',
        'video_labels.csv': made / 'video_labels.csv',
    }


@pytest.fixture(scope='module')
def stand_ins(tmp_path_factory) -> dict:
    made = make_stand_ins(tmp_path_factory.mktemp('stand_ins'))
    wanted = {name for name, (_, stand_in) in PLACEHOLDERS.items() if stand_in}
    assert set(made) == wanted, (
        f'PLACEHOLDERS and make_stand_ins disagree: {sorted(set(made) ^ wanted)}'
    )
    return made


def workdir(tmp: Path, stand_ins: dict) -> Path:
    "A folder holding every stand-in under its placeholder's name, and links to the repository folders named."
    for name, source in stand_ins.items():
        if isinstance(source, list):
            (tmp / name).mkdir()
            for clip in source:
                shutil.copy(clip, tmp / name / clip.name)
        else:
            shutil.copy(source, tmp / name)
    for name in LINK_INTO_WORKDIR:
        (tmp / name).symlink_to(ROOT / name, target_is_directory=True)
    return tmp


def plan_bash(block: Block, slow: bool) -> list[list]:
    """The block's logical lines, each a list of (plan, words, redirections) and operators; fills block.done and
    block.words. A SLURM script (`#SBATCH`) only has its options and commands checked."""
    block.words, sbatch, lines = [], bool(re.search(r'^#SBATCH', block.text, re.M)), []
    if sbatch:
        for options in re.findall(r'^#SBATCH\s+(.*)$', block.text, re.M):
            for word in shlex.split(options):
                known = word.startswith('--') and word[2:].split('=')[0] in SBATCH_OPTIONS
                assert known, (
                    f'{block.where}: #SBATCH {word} is not an sbatch option this test knows'
                )
        block.done.append('checked the #SBATCH options (a SLURM job is not run)')
    for line in logical_lines(block.text):
        planned = []
        for part in split_commands(line):
            if isinstance(part, str):
                planned.append(part)
                continue
            body, redirections = part
            plan, words, why = command_plan(body, block.where)
            if sbatch:
                plan, why = 'check', 'a SLURM job'
            elif plan == 'slow' and not slow:
                plan = 'check'
            block.words += [
                (w, plan == 'check') for w in body + redirections[1::2] if PATH_LIKE.search(w)
            ]
            said = f"{'ran' if plan != 'check' else 'checked'} `{shlex.join(body)[:90]}`"
            block.done.append(said + (f' ({why})' if why else ''))
            planned.append((plan, words, redirections))
        lines.append(planned)
    return lines


def run_in_process(words: list[str], redirections: list[str], folder: Path, where: str) -> None:
    "One of this package's commands through its entry point, globs expanded and `> file` written as bash would."
    entry = entry_point(words[0])
    argv = [
        m
        for w in words[1:]
        for m in (sorted(glob.glob(str(folder / w))) if glob.has_magic(w) else [w])
    ]
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out):
            try:
                code = entry(argv)
            except SystemExit as e:
                code = e.code
    finally:
        os.chdir(cwd)
    printed = out.getvalue()[-3000:]
    assert code in (0, None), (
        f'{where}: `{shlex.join(words)}` fails as printed (exit {code}):\n{printed}'
    )
    if redirections:
        assert redirections[0] in ('>', '>>') and len(redirections) == 2, (
            f'{where}: redirection {redirections}'
        )
        with open(folder / redirections[1], 'a' if redirections[0] == '>>' else 'w') as f:
            f.write(out.getvalue())


def run_bash(lines: list[list], folder: Path, where: str) -> None:
    """Run a planned block line by line: one of this package's commands alone on its line in-process (the same
    entry point the shell would start, without a new interpreter per command), any other line under bash."""
    env = {
        **os.environ,
        'PATH': f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}',
        'MPLBACKEND': 'Agg',
        'OMP_NUM_THREADS': '1',
    }
    for planned in lines:
        if all(isinstance(p, str) or p[0] == 'check' for p in planned):
            continue
        if len(planned) == 1 and planned[0][1][0].startswith('cavmae-sync-'):
            run_in_process(planned[0][1], planned[0][2], folder, where)
            continue
        script = ' '.join(
            p
            if isinstance(p, str)
            else ':'
            if p[0] == 'check'
            else ' '.join(quote(w) for w in p[1] + p[2])
            for p in planned
        )
        done = subprocess.run(
            ['bash', '-euo', 'pipefail', '-c', script],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (
            f'{where} fails as printed:\n{script}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}'
        )


def plan_yaml(block: Block) -> None:
    "A Kubernetes job: its containers' commands checked like shell commands."
    import yaml

    spec, block.words = yaml.safe_load(block.text), []
    containers = spec['spec']['template']['spec']['containers']
    for container in containers:
        command = container['command']
        assert command[:2] == ['sh', '-c'], f'{block.where}: a container command is sh -c "..."'
        for line in logical_lines(command[2]):
            for part in split_commands(line):
                if isinstance(part, str):
                    continue
                command_plan(part[0], block.where)
                block.words += [(w, True) for w in part[0] if PATH_LIKE.search(w)]
                block.done.append(f'checked `{shlex.join(part[0])[:90]}` (a Kubernetes job)')


def run_page(page: str, tmp: Path, stand_ins: dict, slow: bool = False) -> list[Block]:
    folder, namespace = workdir(tmp, stand_ins), {'__name__': '__readme__'}
    blocks = [b for b in page_blocks(page) if b.lang in ('python', 'bash', 'yaml')]
    for block in blocks:
        if block.lang == 'python':
            block.words = []
            check_path_words(block)
            cwd = os.getcwd()
            os.chdir(folder)
            try:
                exec(compile(block.text, block.where, 'exec'), namespace)
            except Exception as e:
                raise AssertionError(
                    f'{block.where} fails as printed: {type(e).__name__}: {e}'
                ) from e
            finally:
                os.chdir(cwd)
            block.done.append('ran the Python block')
            continue
        if block.lang == 'yaml':
            plan_yaml(block)
            check_path_words(block)
            continue
        if ci_test_command(page) and block.text.strip() == ci_test_command(page):
            block.words = []
            command_plan(['python3', '-m', 'pip', 'install', '-e', '.[dev]'], block.where)
            block.done.append("checked the test command (CI's own job: .ci/run runs it)")
            continue
        lines = plan_bash(block, slow)
        check_path_words(block)
        run_bash(lines, folder, block.where)
    report = '\n'.join(f'{b.where}: ' + '; '.join(b.done) for b in blocks)
    print(f'\n{page}:\n{report}')
    return blocks


# ---- the tests


def test_readme_is_short():
    lines = (ROOT / 'README.md').read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f'README.md: {len(lines)} lines, at most {README_MAX_LINES}: move detail out'
    )


def test_no_path_of_this_machine():
    for page in PAGES:
        text = (ROOT / page).read_text()
        for machine in {str(ROOT), str(Path.home()), '/work/', '/tmp/'}:
            assert machine not in text, f'{page} names {machine!r}, a folder of this machine'


def test_links_lead_to_files():
    for page in PAGES:
        for target in re.findall(r'\]\(([^)#\s]+)[^)]*\)', (ROOT / page).read_text()):
            if re.match(r'https?://', target):
                continue
            assert ((ROOT / page).parent / target).exists(), (
                f'{page} links to {target}, which does not exist'
            )


def test_the_test_command_is_what_ci_parses():
    command = ci_test_command()
    assert re.match(r'^python3? -m pip install [^&]*&&', command), (
        command
    )  # .ci/run installs with this part
    assert re.search(r'(^|&& *)nbdev[-_]test( |$)', command), command  # and requires nbdev_test


def test_every_page_has_its_blocks_planned():
    "Every block of every page is python, bash, yaml or text, and the README shows each task of its own videos."
    for page in PAGES:
        for block in page_blocks(page):
            assert block.lang in ('python', 'bash', 'yaml', 'text'), (
                f'{block.where}: unknown language'
            )
    readme = (ROOT / 'README.md').read_text()
    for shown in (
        'embed_video',
        'clip_similarity_maps',
        'cavmae-sync-offset',
        'cavmae-sync-search',
        'load_model_file',
    ):
        assert shown in readme, shown


@pytest.mark.parametrize('page', PAGES)
def test_page_runs_as_printed(page, stand_ins, tmp_path):
    blocks = run_page(page, tmp_path, stand_ins)
    if page == 'README.md':
        ran = ' '.join(d for b in blocks for d in b.done)
        assert 'ran `papermill nbs/retrieval.ipynb out.ipynb`' in ran, (
            ran
        )  # the main job, at quick sizes
        assert (tmp_path / 'my_videos' / 'cavmae_sync.index').is_file()
        layout = next(
            b for b in page_blocks(page) if b.lang == 'text' and b.text.startswith('vggsound/')
        )
        clip = sorted((tmp_path / 'vggsound_test_videos').glob('*.mp4'))[0].stem
        for line in layout.text.splitlines()[1:]:
            path = line.split()[0].replace('{video_id}', clip).replace('{i}', '0')
            assert (tmp_path / 'vggsound' / path).exists(), (
                f'README layout: cavmae-sync-prepare did not write {path}'
            )


@pytest.mark.slow
@pytest.mark.parametrize(
    'page',
    [
        p
        for p in PAGES
        if any(b.lang == 'bash' and re.search(r'^torchrun ', b.text, re.M) for b in page_blocks(p))
    ],
)
def test_page_runs_as_printed_with_several_processes(page, stand_ins, tmp_path):
    run_page(page, tmp_path, stand_ins, slow=True)
