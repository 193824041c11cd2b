"""Tests of ``relpos-ref conform`` (relpos_ref.conformance.cli) and of target loading (plugin.load_target).

The command must never exit 0 for a candidate that exits, hangs, returns nothing usable or leaves checks unchecked,
must give one line and exit 2 for a target that cannot be imported, and finds targets as ``python -m`` would or by
file path. Candidates are small modules written under ``tmp_path``; the exit-status tests that concern the process
itself run it with ``sys.executable -P -m relpos_ref.cli`` (``-P``: the current directory is not put on sys.path by
Python, so finding a module there is the command's doing).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import relpos_ref as rp
from relpos_ref.cli import main
from relpos_ref.conformance import AttentionShape, attention_backward_checks, load_target
from relpos_ref.conformance import cli as conform_cli

pytestmark = pytest.mark.conformance

#: An independent T5 bucket function (HF's formula, float32 log) and misbehaving variants of it.
CANDIDATES = """
import sys
import time
from pathlib import Path

import numpy as np


def good(delta):
    rel = -np.asarray(delta, dtype=np.int64)
    out = np.where(rel > 0, 16, 0)
    n = np.abs(rel)
    nf = np.maximum(n, 1).astype(np.float32)
    scaled = np.log(nf / np.float32(8)) / np.float32(np.log(128 / 8)) * np.float32(8)
    return out + np.where(n < 8, n, np.minimum(8 + scaled.astype(np.int64), 15))


def exits(delta):
    sys.exit(0)


def returns_none(delta):
    return None


def interrupted(delta):
    raise KeyboardInterrupt


def sleeps(delta):
    Path("started").write_text("yes")
    time.sleep(60)
    return good(delta)
"""


def _write(directory, name: str, text: str):
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _command(cwd, *args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "relpos_ref.cli", "conform", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RELPOS_REF_")}


def _conform(cwd, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(cwd, *args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """tmp_path as the current directory with the candidate module; sys.path and the modules restored after."""
    _write(tmp_path, "clicands.py", CANDIDATES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.curdir, str(tmp_path))])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith(("clicands", "filecand", "sibling", "_relpos_ref_target_", "bad_import")):
            del sys.modules[name]


# -- the process's exit status ---------------------------------------------------------------------------------


def test_sys_exit_in_the_candidate_never_exits_zero(workdir):
    proc = _conform(workdir, "clicands:exits", "--kind", "buckets")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "candidate raised SystemExit(0)" in proc.stdout
    assert "FAILED: 0 passed, 6 errors of 6 checks" in proc.stdout
    control = _conform(workdir, "clicands:good", "--kind", "buckets")
    assert control.returncode == 0, control.stdout + control.stderr
    assert "PASSED: 6 passed of 6 checks" in control.stdout


def test_module_found_in_the_current_directory(workdir):
    """As python -m imports: the current directory first. Without it (-P) the module is not importable."""
    plain = subprocess.run(
        [sys.executable, "-P", "-c", "import clicands"], cwd=workdir, env=_env(), capture_output=True, check=False
    )
    assert plain.returncode != 0  # the pass below is the command's doing, not Python's
    proc = _conform(workdir, "clicands:good", "--kind", "buckets")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_timeout_option_ends_a_hanging_candidate(workdir):
    t0 = time.perf_counter()
    proc = _conform(workdir, "clicands:sleeps", "--kind", "buckets", "--timeout", "0.5")
    took = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "candidate timed out: no result after 0.5 s" in proc.stdout
    assert took < 50  # well before the candidate's 60 s sleep ends: the process does not wait for it


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_exits_130(workdir):
    child = subprocess.Popen(
        _command(workdir, "clicands:sleeps", "--kind", "buckets"),
        cwd=workdir,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (workdir / "started").exists():
            assert time.monotonic() < deadline, "the candidate never started"
            assert child.poll() is None, child.communicate()
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 130, out + err
    assert "interrupted" in err


def test_module_exiting_at_import_is_a_usage_error(workdir):
    _write(workdir, "bad_import_exit.py", "import sys\nsys.exit(0)\n")
    proc = _conform(workdir, "bad_import_exit:f", "--kind", "buckets")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "relpos-ref conform: error: target 'bad_import_exit:f': importing 'bad_import_exit' raised SystemExit(0) "
        f"(at {workdir / 'bad_import_exit.py'}:2)"
    ]


# -- in-process: messages and exit codes -----------------------------------------------------------------------


def test_module_raising_at_import_gives_one_line(workdir, capsys):
    _write(workdir, "bad_import_raise.py", "x = 1\nraise RuntimeError('no GPU here')\n")
    assert main(["conform", "bad_import_raise:f", "--kind", "buckets"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "relpos-ref conform: error: target 'bad_import_raise:f': importing 'bad_import_raise' raised RuntimeError: "
        f"no GPU here (at {workdir / 'bad_import_raise.py'}:2)"
    ]
    _write(workdir, "bad_import_dep.py", "import a_module_that_is_not_installed\n")
    assert main(["conform", "bad_import_dep:f", "--kind", "buckets"]) == 2
    err = capsys.readouterr().err
    assert "importing 'bad_import_dep' raised ModuleNotFoundError" in err
    assert "a_module_that_is_not_installed" in err
    assert main(["conform", "no_such_module_here:f", "--kind", "buckets"]) == 2
    assert "cannot import module 'no_such_module_here'" in capsys.readouterr().err


def test_none_and_interrupt(workdir, capsys):
    assert main(["conform", "clicands:returns_none", "--kind", "buckets"]) == 1
    out = capsys.readouterr().out
    assert "got NoneType" in out
    assert "FAILED" in out
    assert main(["conform", "clicands:interrupted", "--kind", "buckets"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_system_exit_escaping_the_checks_is_not_exit_zero(workdir, capsys, monkeypatch):
    """The last guard: even a SystemExit that got past the checks ends the command with 1, not its code."""

    def exits(*args, **kwargs):
        sys.exit(0)

    monkeypatch.setattr(conform_cli, "run_checks", exits)
    assert main(["conform", "clicands:good", "--kind", "buckets"]) == 1
    assert "SystemExit(0)" in capsys.readouterr().err


def test_timeout_option_is_validated(workdir, capsys):
    assert main(["conform", "clicands:good", "--kind", "buckets", "--timeout", "0"]) == 2
    assert "timeout" in capsys.readouterr().err


def test_file_target(workdir, capsys):
    _write(workdir, "sub/sibling_helper.py", "OFFSET = 0\n")
    _write(
        workdir,
        "sub/filecand.py",
        """
        import numpy as np
        import sibling_helper  # a sibling module, found while the file is loaded (as python file.py finds it)


        def bucket(delta):
            rel = -np.asarray(delta, dtype=np.int64)
            n = np.abs(rel)
            nf = np.maximum(n, 1).astype(np.float32)
            scaled = np.log(nf / np.float32(8)) / np.float32(np.log(16)) * np.float32(8)
            small_or_log = np.where(n < 8, n, np.minimum(8 + scaled.astype(np.int64), 15))
            return np.where(rel > 0, 16, 0) + small_or_log + sibling_helper.OFFSET
        """,
    )
    assert main(["conform", "sub/filecand.py:bucket", "--kind", "buckets"]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert str(workdir / "sub") not in sys.path  # only while the file was loaded
    assert main(["conform", "sub/missing.py:bucket", "--kind", "buckets"]) == 2
    err = capsys.readouterr().err
    assert "target 'sub/missing.py:bucket': no file 'sub/missing.py'" in err
    assert main(["conform", "sub/filecand.py:nope", "--kind", "buckets"]) == 2
    assert "target 'sub/filecand.py:nope': file 'sub/filecand.py' has no attribute 'nope'" in capsys.readouterr().err


def _incomplete_checks():
    """Real backward checks of a candidate that returns dq, dk, dv but not the ALiBi slopes' gradient.

    The candidate is a plain NumPy attention backward (B = 1, H = H_kv = 2, no mask) with the bias -m_h |i - j|,
    written from the formulas: P = softmax(tau q k^T + b), dV = P^T dO, dZ = P * (dO V^T - rowsum(P * dO V^T)),
    dQ = tau dZ K, dK = tau dZ^T Q.
    """
    slopes = np.array([0.25, 0.0625])

    def no_param_grads(q, k, v, d_out):
        q, k, v, do = (np.asarray(a, dtype=np.float64) for a in (q, k, v, d_out))
        sq, sk, d = q.shape[2], k.shape[2], q.shape[3]
        tau = 1 / np.sqrt(d)
        delta = (sk - sq + np.arange(sq))[:, None] - np.arange(sk)[None, :]
        z = tau * q @ np.swapaxes(k, -1, -2) - slopes[:, None, None] * np.abs(delta)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        dp = do @ np.swapaxes(v, -1, -2)
        dz = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
        grads = tau * dz @ k, tau * np.swapaxes(dz, -1, -2) @ q, np.swapaxes(p, -1, -2) @ do
        return tuple(g.astype(np.float32) for g in grads)

    bias = rp.ALiBi(slopes)
    return attention_backward_checks(no_param_grads, bias=bias, shapes=[AttentionShape(1, 2, 2, 3, 4, 8)])


def test_unchecked_items_fail_the_command_unless_allowed(workdir, capsys, monkeypatch):
    monkeypatch.setattr(conform_cli, "build_checks", lambda args: _incomplete_checks())
    args = ["conform", "clicands:good", "--kind", "backward"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "relpos_ref conformance: PASSED, INCOMPLETE (1 of 5 checks not checked)" in out
    assert "INCOMPLETE: 4 passed, 1 not checked of 5 checks" in out
    assert (
        "NOT CHECKED: backward.dslopes.shape0: the candidate did not provide what they compare; exit status 1 "
        "(--allow-incomplete accepts this)"
    ) in out
    assert main([*args, "--allow-incomplete"]) == 0
    assert "accepted by --allow-incomplete" in capsys.readouterr().out


def test_t5_table_layout_option_is_not_the_attention_layout(workdir):
    """--layout names the layout of a T5 table in --params; the attention suite's tensor layout stays (B, H, S, D)."""
    args = conform_cli.parse_env_args("clicands:good", "--kind attention --layout buckets_heads")
    checks = conform_cli.build_checks(args, candidate=lambda q, k, v: q)
    assert checks[0]._suite.options.layout == "bhsd"


# -- load_target ---------------------------------------------------------------------------------------------


def test_load_target_keeps_the_current_directory_only_when_needed(workdir):
    assert str(workdir) not in sys.path
    assert load_target("json:dumps") is __import__("json").dumps
    assert str(workdir) not in sys.path  # json is not found in the current directory: no trace left
    assert callable(load_target("clicands:good"))
    assert sys.path[0] == str(workdir)  # clicands came from it; its imports at call time may need it


def test_load_target_file_runs_once_and_does_not_shadow(workdir):
    _write(workdir, "filecand_once.py", "LOADS = []\nLOADS.append(1)\ndef f():\n    return 1\n")
    first = load_target("./filecand_once.py:f")
    assert load_target(str(workdir / "filecand_once.py") + ":f") is first
    assert sys.modules["filecand_once"].LOADS == [1]
    _write(workdir, "json.py", "def dumps(x):\n    return 'not the json module'\n")
    mine = load_target("./json.py:dumps")
    assert mine(1) == "not the json module"
    assert sys.modules["json"].dumps(1) == "1"  # the real json module is untouched


@pytest.mark.parametrize("target", ["no_colon", ":f", "clicands:", 3])
def test_load_target_rejects_malformed_targets(target):
    expected = "target: expected 'package.module:function' or 'path/to/file.py:function'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_target(target)
