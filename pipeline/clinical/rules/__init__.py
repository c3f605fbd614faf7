"""Clinical rule layer: slide result + clinical context -> proposed orders (decision support).

Library API (used by the batch runner; no torch anywhere here)::

    from pipeline.clinical.rules import load_ruleset, load_clinical, recommend
    rs = load_ruleset()                                   # configs/rules.yaml, validated
    table = load_clinical("clinical.csv", slide_ids={...})  # optional
    rec = recommend(result_dict, table.lookup(slide_id, patient_id), rs)

Bad input raises :class:`pipeline.core.errors.DataError` (results, clinical context) or
:class:`pipeline.core.errors.ConfigError` (the ruleset), each with a one-line message.
"""

from __future__ import annotations

from pipeline.clinical.rules.clinical import ClinicalContext, ClinicalTable, load_clinical, parse_context
from pipeline.clinical.rules.engine import parse_result, recommend, resolve_band
from pipeline.clinical.rules.schema import Ruleset, load_ruleset

__all__ = [
    "ClinicalContext",
    "ClinicalTable",
    "Ruleset",
    "load_clinical",
    "load_ruleset",
    "parse_context",
    "parse_result",
    "recommend",
    "resolve_band",
]
