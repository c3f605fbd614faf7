"""Locations of the files the project ships (configs, demo model) and its default outputs."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
DEMO_BUNDLE = REPO_ROOT / "models" / "demo_bundle"
RULES_YAML = CONFIGS / "rules.yaml"
DEMO_SLIDES = REPO_ROOT / "demo_slides"
DEMO_OUTPUT = REPO_ROOT / "demo_output"
