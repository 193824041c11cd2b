"""Shared fixtures and the run's shape: the ``xp`` backend fixture, Hypothesis profiles, the slow-test selection,
xdist scheduling and the skip summary.

Tests marked ``slow`` (the rest of the NVRTC compile matrix, thorough sweeps) are deselected unless ``--slow`` or
``RELPOS_REF_SLOW=1`` is given (all tests) or ``-m`` names the marker (``-m slow``: only those); a test named by its
node id always runs. CI runs them too. With ``-n N`` (pytest-xdist) tests are spread one by one, except that a
file with module- or class-scoped fixtures stays on one worker. Skips and expected failures are summarised as one
line per reason.

Backends (SciPy's model): numpy (through array-api-compat), array_api_strict (proof that only the standard is used)
and cupy when a GPU is present. ``RELPOS_REF_BACKENDS`` (comma-separated ids) selects a subset, e.g.
``RELPOS_REF_BACKENDS=cupy pytest``. A backend named there but unavailable fails loudly instead of silently testing
nothing.
"""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=25, deadline=None)
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("quick", max_examples=8, deadline=None)  # one-shot GPU runs
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def _cupy_reason() -> str | None:
    """None when CuPy can run kernels here, else why not."""
    try:
        import cupy
    except Exception as exc:  # any import failure means: no CuPy backend
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        if not cupy.is_available():
            return "CuPy imports but no CUDA GPU/driver is available (cupy.is_available() is False)"
    except Exception as exc:  # MPS daemons and broken drivers raise instead of returning False
        return f"CuPy cannot query a CUDA device ({type(exc).__name__}: {exc})"
    return None


CUPY_SKIP_REASON = _cupy_reason()


def _load(name: str):
    if name == "numpy":
        import array_api_compat.numpy as xp

        return xp
    if name == "array_api_strict":
        import array_api_strict as xp

        xp.set_array_api_strict_flags(api_version="2025.12")
        return xp
    if name == "cupy":
        import array_api_compat.cupy as xp

        return xp
    msg = f"RELPOS_REF_BACKENDS: unknown backend {name!r} (expected numpy, array_api_strict, cupy)"
    raise ValueError(msg)


REQUESTED = os.environ.get("RELPOS_REF_BACKENDS")
BACKENDS = (
    [n.strip() for n in REQUESTED.split(",") if n.strip()] if REQUESTED else ["numpy", "array_api_strict", "cupy"]
)


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array namespace under test."""
    if request.param == "cupy" and CUPY_SKIP_REASON is not None:
        if REQUESTED:
            pytest.fail(f"RELPOS_REF_BACKENDS names cupy but it cannot run: {CUPY_SKIP_REASON}")
        pytest.skip(CUPY_SKIP_REASON)
    return _load(request.param)


def pytest_addoption(parser):
    parser.addoption(
        "--slow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (the full compile and sweep matrices; -m slow runs only those)",
    )


def _wants_slow(config) -> bool:
    """Slow tests run with --slow or RELPOS_REF_SLOW=1 (how CI adds them to the README's command), or when the -m
    expression names the marker (``-m slow``, ``-m "slow or x"``)."""
    if config.getoption("--slow") or os.environ.get("RELPOS_REF_SLOW") == "1":
        return True
    return re.search(r"\bslow\b", config.getoption("markexpr") or "") is not None


_SLOW_DESELECTED = pytest.StashKey[int]()


def _named_node_ids(config) -> list[str]:
    """Node ids given on the command line (``path::test...``), relative to the root as pytest writes them."""
    out = []
    for arg in config.args:
        path, sep, rest = str(arg).partition("::")
        if not sep:
            continue
        try:
            rel = Path(path).resolve().relative_to(config.rootpath).as_posix()
        except ValueError:
            continue
        out.append(f"{rel}::{rest}")
    return out


def _is_named(nodeid: str, named: list[str]) -> bool:
    """Whether a test was asked for by its own id (or its parametrisations' common prefix): then it runs, slow or
    not."""
    return any(nodeid == n or nodeid.startswith((n + "[", n + "::")) for n in named)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason=f"GPU test: {CUPY_SKIP_REASON}")
    for item in items:
        if "gpu" in item.keywords and CUPY_SKIP_REASON is not None:
            item.add_marker(skip_gpu)
    if not _wants_slow(config):
        named = _named_node_ids(config)
        slow = [item for item in items if "slow" in item.keywords and not _is_named(item.nodeid, named)]
        if slow:
            config.hook.pytest_deselected(items=slow)
            dropped = {id(item) for item in slow}
            items[:] = [item for item in items if id(item) not in dropped]
            config.stash[_SLOW_DESELECTED] = len(slow)
            if hasattr(config, "workeroutput"):  # an xdist worker: the controller prints the summary
                config.workeroutput["slow_deselected"] = len(slow)
    _slow_first(items)


def _slow_first(items) -> None:
    """Move the selected slow tests to the front (longest first is the usual greedy rule for packing work onto
    workers; under xdist every worker reorders alike, so the collections still agree). Tests of a file with
    module-wide fixtures keep their place, so that such a fixture is not built twice in a plain run."""
    shared: dict[Path, bool] = {}

    def movable(item) -> bool:
        if "slow" not in item.keywords:
            return False
        if item.path not in shared:
            shared[item.path] = _shares_module_state(item.path)
        return not shared[item.path]

    front = [item for item in items if movable(item)]
    if front:
        moved = {id(item) for item in front}
        items[:] = front + [item for item in items if id(item) not in moved]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: every worker collects the same items, so any one's count of deselected slow tests holds."""
    n = getattr(node, "workeroutput", {}).get("slow_deselected", 0)
    node.config.stash[_SLOW_DESELECTED] = max(n, node.config.stash.get(_SLOW_DESELECTED, 0))


# A test file whose tests share state built once per module or class (a fixture of that scope, setup_module,
# setup_class, setUpClass): under xdist its tests stay on one worker, so that state is built once.
_SHARED_STATE = re.compile(
    r"""scope\s*=\s*["'](?:class|module|package)["']|def\s+(?:setup_module|setup_class|setUpClass|setUpModule)\b"""
)


def _shares_module_state(path: Path) -> bool:
    """Whether ``path`` or a conftest.py above it (up to the tests root) declares module- or class-wide state."""
    try:
        if _SHARED_STATE.search(path.read_text(encoding="utf-8")):
            return True
    except OSError:  # not a readable file (a doctest item, a deleted file): schedule it as a unit
        return True
    for parent in path.parents:
        conftest = parent / "conftest.py"
        if conftest.is_file() and _SHARED_STATE.search(conftest.read_text(encoding="utf-8")):
            return True
        if parent == Path(__file__).parent:
            break
    return False


def _make_scheduler_class():
    """xdist's scope scheduler with a finer scope: one test per work unit, except that the tests of a file that
    shares module-wide state form one unit (like ``--dist loadfile`` for that file only)."""
    from xdist.scheduler import LoadScopeScheduling

    class TestOrFileScheduling(LoadScopeScheduling):
        def __init__(self, config, log=None):
            super().__init__(config, log)
            self._file_scoped: dict[str, bool] = {}

        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            if file not in self._file_scoped:
                self._file_scoped[file] = _shares_module_state(self.config.rootpath / file)
            return file if self._file_scoped[file] else nodeid

    return TestOrFileScheduling


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With ``-n N`` and the default ``--dist load``: tests are spread one by one (the few long ones do not pin a
    whole file to a worker), but a file with module- or class-scoped fixtures runs on one worker, so an expensive
    shared fixture (a compiled host library) is built once. An explicit ``--dist`` other than load is kept."""
    if config.getvalue("dist") != "load":
        return None
    # Units in collection order (which puts the slow tests first), not sorted by their number of tests: a single
    # long test is then started first instead of after every multi-test file.
    config.option.loadscopereorder = False
    return _make_scheduler_class()(config, log)


def _reason(report) -> str:
    """The reason of a skipped or xfailed report (pytest stores (path, line, "Skipped: why") for skips)."""
    if getattr(report, "wasxfail", None):
        return str(report.wasxfail)
    if isinstance(report.longrepr, (tuple, list)) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return "(no reason given)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line per skip (and xfail) reason with its count, instead of one line per skipping test location."""
    for key, title in (("skipped", "skipped, by reason"), ("xfailed", "expected failures (strict xfail), by reason")):
        reports = [r for r in terminalreporter.stats.get(key, []) if getattr(r, "when", "call") != "teardown"]
        if not reports:
            continue
        counts = collections.Counter(_reason(r) for r in reports)
        terminalreporter.section(title, sep="-")
        for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            terminalreporter.line(f"{n:6d}  {reason}")
    n_slow = config.stash.get(_SLOW_DESELECTED, 0)
    if n_slow:
        terminalreporter.line(
            f"{n_slow} tests marked slow were deselected: run them too with --slow, or only them with -m slow"
        )
