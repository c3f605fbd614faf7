"""One slide analysis: the single composition of the per-slide steps.

    open (µm/px) → tissue mask → tile grid → patch model → quality gate → aggregator → calibration

:class:`SlideAnalyser` holds what every slide needs (the bundle's contract, a patch-model runner,
the slide predictor) and :meth:`SlideAnalyser.analyse` runs the steps for one slide, returning a
typed :class:`SlideAnalysis` and writing nothing (except the optional feature cache). Batch
inference, evaluation, the backend agreement check and training's slide features all call it;
no other module composes these steps. The tile grid and the quality gate's expectations come
from the model's input spec (:meth:`models.bundle.InputSpec.tiling`, :func:`quality_config_for`),
so inference sees a slide as training did.

Units: level-0 pixels for coordinates, µm/px for resolutions, seconds for timings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import BundleContract, InputSpec
from models.patch import PATTERN_CLASSES
from pipeline.patch.backends import Runner
from pipeline.patch.cache import cache_path, load_features, save_features
from pipeline.patch.features import SlideFeatures, TileObserver, extract_features
from pipeline.patch.stain_norm import normaliser_for
from pipeline.reading.slide import open_slide
from pipeline.slide_model.aggregation import SlidePrediction, SlidePredictor
from pipeline.slide_model.quality import QualityConfig, QualityInputs, QualityReport, assess_quality
from pipeline.tiles.tiling import TileGrid, TilingConfig, tile_slide
from pipeline.tiles.tissue import TissueMask

log = logging.getLogger(__name__)


def quality_config_for(inp: InputSpec, base: QualityConfig | None = None) -> QualityConfig:
    """The quality gate's settings for a model: its resolution expectations from the model's input µm/px."""
    base = base or QualityConfig()
    return base.model_copy(update={"expected_mpp": inp.mpp, "mpp_tolerance": inp.mpp_tolerance})


@dataclass
class PreparedSlide:
    """A slide opened, its tissue found and its tile grid laid out (:meth:`SlideAnalyser.prepare`).

    Attributes:
        path: the slide file. ``mpp``: the µm/px given for it (None: from the file).
        slide_mpp: level-0 µm/px used. ``mpp_source``: where it came from.
        reader: which reader opened it. ``dimensions``: level-0 (width, height), px.
        bounds_origin: level-0 (x, y) of the slide's bounds (non-zero for cropped scans).
        fingerprint: content fingerprint (feature-cache key).
        mask: tissue mask; ``thumb``: the detector's thumbnail (RGB uint8 at ``mask.mpp``).
        grid: the tile grid; ``contours``: tissue outlines in level-0 px.
        seconds: time to open (``open``) and to find tissue and lay out the grid (``tissue_tiling``).
    """

    path: Path
    mpp: float | None
    slide_mpp: float
    mpp_source: str | None
    reader: str
    dimensions: tuple[int, int]
    bounds_origin: tuple[int, int]
    fingerprint: str
    mask: TissueMask
    thumb: np.ndarray
    grid: TileGrid
    contours: list[np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class SlideAnalysis:
    """Everything the per-slide steps found for one slide (nothing written).

    Attributes:
        prepared: the opened slide, tissue mask and tile grid.
        features: patch-model outputs per tile (probabilities, embeddings, sharpness, stain).
        quality: the quality gate's report.
        prediction: aggregator + calibration + band; None when the gate refused the slide
            (``non_diagnostic``) or the analyser has no predictor.
        timings: seconds per stage (dotted names are sub-stages).
    """

    prepared: PreparedSlide
    features: SlideFeatures
    quality: QualityReport
    prediction: SlidePrediction | None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``ok`` when the quality gate let the slide through, else ``non_diagnostic``."""
        return "ok" if self.quality.status == "ok" else "non_diagnostic"

    def attention(self) -> np.ndarray:
        """(N,) per-tile attention (NaN where the slide was not aggregated)."""
        if self.prediction is None:
            return np.full(len(self.features), np.nan, np.float32)
        return np.asarray(self.prediction.attention, np.float32)

    def pattern_tile_max(self) -> dict[str, float]:
        """Highest tile probability per pattern (empty without tiles)."""
        f = self.features
        if not len(f):
            return {}
        return {p: float(f.column(p).max()) for p in PATTERN_CLASSES if p in f.classes}


@dataclass
class SlideAnalyser:
    """Runs the per-slide steps with one model.

    Attributes:
        input: what tiles the model expects (µm/px, tile grid, tissue settings: the bundle's
            :class:`~models.bundle.InputSpec`).
        classes: the patch model's output classes, in column order.
        runner: the patch-model backend (:func:`pipeline.patch.backends.make_runner`).
        predictor: aggregator + calibrator + bands; None for a patch-only pass (training's
            slide features, int8 calibration).
        model_sha256: key of the feature cache (the bundle's sha256).
        batch_size: tiles per model call. ``reader_threads``: tile reader threads per slide.
        cache_dir: where features are cached (``<slide_id>.features.h5``); None: no cache.
        quality: the gate's settings (default: :func:`quality_config_for` the contract).
    """

    input: InputSpec
    classes: list[str]
    runner: Runner
    predictor: SlidePredictor | None = None
    model_name: str = "the model"
    model_sha256: str = ""
    batch_size: int = 32
    reader_threads: int = 2
    cache_dir: Path | None = None
    quality: QualityConfig | None = None

    def __post_init__(self) -> None:
        self.classes = list(self.classes)
        if self.quality is None:
            self.quality = quality_config_for(self.input)

    @classmethod
    def for_bundle(
        cls, contract: BundleContract, runner: Runner, predictor: SlidePredictor | None = None, **kwargs: Any
    ) -> SlideAnalyser:
        """The analyser of a bundle: its input spec, classes and name (``kwargs``: the other attributes)."""
        return cls(
            input=contract.input,
            classes=list(contract.architecture.classes),
            runner=runner,
            predictor=predictor,
            model_name=contract.name,
            **kwargs,
        )

    @property
    def tiling(self) -> TilingConfig:
        """The tile grid the model was trained on (from the bundle contract)."""
        return self.input.tiling()

    def prepare(self, path: Path, mpp: float | None = None, slide_id: str | None = None) -> PreparedSlide:
        """Open the slide, find tissue, lay out the tile grid (checked against the model's µm/px)."""
        t = time.perf_counter()
        with open_slide(path, mpp=mpp, slide_id=slide_id) as slide:
            fingerprint = slide.fingerprint()
            t_open = time.perf_counter() - t
            t = time.perf_counter()
            grid, mask, thumb, _ = tile_slide(slide, self.tiling)
            prepared = PreparedSlide(
                path=Path(path),
                mpp=mpp,
                slide_mpp=slide.mpp,
                mpp_source=slide.mpp_source,
                reader=slide.reader_name,
                dimensions=(int(slide.dimensions[0]), int(slide.dimensions[1])),
                bounds_origin=(int(slide.bounds[0]), int(slide.bounds[1])),
                fingerprint=fingerprint,
                mask=mask,
                thumb=thumb,
                grid=grid,
                contours=mask.contours_level0(slide.mpp),
            )
            prepared.seconds = {"open": round(t_open, 4), "tissue_tiling": round(time.perf_counter() - t, 4)}
        return prepared

    def analyse(
        self,
        path: Path,
        mpp: float | None = None,
        slide_id: str | None = None,
        prepared: PreparedSlide | None = None,
        observer: TileObserver | None = None,
    ) -> SlideAnalysis:
        """All per-slide steps for one slide.

        Args:
            path, mpp, slide_id: the slide (``mpp`` overrides a missing/absent file value).
            prepared: :meth:`prepare`'s output when it was made ahead of time.
            observer: offered every tile batch as it streams past the model (e.g. the report
                gallery's candidates); not called when the features come from the cache.
        Raises:
            PipelineError (and subclasses): the slide cannot be read or is at the wrong scale.
        """
        prep = prepared if prepared is not None else self.prepare(path, mpp, slide_id)
        timings = dict(prep.seconds)
        grid = prep.grid
        self.input.check_mpp(grid.plan.effective_mpp, source=str(path), model=self.model_name)

        t = time.perf_counter()
        feats = self._features(prep, slide_id or Path(path).stem, observer)
        timings["patch_model"] = round(time.perf_counter() - t, 4)
        if "model_seconds" in feats.meta:
            timings["patch_model.model"] = round(feats.meta["model_seconds"], 4)
            timings["patch_model.tile_wait"] = round(feats.meta["wait_seconds"], 4)
            timings["patch_model.reader_busy"] = round(feats.meta["read_seconds"], 4)

        t = time.perf_counter()
        report = self.assess(prep, feats)
        timings["quality"] = round(time.perf_counter() - t, 4)

        t = time.perf_counter()
        prediction = None
        if report.status == "ok" and self.predictor is not None and len(feats):
            prediction = self.predictor.predict(feats)
        timings["aggregation"] = round(time.perf_counter() - t, 4)
        return SlideAnalysis(prepared=prep, features=feats, quality=report, prediction=prediction, timings=timings)

    def assess(self, prep: PreparedSlide, feats: SlideFeatures) -> QualityReport:
        """The quality gate on a slide's tissue mask and tile features."""
        classes = feats.classes
        epi = feats.column("epidermis") if "epidermis" in classes else np.zeros(len(feats), np.float32)
        return assess_quality(
            QualityInputs(
                n_tiles=len(feats),
                tissue_area_mm2=prep.mask.tissue_area_mm2,
                tissue_flags=list(prep.mask.flags),
                epidermis_probs=epi,
                tile_blur=feats.sharpness,
                stain_stats=feats.stain if len(feats) else None,
                mpp_effective=prep.grid.plan.effective_mpp,
            ),
            self.quality,
        )

    def _features(self, prep: PreparedSlide, cache_key: str, observer: TileObserver | None) -> SlideFeatures:
        """Patch-model features of the slide, from the cache when slide and model match."""
        grid = prep.grid
        cp = cache_path(self.cache_dir, cache_key) if self.cache_dir is not None else None
        if cp is not None:
            cached = load_features(cp, prep.fingerprint, self.model_sha256)
            if cached is not None and len(cached) == len(grid):
                return cached
        normalise = normaliser_for(
            self.input.stain_normalisation,
            prep.path,
            prep.mpp,
            grid.coords,
            grid.plan,
            grid.tile_px,
            prep.mask.background_rgb,
        )  # None unless the bundle contract asks for stain normalisation
        feats = extract_features(
            prep.path,
            prep.mpp,
            grid.coords,
            grid.plan,
            grid.tile_px,
            grid.tile_size_l0,
            self.runner,
            self.classes,
            batch_size=self.batch_size,
            reader_threads=self.reader_threads,
            background_rgb=prep.mask.background_rgb,
            keep_top=observer,
            normalise=normalise,
        )
        if cp is not None and len(grid):
            save_features(cp, feats, prep.fingerprint, self.model_sha256)
        return feats


def analyse_slide(analyser: SlideAnalyser, path: Path, mpp: float | None = None, **kwargs: Any) -> SlideAnalysis:
    """:meth:`SlideAnalyser.analyse` as a function."""
    return analyser.analyse(path, mpp, **kwargs)


__all__ = ["PreparedSlide", "SlideAnalysis", "SlideAnalyser", "analyse_slide", "quality_config_for"]
