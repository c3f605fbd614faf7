"""Training: patch model (tile labels from annotations) and slide aggregator (slide labels)."""
