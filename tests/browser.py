"""Drive a real JupyterLab in headless Chromium: the shared harness of the browser tests.

    @pytest.mark.browser
    def test_something(tmp_path, request):
        with jupyter_lab(tmp_path, output_dir=browser_output_dir(request)) as lab:
            lab.open_notebook("01_attention.ipynb")
            lab.run_all()
            lab.page.locator(...)          # Playwright selectors
            lab.screenshot("after.png")

`jupyter_lab` starts a JupyterLab server on 127.0.0.1 (free port, random token, fresh settings, workspace and
runtime folders) and Debian's chromium through Playwright, and stops both, and any kernel the server
started, when the block ends, even on failure. Every request the page makes is routed: one that is not to the
lab's own origin, `data:` or `blob:` is refused and fails the test at the end of the block, which proves the
notebook renders offline. Chromium is absent: the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_S = 90
IDLE_STATUS = re.compile(r"^(?!No Kernel).+ \| Idle$")


def require_chromium() -> None:
    """Skip when the browser is missing on a developer machine; fail under CI, where it must be there."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium, or `make chromium`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (pip install -e '.[dev]')")
    if not missing:
        return
    message = "Browser tests need " + " and ".join(missing) + "."
    if os.environ.get("CI") == "true":
        pytest.fail(message + " CI=true: the browser tests must run here, not be skipped.")
    pytest.skip(message)


def browser_output_dir(request: pytest.FixtureRequest) -> Path:
    """test-output/<test name>/ in the repository (gitignored): screenshots and the server log stay."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    folder = REPO / "test-output" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc), e.g. the kernels a Jupyter server started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            # The command name (field 2) may hold spaces: the parent pid is the second field after its ")".
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not reaped by its parent) counts as gone.
    with suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def _kill(pid: int, grace_s: float = 5.0) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Lab:
    """A JupyterLab page: open a notebook, run it, read and screenshot what it shows."""

    def __init__(self, page, base_url: str, token: str, output_dir: Path) -> None:
        self.page = page
        self.base_url = base_url
        self.token = token
        self.output_dir = output_dir

    def open_notebook(self, name: str, timeout_s: float = 60) -> None:
        """Open notebooks/<name> and wait until its kernel has started and is idle."""
        self.page.goto(f"{self.base_url}/lab/tree/{name}?token={self.token}", timeout=timeout_s * 1000)
        self.page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=timeout_s * 1000)
        self.wait_for_idle(timeout_s)

    def open_notebook_without_kernel(self, name: str, timeout_s: float = 60) -> None:
        """Open <root>/<name> with no kernel: none is started and none is asked for (the kernel preference
        `shouldStart: false`, which `docmanager:open` takes since JupyterLab 4.5; a kernel can still be picked
        later). Returns once the notebook's session context is ready, i.e. settled on having no kernel."""
        self.page.goto(f"{self.base_url}/lab?token={self.token}", timeout=timeout_s * 1000)
        self.page.wait_for_function(
            "() => window.jupyterapp && window.jupyterapp.commands.hasCommand('docmanager:open')",
            timeout=timeout_s * 1000,
        )
        self.page.evaluate(
            """(path) => window.jupyterapp.commands
                .execute('docmanager:open', {path, kernelPreference: {shouldStart: false}})
                .then(() => null)""",
            name,
        )
        self.page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=timeout_s * 1000)
        # Found among the main area's widgets by path: `currentWidget` is null while nothing has the focus.
        self.page.wait_for_function(
            """(name) => Array.from(window.jupyterapp.shell.widgets('main')).some((w) =>
                w.sessionContext && w.context && w.context.path.endsWith(name) && w.sessionContext.isReady
            )""",
            arg=name,
            timeout=timeout_s * 1000,
        )
        # The status bar shows the focused notebook's kernel: focus it, then wait for the item to be drawn.
        self.page.evaluate(
            """(name) => { const w = Array.from(window.jupyterapp.shell.widgets('main')).find((w) =>
                w.context && w.context.path.endsWith(name)); window.jupyterapp.shell.activateById(w.id); }""",
            name,
        )
        deadline = time.monotonic() + timeout_s
        while not self.kernel_status() and time.monotonic() < deadline:
            time.sleep(0.2)

    def kernel_status(self) -> str:
        """The status bar's kernel item, e.g. 'Python 3 (ipykernel) | Idle', 'No Kernel | Unknown'."""
        items = [" ".join(t.split()) for t in self.page.locator(".jp-StatusBar-Item").all_inner_texts()]
        states = ("Idle", "Busy", "Starting", "Connecting", "Initializing", "Unknown")
        return next((t for t in items if t.endswith(tuple(f"| {s}" for s in states))), "")

    def toolbar_kernel_name(self) -> str:
        """The kernel name in the notebook's toolbar, e.g. 'No Kernel'."""
        return self.page.locator(".jp-NotebookPanel-toolbar .jp-KernelName").first.inner_text().strip()

    def api(self, path: str):
        """GET the server's REST API at /api/<path> (e.g. 'sessions', 'kernels'): the decoded JSON."""
        request = urllib.request.Request(
            f"{self.base_url}/api/{path}", headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())

    def wait_for_idle(self, timeout_s: float = 60) -> None:
        # "Idle" shows before a kernel exists ("No Kernel | Idle"); a Run All sent then is dropped silently:
        # wait for the kernel's own name in front of it.
        deadline = time.monotonic() + timeout_s
        while not IDLE_STATUS.match(self.kernel_status()):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"The kernel did not become idle in {timeout_s:.0f} s: {self.kernel_status()!r}"
                )
            self.page.wait_for_timeout(250)

    def command(self, command_id: str, args: dict | None = None):
        """Execute a JupyterLab command (the app is exposed by --LabApp.expose_app_in_browser)."""
        return self.page.evaluate(
            "([id, args]) => window.jupyterapp.commands.execute(id, args)", [command_id, args or {}]
        )

    def run_all(self, timeout_s: float = 90) -> None:
        """Run All Cells once the kernel is idle, wait until every code cell has run, fail on any error."""
        self.wait_for_idle()
        self.command("notebook:run-all-cells")
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.cell_state()
            if state["code"] and state["done"] == state["code"] and IDLE_STATUS.match(self.kernel_status()):
                break
            if time.monotonic() > deadline:
                self.screenshot("run-all-timeout.png")
                raise TimeoutError(
                    f"Run All did not finish in {timeout_s:.0f} s: {state}, {self.kernel_status()!r}"
                )
            self.page.wait_for_timeout(500)
        errors = self.cell_state()["errors"]
        if errors:
            self.screenshot("run-all-errors.png")
            raise AssertionError(f"Cells raised: {errors}")

    def cell_state(self) -> dict:
        """How many code cells there are, how many have run (execution count set), and their error outputs."""
        return self.page.evaluate(
            """() => {
                const panel = window.jupyterapp.shell.currentWidget;
                const cells = panel.content.model.cells;
                let code = 0, done = 0, errors = [];
                for (let i = 0; i < cells.length; i++) {
                    const cell = cells.get(i);
                    if (cell.type !== 'code') continue;
                    code++;
                    if (cell.executionCount !== null) done++;
                    const outputs = cell.outputs.toJSON();
                    for (const out of outputs) {
                        if (out.output_type === 'error') errors.push(`${out.ename}: ${out.evalue}`);
                    }
                }
                return {code, done, errors};
            }"""
        )

    def screenshot(self, name: str, locator=None) -> Path:
        """Save a PNG under the output folder: the whole page, or one element (`locator`)."""
        path = self.output_dir / name
        (locator or self.page).screenshot(path=str(path))
        return path


@contextmanager
def jupyter_lab(
    tmp_path: Path,
    *,
    output_dir: Path | None = None,
    root_dir: Path | None = None,
    viewport: tuple[int, int] = (1400, 1000),
    user_settings: dict[str, dict] | None = None,
) -> Iterator[Lab]:
    """JupyterLab on 127.0.0.1 with a token, and a headless chromium page on it (see the module docstring).

    `user_settings`: settings by plugin path, e.g. {"@jupyterlab/notebook-extension/tracker": {...}}."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    if root_dir is None:
        # A copy of notebooks/: JupyterLab autosaves what the test runs, and the committed notebooks must stay
        # as they are (without outputs) whatever a test does.
        root_dir = tmp_path / "notebooks"
        shutil.copytree(NOTEBOOKS, root_dir, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))

    output_dir = Path(output_dir or tmp_path / "browser-output")
    output_dir.mkdir(parents=True, exist_ok=True)
    home = tmp_path / "jupyter"
    settings = home / "settings"
    notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    for plugin, values in (user_settings or {}).items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    for folder in ("workspaces", "runtime", "config", "profile"):
        (home / folder).mkdir(parents=True, exist_ok=True)

    port, token = _free_port(), secrets.token_hex(24)
    base_url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        "--LabApp.expose_app_in_browser=True",
    ]
    env = {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "PYTHONUNBUFFERED": "1",
    }
    log = (output_dir / "jupyterlab.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root_dir)
    offsite: list[str] = []
    kernels: set[int] = set()
    try:
        _wait_for_server(server, base_url, token, output_dir)
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(home / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": viewport[0], "height": viewport[1]},
            )
            try:
                _route_offline(context, base_url, offsite)
                page = context.pages[0] if context.pages else context.new_page()
                page.on("websocket", lambda ws: _check_url(ws.url, base_url, offsite))
                yield Lab(page, base_url, token, output_dir)
            finally:
                kernels.update(_children(server.pid))
                context.close()
    finally:
        kernels.update(_children(server.pid) if server.poll() is None else [])
        _stop_server(server, base_url, token)
        for pid in kernels:
            if _alive(pid):
                _kill(pid)
        log.close()
    if offsite:
        pytest.fail(
            f"The page requested {len(offsite)} resource(s) outside the lab's origin: {sorted(set(offsite))}"
        )


def _check_url(url: str, base_url: str, offsite: list[str]) -> bool:
    scheme = urlsplit(url).scheme
    if scheme in ("data", "blob"):
        return True
    own = urlsplit(base_url)
    parts = urlsplit(url)
    if parts.hostname == own.hostname and parts.port == own.port and scheme in ("http", "https", "ws", "wss"):
        return True
    offsite.append(url)
    return False


def _route_offline(context, base_url: str, offsite: list[str]) -> None:
    def handle(route):
        if _check_url(route.request.url, base_url, offsite):
            route.continue_()
        else:
            route.abort("blockedbyclient")

    context.route("**/*", handle)


def _wait_for_server(server: subprocess.Popen, base_url: str, token: str, output_dir: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"JupyterLab exited with {server.returncode}: see {output_dir / 'jupyterlab.log'}"
            )
        with (
            suppress(OSError),
            urllib.request.urlopen(f"{base_url}/api/status?token={token}", timeout=2) as reply,
        ):
            if reply.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(
        f"JupyterLab did not answer in {SERVER_START_S} s: see {output_dir / 'jupyterlab.log'}"
    )


def _stop_server(server: subprocess.Popen, base_url: str, token: str) -> None:
    if server.poll() is None:
        # The shutdown API stops the kernels too; signals are the fallback.
        with suppress(OSError):
            request = urllib.request.Request(f"{base_url}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(request, timeout=5).close()
        with suppress(subprocess.TimeoutExpired):
            server.wait(timeout=15)
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@contextmanager
def static_page(
    tmp_path: Path,
    html_file: Path,
    *,
    output_dir: Path | None = None,
    viewport: tuple[int, int] = (1400, 1000),
) -> Iterator:
    """A headless chromium page on a local HTML file, which may load nothing but itself, `data:` and `blob:`
    (any other request is refused and fails the test at the end of the block, as does a JavaScript error)."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    own = html_file.resolve().as_uri()
    offsite: list[str] = []
    errors: list[str] = []

    def allowed(url: str) -> bool:
        if urlsplit(url).scheme in ("data", "blob") or url.split("#")[0] == own:
            return True
        offsite.append(url)
        return False

    def handle(route):
        if allowed(route.request.url):
            route.continue_()
        else:
            route.abort("blockedbyclient")

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "static-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            context.route("**/*", handle)
            page = context.pages[0] if context.pages else context.new_page()
            page.on("websocket", lambda ws: allowed(ws.url))
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(own)
            yield page
        finally:
            context.close()
    if offsite:
        pytest.fail(f"The page requested {len(offsite)} resource(s) besides itself: {sorted(set(offsite))}")
    if errors:
        pytest.fail(f"JavaScript errors on the page: {errors}")


def wait_for_change(read, before, timeout_s: float = 60):
    """Poll `read()` until it differs from `before`; the new value (TimeoutError after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while (now := read()) == before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Still {before!r:.80} after {timeout_s:.0f} s")
        time.sleep(0.25)
    return now
