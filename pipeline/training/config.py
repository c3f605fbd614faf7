"""The YAML schema of ``train.py --config``: one file per run, validated with pydantic.

Every section forbids unknown keys, so a typo is a one-line error naming the key and the
allowed ones. ``task`` picks what is trained:

* ``patch``: the tile CNN from annotated slides;
* ``aggregator``: the slide aggregator + calibration on top of an existing patch bundle;
* ``pipeline``: both in sequence, producing one bundle (what ``configs/demo.yaml`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.core.config import StrictModel
from pipeline.tiles.tiling import TilingConfig
from pipeline.training.augment import AugmentConfig


class SyntheticData(StrictModel):
    """Generate a synthetic training set first (skipped if it already exists with the same parameters)."""

    n: int = Field(32, ge=2, description="Number of synthetic slides.")
    seed: int = Field(1234, ge=0, description="Generator seed.")
    mpp: float = Field(0.5, gt=0, description="Scanner resolution of the synthetic slides, µm/px.")
    size_um: tuple[float, float] | None = Field(
        None, description="Slide canvas (width, height) in µm; generator default if null."
    )
    classes: list[str] | None = Field(None, description="Diagnoses to draw (generator default mix if null).")


class PaintedData(StrictModel):
    """Generate slides with the three patterns painted on real skin first (skipped when present)."""

    n: int = Field(24, ge=2, description="Number of painted slides.")
    seed: int = Field(3003, ge=0, description="Painter seed.")
    mpp: float = Field(0.5, gt=0, description="Resolution the painted slides are written at, µm/px.")
    sources: Path = Field(
        Path("data/real_skin"),
        description="Real normal skin to paint on: a slide set (labels.csv with path/mpp columns + annotations).",
    )


class DataConfig(StrictModel):
    """Where slides, labels and annotations are."""

    root: Path = Field(
        Path("data/train"),
        description="Dataset folder: slides/, annotations/, labels.csv. A relative path is taken from the repository "
        "root (the folder holding train.py), not from the config file or the current directory.",
    )
    slides_dir: str = Field("slides", description="Slide folder, relative to root.")
    annotations_dir: str = Field("annotations", description="GeoJSON folder (<slide_id>.geojson), relative to root.")
    labels_csv: str = Field(
        "labels.csv",
        description="Slide table: slide_id, patient_id, nme_pattern, diagnosis, ... ; optional mpp column, optional "
        "path column (the slide file, relative to the table's folder, for slides kept outside slides/), optional "
        "split column (train/val/test).",
    )
    synthetic: SyntheticData | None = Field(None, description="If set, generate this synthetic set into root first.")
    ignore_unlisted: bool = Field(
        False,
        description="Slide files in slides_dir and GeoJSON files in annotations_dir without a labels.csv row are an "
        "error listing them; true: a warning, and they are left out.",
    )


class ExtraDataConfig(DataConfig):
    """A further slide set for the patch model (e.g. real skin annotated for epidermis only, or
    patterns painted on real tissue), sampled beside ``data`` with its own weight and split."""

    weight: float = Field(
        1.0, gt=0, description="Sampling weight of each of its tiles relative to a tile of the main data."
    )
    split: Literal["auto", "train", "val"] = Field(
        "auto",
        description="auto: patient-level split as the main data (a 'split' column in labels.csv overrides it "
        "per slide); train/val: every slide of this set goes there.",
    )
    class_map: dict[str, str] = Field(
        default_factory=dict, description="Renames of this set's annotation classes (added to labels.class_map)."
    )
    painted: PaintedData | None = Field(
        None, description="If set, paint patterns on real tissue into root first (pipeline.synthetic.painted)."
    )


class LabelConfig(StrictModel):
    """How tile targets come from annotation polygons."""

    classes: list[str] = Field(
        default_factory=lambda: ["pallor", "necrolysis", "parakeratosis", "epidermis"],
        description="Tile classes (the three patterns + auxiliary epidermis).",
    )
    positive_coverage: dict[str, float] = Field(
        default_factory=lambda: {"pallor": 0.25, "necrolysis": 0.25, "parakeratosis": 0.1, "epidermis": 0.1},
        description="Fraction of a tile a class polygon must cover for a positive target.",
    )
    coverage_of: dict[str, str] = Field(
        default_factory=dict,
        description="Measure a class's positive coverage as a share of another class's area in the tile, "
        "e.g. {pallor: epidermis}: a band of the upper epidermis is positive when it fills enough of the "
        "tile's epidermis, however thin the epidermis (a share of the whole tile would call thin bands negative).",
    )
    min_positive_coverage: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="For classes in coverage_of: the least fraction of the whole tile they must also cover.",
    )
    negative_coverage: float = Field(
        0.0, ge=0, lt=1, description="At or below this coverage a tile is negative (0: does not touch)."
    )
    mode: Literal["full", "sparse"] = Field(
        "full", description="full: unannotated tissue is negative; sparse: unannotated tiles are ignored."
    )
    class_map: dict[str, str] = Field(
        default_factory=dict, description="Rename annotation classes (e.g. QuPath 'Pallor' -> 'pallor')."
    )
    ignore_classes: list[str] = Field(
        default_factory=lambda: ["Tissue", "tissue"], description="Annotation classes to skip."
    )

    @model_validator(mode="after")
    def _coverage_for_every_class(self) -> LabelConfig:
        unknown = set(self.positive_coverage) - set(self.classes)
        if unknown:
            raise ValueError(f"positive_coverage names unknown classes {sorted(unknown)}")
        for v in self.positive_coverage.values():
            if not 0 < v <= 1:
                raise ValueError("positive_coverage values must be in (0, 1]")
        for cls, base in self.coverage_of.items():
            if cls not in self.classes or base not in self.classes:
                raise ValueError(f"coverage_of {cls}: {base}: both must be among labels.classes {self.classes}")
            if cls == base or base in self.coverage_of:
                raise ValueError(f"coverage_of {cls}: {base}: the base must be another class measured on the tile")
        return self

    def basis_index(self) -> np.ndarray:
        """(C,) int: for each class the index of the class its coverage is a share of, or -1 (whole tile)."""
        return np.array(
            [self.classes.index(self.coverage_of[c]) if c in self.coverage_of else -1 for c in self.classes]
        )


class SplitConfig(StrictModel):
    """Patient-level splits, written to a file and reused."""

    val_fraction: float = Field(0.2, gt=0, lt=0.5, description="Fraction of patients for validation.")
    test_fraction: float = Field(0.0, ge=0, lt=0.5, description="Fraction of patients held out for testing.")
    k_folds: int = Field(5, ge=2, le=20, description="Folds for aggregator cross-validation.")
    seed: int = Field(0, description="Split seed.")
    file: str = Field("splits.json", description="Split file in the run folder (reused when present and consistent).")


class ModelConfig(StrictModel):
    """Patch CNN."""

    backbone: str = Field("mobilenet_v3_small", description="torchvision backbone name.")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the head.")
    init_weights: Path | None = Field(
        None, description="Local weight file (torchvision state dict or safetensors); nothing is downloaded."
    )
    init_bundle: Path | None = Field(
        None,
        description="Fine-tune: start the patch model from this model bundle's weights (hash-checked safetensors; "
        "its backbone and classes must match model.backbone and labels.classes). A relative path is taken from "
        "the repository root. Lower train.lr and fewer train.epochs are the usual companions.",
    )

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        from models.backbones import known_backbone

        return known_backbone(v)

    @field_validator("init_weights")
    @classmethod
    def _weights_exist(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"weight file {v} not found")
        return v

    @model_validator(mode="after")
    def _one_start(self) -> ModelConfig:
        if self.init_weights is not None and self.init_bundle is not None:
            raise ValueError("set init_weights (backbone weights) or init_bundle (fine-tune a bundle), not both")
        return self


class TrainConfig(StrictModel):
    """Optimisation of the patch model."""

    epochs: int = Field(6, ge=1, description="Maximum epochs.")
    tiles_per_epoch: int = Field(
        6000, ge=16, description="Tiles sampled per epoch (class-balanced over slides and patterns)."
    )
    batch_size: int = Field(48, ge=2, description="Tiles per batch.")
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate (cosine schedule).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    patience: int = Field(3, ge=1, description="Early stopping: epochs without validation macro-AUROC gain.")
    max_val_tiles: int = Field(3000, ge=50, description="Validation tiles (fixed, stratified sample).")
    epidermal_negative_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of the negative half of each sample drawn from epidermal tiles negative for every pattern (hard negatives; needs an 'epidermis' class).",
    )
    threshold_rule: Literal["f1", "youden", "specificity"] = Field(
        "f1",
        description="How per-pattern tile thresholds are picked on validation: max F1, max Youden J, or the lowest threshold reaching threshold_specificity.",
    )
    threshold_specificity: float = Field(
        0.98, gt=0, lt=1, description="Target specificity on validation negatives for threshold_rule=specificity."
    )
    num_workers: int = Field(1, ge=0, description="Data-loader worker processes (each opens its own slide handles).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CPUs with native bf16 / AMP on CUDA."
    )
    channels_last: bool = Field(True, description="channels_last memory format.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    checkpoint_every: int = Field(
        50, ge=1, description="Steps between mid-epoch checkpoints (for resume after a kill)."
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores).")


class CalibrationConfig(StrictModel):
    method: Literal["temperature", "platt", "isotonic", "none"] = Field(
        "platt", description="Calibration of the slide score, fitted on out-of-fold predictions."
    )
    band_low: float = Field(0.20, gt=0, lt=1, description="LOW below this calibrated probability.")
    band_high: float = Field(0.60, gt=0, lt=1, description="HIGH at or above this calibrated probability.")
    target_sensitivity: float | None = Field(
        None, gt=0, le=1, description="If set, re-set band_low on out-of-fold data for this sensitivity."
    )

    @model_validator(mode="after")
    def _ordered(self) -> CalibrationConfig:
        if self.band_low >= self.band_high:
            raise ValueError("band_low must be below band_high")
        return self


class AggregatorConfig(StrictModel):
    """Slide aggregator on top of the patch model's tile outputs."""

    type: Literal["gated_attention", "mean", "max", "pattern_stats"] = Field(
        "gated_attention", description="Aggregator kind."
    )
    hidden_dim: int = Field(128, ge=4, description="MIL hidden width.")
    dropout: float = Field(0.1, ge=0, lt=1, description="MIL dropout.")
    use_embeddings: bool = Field(True, description="Feed tile embeddings (else tile probabilities only).")
    epochs: int = Field(60, ge=1, description="MIL training epochs per fold.")
    lr: float = Field(1e-3, gt=0, description="MIL learning rate.")
    weight_decay: float = Field(1e-3, ge=0, description="MIL weight decay.")
    pattern_loss_weight: float = Field(0.5, ge=0, description="Weight of the per-pattern slide heads in the loss.")
    baseline_shift: float = Field(
        0.0,
        ge=0,
        description="MIL kinds: largest raise (logit units) of sub-threshold pattern probabilities in a training bag, "
        "kept below the tile threshold (simulates unseen tissue whose normal tiles drift up); 0 = off.",
    )
    baseline_shift_prob: float = Field(0.5, ge=0, le=1, description="Share of training bags so raised per epoch.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for 95% confidence intervals.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    patch_bundle: Path | None = Field(None, description="task=aggregator: the patch bundle to build on.")
    data: DataConfig | None = Field(
        None,
        description="Slides for the aggregator (separate from the patch model's training slides); null = reuse data.",
    )
    extra_data: list[ExtraDataConfig] = Field(
        default_factory=list,
        description="Further slide sets for the aggregator's cross-validation and calibration (their weight and "
        "split are not used: every slide joins the folds).",
    )


class ReviewedSource(StrictModel):
    """A batch output folder with reviews (``python -m pipeline.review``) as training data.

    Reviewed tiles (confirmed / false positive / inside a drawn region) become sparse pattern labels
    of the patch model's training split (masked loss: unreviewed (tile, pattern) pairs do not count);
    slide verdicts (band HIGH → 1, LOW → 0) join the aggregator's slides.
    """

    output: Path = Field(
        description="Output folder infer.py wrote and reviewers reviewed (OUT_DIR/<slide_id>/review.geojson); "
        "a relative path is taken from the repository root."
    )
    weight: float = Field(
        1.0, gt=0, description="Sampling weight of each reviewed tile relative to a tile of the main data."
    )
    slides_root: Path | None = Field(
        None, description="Where to find slides that moved since inference (by slide id), as review --slides-root."
    )
    positive_at: float = Field(
        0.5, gt=0, le=1, description="Fraction of a tile a drawn region must cover to label the tile."
    )
    slide_labels: bool = Field(
        True, description="Slide verdicts join the aggregator's slides (task aggregator or pipeline)."
    )


class RunConfig(StrictModel):
    """Top level of a training config."""

    task: Literal["patch", "aggregator", "pipeline"] = Field("pipeline", description="What to train.")
    name: str = Field("nme-model", min_length=1, description="Model name written into the bundle.")
    version: str = Field("0.1.0", description="Model version.")
    label: str = Field(
        "research use only, not for clinical use", description="Intended-use label shown with every result."
    )
    seed: int = Field(0, description="Global seed.")
    output_dir: Path = Field(Path("runs/model"), description="Run folder: checkpoints, logs, metrics, splits, bundle/.")
    bundle_dir: Path | None = Field(None, description="Also copy the final bundle here (e.g. models/demo_bundle).")
    data: DataConfig = Field(default_factory=DataConfig)
    extra_data: list[ExtraDataConfig] = Field(
        default_factory=list, description="Further slide sets for the patch model, each with a weight and split."
    )
    reviewed: list[ReviewedSource] = Field(
        default_factory=list,
        description="Reviewed output folders: sparse tile labels for the patch model (training split) and "
        "slide verdicts for the aggregator.",
    )
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    labels: LabelConfig = Field(default_factory=LabelConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if any(c in v for c in "/\\\n"):
            raise ValueError("name must not contain path separators or newlines")
        return v
