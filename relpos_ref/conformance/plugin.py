"""pytest integration: parametrise a test over the conformance checks (scikit-learn's ``parametrize_with_checks``).

.. code-block:: python

    import relpos_ref as rp
    from relpos_ref.conformance import bias_checks, parametrize_with_checks
    from mypkg import alibi_bias

    @parametrize_with_checks(
        bias_checks(alibi_bias, rp.ALiBi.from_num_heads(12), q_len=8, k_len=24, causal=True),
        expected_failures={"bias.monotone": "we only support causal use"},
    )
    def test_alibi_conforms(check):
        check()

Each check becomes one test item named after it. A failing check raises
:class:`~relpos_ref.conformance.ConformanceError` (an ``AssertionError``) whose message is the check's report with the
first mismatch, the diagnosis and a reproduction snippet. Known divergences become strict ``xfail`` items, so a fixed
divergence is reported (XPASS fails the run).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from ._core import Check, _match_expected
from .report import ConformanceError

__all__ = ["load_target", "parametrize_with_checks"]


def _flatten(checks: Any) -> list[Check]:
    if isinstance(checks, Check):
        return [checks]
    out: list[Check] = []
    if not isinstance(checks, Iterable):
        msg = f"checks: expected Check objects or lists of them, got {type(checks).__name__}"
        raise TypeError(msg)
    for c in checks:
        out.extend(_flatten(c))
    return out


def parametrize_with_checks(
    checks: Check | Iterable[Any],
    *,
    expected_failures: dict[str, str] | None = None,
    argname: str = "check",
) -> Any:
    """A ``pytest.mark.parametrize`` over conformance checks.

    Parameters
    ----------
    checks : Check or (nested) iterable of Check
        From :func:`bias_checks`, :func:`attention_checks`, :func:`bucket_checks`; combine several suites by giving
        each a distinct ``label``.
    expected_failures : dict, optional
        Check name or ``fnmatch`` pattern -> reason. Those items are marked ``xfail(strict=True,
        raises=ConformanceError)``. A pattern that matches no check is an error (it would hide a typo).
    argname : str, default "check"
        Name of the test function's argument that receives the :class:`Check`.
    """
    import pytest

    items = _flatten(checks)
    if not items:
        msg = "checks: expected at least one Check, got none"
        raise ValueError(msg)
    names = [c.name for c in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        msg = f"checks: expected unique check names (give each suite its own label=), got duplicates {dupes}"
        raise ValueError(msg)
    marks = _match_expected(items, expected_failures)
    params = []
    for c in items:
        m = []
        if c.name in marks:
            m.append(pytest.mark.xfail(reason=marks[c.name], raises=ConformanceError, strict=True))
        params.append(pytest.param(c, id=c.name, marks=m))
    return pytest.mark.parametrize(argname, params)


def load_target(target: str) -> Any:
    """The object named by ``"package.module:attribute.path"`` or ``"path/to/file.py:attribute.path"``.

    A module is imported as ``python -m`` would import it: the current directory first on ``sys.path``, so a
    candidate next to where the command runs is found (and shadows an installed module of the same name). The
    directory is put there for the import only; it stays afterwards only when the module was found in it, since
    the module's own absolute imports of its siblings at call time need it, as under ``python -m``.

    A file (a target whose module part ends in ``.py`` or contains a path separator) is loaded with
    :func:`importlib.util.spec_from_file_location` under its stem's name (a name already taken in ``sys.modules``
    by another module gets a private name instead). Its directory is first on ``sys.path`` while it runs, so it
    can import its sibling modules at its top; it is removed afterwards.

    Raises
    ------
    ValueError
        ``target`` is not of either form.
    FileNotFoundError
        The file does not exist.
    ImportError
        The module cannot be found, or raised (any exception, SystemExit included) while being imported: one line
        naming the target, the exception and where it was raised.
    AttributeError
        The module has no such attribute.
    """
    if not isinstance(target, str) or ":" not in target:
        msg = f"target: expected 'package.module:function' or 'path/to/file.py:function', got {target!r}"
        raise ValueError(msg)
    # The last colon splits: a Windows path (C:\dir\f.py:fn) has one of its own.
    mod_name, _, attr = target.rpartition(":")
    if not mod_name or not attr:
        msg = f"target: expected 'package.module:function' or 'path/to/file.py:function', got {target!r}"
        raise ValueError(msg)
    is_file = mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name
    obj: Any = _load_file(mod_name, target) if is_file else _import_module(mod_name, target)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            where = f"file {mod_name!r}" if is_file else f"module {mod_name!r}"
            msg = f"target {target!r}: {where} has no attribute {attr!r}"
            raise AttributeError(msg) from exc
    return obj


def _import_module(mod_name: str, target: str) -> ModuleType:
    """``mod_name`` imported with the current directory first on sys.path (kept only if the module came from it)."""
    cwd = os.getcwd()
    with _first_on_path(cwd) as keep:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name != mod_name and not mod_name.startswith(f"{exc.name}."):
                raise _import_error(target, mod_name, exc) from exc  # the module exists; one of its imports does not
            msg = f"target: cannot import module {mod_name!r} (ModuleNotFoundError: {exc}); looked in {cwd} first"
            raise ImportError(msg) from exc
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a module that exits at import is a bad target, not an exit
            raise _import_error(target, mod_name, exc) from exc
        top = sys.modules.get(mod_name.split(".")[0])
        keep.append(top is not None and _located_in(top, cwd))
    return module


def _load_file(path_text: str, target: str) -> ModuleType:
    """The module of the file ``path_text`` (relative to the current directory), executed once."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        msg = f"target {target!r}: no file {path_text!r} (looked for {path.absolute()})"
        raise FileNotFoundError(msg)
    path = path.resolve()
    private = f"_relpos_ref_target_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_"
    private += hashlib.sha1(str(path).encode()).hexdigest()[:10]
    for name in (path.stem, private):
        taken = sys.modules.get(name)
        if taken is not None and getattr(taken, "__file__", None) and Path(taken.__file__).resolve() == path:
            return taken  # loaded before, by this function or by an import
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else private
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        msg = f"target {target!r}: {path} is not a Python source file"
        raise ImportError(msg)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, as an import does: dataclasses and pickling look their module up by name.
    sys.modules[name] = module
    try:
        with _first_on_path(str(path.parent)):
            spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _import_error(target, path_text, exc) from exc
    return module


def _import_error(target: str, what: str, exc: BaseException) -> ImportError:
    """One line: the target, what was imported, the exception and where it was raised."""
    return ImportError(f"target {target!r}: importing {what!r} raised {_where(exc)}")


def _where(exc: BaseException) -> str:
    """ "Type: message (at file:line)" at the deepest frame outside importlib's machinery."""
    if isinstance(exc, SyntaxError) and exc.filename:
        # The error is in the source, not in a frame: the traceback's last frame is importlib's compile call.
        return f"{type(exc).__name__}: {exc.msg} (at {exc.filename}:{exc.lineno})"
    text = f"{type(exc).__name__}({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")]
    if frames and Path(frames[-1].filename).resolve() != Path(__file__).resolve():
        text += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return text


def _same_dir(entry: str, directory: str) -> bool:
    return os.path.realpath(entry or os.curdir) == os.path.realpath(directory)


def _located_in(module: ModuleType, directory: str) -> bool:
    """Whether sys.path's entry ``directory`` is where ``module`` (a top-level module or package) was found."""
    spec = getattr(module, "__spec__", None)
    if spec is None:
        return False
    if spec.submodule_search_locations:
        places = [os.path.dirname(p) for p in spec.submodule_search_locations]
    elif spec.origin and spec.has_location:
        places = [os.path.dirname(spec.origin)]
    else:
        return False
    return any(_same_dir(p, directory) for p in places)


@contextlib.contextmanager
def _first_on_path(directory: str) -> Iterator[list[bool]]:
    """``directory`` first on sys.path inside the block; removed after it unless it was there already or the block
    appended True to the list it receives (the import needs it afterwards)."""
    present = bool(sys.path) and _same_dir(sys.path[0], directory)
    if not present:
        sys.path.insert(0, directory)
    keep: list[bool] = []
    try:
        yield keep
    finally:
        if not present and not any(keep) and directory in sys.path:
            sys.path.remove(directory)
