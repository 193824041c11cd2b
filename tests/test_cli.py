"""Tests of the ``relpos-ref`` entry point (relpos_ref.cli): help, version, ``python -m``, exit-status guards.

In-process through ``main([...])`` with capsys; one subprocess test for a closed output pipe, which needs a real
file descriptor.
"""

from __future__ import annotations

import io
import os
import runpy
import subprocess
import sys
from importlib.metadata import version

import pytest

from relpos_ref import cli
from relpos_ref.cli import main


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RELPOS_REF_")}


def test_help_describes_the_package_and_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Command-line entry point" not in out  # the module docstring is not a description
    assert "Reference math for relative positional biases in attention" in out
    for command in ("verify", "conform", "bench", "plot"):
        assert f"\n    {command} " in out
    assert "exit status: 0 success, 1 a check failed, 2 a usage or input error" in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"relpos-ref {version('relpos_ref')}\n"


def test_python_dash_m_runs_the_same_main(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["python -m relpos_ref", "--version"])
    monkeypatch.delitem(sys.modules, "relpos_ref.__main__", raising=False)  # imported before: runpy would warn
    with pytest.raises(SystemExit) as info:
        runpy.run_module("relpos_ref", run_name="__main__", alter_sys=True)
    assert info.value.code == 0
    assert capsys.readouterr().out == f"relpos-ref {version('relpos_ref')}\n"


def test_usage_error_is_one_line_naming_the_argument(capsys):
    assert main(["verify", "--seed", "-1"]) == 2
    assert capsys.readouterr().err == (
        "relpos-ref verify: error: argument --seed: expected an integer >= 0, got '-1' "
        "(see 'relpos-ref verify --help')\n"
    )
    assert main([]) == 2
    assert capsys.readouterr().err == (
        "relpos-ref: error: the following arguments are required: COMMAND (see 'relpos-ref --help')\n"
    )
    assert main(["verify", "--backend", "jax"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relpos-ref verify: error: argument --backend: invalid choice: 'jax' (choose from ")
    assert err.count("\n") == 1


class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_exits_141_without_a_traceback(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    # json.dumps as a bucket function: every check errors, and the report is printed into the closed pipe.
    assert main(["conform", "json:dumps", "--kind", "buckets"]) == cli.EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


class _BufferedClosedPipe(io.StringIO):
    """As sys.stdout into a pipe: writes are buffered, the closed reader shows only when the buffer is flushed."""

    def flush(self) -> None:
        if self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")


def test_output_still_buffered_meets_the_closed_pipe_inside_the_guard(capsys, monkeypatch):
    """Flushed after the command, not by the interpreter at exit (which prints "Exception ignored" and exits 120)."""

    def short_output(args):
        print("one short line")
        return 0

    monkeypatch.setattr(sys, "stdout", _BufferedClosedPipe())
    monkeypatch.setattr(cli, "_run", short_output)
    assert main(["verify"]) == cli.EXIT_BROKEN_PIPE
    assert capsys.readouterr().err == ""


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert main(["verify"]) == 130
    assert capsys.readouterr().err == "relpos-ref: interrupted\n"


def _into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m relpos_ref ARGS`` with stdout a pipe whose reader is gone before the first write, as in
    ``relpos-ref ... | head -1`` once head has exited (and so that short output cannot hide in the pipe's buffer)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "relpos_ref", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            env=_env(),
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write)


@pytest.mark.skipif(sys.platform == "win32", reason="a pipe whose reader has gone is POSIX")
def test_piping_into_a_closed_reader_prints_no_traceback():
    """The report is buffered (stdout is a pipe), so the broken pipe shows at the final flush, not at a print."""
    proc = _into_closed_pipe("conform", "json:dumps", "--kind", "buckets")
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, proc.stderr
    assert proc.stderr == ""
    help_proc = _into_closed_pipe("conform", "--help")
    assert (help_proc.returncode, help_proc.stderr) == (0, "")


def _subparser(name: str):
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("command", ["conform", "bench", "verify"])
def test_every_option_has_help_that_shows_its_default(command):
    """A flag (store_true) is off unless given; every other option says what it defaults to."""
    p = _subparser(command)
    formatter = p._get_formatter()
    missing, no_default = [], []
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if not action.help:
            missing.append(action.option_strings[0])
        elif action.nargs != 0 and "default" not in formatter._get_help_string(action):
            no_default.append(action.option_strings[0])
    assert missing == []
    assert no_default == []


def test_bench_help_speaks_plainly(capsys):
    assert main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    # Terms a new user cannot know: the code's names and benchmark slang (explained in words instead).
    for jargon in ("rp.attention", "SDPA", "materialised", "unfused", "prefill", "CPU targets", "min-max"):
        assert jargon not in text, jargon
    assert "scaled_dot_product_attention" in text
    assert "grouped-query attention" in text


@pytest.mark.parametrize("command", [[], ["verify"], ["conform"], ["bench"], ["plot"]])
def test_help_lines_fit_120_columns(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps to 118; raw text (epilogs) must fit on its own
    assert main([*command, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    wide = [line for line in lines if len(line) >= 120 and not line.lstrip().startswith("usage:")]
    assert wide == []
    assert [line for line in lines if line != line.rstrip()] == []
