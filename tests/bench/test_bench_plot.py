"""``relpos-ref bench`` and ``relpos-ref plot``: accounting formulas, timing and memory mechanics, output files.

Expected values are independent of the code under test: FLOP counts written out by hand, attended pairs counted by
brute force, sleeps and allocations of known duration and size, the ALiBi formula with the official slopes.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from relpos_ref import bench
from relpos_ref.cli import main

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_mpl = pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed (the 'plot' extra)")
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (the 'peers' extra)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_config(**kw):
    base = {
        "families": ("alibi", "t5"),
        "backends": ("numpy",),
        "seq_lens": (16, 32),
        "decode_lens": (48,),
        "heads": 2,
        "head_dim": 8,
        "reps": 2,
        "budget_s": 1.0,
        "targets": False,
        "progress": False,
        "roofline_gemm_n": 64,
        "roofline_copy_mib": 1,
    }
    base.update(kw)
    return bench.BenchConfig(**base)


# -- accounting --------------------------------------------------------------------------------------------------------


def test_flops_of_the_issue_target_shape():
    # 4 * B * H * S * S * D / 2 with B=1, H=8, S=4096, D=64, multiplied out by hand.
    assert bench.attention_flops(bench.Shape(1, 8, 8, 4096, 4096, 64)) == 17_179_869_184.0


@pytest.mark.parametrize(("sq", "sk"), [(1, 1), (1, 7), (3, 7), (5, 5), (7, 3), (1, 4096)])
def test_attended_pairs_brute_force(sq, sk):
    # Bottom-right: query i sits at position sk - sq + i and sees keys at positions <= its own.
    count = sum(1 for i in range(sq) for j in range(sk) if j <= sk - sq + i)
    assert bench.attended_pairs(bench.Shape(1, 1, 1, sq, sk, 4)) == count
    assert bench.attended_pairs(bench.Shape(1, 1, 1, sq, sk, 4, causal=False)) == sq * sk


def test_decode_flops_and_bytes():
    shape = bench.Shape(2, 8, 2, 1, 1000, 64)
    assert shape.kind == "decode"
    assert bench.attention_flops(shape) == 4 * 2 * 8 * 64 * 1000
    # float32: q (2*8*1*64) + out (same) + K and V (2 * 2*2*1000*64), 4 bytes each.
    assert bench.min_bytes(shape, 4) == 4 * (2 * 2 * 8 * 64 + 2 * 2 * 2 * 1000 * 64)


# -- timing and memory mechanics ---------------------------------------------------------------------------------------


def _runner(fn):
    return bench.Runner(fn=fn, device="cpu", to_host=np.asarray, peak_memory=lambda: (None, ""))


def test_measure_times_a_known_sleep():
    m = bench.measure(_runner(lambda: time.sleep(0.01)), warmup=1, reps=4, budget_s=10.0)
    assert m["reps"] == 4
    assert len(m["times_s"]) == 4
    assert 0.01 <= m["min_s"] <= m["median_s"] <= m["max_s"] < 1.0


def test_measure_cuts_repetitions_to_the_budget_but_keeps_three():
    m = bench.measure(_runner(lambda: time.sleep(0.02)), warmup=1, reps=50, budget_s=0.05)
    assert m["reps"] == 3


def test_tracemalloc_peak_sees_numpy_temporaries():
    def fn():
        a = np.ones(1 << 20)  # 8 MiB
        return a * 2.0  # another 8 MiB while a is alive

    peak, method = bench._tracemalloc_peak(fn)
    assert 16 * bench.MiB <= peak < 17 * bench.MiB
    assert "tracemalloc" in method


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)),
    reason="needs Linux /proc/self/clear_refs to reset the peak resident set size",
)
def test_subprocess_rss_agrees_with_tracemalloc():
    # Two independent measurements of the same call: resident-set growth in a fresh process and tracemalloc's count
    # of NumPy buffers. They must agree to within a few MiB of interpreter noise.
    spec = {
        "backend": "numpy",
        "family": "alibi",
        "shape": bench.Shape(1, 4, 4, 512, 512, 32).as_dict(),
        "dtype": "float32",
        "tracemalloc": True,
        # One tile covering the whole problem, so the call allocates a known-large logits array whatever the default
        # block sizes are.
        "attn_kwargs": {"block_size": 512, "kv_block_size": 512},
    }
    res = bench.memory_probe(spec, timeout_s=120)
    assert res["status"] == "ok", res
    rss, tm = res["peak_extra_bytes"], res["tracemalloc_peak_bytes"]
    assert tm >= 4 * bench.MiB  # the logits tile alone: 4 heads x 512 x 512 float32
    assert abs(rss - tm) <= max(4 * bench.MiB, 0.25 * tm), (rss, tm)
    assert res["process_peak_rss_bytes"] >= res["rss_before_bytes"]


def test_progress_lines_on_a_non_terminal():
    stream = io.StringIO()
    prog = bench.Progress(2, stream=stream)
    prog.show("running a", transient=True)  # not shown on a non-terminal
    prog.step("a done")
    prog.step("b done")
    prog.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "1/2" in lines[0]
    assert "a done" in lines[0]
    assert "2/2" in lines[1]


# -- the matrix and its outputs ----------------------------------------------------------------------------------------


def _check_result(result, cfg):
    assert result["schema"] == bench.SCHEMA
    rows = result["results"]
    shapes = cfg.shapes()
    assert len(rows) == len(shapes) * len(cfg.families) * len(result["backends"])
    for r in rows:
        assert r["status"] == "ok", r
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert len(r["times_s"]) == r["reps"] >= 1
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["median_s"])
        assert r["roofline_fraction"] == pytest.approx(
            r["flops_per_s"] / result["rooflines"]["cpu"]["gemm_flops_per_s"]
        )
    assert {r["kind"] for r in rows} == {"prefill", "decode"}
    assert result["rooflines"]["cpu"]["gemm_flops_per_s"] > 0
    assert result["machine"]["libraries"]["numpy"] == np.__version__


def test_run_bench_numpy_rows_and_memory():
    cfg = _tiny_config()
    result = bench.run_bench(cfg)
    _check_result(result, cfg)
    for r in result["results"]:
        # Every call allocates at least its output (tracemalloc counts NumPy buffers).
        assert r["peak_extra_bytes"] >= r["output_bytes"] > 0
        assert r["error_reference"] == "self"


def test_machine_info_names_no_paths():
    text = json.dumps(bench.machine_info())
    for marker in ("/home/", "/usr/", "/opt/", "site-packages", "\\\\"):
        assert marker not in text


@needs_torch
def test_sdpa_backend_agrees_with_the_reference():
    cfg = _tiny_config(backends=("numpy", "sdpa-cpu"), families=("alibi", "fire", "sandwich"), kv_heads=1)
    result = bench.run_bench(cfg)
    _check_result(result, cfg)
    sdpa = [r for r in result["results"] if r["backend"] == "sdpa-cpu"]
    assert len(sdpa) == 9
    for r in sdpa:
        assert r["error_reference"] == "numpy"
        assert r["max_abs_err"] < 1e-5, r


def test_cli_bench_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "bench",
            "--families", "alibi,kerple_log",
            "--backends", "numpy",
            "--seq-lens", "16,32",
            "--decode-lens", "64",
            "--heads", "2",
            "--head-dim", "8",
            "--reps", "2",
            "--no-targets",
            "--no-plots",
            "--no-progress",
            "--gemm-n", "64",
            "--copy-mib", "1",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert len(result["results"]) == 2 * 3
    assert result["config"]["seq_lens"] == [16, 32]
    md = (out / "results.md").read_text()
    assert "| family | kind | shape | backend | median ms" in md
    assert md.count("| alibi |") == 3
    assert md.count("| kerple_log |") == 3
    assert "| family |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--families", "alibi,nope"], "--families"),
        (["--backends", "torch"], "--backends"),
        (["--heads", "8", "--kv-heads", "3"], "--kv-heads"),
        (["--seq-lens", "16,x"], "comma-separated integers"),
    ],
)
def test_cli_bench_rejects_bad_options(tmp_path, capsys, args, needle):
    assert main(["bench", *args, "--no-progress", "--out", str(tmp_path)]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@needs_mpl
def test_bench_plots_are_png(tmp_path):
    result = bench.run_bench(_tiny_config())
    paths = bench.write_outputs(result, str(tmp_path))
    names = {os.path.basename(p) for p in paths}
    assert {"results.json", "results.md", "time_vs_seqlen.png", "roofline.png"} <= names
    for p in paths:
        if p.endswith(".png"):
            with open(p, "rb") as f:
                assert f.read(8) == PNG_MAGIC


# -- plot --------------------------------------------------------------------------------------------------------------


def test_penalty_helper_reproduces_alibi_formula():
    from relpos_ref import plot

    fam = plot.illustrative_family("alibi", 8)
    d = np.arange(0, 100)
    got = plot.penalty(fam, d)
    # Official slopes for 8 heads: 2**-1, ..., 2**-8; b = -m |Delta| exactly in float64.
    want = -np.array([2.0 ** -(h + 1) for h in range(8)])[:, None] * d[None, :]
    np.testing.assert_array_equal(got, want)


def test_fire_plot_input_matches_family():
    # The FIRE figure plots b against x = log1p(c D) / log1p(c max(L, i)); the family at query i must equal the MLP
    # evaluated at that x (computed here from the parameters with plain NumPy).
    from relpos_ref import plot

    fam = plot.illustrative_family("fire", 3)
    p = {k: np.asarray(v) for k, v in fam.parameters().items()}
    for i_pos in (100, 2000):
        d = np.arange(0, i_pos + 1)
        x = np.log1p(p["c"] * d) / np.log1p(p["c"] * max(float(p["L"]), i_pos))
        hidden = np.maximum(p["w1"][:, 0][None, :] * x[:, None] + p["b1"][None, :], 0.0)
        want = (hidden @ p["w2"].T + p["b2"][None, :]).T
        np.testing.assert_allclose(plot.penalty(fam, d, query_pos=i_pos), want, rtol=1e-12, atol=1e-12)


@needs_mpl
def test_cli_plot_writes_png_and_svg(tmp_path, capsys):
    rc = main(
        [
            "plot",
            "--out", str(tmp_path),
            "--families", "alibi,t5",
            "--heads", "3",
            "--max-offset", "64",
            "--heatmap-len", "12",
            "--dpi", "40",
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out.split()
    expected = {"penalty_curves.png", "penalty_curves.svg", "heatmaps.png"}
    for f in ("alibi", "t5"):
        expected |= {f"penalty_{f}.png", f"penalty_{f}.svg", f"heatmap_{f}.png"}
    assert {os.path.basename(p) for p in printed} == expected
    for name in expected:
        path = tmp_path / name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC
        else:
            root = ET.parse(path).getroot()
            assert root.tag.endswith("svg")


@needs_mpl
def test_cli_plot_rejects_unknown_family(tmp_path, capsys):
    assert main(["plot", "--out", str(tmp_path), "--families", "rope"]) == 2
    assert "families" in capsys.readouterr().err


def test_missing_matplotlib_names_the_plot_extra(tmp_path, capsys, monkeypatch):
    from relpos_ref import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"relpos_ref\[plot\]"):
        plot.require_matplotlib()
    assert main(["plot", "--out", str(tmp_path)]) == 2
    assert "relpos_ref[plot]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bench_without_matplotlib_still_writes_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    args = ["bench", "--families", "alibi", "--backends", "numpy", "--seq-lens", "16", "--decode-lens", ""]
    assert (
        main(
            [
                *args,
                "--heads",
                "1",
                "--head-dim",
                "4",
                "--reps",
                "1",
                "--no-targets",
                "--gemm-n",
                "64",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "relpos_ref[plot]" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]
    assert math.isfinite(json.loads((out / "results.json").read_text())["results"][0]["median_s"])


@pytest.mark.skipif(
    any(bench.backend_status(b) is None for b in bench.GPU_BACKENDS), reason="a GPU backend can run here"
)
def test_gpu_flag_without_a_gpu_fails_before_measuring(tmp_path, capsys):
    assert main(["bench", "--quick", "--gpu", "--no-progress", "--out", str(tmp_path / "gpu")]) == 2
    err = capsys.readouterr().err
    assert "--gpu: no GPU backend can run here" in err
    assert "cupy" in err
    assert not (tmp_path / "gpu").exists()
