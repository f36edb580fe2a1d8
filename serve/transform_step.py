"""The transform step of a raw-row model, served in-process: logged columns -> model inputs.

Export writes `<model>-transform` for Triton's `python` backend (serve/triton_transform.py
as its model.py, beside the model's transform.json and vocabularies). This server does not
run Python-backend models; it recognizes this one by its transform.json and runs the same
mlet.raw_rows code directly, so both engines turn a logged row into the same ids.

A value the transform refuses is the client's fault: it answers 400 naming the column and
the row. A value never seen in training takes its table's out-of-vocabulary row, as in
training, and is counted per table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mlet.encoding import OOV_ID
from mlet.formats import DataFormatError
from mlet.raw_rows import raw_to_inputs
from mlet.runtime import Arrays
from mlet.transform import load_transform
from serve.model_config import ConfigSpec
from serve.protocol import InferenceError


class TransformBackend:
    """Runs a model's own Transform on a request's raw columns."""

    name = "mlet-transform"

    def __init__(
        self,
        version_folder: Path,
        spec: ConfigSpec,
        count_oov: Callable[[str, int], None] | None = None,
    ) -> None:
        self.transform = load_transform(version_folder)
        self.spec = spec
        outputs = {t.name: t for t in spec.outputs}
        if "sparse" not in outputs:
            raise ValueError(f"{version_folder.parent}: a transform step must output 'sparse'")
        self.sparse_dtype = outputs["sparse"].dtype
        self.with_dense = "dense" in outputs
        # Only vocabulary tables have an out-of-vocabulary row; hashed ones map every value.
        self.vocab_tables = [
            (i, t.name) for i, t in enumerate(self.transform.tables) if t.encoding == "vocab"
        ]
        self.count_oov = count_oov

    def infer(self, inputs: Arrays) -> Arrays:
        try:
            dense, sparse = raw_to_inputs(self.transform, inputs, self.sparse_dtype)
        except DataFormatError as e:  # names the column and the row
            raise InferenceError(f"raw row refused: {e}") from e
        self.record_oov(sparse)
        outputs = {"sparse": sparse}
        if self.with_dense:
            outputs = {"dense": dense, **outputs}
        return outputs

    def record_oov(self, ids: np.ndarray) -> None:
        if self.count_oov is None:
            return
        for table, name in self.vocab_tables:
            count = int(np.count_nonzero(ids[:, table] == OOV_ID))
            if count:
                self.count_oov(name, count)
