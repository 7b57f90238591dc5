"""The ipywidgets localization viewer where users run it: JupyterLab in a real (headless) Chromium.

Starts `jupyter lab` on a scratch folder holding a notebook that shows `localization.LocalizationViewer` for a clip,
opens it in Chromium over the DevTools protocol, runs all cells, waits for the widget's image, screenshots it, steps
to another frame (from the kernel, as the Play button does: the slider's value changes and the image is redrawn) and
screenshots again. Used by tests/test_viewer_browser.py (slow) and by hand to refresh the README's screenshot:

    python tests/browser_viewer.py figures/localization_viewer.png [--clip VIDEO] [--checkpoint FILE]

Needs Debian's `chromium` (apt-get install chromium). Without a checkpoint the model is an untrained tiny one: the
screenshot then shows the viewer working, and its maps are noise (the title says so).
"""

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def chromium_binary():
    for name in ('chromium', 'chromium-browser', 'google-chrome'):
        path = shutil.which(name)
        if path:
            return path
    return None


def wait_http(url, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f'{url} did not answer within {timeout} s')


class DevTools:
    "A minimal Chrome DevTools Protocol client over one page's websocket."

    def __init__(self, ws_url):
        import websocket

        self.ws, self.next_id = (
            websocket.create_connection(ws_url, timeout=60, suppress_origin=True),
            0,
        )

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({'id': self.next_id, 'method': method, 'params': params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get('id') == self.next_id:
                if 'error' in message:
                    raise RuntimeError(f'{method}: {message["error"]}')
                return message.get('result', {})

    def evaluate(self, expression, await_promise=False):
        result = self.call(
            'Runtime.evaluate',
            expression=expression,
            returnByValue=True,
            awaitPromise=await_promise,
        )
        if 'exceptionDetails' in result:
            raise RuntimeError(f'{expression[:80]}: {result["exceptionDetails"]}')
        return result['result'].get('value')

    def wait_for(self, expression, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = self.evaluate(expression)
                if value:
                    return value
            except RuntimeError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f'JupyterLab: {what} did not happen within {timeout} s')

    def screenshot(self, path):
        data = self.call('Page.captureScreenshot', format='png')['data']
        Path(path).write_bytes(base64.b64decode(data))


def viewer_notebook(folder, clip, checkpoint):
    setup = f'''import torch, warnings
warnings.simplefilter('ignore')
from cavmae_sync.data import load_clip
from cavmae_sync.localization import LocalizationViewer
checkpoint = {str(checkpoint) if checkpoint else None!r}
if checkpoint:
    from cavmae_sync.checkpoint import load_model_file
    model, note = load_model_file(checkpoint), 'model: ' + checkpoint
else:
    from cavmae_sync.model import CAVMAESync, tiny
    torch.manual_seed(0)
    model, note = CAVMAESync(tiny()).eval(), 'untrained tiny model: the maps are noise, this shows the viewer itself'
clip = load_clip({str(clip)!r}, config=model.config.preprocess_config())
viewer = LocalizationViewer(clip, model)
print(clip.video_id, '|', note)
viewer'''
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(setup)]
    nb.metadata['kernelspec'] = {
        'name': 'python3',
        'display_name': 'Python 3',
        'language': 'python',
    }
    path = Path(folder) / 'viewer.ipynb'
    nbformat.write(nb, path)
    return path


PANEL = "Array.from(window.jupyterapp.shell.widgets('main')).find(w => w.sessionContext)"
IMAGE_SRC = (
    "(() => { const im = document.querySelector('.jp-OutputArea-output img'); return im ? "
    "im.src.length + ':' + im.src.slice(-64) : null; })()"
)


def run(out_first, out_stepped, clip, checkpoint=None, step_to=8, timeout=180, keep=False):
    "Screenshots of the viewer at frame 0 and at frame `step_to`; returns what the page showed."
    browser = chromium_binary()
    if browser is None:
        raise FileNotFoundError('no chromium binary (apt-get install chromium)')
    work = Path(tempfile.mkdtemp(prefix='viewer_'))
    viewer_notebook(work, clip, checkpoint)
    lab_port, debug_port = free_port(), free_port()
    env = {
        **os.environ,
        'JUPYTER_CONFIG_DIR': str(work / 'config'),
        'JUPYTER_RUNTIME_DIR': str(work / 'runtime'),
        'JUPYTER_DATA_DIR': str(work / 'data'),
        'MPLBACKEND': 'Agg',
    }  # nothing written outside the scratch folder
    lab = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'jupyter',
            'lab',
            '--no-browser',
            f'--port={lab_port}',
            '--ip=127.0.0.1',
            '--allow-root',
            f'--ServerApp.root_dir={work}',
            "--IdentityProvider.token=",
            '--ServerApp.password=',
            '--LabApp.expose_app_in_browser=True',
            '--ServerApp.disable_check_xsrf=True',
        ],
        cwd=work,
        env=env,
        stdout=open(work / 'lab.log', 'w'),
        stderr=subprocess.STDOUT,
    )
    chrome = subprocess.Popen(
        [
            browser,
            '--headless=new',
            '--no-sandbox',
            '--disable-gpu',
            '--disable-dev-shm-usage',
            f'--remote-debugging-port={debug_port}',
            f'--user-data-dir={work / "chrome"}',
            '--window-size=1400,1100',
            '--hide-scrollbars',
            'about:blank',
        ],
        stdout=open(work / 'chrome.log', 'w'),
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            'HOME': str(work / 'home'),
            'XDG_CONFIG_HOME': str(work / 'home' / '.config'),
            'XDG_CACHE_HOME': str(work / 'home' / '.cache'),
        },
    )  # crash reports, dconf: not in the user's home
    try:
        wait_http(f'http://127.0.0.1:{lab_port}/api/status', 90)
        pages = json.loads(wait_http(f'http://127.0.0.1:{debug_port}/json', 60))
        page = next(p for p in pages if p.get('type') == 'page')
        tools = DevTools(page['webSocketDebuggerUrl'])
        tools.call('Page.enable')
        tools.call('Page.navigate', url=f'http://127.0.0.1:{lab_port}/lab/tree/viewer.ipynb')
        tools.wait_for(
            f"(() => {{ const w = {PANEL}; return !!(w && w.sessionContext.session && w.sessionContext.session.kernel "
            "&& w.sessionContext.session.kernel.status === 'idle'); })()",
            timeout,
            'the notebook opening with an idle kernel',
        )
        # headless, the window never has the focus, so nothing is "current" until it is activated
        tools.evaluate(
            f"(() => {{ const w = {PANEL}; window.jupyterapp.shell.activateById(w.id); "
            "window.jupyterapp.shell.collapseLeft(); "
            "for (const b of document.querySelectorAll('.jp-toast-button')) if "
            "(b.textContent.trim() === 'No') b.click(); return true; })()"
        )
        tools.evaluate(
            "window.jupyterapp.commands.execute('notebook:run-all-cells')", await_promise=True
        )
        first = tools.wait_for(IMAGE_SRC, timeout, "the viewer's image appearing")
        time.sleep(1.0)
        tools.screenshot(out_first)
        tools.evaluate(
            f"{PANEL}.sessionContext.session.kernel.requestExecute("
            f"{{code: 'viewer.slider.value = {int(step_to)}'}}).done.then(() => true)",
            await_promise=True,
        )
        stepped = tools.wait_for(
            f"(() => {{ const s = {IMAGE_SRC}; return s && s !== {json.dumps(first)} ? s : null; }})()",
            timeout,
            f'the image changing to frame {step_to}',
        )
        slider = tools.evaluate(
            "(() => { const r = document.querySelector('.widget-readout'); return r ? r.textContent : null; })()"
        )
        time.sleep(1.0)
        tools.screenshot(out_stepped)
        errors = tools.evaluate(
            "document.querySelectorAll('.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]').length"
        )
        return {
            'first_image': first,
            'stepped_image': stepped,
            'slider_readout': slider,
            'stderr_outputs': errors,
            'work': str(work) if keep else None,
        }
    finally:
        chrome.terminate()
        lab.terminate()
        for process in (chrome, lab):
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)  # the notebook, the browser profile, the logs


def default_clip():
    from cavmae_sync.config import shared_dir

    shared = shared_dir(required=False)
    clips = sorted((shared / 'media').glob('*.mp4')) if shared else []
    if clips:
        return clips[0]
    from cavmae_sync.sync import time_coded_clip

    return time_coded_clip(Path(tempfile.mkdtemp()) / 'clip.mp4')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        'out', help='PNG of the viewer at frame 0; the stepped frame goes beside it (_stepped.png)'
    )
    parser.add_argument('--clip', default=None)
    parser.add_argument('--checkpoint', default=None)
    parser.add_argument('--frame', type=int, default=8)
    parser.add_argument(
        '--keep',
        action='store_true',
        help='keep the scratch folder (notebook, logs, browser profile)',
    )
    args = parser.parse_args()
    out = Path(args.out)
    stepped = out.with_name(out.stem + '_stepped' + out.suffix)
    print(
        json.dumps(
            run(
                out,
                stepped,
                args.clip or default_clip(),
                args.checkpoint,
                args.frame,
                keep=args.keep,
            ),
            indent=1,
        )
    )
