"""Training-time tile augmentation (albumentations 2), including an H&E stain jitter.

* :class:`AugmentConfig`: the ``augment:`` section of a training config.
* :func:`build_train_augmentation`: flips / 90° rotations, small scale jitter, HED stain
  jitter, CIELAB stain/scanner jitter of the tissue, camera white balance (per-channel gain),
  gamma, brightness/contrast, HSV, lower-resolution capture (down- then up-sampling), Gaussian
  blur, JPEG artefacts. uint8 RGB in, uint8 RGB out, same size. The colour ranges are sized by
  measurement so that augmented synthetic tiles span the real slides' CIELAB and H&E
  statistics (``benchmarks/stain_stats.py --augment``, docs/stain.md).
* :func:`build_eval_transform`: identity (evaluation only converts uint8 -> normalised
  float, on the device: :func:`models.preprocess.to_tensor_batch`).
* :class:`HEDJitter`: Tellez-style stain augmentation in Ruifrok-Johnston H-E-DAB space.
* :class:`LABJitter`: shift and scale the CIELAB statistics of a tile's tissue (glass kept).
* :class:`ChannelGain`: per-channel gain of the whole tile (camera white balance).
* :func:`seed_transforms`: give every transform of a pipeline its own random stream.

Seeding: do **not** use ``A.Compose(seed=...)``: albumentations 2.0 gives every child
transform the *same* seed, so e.g. the horizontal and vertical flips always fire together.
Use ``build_train_augmentation(cfg, seed=...)`` / :func:`seed_transforms`, and call
:func:`seed_transforms` in the DataLoader ``worker_init_fn`` with
``torch.initial_seed() % 2**32`` (otherwise forked workers share one random state and
produce identical augmentations). Every transform, the ones added here included, draws from
its own generator (``self.random_generator``), so :func:`seed_transforms` covers all of them.
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
from pipeline.patch.stain_norm import shift_lab_stats

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


def lab_jitter(image: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Move the CIELAB statistics of a tile's tissue: ``mean' = mean + shift``, ``std' = std * scale``.

    Tissue pixels (summed optical density against white >= 0.15) are mapped channel-wise in
    CIELAB (L, a, b) around their mean, glass is left alone and the edge between them is
    blended (:func:`pipeline.patch.stain_norm.shift_lab_stats`, the map of the inference-time
    Reinhard normaliser). A tile without tissue is returned unchanged.

    Args:
        image: uint8 RGB ``(H, W, 3)`` (or a stack ``(B, H, W, 3)``, each tile with its own statistics).
        shift: ``(3,)`` added to the tissue's L (0-100), a and b means.
        scale: ``(3,)`` factors of the tissue's L, a and b standard deviations.
    """
    if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"lab_jitter expects uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
    return shift_lab_stats(image, shift, scale)


class LABJitter(A.ImageOnlyTransform):
    """Stain and scanner colour augmentation in CIELAB, applied to the tissue of a tile only.

    The tissue's L, a and b means are shifted by ``U[-l_shift, l_shift]``, ``U[-ab_shift, ab_shift]``
    (a and b drawn independently) and its standard deviations scaled by ``U[1 - std_scale,
    1 + std_scale]`` per channel (:func:`lab_jitter`): lighter/darker, pinker/bluer, flatter or
    more contrasted staining, as between laboratories and scanners, while glass stays the
    scanner's white. ``0, 0, 0`` is the identity.

    Args:
        l_shift: half-width of the L mean shift (CIE L units, 0-100 scale).
        ab_shift: half-width of the a and b mean shifts (CIE units).
        std_scale: half-width of the std scale range, in [0, 1).
        p: probability of applying.
    """

    class InitSchema(BaseTransformInitSchema):
        l_shift: float = Field(ge=0.0, le=50.0)
        ab_shift: float = Field(ge=0.0, le=50.0)
        std_scale: float = Field(ge=0.0, lt=1.0)

    def __init__(self, l_shift: float = 15.0, ab_shift: float = 10.0, std_scale: float = 0.4, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.l_shift = l_shift
        self.ab_shift = ab_shift
        self.std_scale = std_scale

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        half = np.array([self.l_shift, self.ab_shift, self.ab_shift])
        return {
            "shift": rng.uniform(-1.0, 1.0, size=3) * half,
            "scale": rng.uniform(1.0 - self.std_scale, 1.0 + self.std_scale, size=3),
        }

    def apply(self, img: np.ndarray, shift: np.ndarray, scale: np.ndarray, **params: Any) -> np.ndarray:
        return lab_jitter(img, shift, scale)

    def apply_to_images(self, images: np.ndarray, shift: np.ndarray, scale: np.ndarray, **params: Any) -> np.ndarray:
        return lab_jitter(images, shift, scale)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("l_shift", "ab_shift", "std_scale")


def channel_gain(image: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Multiply each RGB channel of the whole image (glass included) by its gain; uint8, saturating."""
    if image.dtype != np.uint8 or image.shape[-1] != 3:
        raise ValueError(f"channel_gain expects uint8 RGB (..., 3), got {image.dtype} {image.shape}")
    g = np.asarray(gains, np.float32).reshape(3)
    flat = np.ascontiguousarray(image).reshape(-1, image.shape[-2] if image.ndim > 2 else 1, 3)
    return cv2.transform(flat, np.diag(g)).reshape(image.shape)


class ChannelGain(A.ImageOnlyTransform):
    """Camera-photo white balance: each RGB channel of the whole tile, glass included, times ``U[1 - gain, 1 + gain]``.

    A photo of a slide taken through a microscope with a camera's white balance set for another
    light tints the glass as well as the tissue (unlike a scanner, which calibrates its white).
    ``gain = 0`` is the identity.

    Args:
        gain: half-width of the per-channel gain range, in [0, 1).
        p: probability of applying.
    """

    class InitSchema(BaseTransformInitSchema):
        gain: float = Field(ge=0.0, lt=1.0)

    def __init__(self, gain: float = 0.1, p: float = 0.5) -> None:
        super().__init__(p=p)
        self.gain = gain

    def get_params(self) -> dict[str, Any]:
        return {"gains": self.random_generator.uniform(1.0 - self.gain, 1.0 + self.gain, size=3)}

    def apply(self, img: np.ndarray, gains: np.ndarray, **params: Any) -> np.ndarray:
        return channel_gain(img, gains)

    def apply_to_images(self, images: np.ndarray, gains: np.ndarray, **params: Any) -> np.ndarray:
        return channel_gain(images, gains)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("gain",)


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
    lab_p: float = Field(
        0.5, ge=0, le=1, description="probability of the CIELAB stain/scanner jitter of the tissue (LABJitter)"
    )
    lab_l_shift: float = Field(15.0, ge=0, le=50, description="tissue L mean shift ~ U[-x, x], CIE L units (0-100)")
    lab_ab_shift: float = Field(12.0, ge=0, le=50, description="tissue a and b mean shifts ~ U[-x, x] each, CIE units")
    lab_std_scale: float = Field(0.5, ge=0, lt=1, description="tissue L, a, b std scale ~ U[1 - x, 1 + x] per channel")
    gain_p: float = Field(0.3, ge=0, le=1, description="probability of a camera white-balance change (ChannelGain)")
    gain: float = Field(0.2, ge=0, lt=1, description="per-channel gain ~ U[1 - x, 1 + x] of the whole tile")
    gamma_p: float = Field(0.4, ge=0, le=1, description="probability of a gamma change (RandomGamma)")
    gamma_min: float = Field(
        0.5, gt=0, le=3, description="smallest gamma (< 1: paler, thinner staining; 0.5 halves the optical density)"
    )
    gamma_max: float = Field(1.6, gt=0, le=3, description="largest gamma (> 1: denser staining, darker mid-tones)")
    brightness_contrast_p: float = Field(0.3, ge=0, le=1, description="probability of a brightness/contrast change")
    brightness_limit: float = Field(0.1, ge=0, le=1, description="brightness change, fraction of full range")
    contrast_limit: float = Field(0.1, ge=0, le=1, description="contrast change, fraction")
    hsv_p: float = Field(0.3, ge=0, le=1, description="probability of a hue/saturation/value shift")
    hue_shift: float = Field(4, ge=0, le=90, description="hue shift limit (albumentations units, degrees)")
    sat_shift: float = Field(10, ge=0, le=100, description="saturation shift limit (albumentations units)")
    val_shift: float = Field(5, ge=0, le=100, description="value shift limit (albumentations units)")
    resolution_p: float = Field(
        0.2,
        ge=0,
        le=1,
        description="probability of a lower-resolution capture: down-sampled, then up-sampled (Downscale)",
    )
    resolution_min: float = Field(
        0.5, gt=0, lt=1, description="smallest down-sampling factor (0.5: a 1 µm/px capture shown at 0.5 µm/px)"
    )
    blur_p: float = Field(0.1, ge=0, le=1, description="probability of a Gaussian blur (focus variation)")
    blur_sigma_max: float = Field(1.5, ge=0.1, le=5, description="largest blur sigma in pixels (smallest 0.1)")
    jpeg_p: float = Field(0.2, ge=0, le=1, description="probability of JPEG re-compression artefacts")
    jpeg_quality_min: int = Field(60, ge=1, le=100, description="lowest JPEG quality")
    jpeg_quality_max: int = Field(95, ge=1, le=100, description="highest JPEG quality")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        if self.jpeg_quality_min > self.jpeg_quality_max:
            raise ValueError(f"jpeg_quality_min {self.jpeg_quality_min} > jpeg_quality_max {self.jpeg_quality_max}")
        if self.gamma_min > self.gamma_max:
            raise ValueError(f"gamma_min {self.gamma_min} > gamma_max {self.gamma_max}")
        return self

    @property
    def resolution_range(self) -> tuple[float, float]:
        """Down-sampling factors of the lower-resolution capture (the largest just below 1)."""
        return (self.resolution_min, max(self.resolution_min, 0.9))


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
        LABJitter(l_shift=cfg.lab_l_shift, ab_shift=cfg.lab_ab_shift, std_scale=cfg.lab_std_scale, p=cfg.lab_p),
        ChannelGain(gain=cfg.gain, p=cfg.gain_p),
        A.RandomGamma(gamma_limit=(100.0 * cfg.gamma_min, 100.0 * cfg.gamma_max), p=cfg.gamma_p),
        A.RandomBrightnessContrast(
            brightness_limit=cfg.brightness_limit, contrast_limit=cfg.contrast_limit, p=cfg.brightness_contrast_p
        ),
        A.HueSaturationValue(
            hue_shift_limit=cfg.hue_shift, sat_shift_limit=cfg.sat_shift, val_shift_limit=cfg.val_shift, p=cfg.hsv_p
        ),
        A.Downscale(
            scale_range=cfg.resolution_range,
            interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR},
            p=cfg.resolution_p,
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
