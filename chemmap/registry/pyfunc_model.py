"""chemmap's map model as MLflow serves it: a models-from-code pyfunc around the bundle.

MLflow logs this very file (``python_model=<path of this file>``), never a pickled
instance, and :func:`chemmap.registry.registry.fetch_bundle` accepts a downloaded model only
when its code file is byte for byte this one. Loading runs nothing but this file: the model
itself is the bundle folder of plain files (artifact ``chemmap``), read with
:func:`chemmap.inference.bundle.read_bundle` (hashed weights, ``weights_only=True``).

Use it from anywhere chemmap is installed::

    model = mlflow.pyfunc.load_model("models:/chemmap@champion")
    maps = model.predict({"raw": raw, "white": white, "dark": dark})  # (targets, lines, samples)

MLflow is imported at the top here, unlike in the rest of chemmap: this module exists only
to be executed by MLflow, and nothing in chemmap imports it.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
import numpy as np

from chemmap.errors import InputError
from chemmap.inference.bundle import read_bundle
from chemmap.inference.mapping import map_arrays

ARTIFACT = "chemmap"  # the bundle folder's name among the model's artifacts
INPUTS = ("raw", "white", "dark")


def _band_first(model_input: Any, bands: int) -> dict[str, np.ndarray | None]:
    """``{"raw", "white", "dark"}`` band-last arrays -> band-first ``(bands, lines, samples)`` views."""
    if not isinstance(model_input, dict):
        raise InputError(
            f"model input: expected a dict of arrays {list(INPUTS)}, got {type(model_input).__name__}"
        )
    if "raw" not in model_input:
        raise InputError(f"model input: no 'raw' array (got keys {sorted(model_input)})")
    out: dict[str, np.ndarray | None] = {}
    for key in INPUTS:
        value = model_input.get(key)
        if value is None:
            out[key] = None  # only a recipe with calibration: none scores without references
            continue
        a = np.asarray(value)
        if a.ndim != 3 or a.shape[-1] != bands:
            raise InputError(
                f"model input {key!r}: expected (lines, samples, {bands}) band-last, got shape {a.shape}"
            )
        out[key] = np.moveaxis(a, -1, 0)  # (bands, lines, samples)
    return out


class ChemmapMapModel(mlflow.pyfunc.PythonModel):
    """The fold ensemble of a chemmap bundle: raw scan in, chemical maps out."""

    def load_context(self, context) -> None:
        """Read and check the bundle (``context.artifacts["chemmap"]``) and build its ensemble."""
        self.bundle = read_bundle(context.artifacts[ARTIFACT])
        self.model = self.bundle.ensemble()
        level = self.bundle.provenance.get("raw_saturation")
        self.saturation = math.inf if level is None else float(level)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        """The maps of one raw scan.

        Args:
            context: MLflow's model context (unused: everything was read in ``load_context``).
            model_input: float32 arrays, band-last as MLflow users hold them: ``raw``
                ``(lines, samples, bands)`` counts, ``white`` ``(lines_w, samples, bands)`` and
                ``dark`` ``(lines_d, samples, bands)`` references as recorded (averaged over
                their lines here). ``bands`` = every raw band the recipe was made for.
            params: optional ``saturation``: counts at or above it are saturated; default the
                level recorded with the model's training data (``provenance["raw_saturation"]``,
                None = unbounded).

        Returns:
            ``(targets, lines, samples)`` float32 in the targets' units, NaN outside the mask.
        """
        arrays = _band_first(model_input, len(self.bundle.recipe.raw_wavelengths))
        level = (params or {}).get("saturation")
        scan = map_arrays(
            self.model,
            self.bundle.recipe,
            arrays["raw"],
            arrays["white"],
            arrays["dark"],
            saturation=self.saturation if level is None else float(level),
            source="model input",
        )
        return scan.maps


mlflow.models.set_model(ChemmapMapModel())
