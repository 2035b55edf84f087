"""The bundle as an MLflow pyfunc model: what ``mlflow.pyfunc.load_model`` and ``mlflow
models serve`` run.

pipeline.registry logs each exported bundle as an MLflow model whose artifact ``bundle``
is the bundle folder, whose code is this package (``serving``) and whose python model is
a ``BundleModel``: it loads the bundle with its checksums verified (serving.bundle) and
scores a pandas DataFrame with the torch-free ``Scorer``, the same code path as
``funnelrank score`` and ``funnelrank serve``. ``predict`` takes the rows ``funnelrank
score`` takes (an events bundle: user_id, item_id, the context columns, optionally
``recent``; a table bundle: its feature columns) and returns, row for row, the scorer's
outputs (``p_<task>`` per task, then ``score``).

This is the one serving module that imports mlflow: MLflow hosts it. Everything it calls
is the light scorer (onnxruntime, numpy, pyarrow; pandas comes with mlflow).
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
from mlflow.pyfunc import PythonModel

from serving.bundle import load_bundle
from serving.scorer import Scorer

BUNDLE_ARTIFACT = "bundle"  # the model's artifact: the bundle folder


class BundleModel(PythonModel):
    """A bundle's scorer as a pyfunc model (see the module docstring)."""

    def load_context(self, context) -> None:
        self.scorer = Scorer(load_bundle(context.artifacts[BUNDLE_ARTIFACT]), intra_op_threads=1)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """The scorer's outputs (``result_names``) of each row of ``model_input``, in its order."""
        table = pa.Table.from_pandas(model_input, preserve_index=False)
        scored = self.scorer.score_table(table)
        return scored.select(list(self.scorer.result_names)).to_pandas()
