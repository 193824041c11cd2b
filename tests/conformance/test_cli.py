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


# -- hostile input: one line, exit 2, before anything runs (issue 15) ------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_syntax_error_at_import_names_the_file_and_line(workdir, capsys):
    """The traceback's last frame of a SyntaxError is importlib's compile call; the line must name the source."""
    path = _write(workdir, "bad_import_syntax.py", "x = 1\ndef f(:\n")
    assert main(["conform", "bad_import_syntax:f", "--kind", "buckets"]) == 2
    assert _one_error_line(capsys) == (
        "relpos-ref conform: error: target 'bad_import_syntax:f': importing 'bad_import_syntax' raised SyntaxError: "
        f"invalid syntax (at {path}:2)"
    )


def test_value_error_at_import_is_a_usage_error(workdir, capsys):
    _write(workdir, "bad_import_value.py", "raise ValueError('needs a config file')\n")
    assert main(["conform", "bad_import_value:f", "--kind", "buckets"]) == 2
    assert "raised ValueError: needs a config file (at " in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"not an archive\n", "which is not a zip archive (an .npz file is one)"),
        (b"\x93NUMPY\x01\x00", "a single-array .npy file (save with numpy.savez(path, name=array))"),
        (b"PK\x03\x04 truncated", "which cannot be read (BadZipFile: "),
    ],
    ids=["text", "npy", "corrupt-zip"],
)
def test_params_that_is_not_an_npz_archive(workdir, capsys, content, why):
    (workdir / "p.npz").write_bytes(content)
    assert main(["conform", "clicands:good", "--family", "t5", "--params", "p.npz"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(
        "relpos-ref conform: error: --params: expected an .npz archive of arrays (as numpy.savez writes), got 'p.npz'"
    )
    assert why in line
    assert "allow_pickle" not in line  # numpy's advice to unpickle an untrusted file must not be passed on


def test_params_missing_file_or_directory(workdir, capsys):
    assert main(["conform", "clicands:good", "--family", "t5", "--params", "none.npz"]) == 2
    assert _one_error_line(capsys).endswith("got 'none.npz' (no such file)")
    assert main(["conform", "clicands:good", "--family", "t5", "--params", str(workdir)]) == 2
    assert _one_error_line(capsys).endswith(f"got {str(workdir)!r} (a directory)")


def test_params_with_an_object_array_is_not_unpickled(workdir, capsys):
    np.savez(workdir / "obj.npz", table=np.array([{"a": 1}], dtype=object))
    assert main(["conform", "clicands:good", "--family", "t5", "--params", "obj.npz"]) == 2
    assert "got 'obj.npz', which cannot be read (ValueError: " in _one_error_line(capsys)


def test_json_into_a_missing_directory_fails_before_the_run(workdir, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the checks ran although the report could not be written")

    monkeypatch.setattr(conform_cli, "run_checks", never)
    target = workdir / "no_such_dir" / "report.json"
    assert main(["conform", "clicands:good", "--kind", "buckets", "--json", str(target)]) == 2
    assert _one_error_line(capsys) == (
        f"relpos-ref conform: error: --json: expected a file path in an existing directory, got {str(target)!r} "
        f"(no directory {target.parent})"
    )
    assert main(["conform", "clicands:good", "--kind", "buckets", "--json", str(workdir)]) == 2
    assert "--json: expected a file path, got" in _one_error_line(capsys)


def test_json_written_after_the_verdict(workdir, capsys):
    assert main(["conform", "clicands:good", "--kind", "buckets", "--json", "r.json"]) == 0
    assert "PASSED: 6 passed of 6 checks" in capsys.readouterr().out
    assert (workdir / "r.json").read_text().startswith("{")


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--seed", "-1", "expected an integer >= 0, got '-1'"),
        ("--q-len", str(10**12), "expected an integer from 1 to 1073741824 (the size limit of one array)"),
        ("--k-len", "0", "expected an integer from 1 to 1073741824"),
        ("--heads", str(10**12), "expected an integer from 1 to 65536, got '1000000000000'"),
        ("--max-distance", str(10**12), "expected an integer from 1 to 1048576 (offsets up to 4 x max_distance"),
        ("--num-buckets", "x", "expected an integer >= 1, got 'x'"),
        ("--head-dims", "64,x", "expected comma-separated positive integers such as 64,128, got '64,x'"),
        ("--max-k-len", "-5", "expected an integer from 1 to"),
    ],
)
def test_absurd_numbers_are_usage_errors_naming_the_option(workdir, capsys, option, value, expected):
    assert main(["conform", "clicands:good", "--kind", "buckets", option, value]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"relpos-ref conform: error: argument {option}: {expected}"), line


def test_huge_number_is_shown_short(workdir, capsys):
    assert main(["conform", "clicands:good", "--kind", "buckets", "--q-len", "9" * 40]) == 2
    assert _one_error_line(capsys).endswith("got about 9.999e+39 (see 'relpos-ref conform --help')")


def test_bias_too_large_as_a_whole_is_a_usage_error(workdir, capsys):
    """Each length fits an array, but H x Sq x Sk float64 entries would be 358 GiB: refused before any check."""
    assert main(["conform", "clicands:good", "--family", "alibi", "--heads", "2", "--q-len", str(10**9)]) == 2
    assert _one_error_line(capsys) == (
        "relpos-ref conform: error: --q-len, --k-len: expected an (H, Sq, Sk) float64 bias within the 8 GiB size "
        "limit of one array, got H=2 x Sq=1000000000 x Sk=24 = 358 GiB"
    )


def test_usage_error_is_one_line_without_the_usage_block(workdir, capsys):
    assert main(["conform", "clicands:good", "--kind", "nope"]) == 2
    assert _one_error_line(capsys) == (
        "relpos-ref conform: error: argument --kind: invalid choice: 'nope' (choose from 'bias', 'attention', "
        "'backward', 'buckets') (see 'relpos-ref conform --help')"
    )


# -- RELPOS_REF_ARGS (the pytest entry point) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("--kind nope", "argument --kind: invalid choice: 'nope' (choose from 'bias', 'attention', 'backward', "),
        ("--no-such-option", "unrecognized arguments: --no-such-option; got RELPOS_REF_ARGS='--no-such-option'"),
        ("--seed -3", "argument --seed: expected an integer >= 0, got '-3'"),
        ("--kind 'buckets", 'RELPOS_REF_ARGS: expected options quoted as in a shell, got "--kind \'buckets"'),
    ],
    ids=["choice", "unknown", "seed", "quoting"],
)
def test_env_args_errors_are_value_errors(text, expected):
    """ValueError is what the pytest entry point turns into a usage error; argparse's SystemExit or ArgumentError
    escaped as INTERNALERROR."""
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        conform_cli.parse_env_args("clicands:good", text)
    assert "\n" not in str(info.value)


def test_pytest_entry_point_reports_a_bad_choice_as_a_usage_error(workdir):
    """End to end through ``pytest --pyargs relpos_ref.conformance``: exit 4 (usage error), not INTERNALERROR."""
    env = {**_env(), "RELPOS_REF_IMPL": "clicands:good", "RELPOS_REF_ARGS": "--kind nope"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--pyargs", "relpos_ref.conformance"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert "INTERNALERROR" not in output
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "RELPOS_REF_IMPL / RELPOS_REF_ARGS: argument --kind: invalid choice: 'nope'" in output


def test_env_args_size_errors_reach_build_checks(workdir):
    args = conform_cli.parse_env_args("clicands:good", "--family alibi --heads 4 --q-len 100000 --k-len 100000")
    with pytest.raises(ValueError, match=re.escape("--q-len, --k-len: expected an (H, Sq, Sk) float64 bias")):
        conform_cli.build_checks(args)


# -- help ---------------------------------------------------------------------------------------------------------


def _conform_parser():
    import argparse

    p = argparse.ArgumentParser(prog="conform", formatter_class=conform_cli.DefaultsHelpFormatter)
    conform_cli.add_arguments(p)
    return p


def test_every_conform_option_has_help_that_shows_its_default():
    p = _conform_parser()
    formatter = p._get_formatter()
    missing, no_default = [], []
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if not action.help:
            missing.append(action.option_strings[0])
            continue
        text = formatter._get_help_string(action) % {"default": action.default}
        if action.nargs != 0 and "default" not in text:  # a flag (store_true, ...) is off unless given
            no_default.append(action.option_strings[0])
    assert missing == []
    assert no_default == []


def test_defaults_formatter_keeps_the_epilog_and_wraps_one_paragraph():
    import argparse

    p = argparse.ArgumentParser(
        prog="x", description="word " * 40, epilog="a\n  b", formatter_class=conform_cli.DefaultsHelpFormatter
    )
    p.add_argument("--n", type=int, default=3, help="a number")
    p.add_argument("--m", type=int, default=4, help="another (default: four)")
    text = p.format_help()
    assert "\n  b\n" in text  # the epilog's indentation survives
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "a number (default: 3)" in text
    assert "(default: four)" in text
    assert "(default: 4)" not in text
