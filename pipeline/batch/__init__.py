"""Batch inference over slide folders: discovery, locking/resume, per-slide processing, summary."""
