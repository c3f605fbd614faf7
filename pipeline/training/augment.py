"""Training-time tile augmentation (albumentations 2), including an H&E stain jitter.

* :class:`AugmentConfig`: the ``augment:`` section of a training config.
* :func:`build_train_augmentation`: flips / 90° rotations, small scale jitter, HED stain
  jitter, brightness/contrast, HSV, Gaussian blur, JPEG artefacts. uint8 RGB in, uint8 RGB
  out, same size.
* :func:`build_eval_transform`: identity (evaluation only converts uint8 -> normalised
  float, on the device: :func:`models.preprocess.to_tensor_batch`).
* :class:`HEDJitter`: Tellez-style stain augmentation in Ruifrok-Johnston H-E-DAB space.
* :func:`seed_transforms`: give every transform of a pipeline its own random stream.

Seeding: do **not** use ``A.Compose(seed=...)``: albumentations 2.0 gives every child
transform the *same* seed, so e.g. the horizontal and vertical flips always fire together.
Use ``build_train_augmentation(cfg, seed=...)`` / :func:`seed_transforms`, and call
:func:`seed_transforms` in the DataLoader ``worker_init_fn`` with
``torch.initial_seed() % 2**32`` (otherwise forked workers share one random state and
produce identical augmentations).
"""

from __future__ import annotations

import math
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import BaseTransformInitSchema
from pydantic import Field, model_validator

import pipeline  # noqa: F401  (sets NO_ALBUMENTATIONS_UPDATE before albumentations is imported)
from pipeline.core.config import StrictModel

# Ruifrok & Johnston (2001) stain vectors as used by skimage.color.rgb2hed: rows are the
# optical-density RGB signatures of haematoxylin, eosin and DAB.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

_LN10 = math.log(10.0)
# natural-log optical density of each uint8 grey level: -ln((v + 1) / 256); exact inverse below
_OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """Stain concentrations ``(..., 3)`` float32 (H, E, DAB; log10 optical-density units) of uint8 RGB ``(..., 3)``.

    Optical density ``OD = -log10((I + 1) / 256)`` (the +1 avoids log 0 and is inverted
    exactly by :func:`hed_to_rgb`); negative concentrations are kept, not clipped, so the
    round trip is lossless up to uint8 rounding.
    """
    od = _OD_LUT[rgb] / _LN10
    return od @ HED_FROM_RGB.astype(np.float32)


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hed`: uint8 RGB ``(..., 3)`` from stain concentrations ``(..., 3)``."""
    od_ln = (np.asarray(hed, dtype=np.float32) @ RGB_FROM_HED.astype(np.float32)) * _LN10
    return np.clip(np.rint(256.0 * np.exp(-od_ln) - 1.0), 0, 255).astype(np.uint8)


def hed_jitter(image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Scale and shift each stain: ``hed' = alpha * hed + beta``, then back to RGB.

    The whole operation is affine in optical density, so it is applied as one 3x3 matrix
    plus offset per pixel (``od' = od @ M + c``), about 1 ms for a 224x224 tile.

    Args:
        image: uint8 RGB ``(..., 3)`` (one tile or a stack of tiles).
        alpha: per-stain scale ``(3,)`` (H, E, DAB).
        beta: per-stain shift ``(3,)`` in log10 optical-density units.
    Returns:
        uint8 array of the same shape.
    """
    if image.dtype != np.uint8 or image.shape[-1] != 3:
        raise ValueError(f"hed_jitter expects uint8 RGB (..., 3), got {image.dtype} {image.shape}")
    a = np.asarray(alpha, dtype=np.float64).reshape(3)
    b = np.asarray(beta, dtype=np.float64).reshape(3)
    m = (HED_FROM_RGB * a[None, :]) @ RGB_FROM_HED  # od @ HED_FROM_RGB diag(a) RGB_FROM_HED
    c = (b @ RGB_FROM_HED) * _LN10  # shift, converted to natural-log OD
    od = _OD_LUT[image]  # (..., 3) float32, natural-log OD
    od = od @ m.astype(np.float32) + c.astype(np.float32)
    out = np.exp(-od, out=od)
    out *= 256.0
    out -= 1.0
    np.clip(out, 0.0, 255.0, out=out)
    return np.rint(out, out=out).astype(np.uint8)


class HEDJitter(A.ImageOnlyTransform):
    """H&E stain augmentation (Tellez et al., 2018) as an albumentations transform.

    RGB -> optical density -> H, E, DAB concentrations (Ruifrok-Johnston matrix); each
    channel is scaled by ``alpha ~ U[1 - sigma, 1 + sigma]`` and shifted by
    ``beta ~ U[-bias, bias]`` (log10 OD units), then converted back to RGB. uint8 in and out.
    Random numbers come from the transform's own generator, so the output is deterministic
    given the seed (:func:`seed_transforms`). ``sigma = bias = 0`` is the identity (to within
    one grey level).

    Args:
        sigma: half-width of the per-stain scale range, in [0, 1).
        bias: half-width of the per-stain shift range (log10 OD units; for scale, a dark
            nucleus has H of about 0.5-1, eosin-stained stroma E of about 0.1-0.3, glass ~0).
        p: probability of applying.
    """

    class InitSchema(BaseTransformInitSchema):
        sigma: float = Field(ge=0.0, lt=1.0)
        bias: float = Field(ge=0.0, le=1.0)

    def __init__(self, sigma: float = 0.05, bias: float = 0.02, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.sigma = sigma
        self.bias = bias

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        return {
            "alpha": rng.uniform(1.0 - self.sigma, 1.0 + self.sigma, size=3),
            "beta": rng.uniform(-self.bias, self.bias, size=3),
        }

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any) -> np.ndarray:
        return hed_jitter(img, alpha, beta)

    def apply_to_images(self, images: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **params: Any) -> np.ndarray:
        return hed_jitter(images, alpha, beta)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma", "bias")


class AugmentConfig(StrictModel):
    """``augment:`` section of a training config. Every ``*_p`` is the probability that the
    augmentation is applied to a tile; strengths are the half-widths of uniform ranges."""

    enabled: bool = Field(True, description="false = no augmentation at all (the identity transform)")
    flip_p: float = Field(
        0.5, ge=0, le=1, description="probability of a horizontal flip, and independently of a vertical flip"
    )
    rot90_p: float = Field(0.5, ge=0, le=1, description="probability of a rotation by a random multiple of 90 degrees")
    scale_p: float = Field(
        0.3, ge=0, le=1, description="probability of a small zoom (Affine, tile size kept, reflected borders)"
    )
    scale_min: float = Field(0.9, gt=0, le=1, description="smallest zoom factor")
    scale_max: float = Field(1.1, ge=1, le=2, description="largest zoom factor")
    hed_p: float = Field(0.8, ge=0, le=1, description="probability of the H&E stain jitter (HEDJitter)")
    hed_sigma: float = Field(0.05, ge=0, lt=1, description="stain scale alpha ~ U[1 - sigma, 1 + sigma] per stain")
    hed_bias: float = Field(0.02, ge=0, le=1, description="stain shift beta ~ U[-bias, bias] per stain, log10 OD units")
    brightness_contrast_p: float = Field(0.3, ge=0, le=1, description="probability of a brightness/contrast change")
    brightness_limit: float = Field(0.1, ge=0, le=1, description="brightness change, fraction of full range")
    contrast_limit: float = Field(0.1, ge=0, le=1, description="contrast change, fraction")
    hsv_p: float = Field(0.3, ge=0, le=1, description="probability of a hue/saturation/value shift")
    hue_shift: float = Field(4, ge=0, le=90, description="hue shift limit (albumentations units, degrees)")
    sat_shift: float = Field(10, ge=0, le=100, description="saturation shift limit (albumentations units)")
    val_shift: float = Field(5, ge=0, le=100, description="value shift limit (albumentations units)")
    blur_p: float = Field(0.1, ge=0, le=1, description="probability of a Gaussian blur (focus variation)")
    blur_sigma_max: float = Field(1.0, ge=0.1, le=5, description="largest blur sigma in pixels (smallest 0.1)")
    jpeg_p: float = Field(0.2, ge=0, le=1, description="probability of JPEG re-compression artefacts")
    jpeg_quality_min: int = Field(60, ge=1, le=100, description="lowest JPEG quality")
    jpeg_quality_max: int = Field(95, ge=1, le=100, description="highest JPEG quality")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        if self.jpeg_quality_min > self.jpeg_quality_max:
            raise ValueError(f"jpeg_quality_min {self.jpeg_quality_min} > jpeg_quality_max {self.jpeg_quality_max}")
        return self


def build_train_augmentation(cfg: AugmentConfig | None = None, seed: int | None = None) -> A.Compose:
    """Training augmentation for uint8 RGB tiles ``(H, W, 3)``; output has the same shape and dtype.

    Call as ``aug(image=tile)["image"]``. ``seed`` makes the sequence reproducible (each
    transform gets its own stream, see :func:`seed_transforms`).
    """
    cfg = cfg or AugmentConfig()
    if not cfg.enabled:
        return build_eval_transform()
    transforms: list[A.BasicTransform] = [
        A.HorizontalFlip(p=cfg.flip_p),
        A.VerticalFlip(p=cfg.flip_p),
        A.RandomRotate90(p=cfg.rot90_p),
        A.Affine(
            scale=(cfg.scale_min, cfg.scale_max), keep_ratio=True, border_mode=cv2.BORDER_REFLECT_101, p=cfg.scale_p
        ),
        HEDJitter(sigma=cfg.hed_sigma, bias=cfg.hed_bias, p=cfg.hed_p),
        A.RandomBrightnessContrast(
            brightness_limit=cfg.brightness_limit, contrast_limit=cfg.contrast_limit, p=cfg.brightness_contrast_p
        ),
        A.HueSaturationValue(
            hue_shift_limit=cfg.hue_shift, sat_shift_limit=cfg.sat_shift, val_shift_limit=cfg.val_shift, p=cfg.hsv_p
        ),
        A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, cfg.blur_sigma_max), p=cfg.blur_p),
        A.ImageCompression(quality_range=(cfg.jpeg_quality_min, cfg.jpeg_quality_max), p=cfg.jpeg_p),
    ]
    compose = A.Compose(transforms)
    if seed is not None:
        seed_transforms(compose, seed)
    return compose


def build_eval_transform() -> A.Compose:
    """Identity transform (same call interface as the training one)."""
    return A.Compose([])


def seed_transforms(transform: A.BasicTransform | BaseCompose, seed: int) -> None:
    """Seed ``transform`` and, recursively, every child with independent streams from ``seed``.

    Use instead of ``A.Compose(seed=...)`` (which gives every child the same seed, making
    their random decisions identical), and in a DataLoader ``worker_init_fn``::

        def worker_init_fn(_: int) -> None:
            info = torch.utils.data.get_worker_info()
            seed_transforms(info.dataset.transform, torch.initial_seed() % 2**32)
    """
    _seed_tree(transform, np.random.SeedSequence(int(seed)))


def _seed_tree(t: A.BasicTransform | BaseCompose, seq: np.random.SeedSequence) -> None:
    children = list(t.transforms) if isinstance(t, BaseCompose) else []
    subs = seq.spawn(len(children) + 1)
    t.set_random_seed(int(subs[0].generate_state(1)[0]))  # a Compose also re-seeds its children here...
    for child, sub in zip(children, subs[1:]):  # ...so override them afterwards
        _seed_tree(child, sub)
