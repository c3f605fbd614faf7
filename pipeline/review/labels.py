"""Reviews → training labels (sparse tile labels, slide verdicts, provenance).

The extraction lives in :mod:`pipeline.outputs.review_labels` so that ``train.py`` (a lower layer
than the review app) can read reviewed output folders; this module keeps the review app's names.
"""

from __future__ import annotations

from pipeline.outputs.review_labels import ReviewedLabels, ReviewedSlide, reviewed_labels, slide_labels

__all__ = ["ReviewedLabels", "ReviewedSlide", "reviewed_labels", "slide_labels"]
