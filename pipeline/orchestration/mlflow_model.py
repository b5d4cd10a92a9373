"""MLflow "models from code" definition of the logged teacher/student pyfunc models.

:meth:`calodistill.pipeline.orchestration.tracking.PipelineTracker._log_model` passes this file's path as
``python_model``, so MLflow stores this short, readable source with the model instead of a cloudpickle of
the wrapper object; ``mlflow.pyfunc.load_model`` runs it to build
:class:`~calodistill.pipeline.orchestration.tracking.ShowerGeneratorModel`, whose ``load_context`` opens the
model directory with :class:`~calodistill.pipeline.data.bundle.ModelBundle` (weights read with
``torch.load(weights_only=True)``).
"""

from mlflow.models import set_model

from calodistill.pipeline.orchestration.tracking import (
    ShowerGeneratorModel,  # run as a file by MLflow: absolute
)

set_model(ShowerGeneratorModel())
