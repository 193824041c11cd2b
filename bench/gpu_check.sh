#!/usr/bin/env bash
# One-command GPU check: GPU tests + fused-kernel benchmark, results written as files. No network needed.
#
# Run from anywhere on a machine with a CUDA GPU where numpy, cupy, pytest and hypothesis are installed (PyTorch and
# scipy optional); relpos_ref is used from this checkout through PYTHONPATH (no `pip install` needed):
#
#     bash bench/gpu_check.sh [OUTPUT_DIR]
#
# OUTPUT_DIR defaults to bench/results/<YYYY-MM-DD>-gpu (UTC; the time is appended if that exists). Written there:
# environment.txt (nvidia-smi, versions), stage logs, pytest JUnit XML, bench.json + bench.md (benchmark), and
# summary.md (stage status, timings, test counts, the benchmark table).
# Stages have their own time limits (seconds, overridable through the environment) and the script goes on after a
# failing stage; it exits non-zero if any stage failed. Default total: under 8 minutes.
#   T_WARM=90    parallel pre-compilation of the kernels into CuPy's cache (python -m relpos_ref.cuda._warm)
#   T_FUSED=200  pytest -m gpu tests/cuda/test_fused_gpu.py tests/cuda/test_fused_api.py (the thread-block cluster kernels
#                included, on compute capability 9.0+: they are otherwise off by default)
#   T_BENCH=80   bench/bench_fused.py
#   T_VERIFY=40  relpos-ref verify on numpy + cupy, then the oracle error-bound table on cupy
#   T_SUITE=110  the array-API unit/property/vector suite on CuPy (RELPOS_REF_BACKENDS=cupy, ids naming cupy;
#                Hypothesis profile "quick")
#   T_RPBENCH=60 relpos-ref bench --quick --gpu (NumPy vs CuPy unfused vs CuPy fused)
#   T_SANITIZER=25  compute-sanitizer memcheck on a few fused cases, only if compute-sanitizer exists and time is left
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-bench/results/$(date -u +%Y-%m-%d)-gpu}"
[ -z "${1:-}" ] && [ -e "$OUT" ] && OUT="bench/results/$(date -u +%Y-%m-%d-%H%M%S)-gpu"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
# One writable kernel cache shared by all stages (the warm stage fills it, the tests and the benchmark read it).
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-${TMPDIR:-/tmp}/relpos-ref-cupy-cache}"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-dev}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
T_WARM="${T_WARM:-90}"
T_FUSED="${T_FUSED:-200}"
T_BENCH="${T_BENCH:-80}"
T_SUITE="${T_SUITE:-110}"
T_VERIFY="${T_VERIFY:-40}"
T_RPBENCH="${T_RPBENCH:-60}"
T_SANITIZER="${T_SANITIZER:-25}"
START=$(date +%s)
FAILED=0
SUMMARY="$OUT/summary.md"
{
    echo "# GPU check $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo
    echo "Checkout: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (modified)')"
    echo
    echo "| stage | status | exit code | seconds | log |"
    echo "|---|---|---|---|---|"
} > "$SUMMARY"

# stage NAME LIMIT CMD...: run with a time limit (the whole process group is killed at the limit), log, record.
stage() {
    local name="$1" limit="$2"
    shift 2
    local log="$OUT/$name.log" t0 rc status
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee "$log"
    # timeout signals its whole process group at the limit, so worker processes (the warm stage) go too.
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    case "$rc" in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        5) status="NO TESTS SELECTED" ;;
        *) status=FAILED ;;
    esac
    [ "$rc" -ne 0 ] && FAILED=1
    echo "| $name | $status | $rc | $(( $(date +%s) - t0 )) | $(basename "$log") |" >> "$SUMMARY"
    tail -n 5 "$log"
    echo "== $name: $status (exit $rc)"
}

{
    echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
    echo; echo "## nvidia-smi -q (clocks, memory)"; nvidia-smi -q -d CLOCK,MEMORY,PERFORMANCE 2>&1 | head -n 80 || true
    echo; echo "## python"
    "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for m in ("numpy", "cupy", "scipy", "pytest", "hypothesis", "torch", "array_api_compat", "array_api_strict"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "unavailable:", type(exc).__name__, exc)
try:
    import cupy
    print("cupy.is_available", cupy.is_available())
    print("CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(), "driver", cupy.cuda.runtime.driverGetVersion())
    print("NVRTC", cupy.cuda.nvrtc.getVersion())
    print("device", cupy.cuda.runtime.getDeviceProperties(0)["name"])
except Exception as exc:
    print("cupy query failed:", type(exc).__name__, exc)
EOF
} > "$OUT/environment.txt" 2>&1

stage gpu_present 20 "$PY" -c "import cupy, sys; ok = cupy.is_available(); print('cupy.is_available():', ok); sys.exit(0 if ok else 3)"

stage warm "$T_WARM" "$PY" -m relpos_ref.cuda._warm --jobs "$(nproc)" --deadline $(( T_WARM - 20 ))

# Warnings stay visible in the logs but are not turned into errors here (the project's pytest config does that on
# CPU CI): a one-off hardware run should not be lost to, say, a CuPy environment warning.
WARN=(-W default::UserWarning -W default::DeprecationWarning -W default::FutureWarning -W default::RuntimeWarning)

stage fused_tests "$T_FUSED" "$PY" -m pytest -m gpu tests/cuda/test_fused_gpu.py tests/cuda/test_fused_api.py -p no:cacheprovider -q -rs "${WARN[@]}" \
    --junitxml="$OUT/pytest-fused.xml" -o junit_family=xunit2

stage verify "$T_VERIFY" bash -c "'$PY' -m relpos_ref.cli verify --backend numpy --backend cupy && '$PY' -m tools.bounds_table --backends cupy"

stage bench "$T_BENCH" "$PY" bench/bench_fused.py --out "$OUT/bench.json" --md "$OUT/bench.md" \
    --budget $(( T_BENCH - 25 ))

stage cupy_suite "$T_SUITE" env RELPOS_REF_BACKENDS=cupy HYPOTHESIS_PROFILE=quick "$PY" -m pytest tests -p no:cacheprovider -q -rs -k cupy "${WARN[@]}" \
    --ignore=tests/cuda/test_fused_gpu.py --ignore=tests/cuda/test_emulated.py --ignore=tests/cuda/test_host.py \
    --ignore=tests/cuda/test_compile.py --ignore=tests/cuda/test_fused_api.py --junitxml="$OUT/pytest-cupy-suite.xml" -o junit_family=xunit2

stage relpos_bench "$T_RPBENCH" "$PY" -m relpos_ref.cli bench --quick --gpu --no-progress --out "$OUT/relpos-bench"

if command -v compute-sanitizer > /dev/null 2>&1 && [ $(( $(date +%s) - START )) -lt $(( 465 - T_SANITIZER )) ]; then
    # CuPy's memory pool suballocates large blocks, which would hide out-of-bounds accesses from memcheck:
    # RELPOS_REF_NO_POOL=1 makes test_fused_gpu.py allocate every array with cudaMalloc.
    stage sanitizer "$T_SANITIZER" env RELPOS_REF_NO_POOL=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
        "$PY" -m pytest -m gpu tests/cuda/test_fused_gpu.py -p no:cacheprovider -q -x "${WARN[@]}" \
        -k "alibi-2x3x5x37-float32 or sandwich-1x2x3x4099 or t5_causal-1x2x2x40000-float32 or fire-2x4x1x1-float16 or small-alibi-1x2x3x999 or default-alibi-1x2x2x65536-float32"
else
    echo "| sanitizer | skipped (compute-sanitizer not found or no time left) | - | 0 | - |" >> "$SUMMARY"
fi

# Test counts from the JUnit files; a GPU test run where tests were skipped (no usable GPU) counts as a failure,
# except the cluster-kernel tests on a GPU older than compute capability 9.0 (their skip message says so).
"$PY" - "$OUT" >> "$SUMMARY" <<'EOF' || FAILED=1
import sys, xml.etree.ElementTree as ET
from pathlib import Path
bad = False
print("\n| pytest run | tests | failures | errors | skipped |\n|---|---|---|---|---|")
for f in sorted(Path(sys.argv[1]).glob("pytest-*.xml")):
    suites = ET.parse(f).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    skips = [e.get("message", "") for s in suites for e in s.iter("skipped")]
    pre_sm90 = sum("compute capability 9.0" in m for m in skips)
    note = f" ({pre_sm90} cluster tests: GPU older than sm_90)" if pre_sm90 else ""
    print(f"| {f.stem} | {n['tests']} | {n['failures']} | {n['errors']} | {n['skipped']}{note} |")
    bad |= n["failures"] > 0 or n["errors"] > 0 or n["tests"] == 0
    bad |= f.stem == "pytest-fused" and n["skipped"] > pre_sm90
sys.exit(1 if bad else 0)
EOF

{
    echo
    echo "Total: $(( $(date +%s) - START )) s. Overall: $([ "$FAILED" -eq 0 ] && echo PASS || echo FAIL)."
    if [ -f "$OUT/bench.md" ]; then echo; cat "$OUT/bench.md"; fi
} >> "$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
