"""NME-pattern pipeline: slide -> tissue -> tiles -> patch model -> aggregator -> calibration -> rules -> outputs.

Importing the package sets ``NO_ALBUMENTATIONS_UPDATE=1`` so that albumentations never
tries to reach the network at import (it checks for updates otherwise).
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

DEMO_MODEL_LABEL = "trained on synthetic slides only, not for clinical use"
