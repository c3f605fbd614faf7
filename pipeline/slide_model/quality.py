"""Slide quality gate: is this slide one the model can judge?

The gate runs after tiling and the patch model and before a probability is reported. It
turns measurements into a :class:`QualityReport` with ``status`` ``"ok"`` or
``"non_diagnostic"``, machine-readable ``flags`` and one human sentence per flag (with the
measured number) in ``reasons``. A non-diagnostic slide gets no NME-pattern probability.

Hard rules (``non_diagnostic``):

* ``no_tissue_tiles``: zero tissue tiles.
* ``dark_field``: dark-field / fluorescence image (the tissue detector's ``dark_background``
  flag, or mostly near-black tile pixels). The model reads brightfield H&E.
* ``wrong_resolution``: tiles not read at the model's 0.5 µm/px (± tolerance).
* ``non_he_stain``: too few stained pixels have H&E-like optical density (IHC/DAB, special
  stains, fluorescence), or too many are DAB-brown (immunohistochemistry with a haematoxylin
  counterstain, whose blue nuclei are H&E-like: see ``QualityConfig.max_dab_like_fraction``).
* ``mostly_blurred``: more than half of the tiles are below the sharpness threshold.
* ``too_little_epidermis``: NME patterns are upper-epidermal; without epidermis the slide
  cannot be judged (too few tiles with patch-model epidermis probability > 0.5).

Soft flags (status stays ``ok``, reported): ``ink_or_pen_removed``, ``some_blur``,
``small_biopsy``, other tissue-detector flags, and ``*_not_assessed`` when a measurement was
not supplied (hard when ``QualityConfig.require_all_measurements``, the default).

Measurement helpers: :func:`tile_sharpness` (variance of the Laplacian) and
:func:`stain_statistics` / :class:`StainAccumulator` (optical-density colour statistics).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline.core.config import StrictModel
from pipeline.core.validation import InvalidInputError
from pipeline.tiles.measurements import StainAccumulator, stain_statistics, tile_sharpness, tile_sharpness_many  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

#: Flags that make a slide non-diagnostic.
HARD_FLAGS = frozenset(
    {
        "no_tissue_tiles",
        "dark_field",
        "wrong_resolution",
        "non_he_stain",
        "mostly_blurred",
        "too_little_epidermis",
    }
)

DARK_FIELD_REASON = (
    "out-of-scope stain: dark background, a dark-field/fluorescence or inverted image; the model reads brightfield H&E"
)


# --------------------------------------------------------------------------------------------
# the gate
# --------------------------------------------------------------------------------------------
class QualityConfig(StrictModel):
    """Thresholds of the quality gate (physical units where they apply).

    ``blur_threshold`` was calibrated on the real H&E skin slide CMU-1-Small-Region.svs
    (0.499 µm/px, Aperio 20x, JPEG) with :func:`tile_sharpness` on its 68 tissue tiles
    (default tiling, 224 px at 0.5 µm/px):

    ===================================  ======  ======  ======  =====
    tiles                                min     5 %     median  max
    ===================================  ======  ======  ======  =====
    as scanned (sharp)                    25      301     1307   3801
    Gaussian blur sigma 1 px (0.5 µm)      3       40      158    386
    Gaussian blur sigma 2 px (1 µm)        0.9     6.7     21     57
    Gaussian blur sigma 3 px (1.5 µm)      0.6     2.3     6.0    15
    ===================================  ======  ======  ======  =====

    The one sharp tile below 120 is 80 % glass (25). 120 lies between the sharpest
    sigma-2 tile (57) and the 5th percentile of sharp tiles (301), about their geometric mean
    (131); a focus blur of 1 µm or more is caught, a 0.5 µm blur mostly is not. The measure
    rises with noise and JPEG artefacts and falls on pale, glass-rich tiles, so rules use the
    fraction of blurred tiles, not single tiles. Re-check on each scanner model.

    ``max_dab_like_fraction`` (immunohistochemistry) was set from the ``dab_like_fraction`` of
    :func:`stain_statistics` (stained pixels whose optical density is highest in blue: DAB brown)
    as the demo analysis measures it (tissue tiles at 0.5 µm/px, every 4th pixel):

    ==========================================================  =========  ==========
    slide                                                       DAB-like   H&E-like
    ==========================================================  =========  ==========
    CMU-1-Small-Region.svs (real H&E skin, 68 tiles)             0.016      0.92
    real_skin/morphea_section3.tif (real H&E skin, 723 tiles)    0.0001     1.00
    OS-1-detail.ome.tif (real H&E carcinoma, 4 tiles)            0.002      0.84
    synthetic demo slides SYN2002-0001/2/3/48, PNT3003-0001      <= 0.0005  >= 0.95
    CMU recoloured to haematoxylin + DAB, DAB on 50 % of tissue  0.28       0.69
    the same, DAB on 30 % of tissue                              0.18       0.78
    the same, DAB on 15 % of tissue                              0.088      0.87
    the same, DAB on 5 % of tissue                               0.015      0.95
    ==========================================================  =========  ==========

    The haematoxylin counterstain of an IHC slide is H&E-like, so ``min_he_like_fraction``
    alone let every recoloured slide through. 0.05 is 3x the highest H&E value (CMU, 0.016)
    and catches IHC with DAB on about 10 % of the tissue or more; a sparsely positive IHC
    (DAB on about 5 %) measures like H&E and is not caught (its missing eosin is not measured).
    Fluorescence (dark background) is caught by the tissue detector's ``dark_background`` or
    ``max_dark_pixel_fraction``, before any stain rule.
    """

    expected_mpp: float = Field(0.5, gt=0, description="Resolution the model reads, µm/px.")
    mpp_tolerance: float = Field(0.10, ge=0, lt=1, description="Relative tolerance on the tiles' effective µm/px.")
    min_tiles: int = Field(1, ge=1, description="Fewer tissue tiles than this: non-diagnostic.")
    small_biopsy_area_mm2: float = Field(
        2.0,
        ge=0,
        description="Tissue area (mm²) below which 'small_biopsy' is flagged (soft; a 4 mm punch section is about 4-8 mm²).",
    )
    epidermis_prob_threshold: float = Field(
        0.5, gt=0, lt=1, description="A tile counts as epidermis when its epidermis probability is above this."
    )
    min_epidermis_tiles: int = Field(3, ge=0, description="Fewer epidermis tiles than this: non-diagnostic.")
    min_epidermis_fraction: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Fraction of tissue tiles that are epidermis below which the slide is non-diagnostic "
        "(a punch biopsy has about 5 %, a large excision 1-2 %).",
    )
    blur_threshold: float = Field(
        120.0,
        gt=0,
        description="Tile sharpness (variance of the Laplacian, grey levels², at 0.5 µm/px) below which a tile is blurred.",
    )
    max_blurred_fraction: float = Field(
        0.5, ge=0, le=1, description="More blurred tiles than this fraction: non-diagnostic."
    )
    some_blur_fraction: float = Field(
        0.10, ge=0, le=1, description="More blurred tiles than this fraction: soft flag 'some_blur'."
    )
    min_he_like_fraction: float = Field(
        0.6, ge=0, le=1, description="Fewer H&E-like stained pixels than this fraction: non-diagnostic (CMU H&E: 0.93)."
    )
    max_dark_pixel_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="More near-black tile pixels than this fraction: dark-field/fluorescence (CMU H&E: 0.006, DAPI: 0.82).",
    )
    max_dab_like_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="More DAB-like (brown) stained pixels than this fraction: immunohistochemistry, non-diagnostic "
        "(real H&E: at most 0.016; see the class docstring).",
    )
    require_all_measurements: bool = Field(
        True,
        description="A measurement that was not supplied (epidermis, sharpness, stain, resolution) makes the slide non-diagnostic.",
    )

    @model_validator(mode="after")
    def _blur_order(self) -> QualityConfig:
        if self.some_blur_fraction > self.max_blurred_fraction:
            raise ValueError("some_blur_fraction must not exceed max_blurred_fraction")
        return self


@dataclass
class QualityInputs:
    """Measurements of one slide for :func:`assess_quality`.

    Attributes:
        n_tiles: tissue tiles (N).
        tissue_area_mm2: tissue area from the tissue mask, mm².
        tissue_flags: tissue-detector flags, e.g. ``"dark_background"``, ``"ink_or_pen_removed"``.
        epidermis_probs: float (N,) patch-model epidermis probability per tile, or None.
        tile_blur: float (N,) :func:`tile_sharpness` per tile (grey levels²), or None.
        stain_stats: :func:`stain_statistics` over the tissue tiles, or None. Read:
            ``he_like_fraction`` (alias ``he_fraction``), ``dark_pixel_fraction`` and
            ``dab_like_fraction``; a missing key skips that rule.
        mpp_effective: µm/px the tiles were read at, or None.
    """

    n_tiles: int
    tissue_area_mm2: float
    tissue_flags: list[str] = field(default_factory=list)
    epidermis_probs: np.ndarray | None = None
    tile_blur: np.ndarray | None = None
    stain_stats: dict[str, Any] | None = None
    mpp_effective: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n_tiles, (int, np.integer)) or self.n_tiles < 0:
            raise InvalidInputError(f"n_tiles must be a non-negative integer, got {self.n_tiles!r}")
        self.n_tiles = int(self.n_tiles)
        if not (
            isinstance(self.tissue_area_mm2, (int, float, np.floating))
            and math.isfinite(self.tissue_area_mm2)
            and self.tissue_area_mm2 >= 0
        ):
            raise InvalidInputError(f"tissue_area_mm2 must be a finite number >= 0, got {self.tissue_area_mm2!r}")
        self.tissue_area_mm2 = float(self.tissue_area_mm2)
        self.tissue_flags = [str(f) for f in (self.tissue_flags or [])]
        self.epidermis_probs = self._per_tile(self.epidermis_probs, "epidermis_probs", lo=0.0, hi=1.0)
        self.tile_blur = self._per_tile(self.tile_blur, "tile_blur", lo=0.0, hi=math.inf)
        if self.mpp_effective is not None:
            m = float(self.mpp_effective)
            if not (math.isfinite(m) and m > 0):
                raise InvalidInputError(f"mpp_effective must be a positive number, got {self.mpp_effective!r}")
            self.mpp_effective = m

    def _per_tile(self, values: Any, name: str, lo: float, hi: float) -> np.ndarray | None:
        if values is None:
            return None
        a = np.asarray(values, dtype=np.float64).reshape(-1)
        if a.size != self.n_tiles:
            raise InvalidInputError(f"{name}: {a.size} values for {self.n_tiles} tiles")
        if not np.all(np.isfinite(a)):
            raise InvalidInputError(f"{name}: contains {int((~np.isfinite(a)).sum())} NaN/inf value(s)")
        if a.size and (a.min() < lo or a.max() > hi):
            raise InvalidInputError(f"{name}: values must lie in [{lo}, {hi}], got [{a.min():.4g}, {a.max():.4g}]")
        return a


@dataclass
class QualityReport:
    """Outcome of the gate. ``flags[i]`` is explained by ``reasons[i]``; ``metrics`` is JSON-safe."""

    status: Literal["ok", "non_diagnostic"]
    flags: list[str]
    reasons: list[str]
    metrics: dict[str, Any]

    @property
    def diagnostic(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "flags": list(self.flags),
            "reasons": list(self.reasons),
            "metrics": dict(self.metrics),
        }


def _stat(stats: dict[str, Any] | None, key: str) -> float | None:
    if not stats or stats.get(key) is None:
        return None
    v = float(stats[key])
    if not math.isfinite(v):
        raise InvalidInputError(f"stain_stats[{key!r}] is not finite ({v})")
    return v


def _he_like(stats: dict[str, Any] | None) -> float | None:
    """``he_like_fraction`` (:func:`stain_statistics`), or ``he_fraction`` as older callers name it."""
    if stats and "he_like_fraction" in stats:
        return _stat(stats, "he_like_fraction")
    return _stat(stats, "he_fraction")


def assess_quality(inputs: QualityInputs, config: QualityConfig | None = None) -> QualityReport:
    """Apply the quality rules (see the module docstring) to one slide's measurements."""
    cfg = config or QualityConfig()
    hard: list[tuple[str, str]] = []
    soft: list[tuple[str, str]] = []
    not_assessed: list[tuple[str, str]] = []
    n = inputs.n_tiles
    m: dict[str, Any] = {
        "n_tiles": n,
        "tissue_area_mm2": inputs.tissue_area_mm2,
        "mpp_effective": inputs.mpp_effective,
        "n_epidermis_tiles": None,
        "epidermis_fraction": None,
        "blurred_fraction": None,
        "median_sharpness": None,
        "he_like_fraction": _he_like(inputs.stain_stats),
        "dab_like_fraction": _stat(inputs.stain_stats, "dab_like_fraction"),
        "dark_pixel_fraction": _stat(inputs.stain_stats, "dark_pixel_fraction"),
    }

    # --- dark field / fluorescence -------------------------------------------------------
    dark = m["dark_pixel_fraction"]
    if "dark_background" in inputs.tissue_flags:
        hard.append(("dark_field", f"{DARK_FIELD_REASON} (the slide background is dark)"))
    elif dark is not None and dark > cfg.max_dark_pixel_fraction:
        hard.append(
            (
                "dark_field",
                f"{DARK_FIELD_REASON} ({dark:.0%} of tile pixels are near-black, "
                f"limit {cfg.max_dark_pixel_fraction:.0%})",
            )
        )

    # --- resolution --------------------------------------------------------------------
    if inputs.mpp_effective is None:
        not_assessed.append(
            ("resolution_not_assessed", "resolution not assessed: the tiles' effective µm/px was not given")
        )
    elif abs(inputs.mpp_effective - cfg.expected_mpp) > cfg.mpp_tolerance * cfg.expected_mpp:
        hard.append(
            (
                "wrong_resolution",
                f"tiles were read at {inputs.mpp_effective:.3f} µm/px; the model reads "
                f"{cfg.expected_mpp:g} µm/px ±{cfg.mpp_tolerance:.0%}",
            )
        )

    # --- tiles ---------------------------------------------------------------------------
    if n < cfg.min_tiles:
        what = "no tissue tiles" if n == 0 else f"only {n} tissue tile(s), at least {cfg.min_tiles} needed"
        hard.append(("no_tissue_tiles", f"{what} (tissue area {inputs.tissue_area_mm2:.2f} mm²)"))
    else:
        # --- stain ----------------------------------------------------------------------
        he = m["he_like_fraction"]
        if not inputs.stain_stats or not ({"he_like_fraction", "he_fraction"} & set(inputs.stain_stats)):
            not_assessed.append(("stain_not_assessed", "stain not assessed: no stain statistics were given"))
        elif he is None:
            hard.append(("non_he_stain", f"out-of-scope stain: no stained pixels in the {n} tissue tiles"))
        elif not any(f == "dark_field" for f, _ in hard):
            dab = m["dab_like_fraction"]
            ihc = dab is not None and dab > cfg.max_dab_like_fraction
            if he < cfg.min_he_like_fraction:
                dab_txt = f", {dab:.0%} DAB-like (brown)" if dab is not None else ""
                hard.append(
                    (
                        "non_he_stain",
                        f"out-of-scope stain: only {he:.0%} of stained pixels have H&E-like colour "
                        f"(minimum {cfg.min_he_like_fraction:.0%}{dab_txt}); "
                        + (
                            "looks like immunohistochemistry: this model reads H&E only"
                            if ihc
                            else "the model reads H&E"
                        ),
                    )
                )
            elif ihc:
                hard.append(
                    (
                        "non_he_stain",
                        f"out-of-scope stain: looks like immunohistochemistry (DAB brown in {dab:.0%} of stained "
                        f"tissue, H&E has at most {cfg.max_dab_like_fraction:.0%}): this model reads H&E only",
                    )
                )

        # --- blur -----------------------------------------------------------------------
        if inputs.tile_blur is None:
            not_assessed.append(("sharpness_not_assessed", "sharpness not assessed: no per-tile sharpness was given"))
        else:
            blurred = float(np.mean(inputs.tile_blur < cfg.blur_threshold))
            m["blurred_fraction"] = blurred
            m["median_sharpness"] = float(np.median(inputs.tile_blur))
            detail = (
                f"{blurred:.0%} of {n} tiles are below the sharpness threshold {cfg.blur_threshold:g} "
                f"(median sharpness {m['median_sharpness']:.0f})"
            )
            if blurred > cfg.max_blurred_fraction:
                hard.append(("mostly_blurred", f"mostly blurred: {detail}; rescan the slide"))
            elif blurred > cfg.some_blur_fraction:
                soft.append(("some_blur", f"some blur: {detail}"))

        # --- epidermis ------------------------------------------------------------------
        if inputs.epidermis_probs is None:
            not_assessed.append(
                ("epidermis_not_assessed", "epidermis not assessed: no per-tile epidermis probabilities were given")
            )
        else:
            k = int(np.sum(inputs.epidermis_probs > cfg.epidermis_prob_threshold))
            frac = k / n
            m["n_epidermis_tiles"], m["epidermis_fraction"] = k, frac
            if k < cfg.min_epidermis_tiles or frac < cfg.min_epidermis_fraction:
                hard.append(
                    (
                        "too_little_epidermis",
                        f"too little epidermis to judge upper-epidermal patterns: {k} of {n} tiles ({frac:.1%}) "
                        f"have epidermis probability > {cfg.epidermis_prob_threshold:g} (need at least "
                        f"{cfg.min_epidermis_tiles} tiles and {cfg.min_epidermis_fraction:.1%})",
                    )
                )

    # --- soft: biopsy size, tissue-detector flags --------------------------------------------
    if n >= cfg.min_tiles and inputs.tissue_area_mm2 < cfg.small_biopsy_area_mm2:
        soft.append(
            (
                "small_biopsy",
                f"small biopsy: {inputs.tissue_area_mm2:.2f} mm² of tissue "
                f"(below {cfg.small_biopsy_area_mm2:g} mm²), fewer tiles to judge from",
            )
        )
    for flag in inputs.tissue_flags:
        if flag == "dark_background":
            continue
        if flag == "ink_or_pen_removed":
            soft.append((flag, "ink or pen marks were found and left out of the tissue"))
        else:
            soft.append((flag, f"tissue detector flag: {flag}"))

    if cfg.require_all_measurements:
        hard.extend(not_assessed)
    else:
        soft.extend(not_assessed)
    entries = hard + soft
    status: Literal["ok", "non_diagnostic"] = "non_diagnostic" if hard else "ok"
    report = QualityReport(status=status, flags=[f for f, _ in entries], reasons=[r for _, r in entries], metrics=m)
    if hard:
        log.info("quality gate: non_diagnostic (%s)", ", ".join(f for f, _ in hard))
    return report


__all__ = [
    "HARD_FLAGS",
    "DARK_FIELD_REASON",
    "tile_sharpness",
    "tile_sharpness_many",
    "StainAccumulator",
    "stain_statistics",
    "QualityConfig",
    "QualityInputs",
    "QualityReport",
    "assess_quality",
]
