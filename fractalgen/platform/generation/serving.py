"""The ``mlflow.pyfunc`` model of a registered FractalGen version: class labels in, images out.

Request (``mlflow models serve``, POST /invocations)::

    {"dataframe_records": [{"label": 207}, {"label": 360}],
     "params": {"cfg": 6.5, "temperature": 1.02, "cfg_schedule": "linear", "num_iters": [64, 16],
                "seed": 0, "batch_size": 0}}

Any guidance schedule of docs/model.md#guidance-schedules works (``"cfg_schedule":
"interval:start=0.2,end=0.8"``), as do ``lower_cfg``, ``lower_cfg_schedule`` and ``temperature_end``;
their ``0`` / ``""`` defaults mean unset (the released behaviour).

Response: ``{"predictions": [{"label": 207, "image": "<base64 PNG>"}, ...]}``. In Python,
``mlflow.pyfunc.load_model("models:/NAME@champion").predict(pd.DataFrame({"label": [...]}), params=...)``
returns the same as a DataFrame; ``decode_images`` turns it into a uint8 array.

Terms: *params* are the sampling settings (``fractalgen.sampling_settings.SamplingSettings``; their defaults in the
signature are the model's own defaults when it was logged) plus ``seed`` and ``batch_size``. Batch
i of the request is sampled with seed ``seed + i``; ``batch_size`` 0 samples all rows as one batch,
which equals ``model.sample(labels, seed=seed, ...)`` exactly. Weights live in the model's
``checkpoint`` artifact (released format). The model runs on CUDA when available
(``FRACTALGEN_SERVE_DEVICE`` overrides). Serving needs ``fractalgen`` installed in the serving
environment (``--env-manager local`` in the project image).

Bad requests (``check_request``) are refused with ``MlflowException(INVALID_PARAMETER_VALUE)``,
which the scoring server answers with HTTP 400 and the message: a label outside ``0..classes-1``,
more rows than ``FRACTALGEN_SERVE_MAX_IMAGES`` (default 256) or none, ``batch_size`` outside
``0..max``, a non-finite ``cfg`` / ``lower_cfg`` / ``temperature`` / ``temperature_end`` /
``filter_threshold`` or one out of its range, an unknown or malformed ``cfg_schedule`` /
``lower_cfg_schedule``, ``num_iters`` of another depth or outside ``1..patches`` of its level, a
negative ``seed``. The request size is bounded that way: no request samples more than the maximum.
(The scoring server itself parses the body against the signature first: a non-numeric label or
setting is refused there, also with a 400; a fractional label is cast to an integer there.)
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
from typing import Any

import mlflow.pyfunc
import numpy as np

from fractalgen.sampling_settings import SamplingSettings

CHECKPOINT_ARTIFACT = "checkpoint"
DEVICE_ENV = "FRACTALGEN_SERVE_DEVICE"
MAX_IMAGES_ENV = "FRACTALGEN_SERVE_MAX_IMAGES"
DEFAULT_MAX_IMAGES = 256  # images per request (rows), and so the largest batch
MAX_SEED = 2**62  # seeds seed..seed+batches-1 must stay valid torch seeds


def encode_png(image_hwc: np.ndarray) -> str:
    from PIL import Image  # deferred: heavy import

    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    from PIL import Image  # deferred: heavy import

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
        # an unconditional (1-class) model samples without guidance (SamplingSettings.resolved)
        "cfg": 1.0 if config.num_classes == 1 else float(config.sample_cfg),
        "temperature": float(config.sample_temperature),
        "cfg_schedule": str(config.sample_cfg_schedule),
        "lower_cfg": UNSET_NUMBER,
        "lower_cfg_schedule": UNSET_TEXT,
        "temperature_end": UNSET_NUMBER,
        "num_iters": [int(i) for i in config.default_iters()],
        "filter_threshold": 1e-4,
        "seed": 0,
        "batch_size": 0,
    }


# an MLflow param needs a typed default: 0 / "" stand for "unset" (released behaviour) in the
# optional settings, whose real values are >= 1 (lower_cfg), > 0 (temperature_end) or a schedule
UNSET_NUMBER, UNSET_TEXT = 0.0, ""


class BadRequest(Exception):
    """A request the model refuses (``check_request``); the message says which value and why."""


def max_images() -> int:
    """Images (rows) one request may ask for: ``FRACTALGEN_SERVE_MAX_IMAGES``, else 256."""
    raw = os.environ.get(MAX_IMAGES_ENV, "").strip()
    try:
        value = int(raw) if raw else DEFAULT_MAX_IMAGES
    except ValueError:
        raise ValueError(f"{MAX_IMAGES_ENV}={raw!r}: expected a whole number of images") from None
    if value < 1:
        raise ValueError(f"{MAX_IMAGES_ENV}={raw!r}: expected a whole number of images >= 1")
    return value


def _label_values(model_input: Any) -> list[Any]:
    import pandas as pd  # deferred: heavy import

    if isinstance(model_input, pd.DataFrame):
        for col in ("label", "class_label", "labels"):
            if col in model_input.columns:
                return model_input[col].tolist()
        if model_input.shape[1] == 1:
            return model_input.iloc[:, 0].tolist()
        raise BadRequest(f"input needs a 'label' column, got columns {list(model_input.columns)}")
    if isinstance(model_input, dict):
        return _label_values(pd.DataFrame(model_input))
    return np.asarray(model_input).reshape(-1).tolist()


def _integer(name: str, value: Any) -> int:
    """``value`` as an int if it is a whole number (not a bool, NaN or fraction); else BadRequest."""
    if isinstance(value, bool | np.bool_):
        raise BadRequest(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value.strip())
    raise BadRequest(f"{name} must be a whole number, got {value!r}")


def _real(name: str, value: Any) -> float:
    """``value`` as a finite float by the one float coercion (``config.to_float``); else BadRequest."""
    from fractalgen.config import ConfigError, to_float  # deferred: heavy import

    try:
        return to_float(value.item() if isinstance(value, np.generic) else value, name)
    except ConfigError as err:
        raise BadRequest(str(err)) from None


def check_request(model_input: Any, params: dict[str, Any] | None, config: Any) -> dict[str, Any]:
    """Validate a request against the model's ``config``; the values to sample with.

    Returns ``{"labels", "settings" (SamplingSettings), "seed", "batch_size"}``; raises
    ``BadRequest`` naming the first bad value (module docstring lists the rules).
    """

    p = {**default_params(config), **(params or {})}
    limit = max_images()
    values = _label_values(model_input)
    if not values:
        raise BadRequest("the request has no rows: send one {'label': class index} per image")
    if len(values) > limit:
        raise BadRequest(
            f"the request asks for {len(values)} images; at most {limit} per request "
            f"({MAX_IMAGES_ENV} on the server): split it"
        )
    labels = []
    for i, value in enumerate(values):
        label = _integer(f"label of row {i}", value)
        if not 0 <= label < config.num_classes:
            raise BadRequest(
                f"label of row {i} is {label}: this model has {config.num_classes} classes, "
                f"labels 0..{config.num_classes - 1}"
            )
        labels.append(label)

    cfg = _real("cfg", p["cfg"])
    if config.num_classes == 1 and cfg != 1.0:
        raise BadRequest(f"this model is unconditional (1 class): cfg must be 1.0, got {p['cfg']!r}")
    lower_cfg = _real("lower_cfg", p["lower_cfg"])
    if config.num_classes == 1 and lower_cfg not in (UNSET_NUMBER, 1.0):
        raise BadRequest(
            f"this model is unconditional (1 class): lower_cfg must be unset, got {p['lower_cfg']!r}"
        )
    temperature_end = _real("temperature_end", p["temperature_end"])
    optional = {
        "lower_cfg": None if lower_cfg == UNSET_NUMBER else lower_cfg,
        "lower_cfg_schedule": str(p["lower_cfg_schedule"]).strip() or None,
        "temperature_end": None if temperature_end == UNSET_NUMBER else temperature_end,
    }
    values = {
        "cfg": cfg,
        "temperature": _real("temperature", p["temperature"]),
        "filter_threshold": _real("filter_threshold", p["filter_threshold"]),
        "cfg_schedule": str(p["cfg_schedule"]),
        **optional,
    }
    iters = p["num_iters"]
    if isinstance(iters, str):
        iters = [part for part in iters.replace(" ", "").split(",") if part]
    if not isinstance(iters, list | tuple | np.ndarray):
        raise BadRequest(f"num_iters must be a list of whole numbers, one per level, got {iters!r}")
    patches = [config.seq_len(level) for level in range(config.num_levels)]
    if len(iters) != len(patches):
        raise BadRequest(f"num_iters needs {len(patches)} entries (one per level), got {list(iters)!r}")
    num_iters = []
    for level, (value, most) in enumerate(zip(iters, patches, strict=True)):
        steps = _integer(f"num_iters[{level}]", value)
        if not 1 <= steps <= most:
            raise BadRequest(
                f"num_iters[{level}] is {steps}: level {level} generates {most} patches, so 1..{most} steps"
            )
        num_iters.append(steps)

    seed = _integer("seed", p["seed"])
    if not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed must lie in 0..{MAX_SEED}, got {seed}")
    batch = _integer("batch_size", p["batch_size"])
    if not 0 <= batch <= limit:
        raise BadRequest(f"batch_size must lie in 0..{limit} (0: all rows in one batch), got {batch}")
    try:  # the ranges and schedule specs are SamplingSettings' own checks
        settings = SamplingSettings(num_iters=tuple(num_iters), **values)
    except ValueError as err:
        raise BadRequest(str(err)) from None
    return {"labels": labels, "settings": settings, "seed": seed, "batch_size": batch or len(labels)}


def _bad_request(err: Exception) -> Exception:
    """The exception MLflow's scoring server answers with HTTP 400 and ``err``'s message."""
    from mlflow.exceptions import MlflowException  # deferred: heavy import
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # deferred: heavy import

    return MlflowException(f"bad request: {err}", error_code=INVALID_PARAMETER_VALUE)


class FractalGenPyfunc(mlflow.pyfunc.PythonModel):
    """Generates images for class labels with the given sampling settings (module docstring)."""

    def load_context(self, context: Any) -> None:
        import torch  # deferred: heavy import

        from fractalgen.models import load_released  # deferred: heavy import

        device = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_released(context.artifacts[CHECKPOINT_ARTIFACT]).to(device).eval()

    # no type hints here: MLflow derives (and then warns about) an input schema from predict's hints;
    # the signature logged with the model describes the input instead
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        import pandas as pd  # deferred: heavy import
        import torch  # deferred: heavy import

        from fractalgen.platform.generation.sampling import (
            generate_images,
            to_uint8,
        )  # deferred: heavy import

        try:
            request = check_request(model_input, params, self.model.config)
        except BadRequest as err:
            raise _bad_request(err) from None
        labels = request["labels"]
        label_t = torch.tensor(labels, dtype=torch.long)
        try:
            images = generate_images(
                self.model,
                label_t,
                request["settings"],
                batch_size=request["batch_size"],
                seed=request["seed"],
            )
        except ValueError as err:  # the model's own checks (fractalgen.models.fractal.FractalGen.sample)
            raise _bad_request(err) from None
        encoded = [encode_png(img) for img in to_uint8(images)]
        return pd.DataFrame({"label": labels, "image": encoded})
