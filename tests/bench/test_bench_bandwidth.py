"""``relpos-ref bench`` decode bandwidth (K/V rotation, same-bytes read reference) and the BLAS thread report."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest

from relpos_ref import bench

# The package exports a function named measure; the module is reached by its full name.
measure = importlib.import_module("relpos_ref.bench.measure")

MiB = 1 << 20


def _decode_config(**kw):
    base = {
        "families": ("alibi",),
        "backends": ("numpy",),
        "seq_lens": (16,),
        "decode_lens": (48,),
        "heads": 2,
        "head_dim": 8,
        "reps": 3,
        "budget_s": 1.0,
        "targets": False,
        "progress": False,
        "memory": False,
        "roofline_gemm_n": 64,
        "roofline_copy_mib": 1,
    }
    base.update(kw)
    return bench.BenchConfig(**base)


# -- how many K/V copies a decode row rotates over ---------------------------------------------------------------------


def test_rotation_spans_four_times_the_caches():
    # 16 MiB of K/V against 34 MiB of caches: ceil(4 * 34 / 16) = 9 copies, 144 MiB.
    assert measure.kv_copies(16 * MiB, 34 * MiB) == (9, "memory")
    # A set larger than four times the caches needs no second copy.
    assert measure.kv_copies(256 * MiB, 60 * MiB) == (1, "memory")


def test_rotation_of_tiny_sets_is_capped_and_says_so():
    # 6 KiB sets would need 22 667 copies to span 4 x 34 MiB; at most 64 are made, 384 KiB: all in cache.
    assert measure.kv_copies(6 * 1024, 34 * MiB) == (64, "cache")
    # 64 copies of 1 MiB: more than the 34 MiB caches, less than four times them.
    assert measure.kv_copies(MiB, 34 * MiB) == (64, "partly cache")
    n, where = measure.kv_copies(MiB, None)
    assert (n, where) == (64, "unknown (cache size unknown)")


def test_rotating_runner_shares_one_cycle_between_calls_and_reads():
    calls = []

    def fake(i):
        return measure.Runner(
            fn=lambda: calls.append(("fn", i)),
            device="cpu",
            to_host=np.asarray,
            peak_memory=lambda: (None, ""),
            reads={"r": lambda: calls.append(("read", i))},
        )

    runner = measure.rotating([fake(i) for i in range(3)], measure.Rotation(3))
    runner.fn()
    runner.fn()
    runner.reads["r"]()
    runner.fn()
    # The read takes the copy after the last call's, so each access meets the least recently used copy.
    assert calls == [("fn", 0), ("fn", 1), ("read", 2), ("fn", 0)]


# -- the rows of a run -------------------------------------------------------------------------------------------------


def test_decode_rows_rotate_and_compare_with_a_read_of_their_own_kv(monkeypatch):
    monkeypatch.setattr(bench, "cpu_cache_bytes", lambda: (64 * 1024, "test"))
    used = []
    make_runner = bench.make_runner

    def spy(backend, fam, q, k, v, shape, attn_kwargs=None):
        runner = make_runner(backend, fam, q, k, v, shape, attn_kwargs)
        fn = runner.fn
        runner.fn = lambda: (used.append((shape.kind, id(k))), fn())[1]
        return runner

    monkeypatch.setattr(bench, "make_runner", spy)
    result = bench.run_bench(_decode_config())
    rows = {r["kind"]: r for r in result["results"]}
    dec, pre = rows["decode"], rows["prefill"]
    # K and V of (B=1, H_kv=2, Sk=48, D=8) float32: 2 * 2 * 48 * 8 * 4 = 6144 bytes; ceil(4 * 65536 / 6144) = 43.
    assert dec["read_bytes"] == 6144
    assert dec["kv_rotation"]["copies"] == 43
    assert dec["kv_rotation"]["kv_from"] == "memory"
    decode_ids = [i for kind, i in used if kind == "decode"]
    assert len(decode_ids) == 1 + dec["reps"]  # one warm-up call, then the timed ones
    assert len(set(decode_ids)) == len(decode_ids)  # every call read another copy
    assert dec["bandwidth_fraction"] == pytest.approx(
        (dec["min_bytes"] / dec["median_s"]) / (dec["read_bytes"] / dec["read_s"])
    )
    assert dec["read_method"].startswith("np.dot(x, x)")
    assert pre["bandwidth_fraction"] is None
    assert "compute-bound" in pre["bandwidth_note"]
    assert "kv_rotation" not in pre
    md = bench.markdown_report(result)
    assert "K/V read from memory: 43 copies" in md
    assert "% read BW" in md
    assert "% copy BW" not in md


def test_a_decode_that_reads_its_kv_three_times_is_below_one_read():
    # The model's own claim: a call that must read K and V is no faster than a plain read of them. Here the call is
    # three plain reads, so its fraction is about 1/3 (1 only under extreme noise).
    k = np.ones((1, 2, 1 << 16, 64), dtype=np.float32)
    v = np.ones_like(k)
    reads = measure.numpy_reads((k, v), threads=1)
    read = reads["np.dot(x, x) per array"]
    runner = measure.Runner(
        fn=lambda: [read() for _ in range(3)],
        device="cpu",
        to_host=np.asarray,
        peak_memory=lambda: (None, ""),
        reads=reads,
        read_bytes=k.nbytes + v.nbytes,
    )
    row = {"kind": "decode", "device": "cpu", "flops": 1.0, "min_bytes": k.nbytes + v.nbytes}
    row.update(measure.measure(runner, warmup=1, reps=5, budget_s=5.0))
    row.update(measure.measure_read(runner, reps=5))
    bench._add_rates(row, {})
    assert 0 < row["bandwidth_fraction"] < 1


def test_copy_reference_says_whether_it_came_from_cache(monkeypatch):
    # 1 MiB copied: 2 MiB touched.
    monkeypatch.setattr(measure, "cpu_cache_bytes", lambda: (64 * MiB, "test"))
    assert measure.cpu_roofline(gemm_n=32, copy_mib=1, reps=1)["copy_from"] == "cache"
    monkeypatch.setattr(measure, "cpu_cache_bytes", lambda: (256 * 1024, "test"))
    assert measure.cpu_roofline(gemm_n=32, copy_mib=1, reps=1)["copy_from"] == "memory"
    monkeypatch.setattr(measure, "cpu_cache_bytes", lambda: (None, "test"))
    assert measure.cpu_roofline(gemm_n=32, copy_mib=1, reps=1)["copy_from"].startswith("unknown")


def test_cpu_cache_size_counts_shared_caches_once(tmp_path, monkeypatch):
    # Two cores, private 32 KiB L1d, 32 KiB L1i and 1 MiB L2 each, one shared 32 MiB L3: 2 * (32 K + 1 M) + 32 M.
    for cpu in ("cpu0", "cpu1"):
        for idx, (level, kind, size, shared) in enumerate(
            [
                ("1", "Data", "32K", cpu[3:]),
                ("1", "Instruction", "32K", cpu[3:]),
                ("2", "Unified", "1024K", cpu[3:]),
                ("3", "Unified", "32768K", "0-1"),
            ]
        ):
            d = tmp_path / cpu / "cache" / f"index{idx}"
            d.mkdir(parents=True)
            for name, val in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
                (d / name).write_text(val + "\n")
    (tmp_path / "cpufreq").mkdir()  # not a cpuN folder
    total, how = measure.cpu_cache_bytes(str(tmp_path))
    assert total == 2 * (32 * 1024 + 1024 * 1024) + 32 * MiB
    assert "counted once" in how


# -- BLAS threads ------------------------------------------------------------------------------------------------------


def _report_of_blas(blas):
    return bench.markdown_report({"machine": {"blas": blas}, "rooflines": {}})


def test_blas_threads_without_threadpoolctl_say_unknown_and_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import threadpoolctl now raises ImportError
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    blas = measure.machine_info()["blas"]
    assert blas
    assert all("num_threads" not in b and b["threads_unknown"] for b in blas)
    md = _report_of_blas(blas)
    assert "? threads" not in md
    assert "threads unknown: threadpoolctl is not installed (pip install 'relpos_ref[bench]')" in md
    assert "OPENBLAS_NUM_THREADS=2" in md


def test_blas_threads_from_threadpoolctl(monkeypatch):
    fake = types.ModuleType("threadpoolctl")
    fake.threadpool_info = lambda: [
        {"user_api": "blas", "internal_api": "openblas", "version": "0.3.28", "num_threads": 3, "filepath": "/x"},
        {"user_api": "blas", "internal_api": "mkl", "version": "2024", "num_threads": None},
    ]
    monkeypatch.setitem(sys.modules, "threadpoolctl", fake)
    blas = measure.machine_info()["blas"]
    assert all("filepath" not in b for b in blas)
    md = _report_of_blas(blas)
    assert "openblas 0.3.28 (3 threads)" in md
    assert "mkl 2024 (threads unknown: threadpoolctl reported no thread count for this library)" in md
    assert "?" not in md.split("BLAS:", 1)[1].splitlines()[0]


@pytest.mark.parametrize("threads", [None, "4"])
def test_blas_threads_text_without_a_count_is_never_a_question_mark(threads):
    text = measure.blas_threads_text({"num_threads": threads})
    assert "?" not in text
    assert text == "threads unknown: no thread count recorded"
