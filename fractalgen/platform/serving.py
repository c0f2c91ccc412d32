"""The ``mlflow.pyfunc`` model of a registered FractalGen version: class labels in, images out.

Request (``mlflow models serve``, POST /invocations)::

    {"dataframe_records": [{"label": 207}, {"label": 360}],
     "params": {"cfg": 6.5, "temperature": 1.02, "cfg_schedule": "linear", "num_iters": [64, 16],
                "seed": 0, "batch_size": 0}}

Response: ``{"predictions": [{"label": 207, "image": "<base64 PNG>"}, ...]}``. In Python,
``mlflow.pyfunc.load_model("models:/NAME@champion").predict(pd.DataFrame({"label": [...]}), params=...)``
returns the same as a DataFrame; ``decode_images`` turns it into a uint8 array.

Terms: *params* are the sampling settings (``generate.SamplingSettings``; their defaults in the
signature are the model's own defaults when it was logged) plus ``seed`` and ``batch_size``. Batch
i of the request is sampled with seed ``seed + i``; ``batch_size`` 0 samples all rows as one batch,
which equals ``model.sample(labels, seed=seed, ...)`` exactly. Weights live in the model's
``checkpoint`` artifact (released format). The model runs on CUDA when available
(``FRACTALGEN_SERVE_DEVICE`` overrides). Serving needs ``fractalgen`` installed in the serving
environment (``--env-manager local`` in the project image).
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

import mlflow.pyfunc
import numpy as np

CHECKPOINT_ARTIFACT = "checkpoint"
DEVICE_ENV = "FRACTALGEN_SERVE_DEVICE"


def encode_png(image_hwc: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


def decode_images(predictions: Any) -> np.ndarray:
    """(N, S, S, 3) uint8 from a predict() DataFrame, a list of records or a server response."""
    if isinstance(predictions, dict) and "predictions" in predictions:
        predictions = predictions["predictions"]
    if hasattr(predictions, "to_dict"):
        predictions = predictions.to_dict(orient="records")
    return np.stack([decode_png(row["image"]) for row in predictions])


def default_params(config: Any) -> dict[str, Any]:
    """The params of the signature, with the model config's sampling defaults."""
    return {
        "cfg": float(config.sample_cfg),
        "temperature": float(config.sample_temperature),
        "cfg_schedule": str(config.sample_cfg_schedule),
        "num_iters": [int(i) for i in config.default_iters()],
        "filter_threshold": 1e-4,
        "seed": 0,
        "batch_size": 0,
    }


def _labels(model_input: Any) -> list[int]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        for col in ("label", "class_label", "labels"):
            if col in model_input.columns:
                return [int(v) for v in model_input[col].tolist()]
        if model_input.shape[1] == 1:
            return [int(v) for v in model_input.iloc[:, 0].tolist()]
        raise ValueError(f"input needs a 'label' column, got columns {list(model_input.columns)}")
    if isinstance(model_input, dict):
        return _labels(pd.DataFrame(model_input))
    return [int(v) for v in np.asarray(model_input).reshape(-1).tolist()]


class FractalGenPyfunc(mlflow.pyfunc.PythonModel):
    """Generates images for class labels with the given sampling settings (module docstring)."""

    def load_context(self, context: Any) -> None:
        import torch

        from fractalgen.models import load_released

        device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_released(context.artifacts[CHECKPOINT_ARTIFACT]).to(device).eval()

    # no type hints here: MLflow derives (and then warns about) an input schema from predict's hints;
    # the signature logged with the model describes the input instead
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd
        import torch

        from fractalgen.platform.evaluation.generate import (
            SamplingSettings,
            generate_images,
            parse_iters,
            to_uint8,
        )

        p = {**default_params(self.model.config), **(params or {})}
        labels = _labels(model_input)
        iters = p["num_iters"]
        settings = SamplingSettings(
            num_iters=parse_iters(iters) if isinstance(iters, str) else tuple(int(i) for i in iters),
            cfg=float(p["cfg"]),
            cfg_schedule=str(p["cfg_schedule"]),  # type: ignore[arg-type]
            temperature=float(p["temperature"]),
            filter_threshold=float(p["filter_threshold"]),
        )
        label_t = torch.tensor(labels, dtype=torch.long)
        batch = int(p["batch_size"]) or max(1, len(labels))
        images = generate_images(self.model, label_t, settings, batch_size=batch, seed=int(p["seed"]))
        encoded = [encode_png(img) for img in to_uint8(images)]
        return pd.DataFrame({"label": labels, "image": encoded})
