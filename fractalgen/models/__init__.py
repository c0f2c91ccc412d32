"""FractalAR / FractalMAR: autoregressive models nested inside autoregressive models (docs/model.md).

Public entry points:
- ``build_model(name, **overrides)``: a model of a registered size (``MODEL_CONFIGS``).
- ``load_released(path, name)``: a model holding the weights of a released ``checkpoint-last.pth``.
- ``save_released(model, path)``: write weights in the released checkpoint format.
"""

from fractalgen.models.checkpoint import (
    CheckpointError,
    InitReport,
    init_from_checkpoint,
    load_released,
    save_released,
)
from fractalgen.models.configs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODEL_CONFIGS,
    RELEASED_NAMES,
    FractalConfig,
    get_config,
)
from fractalgen.models.fractal import FractalGen, build_model, parameter_level

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_CONFIGS",
    "RELEASED_NAMES",
    "CheckpointError",
    "FractalConfig",
    "FractalGen",
    "InitReport",
    "build_model",
    "get_config",
    "init_from_checkpoint",
    "load_released",
    "parameter_level",
    "save_released",
]
