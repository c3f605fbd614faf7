"""H&E colour model: Beer-Lambert optical density (OD) with per-slide stain vectors and scanner response.

Tissue is rendered as two stain *amounts* per pixel, haematoxylin ``H`` and eosin ``E``
(dimensionless, about 0-2), plus an ``extra`` OD image for things that are not H or E (red
cells, margin ink, pen, dust). The transmitted intensity is
``I = 255 * exp(-(H * h_vec * h_scale + E * e_vec * e_scale + extra + glass))`` per channel,
so pale, over-stained, bluish or pinkish slides are all the same tissue under other vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Reference stain OD directions (R, G, B), unit length: close to the Macenko estimate of the
#: real skin slide CMU-1-Small-Region (H 0.81/0.51/0.29, E 0.17/0.91/0.39), with more blue absorption
#: so that its collagen and epidermis colours (B/G optical density ~0.6) are matched; slides jitter.
H_REF = np.array([0.74, 0.56, 0.37]) / np.linalg.norm([0.74, 0.56, 0.37])
E_REF = np.array([0.17, 0.86, 0.48]) / np.linalg.norm([0.17, 0.86, 0.48])
#: Red cells: eosinophilic but orange-red (absorb green and blue, little red).
RBC_REF = np.array([0.10, 0.80, 0.62])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _vec3(v) -> tuple[float, float, float]:
    """A length-3 vector as a tuple of three Python floats."""
    x, y, z = (float(a) for a in v)
    return x, y, z


@dataclass(frozen=True)
class Stain:
    """Per-slide staining and scanning parameters.

    Attributes:
        h_vec, e_vec, rbc_vec: OD per unit amount, shape (3,) RGB.
        h_scale, e_scale: staining intensity (1 = typical; <0.7 pale, >1.3 over-stained).
        glass_od: background (glass + mounting medium) OD, shape (3,); sets the background tint.
        blur_um: scanner optical blur, Gaussian sigma in µm.
        noise_std: sensor noise std in 8-bit levels.
        jpeg_quality: JPEG quality of the TIFF tiles (1-100).
    """

    h_vec: tuple[float, float, float]
    e_vec: tuple[float, float, float]
    rbc_vec: tuple[float, float, float]
    h_scale: float
    e_scale: float
    glass_od: tuple[float, float, float]
    blur_um: float
    noise_std: float
    jpeg_quality: int

    def matrix(self) -> np.ndarray:
        """(3, 3) float32: rows = OD contributions of H, E and red-cell amounts (scaled)."""
        return np.array(
            [
                np.array(self.h_vec) * self.h_scale,
                np.array(self.e_vec) * self.e_scale,
                np.array(self.rbc_vec) * self.e_scale,
            ],
            dtype=np.float32,
        )


def sample_batch_stain(rng: np.random.Generator) -> dict[str, float | np.ndarray]:
    """A staining batch (one lab run): vectors and intensities shared by a patient's slides."""
    mode = rng.choice(["typical", "pale", "over"], p=[0.76, 0.12, 0.12])
    base_h = {"typical": 1.0, "pale": 0.55, "over": 1.5}[mode]
    base_e = {"typical": 1.0, "pale": 0.6, "over": 1.4}[mode]
    h_vec = _unit(H_REF + rng.normal(0, [0.06, 0.06, 0.05]) + np.array([0.0, 0.0, rng.uniform(-0.05, 0.10)]))
    e_vec = _unit(
        E_REF + rng.normal(0, [0.03, 0.04, 0.05]) + np.array([rng.uniform(-0.04, 0.08), 0.0, rng.uniform(-0.08, 0.08)])
    )
    return {
        "h_vec": np.abs(h_vec),
        "e_vec": np.abs(e_vec),
        "h_scale": base_h * float(np.exp(rng.normal(0, 0.15))),
        "e_scale": base_e * float(np.exp(rng.normal(0, 0.15))),
    }


def sample_stain(rng: np.random.Generator, batch: dict[str, float | np.ndarray]) -> Stain:
    """This slide's stain: the batch's with slide-to-slide jitter, plus scanner parameters."""
    h_vec = _unit(np.abs(np.asarray(batch["h_vec"]) + rng.normal(0, 0.015, 3)))
    e_vec = _unit(np.abs(np.asarray(batch["e_vec"]) + rng.normal(0, 0.015, 3)))
    rbc = _unit(np.abs(RBC_REF + rng.normal(0, 0.03, 3)))
    tint = rng.uniform(0.015, 0.05) + rng.normal(0, 0.008, 3)
    return Stain(
        h_vec=_vec3(h_vec),
        e_vec=_vec3(e_vec),
        rbc_vec=_vec3(rbc),
        h_scale=float(batch["h_scale"]) * float(np.exp(rng.normal(0, 0.05))),
        e_scale=float(batch["e_scale"]) * float(np.exp(rng.normal(0, 0.05))),
        glass_od=_vec3(max(v, 0.003) for v in tint),
        blur_um=float(rng.uniform(0.12, 0.45)),
        noise_std=float(rng.uniform(0.8, 2.5)),
        jpeg_quality=int(rng.integers(72, 96)),
    )


def od_to_rgb(amounts: np.ndarray, stain: Stain, extra_od: np.ndarray | None) -> np.ndarray:
    """Stain amounts → RGB float32 in 0-255.

    Args:
        amounts: float32 (h, w, 3): H, E and red-cell amounts per pixel.
        stain: the slide's :class:`Stain`.
        extra_od: float32 (h, w, 3) RGB OD added on top (ink, pen, dust) or ``None``.

    Returns:
        float32 (h, w, 3) RGB intensities, 0-255.
    """
    od: np.ndarray = cv2.transform(amounts, stain.matrix().T.copy())
    od += np.asarray(stain.glass_od, dtype=np.float32)
    if extra_od is not None:
        od += extra_od
    np.negative(od, out=od)
    cv2.exp(od, od)
    od *= np.float32(255.0)
    return od
