"""Search and shrink: Hypothesis draws attention cases until a candidate fails one, then shrinks it to a minimal one.

:func:`search_attention` complements :func:`relpos_ref.conformance.check_attention`. Where ``check_attention`` runs
a fixed, kernel-shaped set of cases, the search draws one case at a time (batch, kv heads, query and key lengths,
head dim, logit scale, dtype), runs the harness's value checks on it and, as soon as one fails, lets Hypothesis
shrink the case to a minimal failing one: the smallest lengths, batch and head dim, the plainest logit scale and
dtype that still fail. The result carries that case's conformance :class:`~relpos_ref.conformance.Report` and the
reproduction snippet of its first failed check.

Draws, and why they shrink well
-------------------------------
A length is drawn from ``one_of(integers(1, cap), sampled_from(edges))``. The second branch puts a large share of
the draws on the sizes kernels get wrong: one short of, at, and one past a multiple of the usual tile widths
(16, 32, 64, 128, 256, times 1..8), the decode length 1, and 2047..2049 and 4095..4097 (offsets a half-precision
float no longer holds). Hypothesis shrinks a ``one_of`` towards its first branch, so a failure found on a tile edge
still shrinks to the smallest failing integer, not to the smallest failing edge: a candidate that drops every key
past index 64 shrinks to ``k_len == 65`` whichever size first exposed it. The other choices are ordered so that
their first value is the plainest: ``kv_heads == heads`` first (grouped-query heads only when they matter), the
smallest head dim, the caller's first logit scale and dtype. Positions follow from the lengths and ``align``
(bottom-right: the last query sits on the last key), so offsets past 2048 are reached through lengths past 2048.

Budgets
-------
``max_examples`` bounds the generation (Hypothesis' setting of that name); ``time_budget`` stops it too: once that
many seconds have passed, no new case is started and the search ends (a case already running finishes, so the
search may overrun by one case). A failure found before then is shrunk even if the time budget runs out during the
shrink; the shrink has its own bound, ``shrink_budget`` seconds from the first failure (default: ``time_budget``),
after which the smallest failing case seen so far is the result (``stopped == "shrink_budget"``; it is a failing
case, though perhaps not minimal). Hypothesis also stops a shrink by itself after 500 improvements. A search
therefore ends within about ``time_budget + shrink_budget`` seconds plus one case.

Cost
----
Whatever device the candidate runs on, the harness computes the reference in float64 and the plain same-dtype
baseline of its tolerance rule with NumPy on the CPU, at about ``batch * heads * q_len * k_len * (head_dim + 64)``
operations (the logits and their softmax, then the two products): of the order of a microsecond per logit. The
draws keep a case under 2**27 of them, so that it takes seconds: the key length is drawn first over its whole range
(decode and chunked prefill against thousands of keys are the commonest kernel calls), then the query length, the
batch and the head dims that still fit (with 4 heads and head dim 16, 2049 keys leave room for up to 204 queries).

Replays
-------
With ``database=path`` Hypothesis keeps its failing examples in a
:class:`hypothesis.database.DirectoryBasedExampleDatabase` at ``path``, under a key made of the candidate's name and
the whole search configuration: a later search of the same candidate with the same configuration replays the minimal
failing case first (``found_at == 1``), and searches of other candidates or configurations sharing the directory do
not disturb each other. Without a database (the default) nothing is kept: Hypothesis' cache of the constants it
collects from the loaded modules, which it writes to ``./.hypothesis`` by default, goes to a temporary directory
removed after the search, unless the environment variable ``HYPOTHESIS_STORAGE_DIRECTORY`` names a place for it.

Hypothesis is a test dependency of relpos_ref, not a base one: it is imported when the search runs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from ._host import to_host
from .cases import AttentionShape
from .conformance._core import run_checks
from .conformance.attention import attention_checks, check_attention
from .conformance.report import Report
from .conventions import FLOAT_DTYPES
from .families import BiasFamily, TensorBias

__all__ = ["SearchResult", "search_attention"]

#: Lengths drawn when the candidate declares no maximum (past 2048, below a cost that keeps a case within seconds).
DEFAULT_MAX_LEN = 2100
#: Head dims drawn when the candidate declares none.
DEFAULT_HEAD_DIMS = (16, 32, 64, 128)
#: Query heads of a search without a bias family (with one, its ``num_heads``).
DEFAULT_HEADS = 4
_TILES = (16, 32, 64, 128, 256)
_LANDMARKS = (1, 2, 2047, 2048, 2049, 4095, 4096, 4097)
_MAX_COST = 2**27
#: The checks run on each drawn case: those that judge the candidate's one call on it (output, lse, the rows that
#: see no key). The property checks of ``check_attention`` (rows_sum_to_one on its own 16x16 case, the future-key
#: and alignment probes, repeatability) cost further calls and do not depend on the drawn case as much.
_CASE_CHECKS = (".output.", ".lse.", ".fully_masked_rows")
#: check_attention's keywords the search sets itself or cannot honour.
_OWN = {
    "candidate": "the candidate is search_attention's first argument",
    "shapes": "search_attention draws the shapes itself; bound them with max_q_len, max_k_len, head_dims and gqa",
    "seed": "seed is search_attention's own keyword (it seeds both Hypothesis and the inputs)",
    "expected_failures": "search_attention counts every failed check; leave a known divergence out of the options "
    "instead (e.g. with_lse=False)",
}


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`search_attention`.

    Attributes
    ----------
    found : bool
        Whether a drawn case failed.
    examples : int
        Cases run in all: generated, replayed from the database and tried while shrinking.
    elapsed : float
        Seconds the search took.
    shape : AttentionShape or None
        The minimal failing case (None when nothing failed).
    dtype : str or None
        Its input dtype.
    report : Report or None
        The conformance report of the minimal failing case.
    reproduction : str or None
        The reproduction snippet of its first failed check.
    database : str or None
        The Hypothesis database directory, or None.
    seed : int
        The seed of Hypothesis and of the inputs.
    found_at : int or None
        The number (from 1) of the case that failed first.
    stopped : str
        Why the search ended: ``"shrunk"`` (a failure, shrunk until Hypothesis found nothing smaller),
        ``"shrink_budget"`` (a failure, shrink cut short), ``"flaky"`` (a failure that did not fail again on a replay:
        a non-deterministic candidate), ``"max_examples"``, ``"time_budget"`` or ``"exhausted"`` (Hypothesis ended the
        generation before ``max_examples``, out of new cases to draw, as with a TensorBias's fixed lengths).
    """

    found: bool
    examples: int
    elapsed: float
    shape: AttentionShape | None
    dtype: str | None
    report: Report | None
    reproduction: str | None
    database: str | None
    seed: int
    found_at: int | None = None
    stopped: str = ""

    def __str__(self) -> str:
        if not self.found:
            return (
                f"search_attention: no failure in {self.examples} cases, {self.elapsed:.1f} s "
                f"(stopped: {self.stopped}; seed {self.seed})"
            )
        lines = [
            f"search_attention: FAILED; first failure at case {self.found_at}, {self.examples} cases in "
            f"{self.elapsed:.1f} s (stopped: {self.stopped}; seed {self.seed})",
            f"{'minimal' if self.stopped == 'shrunk' else 'smallest failing'} case: {self.shape!r}, dtype {self.dtype}",
        ]
        for c in self.report.failures if self.report is not None else []:
            err = "" if c.max_abs is None else f" (max abs err {c.max_abs:.2e}, bound {c.bound or 0.0:.2e})"
            lines.append(f"failed: {c.name}: {c.status}{err}")
            lines.extend(f"  diagnosis: {d}" for d in c.diagnosis)
        if self.reproduction:
            lines.append("reproduce:")
            lines.extend("    " + ln for ln in self.reproduction.splitlines())
        if self.database:
            lines.append(f"replay: search_attention(..., database={self.database!r}) runs this case first")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Plan:
    """What the search draws from, validated once."""

    heads: int
    kv_heads: tuple[int, ...]
    q_cap: int
    k_cap: int
    fixed: tuple[int, int] | None
    head_dims: tuple[int, ...]
    scales: tuple[float, ...]
    dtypes: tuple[str, ...]


class _Stop(KeyboardInterrupt):
    """A budget ran out. Hypothesis lets a KeyboardInterrupt through at once and, unlike any other exception, neither
    records the case as a failure nor saves it to the database; any other exception would be shrunk as a bug."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _CaseFailedError(AssertionError):
    """A drawn case failed its checks (what Hypothesis shrinks)."""


class _State:
    """What the search has seen so far (the Hypothesis test body writes it)."""

    def __init__(self) -> None:
        self.examples = 0
        self.found_at: int | None = None
        self.shrink_deadline = math.inf
        self.last: tuple[AttentionShape, str, Report] | None = None
        self.best: tuple[AttentionShape, str, Report] | None = None
        self.best_key: tuple[Any, ...] = ()


def search_attention(
    candidate: Callable[..., Any],
    /,
    *,
    max_examples: int = 200,
    time_budget: float = 60.0,
    shrink_budget: float | None = None,
    database: str | os.PathLike[str] | None = None,
    seed: int = 0,
    dtypes: Sequence[str] | None = None,
    logit_scales: Sequence[float] = (1.0, 8.0, 40.0),
    **options: Any,
) -> SearchResult:
    r"""Search for an attention case on which ``candidate`` fails, and shrink it to a minimal one.

    Each drawn case runs ``attention_checks(candidate, shapes=[shape], dtype=dtype, seed=seed, **options)`` and the
    checks that judge the one call on that case: ``attention.output.shape0``, ``attention.lse.shape0`` (with
    ``with_lse``) and ``attention.fully_masked_rows`` (when the case has a query that sees no key). A failed or
    erroring check is a Hypothesis failure; Hypothesis then shrinks the case. While no check fails, the search steers
    towards large errors (``hypothesis.target`` on the largest ratio of error to bound).

    Parameters
    ----------
    candidate : callable
        ``candidate(q, k, v)`` as for :func:`relpos_ref.conformance.check_attention`.
    max_examples : int
        Most cases generated (replays and shrinking come on top).
    time_budget : float
        Seconds after which no new case is generated.
    shrink_budget : float, optional
        Seconds the shrink may take from the first failure (default ``time_budget``); ``0`` returns the first
        failing case unshrunk.
    database : str or path, optional
        Directory of a Hypothesis example database; a later search with the same candidate and configuration replays
        its minimal failing case first. None (default): nothing is written.
    seed : int
        Seed of Hypothesis' draws and of the inputs (``attention_inputs(shape, dtype=..., seed=seed)``).
    dtypes : sequence of {"float32", "float64", "float16", "bfloat16"}, optional
        Input dtypes to draw from, the plainest first (a failure shrinks towards the first). Default: ``dtype`` from
        ``options``, else "float32".
    logit_scales : sequence of float
        Factors q is multiplied by (``AttentionShape.logit_scale``), the plainest first; 40 gives logits of order 100.
    **options
        Keywords of :func:`~relpos_ref.conformance.check_attention` (bias, causal, align, placement, scale, dtype,
        with_lse, xp, device, fully_masked, rtol, atol, target, layout, timeout and the declaration head_dims,
        max_q_len, max_k_len, gqa), all but candidate, shapes, seed and expected_failures. The declaration bounds the
        draws: head dims from ``head_dims`` (default 16, 32, 64, 128), lengths 1..``max_q_len`` and
        1..``max_k_len`` (default 2100 each), ``kv_heads`` a divisor of the heads (only the heads themselves with
        ``gqa=False``). The heads are the bias family's ``num_heads`` (4 without a bias); a ``TensorBias`` fixes
        the lengths to its (Sq, Sk).

    Returns
    -------
    SearchResult
        ``found``, the minimal ``shape`` and ``dtype``, its ``report`` and ``reproduction``, the counts and
        ``stopped``, the reason the search ended; ``str(result)`` is a short summary.

    Raises
    ------
    TypeError, ValueError
        A bad argument or option, named in the message.
    ImportError
        Hypothesis is not installed.

    Notes
    -----
    The search stops generating at ``max_examples`` cases or after ``time_budget`` seconds, whichever comes first;
    a shrink in progress runs on for at most ``shrink_budget`` seconds from the first failure, so the whole search
    takes at most about :math:`t_\text{time} + t_\text{shrink}` plus one case. Minimality is Hypothesis': no single
    smaller value of any one drawn choice (and none of the other reductions it tries) still fails.

    Examples
    --------
    >>> import numpy as np, relpos_ref as rp
    >>> from relpos_ref.search import search_attention
    >>> def drops_late_keys(q, k, v):  # a kernel that forgets every key past the first tile of 64
    ...     return np.asarray(rp.attention(q, k[:, :, :64], v[:, :, :64])).astype(q.dtype)
    >>> result = search_attention(drops_late_keys, max_k_len=200, max_q_len=8, max_examples=50)
    >>> result.found, result.shape.k_len
    (True, 65)
    """
    seed = _checks.integer("seed", seed)
    if not callable(candidate):
        msg = f"candidate: expected a callable candidate(q, k, v), got {type(candidate).__name__}"
        raise TypeError(msg)
    max_examples = _checks.integer("max_examples", max_examples, minimum=1)
    time_budget = _checks.real_scalar("time_budget", time_budget, positive=True)
    shrink = time_budget if shrink_budget is None else _checks.real_scalar("shrink_budget", shrink_budget)
    if shrink < 0:
        msg = f"shrink_budget: expected None or a number >= 0, got {shrink_budget!r}"
        raise ValueError(msg)
    path = _database_path(database)
    options = _options(options)
    plan = _plan(candidate, options, dtypes, logit_scales, seed)
    hyp = _hypothesis()
    db = None if path is None else _keyed_database(hyp, path, _key(candidate, options, plan))
    return _run(hyp, candidate, options, plan, db, path, seed, max_examples, (time_budget, shrink))


def _database_path(database: Any) -> str | None:
    if database is None:
        return None
    if not isinstance(database, str | os.PathLike) or isinstance(database, bytes):
        msg = f"database: expected None or a directory path (str or os.PathLike), got {type(database).__name__}"
        raise TypeError(msg)
    path = os.fspath(database)
    if not isinstance(path, str) or not path:
        msg = f"database: expected a non-empty directory path, got {database!r}"
        raise ValueError(msg)
    return path


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """The options, checked against the keywords ``check_attention`` and ``attention_checks`` take at run time."""
    taken = set(inspect.signature(check_attention).parameters) & set(inspect.signature(attention_checks).parameters)
    for name in options:
        if name in _OWN:
            msg = f"{name}: not an option of search_attention ({_OWN[name]})"
            raise TypeError(msg)
        if name not in taken:
            msg = f"{name}: not a keyword of check_attention (it takes {', '.join(sorted(taken - set(_OWN)))})"
            raise TypeError(msg)
    return dict(options)


def _sequence(name: str, value: Any, what: str) -> tuple[Any, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        msg = f"{name}: expected a sequence of {what}, got {value!r}"
        raise TypeError(msg)
    if not value:
        msg = f"{name}: expected at least one of {what}, got an empty sequence"
        raise ValueError(msg)
    return tuple(value)


def _plan(candidate: Any, options: dict[str, Any], dtypes: Any, logit_scales: Any, seed: int) -> _Plan:
    """What to draw from; the options themselves are validated by building the harness's checks on a probe case."""
    if dtypes is None:
        dts: tuple[str, ...] = (_checks.option("dtype", options.get("dtype", "float32"), FLOAT_DTYPES),)
    else:
        if "dtype" in options:
            msg = f"dtype: give dtype or dtypes, not both (got dtype={options['dtype']!r}, dtypes={dtypes!r})"
            raise ValueError(msg)
        dts = _sequence("dtypes", dtypes, f"dtype names {FLOAT_DTYPES}")
        for d in dts:
            if not isinstance(d, str) or d not in FLOAT_DTYPES:
                msg = f"dtypes: expected names among {FLOAT_DTYPES}, got {d!r} in {dtypes!r}"
                raise ValueError(msg)
    scales = _sequence("logit_scales", logit_scales, "positive numbers")
    scales = tuple(_checks.real_scalar("logit_scales", s, positive=True) for s in scales)
    bias = options.get("bias")
    heads = bias.num_heads if isinstance(bias, BiasFamily) else DEFAULT_HEADS
    head_dims = options.get("head_dims")
    if head_dims is not None:
        dims = tuple(
            sorted({_checks.integer("head_dims", d, minimum=1) for d in _sequence("head_dims", head_dims, "head dims")})
        )
    else:
        dims = DEFAULT_HEAD_DIMS
    caps = []
    for name in ("max_q_len", "max_k_len"):
        cap = options.get(name)
        caps.append(DEFAULT_MAX_LEN if cap is None else _checks.integer(name, cap, minimum=1))
    fixed = None
    if isinstance(bias, TensorBias):
        sq, sk = (int(n) for n in bias.shape[1:])
        fixed = (sq, sk)
        if sq > caps[0] or sk > caps[1]:
            msg = f"max_q_len, max_k_len: the TensorBias fixes (Sq, Sk) = {fixed}, above the declared {tuple(caps)}"
            raise ValueError(msg)
    gqa = _checks.boolean("gqa", options.get("gqa", True))
    kv = tuple(h for h in range(heads, 0, -1) if heads % h == 0) if gqa else (heads,)
    probe = AttentionShape(1, heads, heads, *(fixed or (1, 1)), dims[0])
    rest = {k: v for k, v in options.items() if k != "dtype"}
    for d in dict.fromkeys(dts):
        attention_checks(candidate, shapes=[probe], dtype=d, seed=seed, **rest)
    return _Plan(heads, kv, caps[0], caps[1], fixed, dims, tuple(dict.fromkeys(scales)), tuple(dict.fromkeys(dts)))


def _hypothesis() -> Any:
    """The hypothesis module, imported on first use (a test dependency of relpos_ref, not a base one)."""
    try:
        import hypothesis
        import hypothesis.configuration
        import hypothesis.database
        import hypothesis.errors
        import hypothesis.strategies
    except ImportError as exc:
        msg = "search_attention needs Hypothesis: pip install hypothesis (or relpos_ref's test extra)"
        raise ImportError(msg) from exc
    return hypothesis


def _key(candidate: Any, options: dict[str, Any], plan: _Plan) -> bytes:
    """A digest of the candidate's name and the whole configuration: the database key prefix of this search."""
    h = hashlib.sha256()
    name = options.get("target") or f"{getattr(candidate, '__module__', '')}.{getattr(candidate, '__qualname__', '')}"
    h.update(repr((name, plan)).encode())
    for k in sorted(options):
        v = options[k]
        if isinstance(v, BiasFamily):
            h.update(repr((k, type(v).__name__, sorted(v.options().items()))).encode())
            for p, arr in sorted(v.parameters().items()):
                h.update(p.encode() + np.ascontiguousarray(to_host(arr)[0]).tobytes())
        elif k not in ("target", "dtype"):
            h.update(repr((k, getattr(v, "__name__", v))).encode())
    return h.hexdigest()[:32].encode() + b"."


def _keyed_database(hyp: Any, path: str, prefix: bytes) -> Any:
    """A DirectoryBasedExampleDatabase at ``path`` whose keys start with ``prefix``: Hypothesis' key is the digest of
    the test function, the same closure for every search, so the configuration must be added to it."""
    base = hyp.database.DirectoryBasedExampleDatabase(path)

    class _Keyed(hyp.database.ExampleDatabase):
        def save(self, key: bytes, value: bytes) -> None:
            base.save(prefix + key, value)

        def fetch(self, key: bytes) -> Any:
            return base.fetch(prefix + key)

        def delete(self, key: bytes, value: bytes) -> None:
            base.delete(prefix + key, value)

        def move(self, src: bytes, dest: bytes, value: bytes) -> None:
            base.move(prefix + src, prefix + dest, value)

    return _Keyed()


@functools.lru_cache(maxsize=64)
def _edges(cap: int) -> tuple[int, ...]:
    """The lengths kernels get wrong, up to ``cap``: around multiples of the tile widths, 1, and past 2048."""
    near = {m * c + d for m in _TILES for c in range(1, 9) for d in (-1, 0, 1)}
    return tuple(sorted(n for n in near | set(_LANDMARKS) if 1 <= n <= cap))


def _length(st: Any, cap: int) -> Any:
    if cap == 1:
        return st.just(1)
    # integers first: Hypothesis shrinks a one_of towards its first branch, so a failure found on an edge still
    # shrinks to the smallest failing length. The edges come twice, as two objects (one_of drops a repeated one), so
    # that two draws in three aim at a tile edge.
    return st.one_of(st.integers(1, cap), st.sampled_from(_edges(cap)), st.sampled_from(_edges(cap)))


def _cases(st: Any, plan: _Plan) -> Any:
    """The strategy of (AttentionShape, dtype) pairs: keys first (decode against a long cache is the commonest kernel
    call), then queries, batch and head dim within what keeps the case's cost under ``_MAX_COST``."""
    d0 = plan.head_dims[0]

    @st.composite
    def case(draw: Any) -> tuple[AttentionShape, str]:
        if plan.fixed is not None:
            sq, sk = plan.fixed
        else:
            sk = draw(_length(st, plan.k_cap))
            sq = draw(_length(st, max(1, min(plan.q_cap, _MAX_COST // _cost(1, plan.heads, 1, sk, d0)))))
        batch = draw(st.integers(1, max(1, min(3, _MAX_COST // _cost(1, plan.heads, sq, sk, d0)))))
        dims = [d for d in plan.head_dims if _cost(batch, plan.heads, sq, sk, d) <= _MAX_COST] or [d0]
        d = draw(st.sampled_from(dims))
        kv = draw(st.sampled_from(plan.kv_heads))
        scale = draw(st.sampled_from(plan.scales))
        dtype = draw(st.sampled_from(plan.dtypes))
        return AttentionShape(batch, plan.heads, kv, sq, sk, d, scale), dtype

    return case()


def _cost(batch: int, heads: int, sq: int, sk: int, head_dim: int) -> int:
    """The cost model of one case: the logits, each about as dear as 64 multiply-adds of the products."""
    return batch * heads * sq * sk * (head_dim + 64)


@contextlib.contextmanager
def _scratch_storage(hyp: Any) -> Iterator[None]:
    """Hypothesis' storage directory in a temporary directory for the search, unless the environment names one:
    Hypothesis caches the constants of the loaded modules there, by default in ``./.hypothesis``."""
    conf = hyp.configuration
    if os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        yield
        return
    try:
        before = conf.storage_directory(intent_to_write=False).home_directory
    except TypeError:  # older Hypothesis: no intent_to_write, and the directory itself is returned
        before = conf.storage_directory()
    with tempfile.TemporaryDirectory(prefix="relpos_ref_search_") as scratch:
        conf.set_hypothesis_home_dir(scratch)
        try:
            yield
        finally:
            conf.set_hypothesis_home_dir(before)


def _size(shape: AttentionShape, dtype: str, plan: _Plan) -> tuple[Any, ...]:
    """An order of failing cases close to Hypothesis' (smaller lengths first, then the plainer choices), used only for
    the best case when the shrink budget cuts the shrink short."""
    return (
        shape.q_len + shape.k_len,
        shape.k_len,
        shape.batch,
        shape.head_dim,
        plan.kv_heads.index(shape.kv_heads),
        plan.scales.index(shape.logit_scale),
        plan.dtypes.index(dtype),
    )


def _worst_ratio(report: Report) -> float | None:
    """The largest error-to-bound ratio of the report's value checks (finite), what ``target`` climbs."""
    ratios = [
        c.max_abs / c.bound
        for c in report.checks
        if c.max_abs is not None and c.bound and math.isfinite(c.max_abs) and math.isfinite(c.bound)
    ]
    return max(ratios) if ratios else None


def _run(
    hyp: Any,
    candidate: Any,
    options: dict[str, Any],
    plan: _Plan,
    db: Any,
    path: str | None,
    seed: int,
    max_examples: int,
    budgets: tuple[float, float],
) -> SearchResult:
    """The Hypothesis run and its result."""
    st = hyp.strategies
    rest = {k: v for k, v in options.items() if k != "dtype"}
    state = _State()
    start = time.perf_counter()
    deadline = start + budgets[0]

    def check(shape: AttentionShape, dtype: str) -> Report:
        checks = attention_checks(candidate, shapes=[shape], dtype=dtype, seed=seed, **rest)
        return run_checks([c for c in checks if any(s in c.name for s in _CASE_CHECKS)])

    phases = [hyp.Phase.reuse, hyp.Phase.generate, hyp.Phase.target, hyp.Phase.shrink]

    @hyp.settings(
        max_examples=max_examples,
        deadline=None,
        database=db,
        derandomize=False,
        phases=phases,
        report_multiple_bugs=False,
        suppress_health_check=list(hyp.HealthCheck),
        verbosity=hyp.Verbosity.quiet,
        print_blob=False,
    )
    @hyp.seed(seed)
    @hyp.given(_cases(st, plan))
    def body(case: tuple[AttentionShape, str]) -> None:
        now = time.perf_counter()
        if state.found_at is None and now > deadline:
            raise _Stop("time_budget")
        if now > state.shrink_deadline:
            raise _Stop("shrink_budget")
        shape, dtype = case
        state.examples += 1
        report = check(shape, dtype)
        if report.passed:
            ratio = _worst_ratio(report)
            if ratio is not None:
                hyp.target(ratio, label="error / bound")
            return
        if state.found_at is None:
            state.found_at = state.examples
            state.shrink_deadline = time.perf_counter() + budgets[1]
        state.last = (shape, dtype, report)
        key = _size(shape, dtype, plan)
        if state.best is None or key < state.best_key:
            state.best, state.best_key = state.last, key
        raise _CaseFailedError(f"{shape!r}, dtype {dtype}: {', '.join(c.name for c in report.failures)}")

    stopped = ""
    try:
        with _scratch_storage(hyp):
            body()
    except _Stop as stop:
        stopped = stop.reason
    except _CaseFailedError:
        stopped = "shrunk"
    except hyp.errors.Flaky:
        if state.best is None:
            raise
        stopped = "flaky"
    if not stopped:
        stopped = "max_examples" if state.examples >= max_examples else "exhausted"
    chosen = state.last if stopped == "shrunk" else state.best
    elapsed = time.perf_counter() - start
    if chosen is None:
        return SearchResult(False, state.examples, elapsed, None, None, None, None, path, seed, None, stopped)
    shape, dtype, report = chosen
    first = report.failures[0]
    return SearchResult(
        True, state.examples, elapsed, shape, dtype, report, first.reproduction, path, seed, state.found_at, stopped
    )
