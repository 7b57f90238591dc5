"""The code's layout: no import cycle between modules (imports inside functions included), no notebook importing a
later one, the layout table of nbs/index.ipynb matching `ls nbs/`, export cells short enough to read between their
tests, and lines as short as the field's model codebases'."""

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'cavmae_sync'
NBS = ROOT / 'nbs'
MAX_EXPORT_CELL_LINES = 80
MAX_LINE = 120
MAX_SHARE_OVER_100 = 0.05


def cells(notebook: Path) -> list[dict]:
    return json.loads(notebook.read_text())['cells']


def code_of(notebook: Path) -> list[str]:
    return [''.join(c['source']) for c in cells(notebook) if c['cell_type'] == 'code']


def imported_modules(source: str, package_module: str | None = None) -> set[str]:
    "The cavmae_sync modules `source` imports, at any depth (inside functions too)."
    found = set()
    lines = [line for line in source.split('\n') if not line.lstrip().startswith(('%', '!'))]
    for node in ast.walk(ast.parse('\n'.join(lines))):
        if isinstance(node, ast.ImportFrom):
            # relative: `from .x import y`, `from . import x`
            if node.level and package_module is not None:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif node.module == 'cavmae_sync':
                found |= {alias.name for alias in node.names}
            elif node.module and node.module.startswith('cavmae_sync.'):
                found.add(node.module.split('.')[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('cavmae_sync.')}
    return found - {package_module, '__version__', '_modidx'}


def module_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob('*.py') if not p.stem.startswith('_')}
    return {m: imported_modules((PACKAGE / f'{m}.py').read_text(), m) & modules for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "One import cycle of `graph` as a path [a, b, ..., a], or None."
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 'done'
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_hidden_cycle_and_accepts_a_chain():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    inner = "def f():\n    from cavmae_sync.retrieval import retrieval_table\n"  # a function-level import counts
    assert imported_modules(inner, 'embeddings') == {'retrieval'}


def test_no_import_cycle_between_modules():
    assert find_cycle(module_graph()) is None, (
        f"import cycle: {' -> '.join(find_cycle(module_graph()))}"
    )


def component_notebooks() -> dict[str, Path]:
    "{module: notebook} of the notebooks that export a module (`#| default_exp`)."
    found = {}
    for notebook in sorted(NBS.glob('*.ipynb')):
        for source in code_of(notebook):
            if match := re.search(r'^#\|\s*default_exp\s+(\S+)', source, re.M):
                found[match.group(1)] = notebook
    return found


def test_no_notebook_imports_a_later_one():
    "Notebook file names sort in the order data flows: each imports only modules of notebooks before it."
    exporting = component_notebooks()
    later = []
    for notebook in sorted(NBS.glob('*.ipynb')):
        if notebook.name not in {p.name for p in exporting.values()}:
            continue  # reproduction notebooks come last
        used = set().union(*(imported_modules(s) for s in code_of(notebook)))
        later += [
            f'{notebook.name} imports {m} ({exporting[m].name})'
            for m in sorted(used)
            if m in exporting and exporting[m].name > notebook.name
        ]
    assert not later, later


def test_layout_table_matches_the_notebooks():
    "nbs/index.ipynb's table has one row per component notebook, in file order, each with the module it exports."
    index = ''.join(''.join(c['source']) for c in cells(NBS / 'index.ipynb'))
    rows = re.findall(r'^\| `nbs/(\S+\.ipynb)` \| `cavmae_sync\.(\w+)` \|', index, re.M)
    expected = sorted((p.name, m) for m, p in component_notebooks().items())
    assert rows == expected


def export_cells(notebook: Path) -> list[str]:
    return [s for s in code_of(notebook) if re.match(r'#\|\s*export\b', s)]


@pytest.mark.parametrize('notebook', sorted(component_notebooks().values()), ids=lambda p: p.name)
def test_export_cells_are_short(notebook):
    long = [
        (k, len(s.split('\n')))
        for k, s in enumerate(export_cells(notebook))
        if len(s.split('\n')) > MAX_EXPORT_CELL_LINES
    ]
    assert not long, (
        f'{notebook.name}: export cells over {MAX_EXPORT_CELL_LINES} lines (cell, lines): {long}'
    )


def code_lines(module: Path) -> list[str]:
    "The non-blank lines of an exported module, without the `__all__` list nbdev writes (pformat, 160 wide)."
    text = re.sub(r"^__all__ = \[.*?\]\n", '', module.read_text(), flags=re.M | re.S)
    return [line for line in text.split('\n') if line.strip()]


def test_package_lines_are_short():
    lines = [
        line
        for p in sorted(PACKAGE.glob('*.py'))
        if p.name != '_modidx.py'
        for line in code_lines(p)
    ]
    too_long = [line.strip()[:60] for line in lines if len(line) > MAX_LINE]
    over_100 = sum(len(line) > 100 for line in lines) / len(lines)
    assert not too_long, too_long[:10]
    assert over_100 <= MAX_SHARE_OVER_100, (
        f'{over_100:.1%} of the package lines are over 100 characters'
    )
