"""GGUF block quantization (ggml's Q8_0, Q5_0, Q4_1, Q4_0, Q4_K, Q6_K) in numpy, byte for byte.

Each ``quantize_*`` takes float32 rows whose length is a multiple of the block and returns the
packed blocks as uint8, laid out as ggml's ``block_q*`` structs (ggml-common.h); each
``dequantize_*`` reads them back to float32. The 32-blocks follow ``quantize_row_q*_ref`` as gguf-py
(``gguf.quants``) mirrors it. The K-quants follow llama.cpp's ``quantize_row_q4_K_ref`` /
``quantize_row_q6_K_ref`` (what ``llama-quantize`` runs without an importance matrix), whose
scale search accumulates float32 sums one element at a time: we do the same, element by element
and vectorized over blocks, so the float32 rounding, and the bytes, are the C code's.

Why not call gguf-py? It cannot quantize K-quants (it only dequantizes them), and the lab wants
the arithmetic on the page. ``nearest_int`` in ggml adds 1.5 * 2**23 to round, which is
round-half-to-even: ``np.rint`` in float32.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32


def _fp16_bytes(d: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> the fp16's two little-endian bytes (n, 2), rounded to nearest even."""
    return d.astype(np.float16).view(np.uint8).reshape(d.shape[0], 2)


def _fp16_from(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def _blocks(rows: np.ndarray, block: int) -> np.ndarray:
    x = np.ascontiguousarray(rows, dtype=F32)
    if x.ndim != 2 or x.shape[1] % block:
        raise ValueError(
            f"rows must be 2-D with a length that is a multiple of {block}, got {x.shape}"
        )
    return x.reshape(-1, block)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, as a C ``for`` loop does.

    ``np.add.accumulate`` is strictly sequential (unlike ``np.sum``, which sums pairwise), so
    its last column carries the C loop's exact rounding.
    """
    return np.add.accumulate(a.astype(F32, copy=False), axis=1)[:, -1]


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf, half away from zero, without the floor(a + 0.5) error at 0.49999997."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(F32(2) * (a - floored)))


# ---------------------------------------------------------------------- 32-element blocks


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d in float32, 0 where d is 0 (ggml's ``id = d ? 1.0f/d : 0.0f``)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def quantize_q8_0(rows: np.ndarray) -> np.ndarray:
    """Q8_0: d = max|x| / 127 (fp16), q = roundf(x / d) as int8. 34 bytes per 32 weights."""
    x = _blocks(rows, 32)
    d = np.abs(x).max(axis=1, keepdims=True) / F32(127)
    inv = _inverse(d)
    q = _roundf(x * inv).astype(np.int8).view(np.uint8)
    out = np.concatenate([_fp16_bytes(d), q], axis=1)
    return out.reshape(rows.shape[0], -1)


def dequantize_q8_0(blocks: np.ndarray, cols: int) -> np.ndarray:
    b = blocks.reshape(-1, 34)
    d = _fp16_from(b[:, :2])
    q = b[:, 2:].view(np.int8).astype(F32)
    return (q * d).reshape(-1, cols)


def _signed_max(x: np.ndarray) -> np.ndarray:
    """The element of largest magnitude in each block, sign kept (first one on ties)."""
    idx = np.abs(x).argmax(axis=1)[:, None]
    return np.take_along_axis(x, idx, axis=1)


def quantize_q4_0(rows: np.ndarray) -> np.ndarray:
    """Q4_0: d = max / -8 (signed extreme), q = min(15, trunc(x / d + 8.5)). 18 bytes per 32."""
    x = _blocks(rows, 32)
    d = _signed_max(x) / F32(-8)
    inv = _inverse(d)
    q = np.trunc(x * inv + F32(8.5)).astype(np.uint8).clip(0, 15)
    q = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([_fp16_bytes(d), q], axis=1).reshape(rows.shape[0], -1)


def dequantize_q4_0(blocks: np.ndarray, cols: int) -> np.ndarray:
    b = blocks.reshape(-1, 18)
    d = _fp16_from(b[:, :2])
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return (d * q.astype(F32)).reshape(-1, cols)


def quantize_q4_1(rows: np.ndarray) -> np.ndarray:
    """Q4_1: d = (max - min) / 15 and m = min (both fp16), q = min(15, trunc((x - min) / d + 0.5)).

    The affine 32-block (a scale and an offset, no sign): 20 bytes per 32 weights. The codes are
    rounded against the float32 d, not its fp16 copy, as ``quantize_row_q4_1_ref`` does.
    """
    x = _blocks(rows, 32)
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / F32(15)
    inv = _inverse(d)
    q = np.trunc((x - lo) * inv + F32(0.5)).astype(np.uint8).clip(0, 15)
    q = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), q], axis=1).reshape(rows.shape[0], -1)


def dequantize_q4_1(blocks: np.ndarray, cols: int) -> np.ndarray:
    b = blocks.reshape(-1, 20)
    d = _fp16_from(b[:, :2])
    m = _fp16_from(b[:, 2:4])
    qs = b[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(F32)
    return (d * q + m).reshape(-1, cols)


def quantize_q5_0(rows: np.ndarray) -> np.ndarray:
    """Q5_0: d = max / -16, q = min(31, trunc(x / d + 16.5)); 5th bits packed in a uint32."""
    x = _blocks(rows, 32)
    d = _signed_max(x) / F32(-16)
    inv = _inverse(d)
    q = np.trunc(x * inv + F32(16.5)).astype(np.uint8).clip(0, 31)
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << np.uint8(4))
    high = (q >> 4).astype(np.uint32)  # bit j of qh is the 5th bit of element j
    qh = (high << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    qh_bytes = qh.astype("<u4").view(np.uint8).reshape(-1, 4)
    return np.concatenate([_fp16_bytes(d), qh_bytes, qs], axis=1).reshape(rows.shape[0], -1)


def dequantize_q5_0(blocks: np.ndarray, cols: int) -> np.ndarray:
    b = blocks.reshape(-1, 22)
    d = _fp16_from(b[:, :2])
    qh = np.ascontiguousarray(b[:, 2:6]).view("<u4").astype(np.uint32)
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    qs = b[:, 6:]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(16)
    return (d * q.astype(F32)).reshape(-1, cols)


# ---------------------------------------------------------------------- K-quant helpers


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants (use_mad=false) for many blocks at once: x, w are (nb, n).

    Fits x ~ scale * L + min with L in [0, nmax] and min <= 0: starts from the min/max fit, then
    tries nstep+1 inverse scales (rmin + rdelta*step + nmax) / (max - min), each solved by
    weighted least squares, keeping the best. As in C, a winning step moves ``min``, and later
    steps measure from it. Returns (scale, -min, L). Sums run element by element in float32.
    """
    nb, n = x.shape
    xmax = x.max(axis=1)
    xmin = np.minimum(x.min(axis=1), F32(0))
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = xmax == xmin
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(nmax) / (xmax - xmin)
        scale = F32(1) / iscale
        L = np.clip(np.rint(iscale[:, None] * (x - xmin[:, None])), 0, nmax).astype(F32)
    diff = scale[:, None] * L + xmin[:, None] - x
    best = _seqsum(w * (diff * diff))
    cur_min = xmin.copy()
    for step in range(nstep + 1):
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (xmax - cur_min)
            la = np.rint(iscale[:, None] * (x - cur_min[:, None]))
        la = np.clip(np.nan_to_num(la), 0, nmax).astype(F32)
        wl = w * la
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * la)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = (D > 0) & ~flat
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        this_min = np.where(pos, F32(0), this_min)
        diff = this_scale[:, None] * la + this_min[:, None] - x
        cur = _seqsum(w * (diff * diff))
        better = ok & (cur < best)
        L = np.where(better[:, None], la, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        cur_min = np.where(better, this_min, cur_min)
    scale = np.where(flat, F32(0), scale).astype(F32)
    L = np.where(flat[:, None], F32(0), L)
    return scale, (-cur_min).astype(F32), L


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) for many blocks: x is (nb, n).

    Symmetric: L in [-nmax, nmax-1] around the signed extreme, weights x**2, 19 inverse scales
    -(nmax + 0.1*is) / max tried, best weighted fit kept. Returns (scale, L + nmax).
    """
    nb, n = x.shape
    vmax = _signed_max(x)[:, 0]
    zero = np.abs(vmax) < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), vmax)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
        wx = x * x
        return lv, _seqsum(wx * x * lv), _seqsum(wx * lv * lv)

    L, sumlx, suml2 = fit(F32(-nmax) / safe_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = fit(-(F32(nmax) + F32(0.1) * F32(step)) / safe_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = sumlx / suml2
        L = np.where(better[:, None], lv, L)
        scale = np.where(better, new_scale, scale).astype(F32)
        best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero[:, None], F32(0), L + F32(nmax))
    return scale, L


def _scale_min_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K's 12 bytes into 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    q = packed.astype(np.uint8)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


# ---------------------------------------------------------------------- Q4_K


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """Q4_K (quantize_row_q4_K_ref): 256-weight super-blocks of 8 sub-blocks of 32.

    Each sub-block gets an affine fit (scale, min) by make_qkx2_quants with weights
    rms(x) + |x|; the 8 scales and 8 mins are themselves quantized to 6 bits against fp16
    super-scales d and dmin; then every weight is re-rounded against its final 4-bit grid.
    144 bytes: d, dmin (fp16), 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles.
    """
    x = _blocks(rows, QK_K)
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    sum_x2 = _seqsum(sub * sub)
    av_x = np.sqrt(sum_x2 / F32(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = _make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, QK_K)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(np.rint(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(np.rint(inv_min[:, None] * mins), 63).astype(np.uint8)
    packed = np.zeros((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    sc, mn = _scale_min_k4(packed)
    d = d16.astype(F32)[:, None] * sc.astype(F32)
    dm = dmin16.astype(F32)[:, None] * mn.astype(F32)
    d_full = np.repeat(d, 32, axis=1)
    dm_full = np.repeat(dm, 32, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint((x + dm_full) / d_full), 0, 15)
    L = np.where(d_full != 0, requant, L).astype(np.uint8)
    chunks = L.reshape(nb, 4, 2, 32)  # 4 groups of 64: low nibble = first 32, high = next 32
    qs = (chunks[:, :, 0, :] | (chunks[:, :, 1, :] << np.uint8(4))).reshape(nb, 128)
    out = np.concatenate(
        [
            _fp16_bytes(d16.astype(F32)[:, None]),
            _fp16_bytes(dmin16.astype(F32)[:, None]),
            packed,
            qs,
        ],
        axis=1,
    )
    return out.reshape(rows.shape[0], -1)


def dequantize_q4_k(blocks: np.ndarray, cols: int) -> np.ndarray:
    b = blocks.reshape(-1, 144)
    nb = b.shape[0]
    d = _fp16_from(b[:, 0:2])
    dmin = _fp16_from(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:].reshape(nb, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32).astype(F32)
    dl = (d * sc.astype(F32))[:, :, None]
    ml = (dmin * mn.astype(F32))[:, :, None]
    return (dl * q - ml).reshape(-1, cols)


# ---------------------------------------------------------------------- Q6_K


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """Q6_K (quantize_row_q6_K_ref): 16 sub-blocks of 16 weights, symmetric 6-bit.

    Each sub-block's scale comes from make_qx_quants (rmse_type 1); the 16 scales are stored as
    int8 against one fp16 d = max_scale / -128; weights are re-rounded to [-32, 31].
    210 bytes: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, fp16 d.
    """
    x = _blocks(rows, QK_K)
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, L = _make_qx_quants_rmse1(sub, 32)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, QK_K)
    imax = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, imax, axis=1)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / np.where(empty, F32(1), max_scale)
        d16 = np.where(empty, F32(0), F32(1) / iscale).astype(np.float16)
    sc = np.minimum(np.rint(iscale[:, None] * scales), 127).astype(np.int8)
    sc = np.where(empty[:, None], np.int8(0), sc)
    d = d16.astype(F32)[:, None] * sc.astype(F32)
    d_full = np.repeat(d, 16, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint(x / d_full), -32, 31) + 32
    L = np.where(d_full != 0, requant, L)
    L = np.where(empty[:, None], F32(0), L).astype(np.uint8)
    halves = L.reshape(nb, 2, 4, 32)  # 2 halves of 128, each 4 runs of 32
    low = halves & 0x0F
    ql = np.concatenate(
        [
            low[:, :, 0] | (low[:, :, 2] << np.uint8(4)),
            low[:, :, 1] | (low[:, :, 3] << np.uint8(4)),
        ],
        axis=2,
    ).reshape(nb, 128)
    high = halves >> 4
    qh = (
        (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
        .astype(np.uint8)
        .reshape(nb, 64)
    )
    out = np.concatenate([ql, qh, sc.view(np.uint8), _fp16_bytes(d16.astype(F32)[:, None])], axis=1)
    return out.reshape(rows.shape[0], -1)


def dequantize_q6_k(blocks: np.ndarray, cols: int) -> np.ndarray:
    b = blocks.reshape(-1, 210)
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 64)
    qh = b[:, 128:192].reshape(nb, 2, 32)
    sc = b[:, 192:208].view(np.int8).astype(F32).reshape(nb, 16)
    d = _fp16_from(b[:, 208:210])
    lo = np.stack(
        [ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], 2
    )
    hi = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = (lo | (hi << 4)).astype(np.int8).astype(F32) - F32(32)  # (nb, 2, 4, 32)
    q = q.reshape(nb, 16, 16)
    return (d[:, :, None] * sc[:, :, None] * q).reshape(-1, cols)


QUANTIZE = {
    "Q8_0": quantize_q8_0,
    "Q5_0": quantize_q5_0,
    "Q4_1": quantize_q4_1,
    "Q4_0": quantize_q4_0,
    "Q4_K": quantize_q4_k,
    "Q6_K": quantize_q6_k,
}
DEQUANTIZE = {
    "Q8_0": dequantize_q8_0,
    "Q5_0": dequantize_q5_0,
    "Q4_1": dequantize_q4_1,
    "Q4_0": dequantize_q4_0,
    "Q4_K": dequantize_q4_k,
    "Q6_K": dequantize_q6_k,
}


def quantize(rows: np.ndarray, gguf_type: str) -> np.ndarray:
    """Pack float32 rows (n_rows, cols) into ggml blocks of ``gguf_type``: uint8 (n_rows, bytes)."""
    if gguf_type not in QUANTIZE:
        raise ValueError(f"gguf_type must be one of {sorted(QUANTIZE)}, got {gguf_type!r}")
    return QUANTIZE[gguf_type](np.asarray(rows, dtype=F32))


def dequantize(blocks: np.ndarray, gguf_type: str, cols: int) -> np.ndarray:
    """Read ggml blocks back to float32 rows (n_rows, cols)."""
    if gguf_type not in DEQUANTIZE:
        raise ValueError(f"gguf_type must be one of {sorted(DEQUANTIZE)}, got {gguf_type!r}")
    return DEQUANTIZE[gguf_type](np.ascontiguousarray(blocks, dtype=np.uint8), cols)
