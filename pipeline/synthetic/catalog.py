"""What each synthetic diagnosis contains: patterns, epidermal architecture, inflammation, sites.

Pure data, no drawing. Thicknesses and lengths are in µm; fractions are of the slide's
epidermis length. Every range is ``(low, high)`` and is drawn uniformly per slide (a pattern's
``intensity`` per section, jittered per patch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The three upper-epidermal NME patterns, in the order of the ``labels.csv`` columns.
PATTERNS: tuple[str, ...] = ("pallor", "necrolysis", "parakeratosis")

#: Biopsy sites recorded in ``labels.csv``.
SITES: tuple[str, ...] = (
    "intertriginous",
    "perioral",
    "perineal",
    "acral",
    "trunk",
    "extremity",
    "sun_exposed",
    "other",
)

#: QuPath classification colours (RGB) of the annotation classes.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "epidermis": (0, 160, 60),
    "pallor": (240, 200, 0),
    "necrolysis": (220, 30, 30),
    "parakeratosis": (40, 90, 230),
}

Range = tuple[float, float]


@dataclass(frozen=True)
class PatternPlan:
    """How much of one pattern a diagnosis draws.

    Attributes:
        probability: chance that the pattern is present at all on a slide of this diagnosis.
        coverage: fraction of the epidermis length covered by the pattern's patches.
        patches: number of separate patches per fragment (integers, inclusive).
        depth: for pallor/necrolysis, the fraction of the suprapapillary epidermal thickness
            (µm below the top of the living epidermis, relative) that the patch reaches.
        intensity: how conspicuous the pattern is drawn, 0-1 (1 = florid, as in textbook
            pictures; ~0.1 = barely visible). Pallor: paleness, swelling and vacuolation of the
            keratinocytes; necrolysis: eosinophilia, loss of nuclei, clefts; parakeratosis:
            density of retained nuclei (from a few scattered ones to confluent).
    """

    probability: float
    coverage: Range
    patches: tuple[int, int]
    depth: Range = (0.3, 0.5)
    intensity: Range = (0.15, 1.0)


@dataclass(frozen=True)
class DiagnosisSpec:
    """Everything the layout needs to know about a slide class.

    Thicknesses in µm. ``rete_depth`` is how far rete ridges reach below the suprapapillary
    plate; ``rete_regularity`` 1 = evenly spaced, equal ridges (psoriasis), 0 = irregular.
    """

    name: str
    description: str
    patterns: dict[str, PatternPlan]
    suprapapillary: Range = (45.0, 80.0)
    rete_depth: Range = (20.0, 70.0)
    rete_spacing: Range = (90.0, 160.0)
    rete_width: Range = (35.0, 60.0)
    rete_regularity: Range = (0.2, 0.5)
    granular: Range = (5.0, 12.0)
    granular_loss: float = 0.0
    spongiosis: Range = (0.0, 0.0)
    spongiosis_coverage: Range = (0.0, 0.0)
    neutrophil_clusters_per_mm: Range = (0.0, 0.0)
    exocytosis_per_mm: Range = (0.0, 0.0)
    inflammation: Range = (0.1, 0.35)
    papillary_vessel_dilation: Range = (1.0, 1.2)
    nme_pattern: bool = False
    sites: dict[str, float] = field(default_factory=dict)


_NME_SITES = {
    "intertriginous": 0.30,
    "perineal": 0.18,
    "perioral": 0.14,
    "extremity": 0.20,
    "acral": 0.10,
    "other": 0.08,
}
_ANY_SITE = dict.fromkeys(SITES, 1.0)

DIAGNOSIS_SPECS: dict[str, DiagnosisSpec] = {
    "normal": DiagnosisSpec(
        name="normal",
        description="normal skin: basket-weave orthokeratin, granular layer, no pattern",
        patterns={},
        inflammation=(0.0, 0.15),
        sites=_ANY_SITE,
    ),
    "nme": DiagnosisSpec(
        name="nme",
        description="necrolytic migratory erythema: patchy upper pallor, necrolysis and parakeratosis "
        "over psoriasiform hyperplasia",
        patterns={
            "parakeratosis": PatternPlan(1.0, (0.30, 0.75), (1, 3), intensity=(0.25, 1.0)),
            # Florid lesions: pale, ballooned upper half to two thirds of an acanthotic epidermis and
            # necrolysis of its upper third to half, so that whole 112 µm tiles show the pattern.
            "pallor": PatternPlan(1.0, (0.30, 0.65), (1, 4), depth=(0.65, 0.88), intensity=(0.3, 1.0)),
            "necrolysis": PatternPlan(1.0, (0.20, 0.45), (1, 3), depth=(0.35, 0.55), intensity=(0.3, 1.0)),
        },
        suprapapillary=(100.0, 160.0),
        rete_depth=(80.0, 220.0),
        rete_spacing=(90.0, 150.0),
        rete_width=(35.0, 60.0),
        rete_regularity=(0.2, 0.6),
        neutrophil_clusters_per_mm=(0.0, 1.0),
        inflammation=(0.3, 0.7),
        papillary_vessel_dilation=(1.1, 1.6),
        nme_pattern=True,
        sites=_NME_SITES,
    ),
    "nme_early": DiagnosisSpec(
        name="nme_early",
        description="early NME: upper pallor with focal necrolysis, no parakeratosis yet, mild acanthosis",
        patterns={
            "pallor": PatternPlan(1.0, (0.25, 0.55), (1, 3), depth=(0.60, 0.85), intensity=(0.1, 0.8)),
            "necrolysis": PatternPlan(1.0, (0.08, 0.25), (1, 2), depth=(0.30, 0.50), intensity=(0.1, 0.7)),
        },
        suprapapillary=(80.0, 130.0),
        rete_depth=(30.0, 100.0),
        inflammation=(0.2, 0.5),
        sites=_NME_SITES,
    ),
    "nme_late": DiagnosisSpec(
        name="nme_late",
        description="late NME: parakeratosis over psoriasiform hyperplasia with little pallor, no necrolysis",
        patterns={
            "parakeratosis": PatternPlan(1.0, (0.40, 0.85), (1, 3), intensity=(0.35, 1.0)),
            "pallor": PatternPlan(1.0, (0.04, 0.12), (1, 1), depth=(0.30, 0.45), intensity=(0.1, 0.6)),
        },
        suprapapillary=(45.0, 80.0),
        rete_depth=(100.0, 250.0),
        rete_regularity=(0.4, 0.8),
        inflammation=(0.2, 0.5),
        papillary_vessel_dilation=(1.1, 1.5),
        sites=_NME_SITES,
    ),
    "partial_pallor": DiagnosisSpec(
        name="partial_pallor",
        description="upper epidermal pallor only (no necrolysis, no parakeratosis)",
        patterns={"pallor": PatternPlan(1.0, (0.20, 0.50), (1, 3), depth=(0.60, 0.85), intensity=(0.1, 0.9))},
        suprapapillary=(80.0, 130.0),
        rete_depth=(30.0, 110.0),
        inflammation=(0.1, 0.4),
        sites=_NME_SITES,
    ),
    "partial_necrolysis": DiagnosisSpec(
        name="partial_necrolysis",
        description="upper epidermal necrolysis only (no pallor, no parakeratosis)",
        patterns={"necrolysis": PatternPlan(1.0, (0.15, 0.40), (1, 3), depth=(0.35, 0.55), intensity=(0.1, 0.9))},
        suprapapillary=(80.0, 130.0),
        rete_depth=(30.0, 110.0),
        inflammation=(0.2, 0.5),
        sites={**_NME_SITES, "trunk": 0.1},
    ),
    "psoriasiform": DiagnosisSpec(
        name="psoriasiform",
        description="psoriasiform dermatitis: confluent parakeratosis with neutrophil collections, "
        "regular elongated rete, thin suprapapillary plates, no pallor or necrolysis",
        patterns={"parakeratosis": PatternPlan(1.0, (0.65, 0.95), (1, 2), intensity=(0.55, 1.0))},
        suprapapillary=(28.0, 45.0),
        rete_depth=(160.0, 320.0),
        rete_spacing=(80.0, 120.0),
        rete_width=(40.0, 60.0),
        rete_regularity=(0.75, 0.95),
        granular=(0.0, 4.0),
        granular_loss=0.8,
        neutrophil_clusters_per_mm=(1.5, 5.0),
        exocytosis_per_mm=(2.0, 8.0),
        inflammation=(0.2, 0.5),
        papillary_vessel_dilation=(1.6, 2.4),
        sites={"extremity": 0.35, "trunk": 0.25, "other": 0.2, "sun_exposed": 0.1, "intertriginous": 0.1},
    ),
    "spongiotic": DiagnosisSpec(
        name="spongiotic",
        description="spongiotic dermatitis: intercellular oedema of the lower and mid epidermis, "
        "focal parakeratosis, lymphocyte exocytosis (pale epidermis that is NOT pallor)",
        patterns={"parakeratosis": PatternPlan(0.7, (0.04, 0.15), (1, 3), intensity=(0.05, 0.5))},
        suprapapillary=(55.0, 95.0),
        rete_depth=(30.0, 110.0),
        spongiosis=(0.5, 1.0),
        spongiosis_coverage=(0.45, 0.95),
        exocytosis_per_mm=(8.0, 25.0),
        inflammation=(0.4, 0.8),
        sites={"trunk": 0.3, "extremity": 0.35, "sun_exposed": 0.15, "other": 0.1, "intertriginous": 0.1},
    ),
}

#: Slide classes (``labels.csv`` ``diagnosis``), in a stable order.
DIAGNOSES: tuple[str, ...] = tuple(DIAGNOSIS_SPECS)

#: Share of each diagnosis when a dataset is drawn without ``classes``.
DEFAULT_MIX: dict[str, float] = {
    "normal": 0.20,
    "nme": 0.25,
    "nme_early": 0.07,
    "nme_late": 0.08,
    "partial_pallor": 0.06,
    "partial_necrolysis": 0.06,
    "psoriasiform": 0.14,
    "spongiotic": 0.14,
}
