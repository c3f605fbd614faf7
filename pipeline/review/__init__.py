"""Review in the browser: a local web app over a batch output folder, reviews saved as QuPath GeoJSON.

``python -m pipeline.review OUT_DIR`` serves (Starlette app, uvicorn; :mod:`pipeline.review.server`)
the worklist and a deep-zoom viewer of each slide (OpenSeadragon, vendored: :mod:`pipeline.review.assets`)
with its stored tile predictions as layers; reviewers confirm or reject tiles, draw missed or excluded
regions and give a slide verdict, saved to ``OUT_DIR/<slide_id>/review.geojson`` and
``review.json`` (:mod:`pipeline.review.store`). :mod:`pipeline.review.labels` turns reviews into
sparse tile labels for training. See ``docs/review.md``.
"""
