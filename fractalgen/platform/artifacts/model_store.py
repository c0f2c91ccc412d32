"""The MLflow model registry as a store of model files: a client, ``models:/`` URIs, finding a version
and the checkpoint file inside a downloaded model; ``use_tracking_uri``, MLflow's process-wide URI
for a block; and what every MLflow user here shares: ``ensure_experiment`` and ``flatten_params``
(training runs, sweeps, registrations). Registering, reviewing and promoting versions is
``fractalgen.platform.registry``'s job."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def use_tracking_uri(uri: str | None, *, registry: bool = False) -> Iterator[None]:
    """MLflow's process-wide tracking URI (and registry URI if ``registry``) is ``uri`` for the block.

    Afterwards everything is as before, including the ``MLFLOW_TRACKING_URI`` variable that
    ``mlflow.set_tracking_uri`` also sets (MLflow's own ``_use_tracking_uri`` unsets it instead).
    Needed where MLflow itself reads the global URI rather than a client's: ``mlflow.start_run``,
    ``log_model``, and the registry store's look-up of the logged model in ``create_model_version``.
    ``uri`` None: nothing changes.
    """
    if not uri:
        yield
        return
    import mlflow  # deferred: heavy import
    from mlflow.tracking._model_registry import utils as registry_utils  # deferred: heavy import
    from mlflow.tracking._tracking_service import utils as tracking_utils  # deferred: heavy import

    saved_env = {key: os.environ.get(key) for key in URI_ENV}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    if registry:
        mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])  # type: ignore[arg-type]  # None: unset again (resets its tracer too)
        registry_utils._registry_uri = saved[1]  # set_registry_uri(None) would keep the variable
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RegistryError(ValueError):
    """A registered model or version does not exist, or the registry refused an operation."""


def client(tracking_uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` for ``tracking_uri`` (default: MLFLOW_TRACKING_URI / mlflow's default);
    the registry is the tracking server's unless MLFLOW_REGISTRY_URI says otherwise."""
    from mlflow.tracking import MlflowClient  # deferred: heavy import

    return MlflowClient(
        tracking_uri=tracking_uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    )


MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (longer values are refused)


def flatten_params(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    """Nested mappings as flat MLflow params in ``out`` (and returned): ``{"train": {"lr": 1}}`` with
    prefix ``""`` -> ``{"train.lr": "1"}``; lists as JSON, other values as ``str``, each cut to
    ``MAX_PARAM_LENGTH`` characters."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            flatten_params(f"{prefix}{k}.", v, out)
    else:
        text = json.dumps(value) if isinstance(value, list) else str(value)
        out[prefix.rstrip(".")] = text[:MAX_PARAM_LENGTH]
    return out


def ensure_experiment(c: MlflowClient, name: str, tracking_uri: str | None = None) -> str:
    """The id of experiment ``name``, created if needed; with a SQLite store its artifacts go beside
    the database (``mlartifacts/``), not into the working directory."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = str(tracking_uri or c.tracking_uri)
    location = None
    if uri.startswith("sqlite:///"):
        folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///") :]))
        location = "file://" + os.path.join(folder, "mlartifacts")
    return c.create_experiment(name, artifact_location=location)


# ------------------------------------------------------------------------------ finding versions
def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME/VERSION`` -> (NAME, VERSION, None); ``models:/NAME@ALIAS`` -> (NAME, None, ALIAS)."""
    if not uri.startswith("models:/"):
        raise RegistryError(
            f"{uri!r} is not a registered model URI (models:/NAME/VERSION or models:/NAME@ALIAS)"
        )
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, None
    raise RegistryError(f"{uri!r} names no version: use models:/{rest}/VERSION or models:/{rest}@champion")


def _versions(c: Any, name: str) -> list[Any]:
    from mlflow.exceptions import MlflowException  # deferred: heavy import

    try:
        c.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in c.search_registered_models(max_results=50))
        raise RegistryError(
            f"no registered model named {name!r}" + (f" (registered: {', '.join(names)})" if names else "")
        ) from None
    return sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def get_version(
    name: str, version: str | int | None = None, alias: str | None = None, *, c: Any = None
) -> Any:
    """The ``ModelVersion`` NAME/VERSION or NAME@ALIAS; ``RegistryError`` naming what exists otherwise."""
    from mlflow.exceptions import MlflowException  # deferred: heavy import

    c = c or client()
    versions = _versions(c, name)
    listing = ", ".join(str(v.version) for v in versions) or "none"
    if alias is not None:
        try:
            return c.get_model_version_by_alias(name, alias)
        except MlflowException:
            aliases = sorted({a for v in versions for a in (v.aliases or [])})
            raise RegistryError(
                f"model {name!r} has no alias {alias!r} (aliases: {', '.join(aliases) or 'none'}; versions: {listing})"
            ) from None
    text = str(version)
    if text == "latest":
        if not versions:
            raise RegistryError(f"model {name!r} has no versions")
        return versions[-1]
    for v in versions:
        if str(v.version) == text:
            return c.get_model_version(name, text)  # with tags and aliases filled in
    raise RegistryError(f"model {name!r} has no version {text} (versions: {listing})")


def resolve_version(uri: str, *, c: Any = None) -> Any:
    name, version, alias = parse_model_uri(uri)
    return get_version(name, version, alias, c=c)


def _checkpoint_in_model_dir(model_dir: Path) -> Path:
    import yaml  # deferred: heavy import

    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    arts = (mlmodel.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {}) or {}
    rel = (arts.get("checkpoint") or {}).get("path")
    if rel and (model_dir / rel).is_file():
        return model_dir / rel
    found = sorted(model_dir.rglob("*.pth"))
    if not found:
        raise RegistryError(f"the model at {model_dir} holds no checkpoint artifact")
    return found[0]
