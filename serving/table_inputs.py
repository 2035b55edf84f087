"""The ONNX inputs of rows scored with a table bundle (a model trained on the user's own
feature table, ``[table]``): each row carries every feature column itself, as
features.table_source reads them (ids as integers or strings, list columns, numeric
columns), and is encoded with the bundled vocabularies as table_source did (unseen ids ->
OOV buckets, null -> padding, the same numeric transform). Nothing is joined.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from serving.bundle import Bundle
from serving.encoding import finite_numeric_values, list_elements, pad_jagged


class TableInputs:
    """A table bundle's encoders, loaded once; rows -> ONNX inputs. Thread-safe."""

    def __init__(self, bundle: Bundle) -> None:
        self.spec = bundle.spec
        self.encoders = {f.name: bundle.encoder(f) for f in self.spec.sparse}
        columns = [f.column for f in self.spec.sparse] + [d.column for d in self.spec.dense]
        self.required_columns = tuple(dict.fromkeys(columns))

    def feeds(self, table: pa.Table) -> dict[str, np.ndarray]:
        """The ONNX inputs of ``table``'s rows: every feature encoded from its own raw column."""
        feeds: dict[str, np.ndarray] = {}
        for f in self.spec.sparse:
            values = _feature_column(table, f.column, f.name)
            try:
                if f.kind == "list":
                    lengths, elements = list_elements(values, self.spec.list_delimiter)
                    feeds[f.name] = pad_jagged(lengths, self.encoders[f.name](elements))
                else:
                    feeds[f.name] = self.encoders[f.name](values)
            except (TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ValueError(f"scoring input column {f.column!r} (feature {f.name!r}): {err}") from None
        dense = np.zeros((table.num_rows, len(self.spec.dense)), np.float32)
        for j, d in enumerate(self.spec.dense):
            try:
                column = _feature_column(table, d.column, d.name)
                dense[:, j] = finite_numeric_values(
                    column, d.transform, f"scoring input column {d.column!r} (feature {d.name!r})"
                )
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ValueError(
                    f"scoring input column {d.column!r} (feature {d.name!r}) must hold numbers: {err}"
                ) from None
        feeds["dense"] = dense
        return feeds


def _feature_column(table: pa.Table, column: str, feature: str) -> pa.Array:
    if column not in table.column_names:
        raise ValueError(f"scoring input has no column {column!r} (feature {feature!r}; columns: {table.column_names})")
    return table.column(column).combine_chunks()
