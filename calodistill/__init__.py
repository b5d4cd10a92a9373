"""calodistill: fast, trustworthy surrogate simulators of particle-physics calorimeters.

``calodistill.flows`` holds the normalizing flows (torch + nflows only); ``calodistill.pipeline`` the
data layer, metrics, reports, stages, orchestration (Dask, MLflow) and the command line.
In the source tree both live at the top level (``flows/``, ``pipeline/``); this folder links them.
"""

__version__ = "0.2.0"
