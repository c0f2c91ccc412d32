"""The MLflow model registry for FractalGen: ``versions`` registers checkpoints as versions (an
``mlflow.pyfunc`` model with the weights, a sample grid, the ``candidate`` alias) and keeps their
tags (metrics, a sweep's best sampling settings); ``review`` compares versions side by side
(terminal, HTML) and moves ``champion`` to the one in use. The terms are in ``versions``' docstring."""

from fractalgen.platform.artifacts.model_store import RegistryError, client, get_version
from fractalgen.platform.registry.review import VersionSummary, collect_versions, promote, review
from fractalgen.platform.registry.versions import (
    CANDIDATE,
    CHAMPION,
    TAG_ARCH,
    TAG_SOURCE,
    TAG_SOURCE_KIND,
    TAG_TRAINING_RUN,
    RegisteredVersion,
    architecture_name,
    record_metrics,
    register_checkpoint,
    set_best_settings,
)

__all__ = [
    "CANDIDATE", "CHAMPION", "TAG_ARCH", "TAG_SOURCE", "TAG_SOURCE_KIND", "TAG_TRAINING_RUN", "RegisteredVersion", "RegistryError", "VersionSummary",
    "architecture_name", "client", "collect_versions", "get_version", "promote", "record_metrics",
    "register_checkpoint", "review", "set_best_settings",
]  # fmt: skip
