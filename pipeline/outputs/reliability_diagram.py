"""Reliability diagram of slide probabilities as a PNG (drawn with OpenCV; matplotlib is not a dependency)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.core.io import atomic_write_bytes
from pipeline.core.validation import as_binary_labels, as_probabilities
from pipeline.evaluation.reliability import bin_index, reliability_curve

# --------------------------------------------------------------------------------------------
# reliability diagram (OpenCV)
# --------------------------------------------------------------------------------------------
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK = (0, 0, 0)
_GREY = (150, 150, 150)
_LIGHT = (228, 228, 228)
_BAR = (226, 186, 120)  # BGR light blue
_BAR_EDGE = (160, 110, 40)
_GAP = (90, 90, 220)  # BGR red-ish
_POINT = (40, 40, 40)


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    return (
        text.replace("µ", "u")
        .replace("—", "-")
        .replace("–", "-")
        .replace("≥", ">=")
        .replace("≤", "<=")
        .encode("ascii", "replace")
        .decode("ascii")
    )


def _put(
    img: np.ndarray,
    text: str,
    org: tuple[int, int],
    scale: float = 0.55,
    color=_BLACK,
    thick: int = 1,
    anchor: str = "left",
) -> None:
    text = _ascii(text)
    (w, h), _ = cv2.getTextSize(text, _FONT, scale, thick)
    x, y = org
    if anchor == "center":
        x -= w // 2
    elif anchor == "right":
        x -= w
    cv2.putText(img, text, (int(x), int(y)), _FONT, scale, color, thick, cv2.LINE_AA)


def _wilson(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    if n <= 0:
        return 0.0, 1.0
    ph = k / n
    den = 1 + z * z / n
    centre = (ph + z * z / (2 * n)) / den
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def render_reliability_diagram(
    probs: Any, y: Any, n_bins: int = 10, title: str = "Reliability diagram", strategy: str = "uniform", size: int = 900
) -> np.ndarray:
    """Reliability diagram as a BGR uint8 image (size x size).

    Bars: observed frequency of positives per bin (bin width on the x axis); black dot: the mean
    predicted probability of the bin at its observed frequency, with a 95% Wilson interval;
    red segment: the gap to the diagonal (perfect calibration); ``n=`` under each bar: the
    slide count. Below: histogram of predicted probabilities. Subtitle: ECE, Brier, n.
    """
    p = as_probabilities(probs)
    t = as_binary_labels(y, p.size)
    curve = reliability_curve(p, t, n_bins, strategy)
    ece = curve.ece()
    brier = float(np.mean((p - t) ** 2))

    W = H = int(size)
    img = np.full((H, W, 3), 255, np.uint8)
    left, right, top = 110, W - 40, 140
    hist_h = int(H * 0.13)
    bottom = H - 110 - hist_h - 32  # main plot bottom
    hist_top, hist_bottom = bottom + 32, bottom + 32 + hist_h
    pw, ph = right - left, bottom - top

    def X(v: float) -> int:
        return int(round(left + v * pw))

    def Y(v: float) -> int:
        return int(round(bottom - v * ph))

    # title
    _put(img, title, (W // 2, 34), 0.8, thick=2, anchor="center")
    _put(
        img,
        f"ECE = {ece:.3f} ({strategy}, {n_bins} bins)   Brier = {brier:.3f}   n = {p.size} ({int(t.sum())} positive)",
        (W // 2, 64),
        0.55,
        anchor="center",
    )

    # grid + ticks
    for k in range(6):
        v = k / 5
        cv2.line(img, (X(v), top), (X(v), bottom), _LIGHT, 1)
        cv2.line(img, (left, Y(v)), (right, Y(v)), _LIGHT, 1)
        _put(img, f"{v:.1f}", (left - 10, Y(v) + 6), 0.5, anchor="right")
    # bars
    for lo, hi, _mp, of, _c in zip(
        curve.bin_lower, curve.bin_upper, curve.mean_predicted, curve.observed_frequency, curve.count
    ):
        x0, x1 = X(lo) + 2, X(hi) - 2
        cv2.rectangle(img, (x0, Y(of)), (x1, bottom), _BAR, -1)
        cv2.rectangle(img, (x0, Y(of)), (x1, bottom), _BAR_EDGE, 1)
    # diagonal (dashed)
    n_dash = 40
    for k in range(n_dash):
        if k % 2 == 0:
            a, b = k / n_dash, (k + 1) / n_dash
            cv2.line(img, (X(a), Y(a)), (X(b), Y(b)), _GREY, 2, cv2.LINE_AA)
    # gap, Wilson interval, point, count
    for mp, of, c in zip(curve.mean_predicted, curve.observed_frequency, curve.count):
        cv2.line(img, (X(mp), Y(mp)), (X(mp), Y(of)), _GAP, 3, cv2.LINE_AA)
        lo, hi = _wilson(of * c, c)
        cv2.line(img, (X(mp), Y(lo)), (X(mp), Y(hi)), _POINT, 1, cv2.LINE_AA)
        for yy in (lo, hi):
            cv2.line(img, (X(mp) - 5, Y(yy)), (X(mp) + 5, Y(yy)), _POINT, 1, cv2.LINE_AA)
        cv2.circle(img, (X(mp), Y(of)), 6, _POINT, -1, cv2.LINE_AA)
    # slide count of each bin, between the plot and the histogram
    count_scale = 0.45 if curve.edges.size <= 13 else 0.32
    for lo, hi, c in zip(curve.bin_lower, curve.bin_upper, curve.count):
        txt = f"n={int(c)}" if curve.edges.size <= 13 else str(int(c))
        _put(img, txt, ((X(lo) + X(hi)) // 2, bottom + 22), count_scale, color=(40, 40, 40), anchor="center")
    cv2.rectangle(img, (left, top), (right, bottom), _BLACK, 1)

    # histogram of predictions
    counts = np.bincount(bin_index(p, curve.edges), minlength=curve.edges.size - 1)
    cmax = max(1, int(counts.max()))
    for k, c in enumerate(counts):
        if c:
            hh = int(round((hist_bottom - hist_top) * c / cmax))
            cv2.rectangle(
                img,
                (X(curve.edges[k]) + 2, hist_bottom - hh),
                (X(curve.edges[k + 1]) - 2, hist_bottom),
                (170, 170, 170),
                -1,
            )
    cv2.rectangle(img, (left, hist_top), (right, hist_bottom), _BLACK, 1)
    _put(img, "slides", (left - 10, (hist_top + hist_bottom) // 2 + 5), 0.45, anchor="right")
    _put(img, str(cmax), (left - 10, hist_top + 12), 0.4, anchor="right")
    for k in range(6):
        v = k / 5
        cv2.line(img, (X(v), hist_bottom), (X(v), hist_bottom + 6), _BLACK, 1)
        _put(img, f"{v:.1f}", (X(v), hist_bottom + 26), 0.5, anchor="center")

    # axis labels
    _put(img, "mean predicted probability", ((left + right) // 2, H - 45), 0.6, anchor="center")
    label = _ascii("observed frequency of positives")
    (tw, th), _ = cv2.getTextSize(label, _FONT, 0.6, 1)
    strip: np.ndarray = np.full((th + 12, tw + 8, 3), 255, np.uint8)
    cv2.putText(strip, label, (4, th + 4), _FONT, 0.6, _BLACK, 1, cv2.LINE_AA)
    strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    sy = max(0, (top + bottom) // 2 - strip.shape[0] // 2)
    sx = 22
    img[sy : sy + strip.shape[0], sx : sx + strip.shape[1]] = strip[: H - sy, : W - sx]

    # legend: two rows above the plot, never over the data
    lx, ly = left, 96
    cv2.rectangle(img, (lx, ly - 10), (lx + 22, ly + 4), _BAR, -1)
    cv2.rectangle(img, (lx, ly - 10), (lx + 22, ly + 4), _BAR_EDGE, 1)
    _put(img, "observed frequency of positives per bin", (lx + 30, ly + 3), 0.45)
    cv2.line(img, (lx, ly + 22), (lx + 22, ly + 22), _GAP, 3)
    _put(img, "gap to the diagonal (miscalibration)", (lx + 30, ly + 27), 0.45)
    mx = left + pw // 2 + 20
    cv2.circle(img, (mx + 11, ly - 3), 5, _POINT, -1, cv2.LINE_AA)
    _put(img, "bin mean prediction; 95% CI of observed", (mx + 30, ly + 3), 0.45)
    cv2.line(img, (mx, ly + 22), (mx + 22, ly + 22), _GREY, 2)
    _put(img, "perfect calibration", (mx + 30, ly + 27), 0.45)
    return img


def write_reliability_diagram(
    path: str | Path,
    probs: Any,
    y: Any,
    n_bins: int = 10,
    title: str = "Reliability diagram",
    strategy: str = "uniform",
) -> Path:
    """Draw :func:`render_reliability_diagram` and write it as a PNG, atomically. Returns the path."""
    img = render_reliability_diagram(probs, y, n_bins=n_bins, title=title, strategy=strategy)
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover - cv2 failure
        raise RuntimeError("cv2.imencode failed for the reliability diagram")
    return atomic_write_bytes(path, buf.tobytes())
