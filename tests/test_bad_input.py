"""Bad input: every public function raises TypeError or ValueError whose message names the argument, says what was
expected and shows the value given; nothing else escapes (no IndexError, AttributeError, ZeroDivisionError, NumPy
warnings, which this suite turns into errors), and inputs are never modified.

Part 1 lists hand-written cases with the exact message expected. Part 2 is a Hypothesis fuzzer that replaces
arguments of valid calls with random objects, shapes, dtypes and option strings.
"""

from __future__ import annotations

import copy
import math
import re

import array_api_compat.numpy as np_compat
import array_api_strict as xs
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import relpos_ref as rp

F = np.float64


def arr(*shape, dtype=F, fill=1.0):
    return np.full(shape, fill, dtype=dtype)


def qkv(nb=1, nh=2, nkv=1, sq=3, sk=5, d=4, dv=4):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((nb, nh, sq, d)),
        rng.standard_normal((nb, nkv, sk, d)),
        rng.standard_normal((nb, nkv, sk, dv)),
    )


def fire(**kw):
    args = {"w1": arr(3, 1), "b1": arr(3), "w2": arr(2, 3), "b2": arr(2)}
    args.update(kw)
    return rp.FIRE(**args)


def att(**kw):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    args.update(kw)
    return rp.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def vjp(**kw):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v, "d_out": np.ones((*q.shape[:3], v.shape[3]))}
    args.update(kw)
    return rp.attention_vjp(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("d_out"), **args)


def softmax(**kw):
    args = {"scores": arr(2, 3)}
    args.update(kw)
    return rp.biased_softmax(args.pop("scores"), **args)


POS = rp.positions(3, 3)
WIDE = np.broadcast_to(np.int64(0), (2**28,))  # 2**28 positions in 8 bytes
ALIBI2 = rp.ALiBi(np.array([0.5, 0.25]))

# (id, call, exception, regex that must match the message: argument, expectation, value)
CASES = [
    # positions
    ("positions q_len 0", lambda: rp.positions(0, 2), ValueError, r"^q_len: expected an integer >= 1, got 0$"),
    ("positions k_len -3", lambda: rp.positions(2, -3), ValueError, r"^k_len: expected an integer >= 1, got -3$"),
    ("positions q_len float", lambda: rp.positions(2.0, 2), TypeError, r"^q_len: expected an integer, got 2\.0"),
    ("positions k_len bool", lambda: rp.positions(2, True), TypeError, r"^k_len: expected an integer, got True"),
    ("positions q_len str", lambda: rp.positions("3", 2), TypeError, r"^q_len: expected an integer, got '3'"),
    (
        "positions align",
        lambda: rp.positions(2, 2, align="bottom-right"),
        ValueError,
        r"^align: expected one of 'bottom_right', 'top_left', got 'bottom-right'$",
    ),
    ("positions align None", lambda: rp.positions(2, 2, align=None), ValueError, r"^align: expected one of .*got None"),
    (
        "positions xp str",
        lambda: rp.positions(2, 2, xp="numpy"),
        TypeError,
        r"^xp: expected an array namespace.*'numpy'",
    ),
    # relative offsets / causal mask
    (
        "offsets float",
        lambda: rp.relative_offsets(np.ones(2), np.arange(2)),
        TypeError,
        r"^q_pos: expected an integer dtype, got float64$",
    ),
    (
        "offsets bool",
        lambda: rp.relative_offsets(np.arange(2), np.ones(2, bool)),
        TypeError,
        r"^k_pos: expected an integer dtype, got bool$",
    ),
    (
        "offsets 2-D",
        lambda: rp.causal_mask(np.ones((2, 2), int), np.arange(2)),
        ValueError,
        r"^q_pos: expected a 1-dimensional array, got shape \(2, 2\)$",
    ),
    (
        "offsets empty",
        lambda: rp.causal_mask(np.arange(2), np.arange(0)),
        ValueError,
        r"^k_pos: expected a non-empty array, got shape \(0,\)$",
    ),
    (
        "offsets list",
        lambda: rp.relative_offsets([0, 1], np.arange(2)),
        TypeError,
        r"^q_pos: expected an array .*got list$",
    ),
    (
        "offsets two libraries",
        lambda: rp.relative_offsets(np.arange(2), xs.arange(2)),
        TypeError,
        r"^q_pos, k_pos: expected arrays from one array library, got arrays from \['array_api_strict', 'numpy'\]$",
    ),
    (
        "offsets xp mismatch",
        lambda: rp.relative_offsets(np.arange(2), np.arange(2), xp=xs),
        TypeError,
        r"^q_pos, k_pos: expected arrays of array_api_strict.*got arrays of .*numpy",
    ),
    # t5
    (
        "t5 delta float",
        lambda: rp.t5_bucket(np.ones(2), bidirectional=True),
        TypeError,
        r"^delta: expected an integer dtype, got float64$",
    ),
    (
        "t5 odd buckets",
        lambda: rp.t5_bucket(np.arange(2), bidirectional=True, num_buckets=31),
        ValueError,
        r"^num_buckets: expected an even integer >= 4 .*got 31$",
    ),
    (
        "t5 max_distance",
        lambda: rp.t5_bucket_thresholds(bidirectional=False, max_distance=16),
        ValueError,
        r"^max_distance: expected an integer > 16 .*got 16$",
    ),
    (
        "t5 layout",
        lambda: rp.T5Bias(arr(2, 32), bidirectional=True, layout="HB"),
        ValueError,
        r"^layout: expected one of 'heads_buckets', 'buckets_heads', got 'HB'$",
    ),
    (
        "t5 table 1-D",
        lambda: rp.T5Bias(arr(32), bidirectional=True, layout="heads_buckets"),
        ValueError,
        r"^table: expected a 2-dimensional array, got shape \(32,\)$",
    ),
    (
        "t5 table inf",
        lambda: rp.T5Bias(arr(2, 32, fill=np.inf), bidirectional=True, layout="heads_buckets"),
        ValueError,
        r"^table: expected finite values, got NaN or infinity in \[\[inf",
    ),
    # ALiBi
    ("slopes num_heads 0", lambda: rp.alibi_slopes(0), ValueError, r"^num_heads: expected an integer >= 1, got 0$"),
    ("slopes num_heads float", lambda: rp.alibi_slopes(2.5), TypeError, r"^num_heads: expected an integer, got 2\.5"),
    (
        "slopes dtype int",
        lambda: rp.alibi_slopes(4, dtype=np.int64),
        TypeError,
        r"^dtype: expected a real floating-point dtype, got .*int64",
    ),
    (
        "slopes dtype junk",
        lambda: rp.alibi_slopes(4, dtype="abc"),
        TypeError,
        r"^dtype: expected a real floating-point dtype, got 'abc'$",
    ),
    (
        "ALiBi negative slope in an array",
        lambda: rp.ALiBi(np.array([0.5, -0.25])),
        ValueError,
        r"^slopes: expected values >= 0 .*got \[ 0\.5 +-0\.25\]$",
    ),
    ("ALiBi negative slope", lambda: rp.ALiBi([-1.0]), ValueError, r"^slopes: expected values >= 0 .*got \[-1\.\]$"),
    (
        "ALiBi NaN slope",
        lambda: rp.ALiBi([math.nan]),
        ValueError,
        r"^slopes: expected finite values, got NaN or infinity in \[nan\]$",
    ),
    ("ALiBi inf slope", lambda: rp.ALiBi([math.inf]), ValueError, r"^slopes: expected finite values, .*\[inf\]$"),
    (
        "ALiBi 2-D",
        lambda: rp.ALiBi(arr(2, 1)),
        ValueError,
        r"^slopes: expected a 1-dimensional array, got shape \(2, 1\)$",
    ),
    ("ALiBi empty", lambda: rp.ALiBi([]), ValueError, r"^slopes: expected a non-empty array, got shape \(0,\)$"),
    (
        "ALiBi int array",
        lambda: rp.ALiBi(np.array([1, 2])),
        TypeError,
        r"^slopes: expected a real floating-point dtype, got int64$",
    ),
    (
        "ALiBi bool array",
        lambda: rp.ALiBi(np.array([True])),
        TypeError,
        r"^slopes: expected a real floating-point dtype, got bool$",
    ),
    (
        "ALiBi str",
        lambda: rp.ALiBi("0.5"),
        TypeError,
        r"^slopes: expected a floating-point array or real numbers, got '0\.5'$",
    ),
    (
        "ALiBi from_num_heads 0",
        lambda: rp.ALiBi.from_num_heads(0),
        ValueError,
        r"^num_heads: expected an integer >= 1, got 0$",
    ),
    # KERPLE
    ("power r1 0", lambda: rp.KerplePower([0.0], [1.0]), ValueError, r"^r1: expected values > 0, got \[0\.\]$"),
    (
        "power r1 negative",
        lambda: rp.KerplePower([-0.5], [1.0]),
        ValueError,
        r"^r1: expected values > 0, got \[-0\.5\]$",
    ),
    (
        "power r2 above 2",
        lambda: rp.KerplePower([1.0], [2.5]),
        ValueError,
        r"^r2: expected values in \(0, 2\.0\], got \[2\.5\]$",
    ),
    (
        "power r2 0",
        lambda: rp.KerplePower([1.0], [0.0]),
        ValueError,
        r"^r2: expected values in \(0, 2\.0\], got \[0\.\]$",
    ),
    ("power r2 NaN", lambda: rp.KerplePower([1.0], [math.nan]), ValueError, r"^r2: expected finite values, .*\[nan\]$"),
    (
        "power shapes",
        lambda: rp.KerplePower(arr(2), arr(3)),
        ValueError,
        r"^r2: expected the shape of r1 \(2,\) \(one value per head\), got \(3,\)$",
    ),
    (
        "power dtypes",
        lambda: rp.KerplePower(arr(2, dtype=np.float32), arr(2)),
        TypeError,
        r"^r2: expected the dtype of r1 \(float32\), got float64$",
    ),
    ("log r2 0", lambda: rp.KerpleLog([1.0], [0.0]), ValueError, r"^r2: expected values > 0, got \[0\.\]$"),
    ("log r2 negative", lambda: rp.KerpleLog([1.0], [-1.0]), ValueError, r"^r2: expected values > 0, got \[-1\.\]$"),
    ("log r1 0", lambda: rp.KerpleLog([0.0], [1.0]), ValueError, r"^r1: expected values > 0, got \[0\.\]$"),
    (
        "log 0-d",
        lambda: rp.KerpleLog(np.array(1.0), np.array(1.0)),
        ValueError,
        r"^r1: expected a 1-dimensional array, got shape \(\)$",
    ),
    # FIRE
    ("FIRE c 0", lambda: fire(c=0.0), ValueError, r"^c: expected values > 0, got 0\.0$"),
    ("FIRE c negative", lambda: fire(c=-0.1), ValueError, r"^c: expected values > 0, got -0\.1$"),
    ("FIRE L 0", lambda: fire(L=0.0), ValueError, r"^L: expected values > 0, got 0\.0$"),
    ("FIRE L NaN", lambda: fire(L=math.nan), ValueError, r"^L: expected finite values, got NaN or infinity in nan$"),
    ("FIRE eps negative", lambda: fire(eps=-1e-6), ValueError, r"^eps: expected a number >= 0, got -1e-06$"),
    ("FIRE eps NaN", lambda: fire(eps=math.nan), ValueError, r"^eps: expected a finite number, got nan$"),
    ("FIRE eps str", lambda: fire(eps="0"), TypeError, r"^eps: expected a real number, got '0' of type str$"),
    ("FIRE c 1-D", lambda: fire(c=arr(1)), ValueError, r"^c: expected a 0-dimensional array, got shape \(1,\)$"),
    ("FIRE w1 shape", lambda: fire(w1=arr(3, 2)), ValueError, r"^w1: expected shape \(3, 1\) .*got \(3, 2\)$"),
    ("FIRE b1 shape", lambda: fire(b1=arr(4)), ValueError, r"^b1: expected shape \(3,\) .*got \(4,\)$"),
    ("FIRE w2 shape", lambda: fire(w2=arr(2, 4)), ValueError, r"^w2: expected shape \(2, 3\) .*got \(2, 4\)$"),
    ("FIRE b2 shape", lambda: fire(b2=arr(3)), ValueError, r"^b2: expected shape \(2,\) .*got \(3,\)$"),
    (
        "FIRE w1 int",
        lambda: fire(w1=arr(3, 1, dtype=np.int64)),
        TypeError,
        r"^w1: expected a real floating-point dtype, got int64$",
    ),
    ("FIRE b2 NaN", lambda: fire(b2=arr(2, fill=np.nan)), ValueError, r"^b2: expected finite values, .*nan"),
    (
        "FIRE w2 other library",
        lambda: fire(w2=xs.ones((2, 3), dtype=xs.float64)),
        TypeError,
        r"^w2: expected arrays of .*numpy.*array_api_strict",
    ),
    # Sandwich
    ("Sandwich odd head_dim", lambda: rp.Sandwich(2, 7), ValueError, r"^head_dim: expected an even integer .*got 7$"),
    ("Sandwich head_dim 0", lambda: rp.Sandwich(2, 0), ValueError, r"^head_dim: expected an integer >= 2, got 0$"),
    ("Sandwich num_heads 0", lambda: rp.Sandwich(0, 8), ValueError, r"^num_heads: expected an integer >= 1, got 0$"),
    (
        "Sandwich dtype int",
        lambda: rp.Sandwich(2, 8, dtype=np.int32),
        TypeError,
        r"^dtype: expected a real floating-point dtype, got .*int32",
    ),
    # OffsetBias / TensorBias
    (
        "Offset even columns",
        lambda: rp.OffsetBias(arr(2, 4)),
        ValueError,
        r"^table: expected shape \(H, 2K\+1\) with an odd number of columns, got shape \(2, 4\)$",
    ),
    (
        "Offset 3-D",
        lambda: rp.OffsetBias(arr(2, 3, 3)),
        ValueError,
        r"^table: expected a 2-dimensional array, got shape \(2, 3, 3\)$",
    ),
    ("Offset NaN", lambda: rp.OffsetBias(arr(1, 3, fill=np.nan)), ValueError, r"^table: expected finite values"),
    (
        "Tensor 2-D",
        lambda: rp.TensorBias(arr(2, 2)),
        ValueError,
        r"^array: expected a 3-dimensional array, got shape \(2, 2\)$",
    ),
    (
        "Tensor NaN",
        lambda: rp.TensorBias(arr(1, 2, 2, fill=np.nan)),
        ValueError,
        r"^array: expected finite values or -inf .*got NaN or \+inf$",
    ),
    (
        "Tensor +inf",
        lambda: rp.TensorBias(arr(1, 2, 2, fill=np.inf)),
        ValueError,
        r"^array: expected finite values or -inf",
    ),
    (
        "Tensor lengths",
        lambda: rp.TensorBias(arr(1, 3, 3)).bias(*rp.positions(2, 3)),
        ValueError,
        r"^q_pos, k_pos: expected lengths \(3, 3\) .*got \(2, 3\)$",
    ),
    # family methods
    (
        "bias heads out of range",
        lambda: ALIBI2.bias(*POS, heads=[0, 2]),
        ValueError,
        r"^heads: expected head indices in \[0, 2\), got 2$",
    ),
    (
        "bias heads negative",
        lambda: ALIBI2.bias(*POS, heads=-1),
        ValueError,
        r"^heads: expected head indices in \[0, 2\), got -1$",
    ),
    (
        "bias heads float",
        lambda: ALIBI2.bias(*POS, heads=[0.0]),
        TypeError,
        r"^heads: expected an integer, got 0\.0 of type float$",
    ),
    (
        "bias heads empty",
        lambda: ALIBI2.bias(*POS, heads=[]),
        ValueError,
        r"^heads: expected at least one head index, got an empty sequence$",
    ),
    (
        "bias heads str",
        lambda: ALIBI2.bias(*POS, heads="0"),
        TypeError,
        r"^heads: expected an integer, got '0' of type str$",
    ),
    (
        "bias float positions",
        lambda: ALIBI2.bias(np.ones(3), np.arange(3)),
        TypeError,
        r"^q_pos: expected an integer dtype, got float64$",
    ),
    (
        # A NumPy family follows its positions' library; one whose parameters were put elsewhere does not.
        "bias positions of another library",
        lambda: ALIBI2.astype(xp=xs).bias(np.arange(3), np.arange(3)),
        TypeError,
        r"^q_pos, k_pos: expected arrays of array_api_strict.*got arrays of numpy$",
    ),
    (
        "bias float16 family, positions of a library without float16",
        lambda: rp.ALiBi([0.5], dtype=np.float16).bias(xs.arange(3), xs.arange(3)),
        TypeError,
        r"^q_pos: expected arrays of a library with the family's dtype float16 .*got arrays of array_api_strict",
    ),
    (
        "astype int",
        lambda: ALIBI2.astype(np.int64),
        TypeError,
        r"^dtype: expected a real floating-point dtype, got .*int64",
    ),
    ("astype xp str", lambda: ALIBI2.astype(xp="numpy"), TypeError, r"^xp: expected an array namespace.*'numpy'$"),
    # biased_softmax
    (
        "softmax int scores",
        lambda: softmax(scores=np.ones((2, 3), int)),
        TypeError,
        r"^scores: expected a real floating-point dtype, got int64$",
    ),
    (
        "softmax bool scores",
        lambda: softmax(scores=np.ones((2, 3), bool)),
        TypeError,
        r"^scores: expected a real floating-point dtype, got bool$",
    ),
    (
        "softmax complex scores",
        lambda: softmax(scores=np.ones(3, complex)),
        TypeError,
        r"^scores: expected a real floating-point dtype, got complex128$",
    ),
    (
        "softmax 0-d",
        lambda: softmax(scores=np.array(1.0)),
        ValueError,
        r"^scores: expected an array with at least one axis .*0-d array$",
    ),
    (
        "softmax empty",
        lambda: softmax(scores=arr(2, 0)),
        ValueError,
        r"^scores: expected a non-empty array, got shape \(2, 0\)$",
    ),
    ("softmax scores list", lambda: softmax(scores=[1.0, 2.0]), TypeError, r"^scores: expected an array .*got list$"),
    (
        "softmax bias shape",
        lambda: softmax(bias=arr(4)),
        ValueError,
        r"^bias: expected a shape broadcastable to \(2, 3\), got \(4,\)$",
    ),
    (
        "softmax bias larger",
        lambda: softmax(bias=arr(5, 2, 3)),
        ValueError,
        r"^bias: expected a shape broadcastable to \(2, 3\), got \(5, 2, 3\)$",
    ),
    (
        "softmax bias int",
        lambda: softmax(bias=np.ones(3, int)),
        TypeError,
        r"^bias: expected a real floating-point dtype, got int64$",
    ),
    ("softmax mask float", lambda: softmax(mask=arr(3)), TypeError, r"^mask: expected a boolean dtype, got float64$"),
    (
        "softmax mask shape",
        lambda: softmax(mask=np.ones((3, 2), bool)),
        ValueError,
        r"^mask: expected a shape broadcastable to \(2, 3\), got \(3, 2\)$",
    ),
    ("softmax scale 0", lambda: softmax(scale=0), ValueError, r"^scale: expected a number > 0, got 0\.0$"),
    ("softmax scale negative", lambda: softmax(scale=-1.5), ValueError, r"^scale: expected a number > 0, got -1\.5$"),
    ("softmax scale NaN", lambda: softmax(scale=math.nan), ValueError, r"^scale: expected a finite number, got nan$"),
    ("softmax scale inf", lambda: softmax(scale=math.inf), ValueError, r"^scale: expected a finite number, got inf$"),
    (
        "softmax scale str",
        lambda: softmax(scale="1"),
        TypeError,
        r"^scale: expected a real number, got '1' of type str$",
    ),
    (
        "softmax scale bool",
        lambda: softmax(scale=True),
        TypeError,
        r"^scale: expected a real number, got True of type bool$",
    ),
    (
        "softmax scale array",
        lambda: softmax(scale=np.array(1.0)),
        TypeError,
        r"^scale: expected a real number, got array\(1\.\) of type ndarray$",
    ),
    (
        "softmax placement",
        lambda: softmax(placement="post"),
        ValueError,
        r"^placement: expected one of 'post_scale', 'pre_scale', got 'post'$",
    ),
    (
        "softmax fully_masked",
        lambda: softmax(fully_masked="uniform"),
        ValueError,
        r"^fully_masked: expected one of 'zero', 'nan', got 'uniform'$",
    ),
    ("softmax return_lse", lambda: softmax(return_lse=1), TypeError, r"^return_lse: expected True or False, got 1$"),
    (
        "softmax two libraries",
        lambda: softmax(bias=xs.ones((2, 3), dtype=xs.float64)),
        TypeError,
        r"^scores, bias, mask: expected arrays from one array library, "
        r"got arrays from \['array_api_strict', 'numpy'\]$",
    ),
    (
        "softmax NaN score",
        lambda: softmax(scores=np.array([math.nan, 1.0])),
        ValueError,
        r"^scores: expected finite values or -inf on attended entries, got NaN or \+inf in \[nan +1\.\]$",
    ),
    (
        "softmax +inf bias",
        lambda: softmax(scores=arr(2), bias=np.array([math.inf, 0.0])),
        ValueError,
        r"^bias: expected finite values or -inf on attended entries, got NaN or \+inf in \[inf +0\.\]$",
    ),
    # attention
    (
        "attention q 3-D",
        lambda: att(q=arr(2, 3, 4)),
        ValueError,
        r"^q: expected a 4-dimensional array, got shape \(2, 3, 4\)$",
    ),
    (
        "attention v 5-D",
        lambda: att(v=arr(1, 1, 1, 5, 4)),
        ValueError,
        r"^v: expected a 4-dimensional array, got shape \(1, 1, 1, 5, 4\)$",
    ),
    (
        "attention q int",
        lambda: att(q=np.ones((1, 2, 3, 4), int)),
        TypeError,
        r"^q: expected a real floating-point dtype, got int64$",
    ),
    (
        "attention k bool",
        lambda: att(k=np.ones((1, 1, 5, 4), bool)),
        TypeError,
        r"^k: expected a real floating-point dtype, got bool$",
    ),
    (
        "attention q empty",
        lambda: att(q=arr(1, 2, 0, 4)),
        ValueError,
        r"^q: expected a non-empty array, got shape \(1, 2, 0, 4\)$",
    ),
    (
        "attention k dtype",
        lambda: att(k=qkv()[1].astype(np.float32)),
        TypeError,
        r"^k, v: expected the dtype of q \(float64\), got k float32 and v float64$",
    ),
    (
        "attention batch",
        lambda: att(k=arr(2, 1, 5, 4)),
        ValueError,
        r"^k, v: expected batch size 1 \(from q\), got 2 and 1$",
    ),
    (
        "attention v length",
        lambda: att(v=arr(1, 1, 4, 4)),
        ValueError,
        r"^v: expected \(H_kv, Sk\) = \(1, 5\) from k, got \(1, 4\)$",
    ),
    (
        "attention v heads",
        lambda: att(v=arr(1, 2, 5, 4)),
        ValueError,
        r"^v: expected \(H_kv, Sk\) = \(1, 5\) from k, got \(2, 5\)$",
    ),
    (
        "attention head dim",
        lambda: att(k=arr(1, 1, 5, 3)),
        ValueError,
        r"^k: expected head dim D = 4 \(from q\), got 3$",
    ),
    (
        "attention GQA",
        lambda: att(q=arr(1, 4, 3, 4), k=arr(1, 3, 5, 4), v=arr(1, 3, 5, 4)),
        ValueError,
        r"^k: expected a number of kv heads dividing the 4 query heads, got 3$",
    ),
    (
        "attention family heads",
        lambda: att(bias=rp.ALiBi.from_num_heads(4)),
        ValueError,
        r"^bias: expected a family with num_heads = 2 \(query heads of q\), got 4$",
    ),
    (
        "attention family library",
        lambda: att(bias=rp.ALiBi.from_num_heads(2, xp=xs)),
        TypeError,
        r"^bias: expected a family whose parameters live in .*numpy, got array_api_strict$",
    ),
    (
        "attention bias shape",
        lambda: att(bias=arr(3, 3)),
        ValueError,
        r"^bias: expected a shape broadcastable to \(1, 2, 3, 5\), got \(3, 3\)$",
    ),
    (
        "attention bias heads",
        lambda: att(bias=arr(3, 3, 5)),
        ValueError,
        r"^bias: expected a shape broadcastable to \(1, 2, 3, 5\), got \(3, 3, 5\)$",
    ),
    (
        "attention bias int",
        lambda: att(bias=np.ones((2, 3, 5), int)),
        TypeError,
        r"^bias: expected a real floating-point dtype, got int64$",
    ),
    (
        "attention bias NaN",
        lambda: att(bias=arr(2, 3, 5, fill=np.nan)),
        ValueError,
        r"^bias: expected finite values or -inf .*NaN or \+inf$",
    ),
    ("attention bias str", lambda: att(bias="alibi"), TypeError, r"^bias: expected an array .*got str$"),
    (
        "attention mask int",
        lambda: att(mask=np.ones((3, 5), int)),
        TypeError,
        r"^mask: expected a boolean dtype, got int64$",
    ),
    (
        "attention mask shape",
        lambda: att(mask=np.ones((5, 3), bool)),
        ValueError,
        r"^mask: expected a shape broadcastable to \(1, 2, 3, 5\), got \(5, 3\)$",
    ),
    ("attention causal", lambda: att(causal=1), TypeError, r"^causal: expected True or False, got 1$"),
    (
        "attention align",
        lambda: att(align="bottom"),
        ValueError,
        r"^align: expected one of 'bottom_right', 'top_left', got 'bottom'$",
    ),
    ("attention placement", lambda: att(placement=None), ValueError, r"^placement: expected one of .*got None$"),
    (
        "attention fully_masked",
        lambda: att(fully_masked="NaN"),
        ValueError,
        r"^fully_masked: expected one of 'zero', 'nan', got 'NaN'$",
    ),
    (
        "attention return_lse",
        lambda: att(return_lse=None),
        TypeError,
        r"^return_lse: expected True or False, got None$",
    ),
    ("attention scale 0", lambda: att(scale=0.0), ValueError, r"^scale: expected a number > 0, got 0\.0$"),
    ("attention block_size 0", lambda: att(block_size=0), ValueError, r"^block_size: expected an integer >= 1, got 0$"),
    (
        "attention block_size float",
        lambda: att(block_size=1.5),
        TypeError,
        r"^block_size: expected an integer, got 1\.5 of type float$",
    ),
    (
        "attention q NaN",
        lambda: att(q=arr(1, 2, 3, 4, fill=np.nan)),
        ValueError,
        r"^q: expected finite values, got NaN or infinity",
    ),
    (
        "attention v inf",
        lambda: att(v=arr(1, 1, 5, 4, fill=-np.inf)),
        ValueError,
        r"^v: expected finite values, got NaN or infinity",
    ),
    (
        "attention two libraries",
        lambda: att(k=xs.ones((1, 1, 5, 4), dtype=xs.float64)),
        TypeError,
        r"^q, k, v, bias, mask: expected arrays from one array library, "
        r"got arrays from \['array_api_strict', 'numpy'\]$",
    ),
    (
        "attention xp mismatch",
        lambda: att(xp=xs),
        TypeError,
        r"^q, k, v, bias, mask: expected arrays of array_api_strict",
    ),
]


CASES += [
    (
        "attention_vjp d_out shape",
        lambda: vjp(d_out=arr(1, 2, 3, 5)),
        ValueError,
        r"^d_out: expected the output's shape \(B, H, Sq, Dv\) = \(1, 2, 3, 4\), got \(1, 2, 3, 5\)$",
    ),
    (
        "attention_vjp d_out dtype",
        lambda: vjp(d_out=np.ones((1, 2, 3, 4), np.float32)),
        TypeError,
        r"^d_out: expected the dtype of q \(float64\), got float32$",
    ),
    ("attention_vjp d_out NaN", lambda: vjp(d_out=arr(1, 2, 3, 4, fill=math.nan)), ValueError, r"^d_out: expected"),
    ("attention_vjp d_out int", lambda: vjp(d_out=np.ones((1, 2, 3, 4), int)), TypeError, r"^d_out: expected"),
    (
        "attention_vjp d_lse shape",
        lambda: vjp(d_lse=arr(1, 2, 4)),
        ValueError,
        r"^d_lse: expected the lse's shape \(B, H, Sq\) = \(1, 2, 3\), got \(1, 2, 4\)$",
    ),
    ("attention_vjp d_lse inf", lambda: vjp(d_lse=arr(1, 2, 3, fill=math.inf)), ValueError, r"^d_lse: expected"),
    ("attention_vjp q NaN", lambda: vjp(q=arr(1, 2, 3, 4, fill=math.nan)), ValueError, r"^q: expected"),
    ("attention_vjp placement", lambda: vjp(placement="pre"), ValueError, r"^placement: expected one of"),
    (
        "bias_vjp d_bias shape",
        lambda: rp.ALiBi.from_num_heads(2).bias_vjp(POS[0], POS[1], arr(2, 3, 4)),
        ValueError,
        r"^d_bias: expected shape \(H, Sq, Sk\) = \(2, 3, 3\)",
    ),
    (
        "bias_vjp tensor positions",
        lambda: rp.TensorBias(arr(2, 3, 5)).bias_vjp(POS[0], rp.positions(3, 5)[1][:4], arr(2, 3, 4)),
        ValueError,
        r"^q_pos, k_pos: expected lengths \(3, 5\)",
    ),
    # issue 15, found by tools/adversarial.py: sizes of results checked before allocating (zero-stride positions of
    # 2**28 entries cost 8 bytes, their offsets 512 PiB: a MemoryError); an interpolant beyond the range.
    (
        "relative_offsets result beyond memory",
        lambda: rp.relative_offsets(WIDE, WIDE),
        ValueError,
        r"^q_pos, k_pos: expected sizes whose int64 offsets \(Sq, Sk\) fits the 8 GiB size limit, got shape "
        r"\(268435456, 268435456\) \(8-byte elements, 5\.369e\+08 GiB\)$",
    ),
    (
        "causal_mask result beyond memory",
        lambda: rp.causal_mask(WIDE, WIDE),
        ValueError,
        r"^q_pos, k_pos: expected sizes whose int64 offsets",
    ),
    (
        "family bias result beyond memory",
        lambda: rp.Sandwich(64, 8).bias(WIDE[: 2**15], WIDE[: 2**15]),
        ValueError,
        r"^q_pos, k_pos: expected sizes whose bias \(h, Sq, Sk\) fits the 8 GiB size limit, got shape "
        r"\(64, 32768, 32768\) \(8-byte elements, 512 GiB\)$",
    ),
    (
        "FIRE interpolant beyond float64",
        lambda: fire(c=1.0, L=3e-308),
        ValueError,
        r"^c, L: expected c, L and eps whose largest interpolant psi\(2\*\*63\) / \(psi\(L\) \+ eps\) is at most "
        r"4\.49e\+307 .*got c = 1\.0, L = 3e-308, eps = 0\.0, for which it is above 1\.8e\+308$",
    ),
]


@pytest.mark.parametrize(("call", "exc", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejected_with_message(call, exc, pattern):
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc
    assert re.search(pattern, str(info.value)), str(info.value)


def test_boundaries_accepted():
    # The edges of each constraint are valid: r2 = 2 (power), tiny positive values, eps = 0, K = 0, D = E + 1.
    rp.KerplePower([1e-300], [2.0])
    rp.KerpleLog([1e-300], [1e300])
    fire(c=1e-150, L=1e-150, eps=0.0)  # c * L = 1e-300 is still a normal number (issue 15)
    rp.OffsetBias(arr(1, 1))
    rp.T5Bias(arr(1, 32), bidirectional=True, max_distance=9, layout="heads_buckets")
    rp.Sandwich(1, 2)
    rp.ALiBi([1e-300])
    att(bias=arr(2, 3, 5, fill=-np.inf))  # -inf in an array bias is a mask: every row fully masked, no error
    softmax(scores=arr(3, fill=-np.inf))  # all -inf: a fully masked row
    softmax(scores=np.array([math.nan, 1.0]), mask=np.array([False, True]))  # NaN on a masked entry is ignored


# -- Part 2: fuzzing ------------------------------------------------------------------------------------------------

OPTION_STRINGS = [
    "bottom_right", "top_left", "post_scale", "pre_scale", "zero", "nan", "heads_buckets", "buckets_heads",
    "Bottom_Right", "top-left", "", "float32", "numpy", "uniform",
]  # fmt: skip
NP_DTYPES = [np.bool_, np.int8, np.int32, np.int64, np.uint8, np.uint64, np.float16, np.float32, np.float64,
             np.longdouble, np.complex128]  # fmt: skip


def _np_array(dtype, shape, seed, special):
    rng = np.random.default_rng(seed)
    values = rng.uniform(-3, 3, size=shape)
    if special and values.size:
        values.flat[seed % values.size] = (np.nan, np.inf, -np.inf, 0.0, 1e300)[seed % 5]
    if np.issubdtype(dtype, np.integer) or dtype is np.bool_:
        values = np.nan_to_num(values, nan=0.0, posinf=3.0, neginf=-3.0)
        return (
            np.clip(np.round(values), -3, 3).astype(dtype)
            if dtype is not np.uint8
            else np.abs(np.round(values) % 4).astype(dtype)
        )
    with np.errstate(over="ignore", invalid="ignore"):
        return values.astype(dtype)


np_arrays = st.builds(
    _np_array,
    dtype=st.sampled_from(NP_DTYPES),
    shape=st.lists(st.integers(0, 4), max_size=5).map(tuple),
    seed=st.integers(0, 2**16),
    special=st.booleans(),
)


def _to_strict(a):
    if a.dtype in (np.float16, np.longdouble):  # dtypes that array_api_strict lacks
        with np.errstate(over="ignore"):  # a long double 1e300 becomes inf in float32: junk either way
            return xs.asarray(a.astype(np.float32))
    return xs.asarray(a)


strict_arrays = np_arrays.map(_to_strict)


def _alternating(shape, top):
    """+top and -top in turn: partial sums of a gradient overflow although the exact sum may not."""
    a = np.full(shape, top)
    a.flat[1::2] = -top
    return a


def _families():
    return [
        rp.ALiBi.from_num_heads(2),
        rp.ALiBi.from_num_heads(2, xp=xs),
        rp.KerpleLog(arr(2), arr(2)),
        rp.Sandwich(4, 8),
        rp.TensorBias(arr(2, 3, 5)),
        rp.T5Bias(arr(2, 8), bidirectional=False, max_distance=10, layout="heads_buckets"),
    ]


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-4, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(OPTION_STRINGS),
    st.text(max_size=6),
    st.binary(max_size=3),
    st.complex_numbers(max_magnitude=3, allow_nan=False),
    st.lists(st.floats(-3, 3), max_size=4),
    st.lists(st.integers(-3, 3), max_size=4).map(tuple),
    st.lists(st.lists(st.floats(-3, 3), max_size=3), max_size=3),
    st.sampled_from([np.float64(1.5), np.int64(2), np.float32(0.25), np.bool_(True), object(), {}, {"a": 1}, math]),
    # issue 15: Python integers beyond float64 and int64, sizes beyond memory, bools inside lists, long double
    st.sampled_from([10**400, -(2**64), 2**63, 10**10, [True], [0.5, True], [10**400], np.longdouble, "gpu9"]),
    st.sampled_from(
        [np.float64, np.float32, np.float16, np.int32, np.bool_, xs.float32, xs.int64, "float64", ml_dtypes.bfloat16]
    ),
    st.sampled_from([np_compat, xs, np]),
    # issue 15 (tools/adversarial.py): zero-stride positions whose pairwise results exceed memory; cotangents of
    # the targets' shapes whose partial sums overflow (a NumPy overflow warning is an error here)
    st.sampled_from([np.broadcast_to(np.int64(7), (2**20,)), np.broadcast_to(np.int64(-2), (2**20,))]),
    st.sampled_from([_alternating((2, 3, 5), 1e308), _alternating((2, 3, 5), -3e38).astype(np.float32)]),
    st.sampled_from(_families()),
    np_arrays,
    strict_arrays,
)


def _fam():
    return rp.KerplePower(np.array([0.5, 1.0]), np.array([1.0, 1.5]))


# name -> (callable taking keyword arguments, valid keyword arguments)
TARGETS = {
    "positions": (rp.positions, {"q_len": 3, "k_len": 5, "align": "bottom_right", "xp": None}),
    "relative_offsets": (rp.relative_offsets, {"q_pos": np.arange(3), "k_pos": np.arange(5), "xp": None}),
    "causal_mask": (rp.causal_mask, {"q_pos": np.arange(3), "k_pos": np.arange(5), "xp": None}),
    "t5_bucket": (
        rp.t5_bucket,
        {"delta": np.arange(-3, 3), "bidirectional": True, "num_buckets": 8, "max_distance": 10, "xp": None},
    ),
    "t5_bucket_thresholds": (rp.t5_bucket_thresholds, {"bidirectional": False, "num_buckets": 8, "max_distance": 10}),
    "alibi_slopes": (rp.alibi_slopes, {"num_heads": 3, "dtype": None, "xp": None}),
    "ALiBi": (rp.ALiBi, {"slopes": np.array([0.5, 0.25]), "xp": None, "dtype": None}),
    "ALiBi.from_num_heads": (rp.ALiBi.from_num_heads, {"num_heads": 2, "dtype": None, "xp": None}),
    "T5Bias": (
        rp.T5Bias,
        {
            "table": arr(2, 8),
            "bidirectional": True,
            "max_distance": 10,
            "layout": "heads_buckets",
            "xp": None,
            "dtype": None,
        },
    ),
    "OffsetBias": (rp.OffsetBias, {"table": arr(2, 5), "xp": None, "dtype": None}),
    "KerplePower": (rp.KerplePower, {"r1": arr(2), "r2": arr(2), "xp": None, "dtype": None}),
    "KerpleLog": (rp.KerpleLog, {"r1": arr(2), "r2": arr(2), "xp": None, "dtype": None}),
    "FIRE": (
        rp.FIRE,
        {
            "w1": arr(3, 1),
            "b1": arr(3),
            "w2": arr(2, 3),
            "b2": arr(2),
            "c": 0.1,
            "L": 8.0,
            "eps": 0.0,
            "xp": None,
            "dtype": None,
        },
    ),
    "Sandwich": (rp.Sandwich, {"num_heads": 2, "head_dim": 8, "dtype": None, "xp": None}),
    "TensorBias": (rp.TensorBias, {"array": arr(2, 3, 5), "xp": None, "dtype": None}),
    "family.bias": (
        lambda q_pos, k_pos, heads: _fam().bias(q_pos, k_pos, heads=heads),
        {"q_pos": np.arange(3), "k_pos": np.arange(5), "heads": None},
    ),
    "TensorBias.bias": (
        lambda q_pos, k_pos, heads: rp.TensorBias(arr(2, 3, 5)).bias(q_pos, k_pos, heads=heads),
        {"q_pos": np.arange(3), "k_pos": np.arange(5), "heads": None},
    ),
    "family.astype": (lambda dtype, xp: _fam().astype(dtype, xp=xp), {"dtype": None, "xp": None}),
    "biased_softmax": (
        rp.biased_softmax,
        {
            "scores": arr(2, 3, 4),
            "bias": arr(3, 4),
            "mask": np.ones((3, 4), bool),
            "scale": 0.5,
            "placement": "post_scale",
            "fully_masked": "zero",
            "return_lse": True,
            "xp": None,
        },
    ),
    "attention": (
        rp.attention,
        {
            "q": qkv()[0],
            "k": qkv()[1],
            "v": qkv()[2],
            "bias": rp.ALiBi.from_num_heads(2),
            "causal": True,
            "align": "bottom_right",
            "scale": None,
            "placement": "post_scale",
            "mask": np.ones((3, 5), bool),
            "fully_masked": "zero",
            "return_lse": True,
            "block_size": 2,
            "xp": None,
        },
    ),
    "attention_vjp": (
        rp.attention_vjp,
        {
            "q": qkv()[0],
            "k": qkv()[1],
            "v": qkv()[2],
            "d_out": np.ones((1, 2, 3, 4)),
            "bias": rp.ALiBi.from_num_heads(2),
            "causal": True,
            "align": "bottom_right",
            "scale": None,
            "placement": "post_scale",
            "mask": np.ones((3, 5), bool),
            "fully_masked": "zero",
            "d_lse": np.zeros((1, 2, 3)),
            "block_size": 2,
            "kv_block_size": 2,
            "xp": None,
        },
    ),
    "family.bias_vjp": (
        lambda q_pos, k_pos, d_bias: _fam().bias_vjp(q_pos, k_pos, d_bias),
        {"q_pos": np.arange(3), "k_pos": np.arange(5), "d_bias": arr(2, 3, 5)},
    ),
}


def _snapshot(value):
    if isinstance(value, np.ndarray):
        return ("np", value.copy())
    if type(value).__module__.startswith("array_api_strict"):
        return ("xs", np.asarray(value).copy())
    if isinstance(value, list | dict):
        return ("py", copy.deepcopy(value))
    return None


def _unchanged(value, snap):
    kind, saved = snap
    if kind == "py":
        return value == saved or repr(value) == repr(saved)  # NaN != NaN in lists
    now = np.asarray(value)
    return (
        now.dtype == saved.dtype
        and now.shape == saved.shape
        and np.array_equal(now, saved, equal_nan=now.dtype.kind in "fc")
    )


@pytest.mark.parametrize("target", sorted(TARGETS))
@given(data=st.data())
def test_fuzz_only_type_or_value_errors(target, data):
    func, valid = TARGETS[target]
    names = sorted(valid)
    chosen = data.draw(st.sets(st.sampled_from(names), min_size=1, max_size=3), label="replaced")
    kwargs = dict(valid)
    for name in sorted(chosen):
        kwargs[name] = data.draw(junk, label=name)
    snaps = {k: _snapshot(v) for k, v in kwargs.items()}
    try:
        func(**kwargs)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        head, _, rest = message.partition(":")
        named = [n.strip() for n in head.split(",")]
        # The message starts with the argument(s) it is about, then says what was expected.
        assert named, message
        assert all(n in names for n in named), (  # noqa: PT017 (a call may also succeed: no pytest.raises)
            f"{type(exc).__name__}: {message!r} does not start with an argument of {names}"
        )
        assert "expected" in rest, message
    # Any other exception type (IndexError, AttributeError, ZeroDivisionError, warnings turned into errors, ...)
    # propagates and fails the test.
    for name, snap in snaps.items():
        if snap is not None:
            assert _unchanged(kwargs[name], snap), f"{target} modified its argument {name}"
