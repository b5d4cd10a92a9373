"""calodistill.flows: conditional normalizing flows for calorimeter showers, on torch + nflows.

Directions, said once for the whole package (nflows' convention):

- ``forward`` maps data → noise (x → z) and returns ``(z, logabsdet)``;
- ``inverse`` maps noise → data (z → x) and returns ``(x, logabsdet)``.

The MAF teacher is fast ``forward`` (one MADE pass: density evaluation, training); its ``inverse``
(sampling) needs D sequential passes. The IAF student is the mirror image: fast ``inverse``
(sampling in one pass), slow ``forward`` (exact likelihood of external data in D passes).

This package imports neither dask, mlflow nor ``pipeline``; it can be used from a notebook alone.
"""
