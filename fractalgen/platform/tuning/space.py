"""The search space of a sweep for Ray Tune: grid lists, Optuna's define-by-run space (only the chosen
schedule family's parameters sampled), the released baseline first, ASHA over the image count."""

from __future__ import annotations

import logging
from typing import Any

from fractalgen.platform.tuning.config import (
    OPTIONAL_FIELDS,
    SweepConfig,
    SweepSpaceConfig,
    canonical_spec,
    family_params,
    schedule_spec,
)
from fractalgen.sampling_settings import SamplingSettings, parse_iters

log = logging.getLogger(__name__)


# =============================================================================== search space
def _iters_key(iters: tuple[int, ...] | list[int] | None) -> str:
    return ",".join(map(str, iters)) if iters else "default"


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """Tune's param space as a dict: ``grid_search`` lists (grid), or for Optuna the same lists as
    choices / uniform ranges without conditions (each expanded schedule spec one choice).

    ``run_sweep`` gives Optuna ``optuna_space`` instead (define-by-run: a family's parameters are
    sampled only when the family is chosen, and ``schedule_ranges`` apply). ``num_iters`` travels as
    a string (``"64,16"`` or ``"default"``): Optuna's categorical distributions take scalars only.
    """
    from ray import tune  # deferred: heavy import

    s = cfg.space
    iters = [_iters_key(i) for i in s.num_iters] or ["default"]
    lists: dict[str, list[Any]] = {
        "cfg": list(s.cfg), "temperature": list(s.temperature), "cfg_schedule": s.schedule_specs(),
        "num_iters": iters, **{key: list(getattr(s, key)) for key in OPTIONAL_FIELDS},
    }  # fmt: skip
    if cfg.search.algorithm == "grid":
        return {"released": False, **{k: tune.grid_search(v) for k, v in lists.items()}}
    space: dict[str, Any] = {k: tune.choice(v) for k, v in lists.items()}
    if s.cfg_range:
        space["cfg"] = tune.uniform(*s.cfg_range)
    if s.temperature_range:
        space["temperature"] = tune.uniform(*s.temperature_range)
    return space


class OptunaSpace:
    """Optuna's define-by-run space (``optuna_space``); a module-level class so that OptunaSearch's
    checkpoint (plain ``pickle``) can store it."""

    def __init__(self, space: SweepSpaceConfig) -> None:
        self.space = space
        self.iters = [_iters_key(i) for i in space.num_iters] or ["default"]
        self.conditional = set(space.schedule_params) | set(space.schedule_ranges)
        self.choices: list[str] = []
        for spec in space.cfg_schedule:
            choice = spec.strip() if spec.strip() in self.conditional else canonical_spec(spec)
            if choice not in self.choices:
                self.choices.append(choice)

    def __call__(self, trial: Any) -> dict[str, Any]:
        s = self.space
        if s.cfg_range:
            trial.suggest_float("cfg", *s.cfg_range)
        else:
            trial.suggest_categorical("cfg", list(s.cfg))
        if s.temperature_range:
            trial.suggest_float("temperature", *s.temperature_range)
        else:
            trial.suggest_categorical("temperature", list(s.temperature))
        choice = trial.suggest_categorical("schedule", self.choices)
        spec = choice
        if choice in self.conditional:  # only the chosen family's parameters are sampled
            params: dict[str, float] = {}
            for name in family_params(choice):
                rng = s.schedule_ranges.get(choice, {}).get(name)
                values = s.schedule_params.get(choice, {}).get(name)
                if rng is not None:
                    params[name] = trial.suggest_float(f"{choice}.{name}", *rng)
                elif values is not None:
                    params[name] = trial.suggest_categorical(f"{choice}.{name}", list(values))
            spec = canonical_spec(schedule_spec(choice, params))
        trial.suggest_categorical("num_iters", self.iters)
        for key in OPTIONAL_FIELDS:
            trial.suggest_categorical(key, list(getattr(s, key)))
        return {"cfg_schedule": spec, "released": False}


def optuna_space(cfg: SweepConfig) -> OptunaSpace:
    """Optuna's define-by-run space: the schedule (``schedule``: a spec, or a bare family of
    ``schedule_params`` / ``schedule_ranges``) is chosen first, then only that family's parameters
    are sampled (``<family>.<param>``); the call returns the trial's ``cfg_schedule`` spec."""
    return OptunaSpace(cfg.space)


def released_config(model_config: Any) -> dict[str, Any]:
    """The trial config of the model's released setting (``SamplingSettings().resolved``)."""
    r = SamplingSettings().resolved(model_config)
    return {
        "released": True, "cfg": r.cfg, "temperature": r.temperature, "cfg_schedule": str(r.cfg_schedule),
        "num_iters": _iters_key(r.num_iters), "lower_cfg": r.lower_cfg,
        "lower_cfg_schedule": None if r.lower_cfg_schedule is None else str(r.lower_cfg_schedule),
        "temperature_end": r.temperature_end, "filter_threshold": r.filter_threshold,
    }  # fmt: skip


def trial_settings(config: dict[str, Any]) -> SamplingSettings:
    """The SamplingSettings of a trial's config (or of a results row)."""
    iters = config.get("num_iters", "default")
    optional = {
        k: config.get(k)
        for k in OPTIONAL_FIELDS
        if config.get(k) is not None and config.get(k) == config.get(k)
    }
    return SamplingSettings(
        cfg=float(config["cfg"]),
        temperature=float(config["temperature"]),
        cfg_schedule=config["cfg_schedule"],
        num_iters=None if iters in (None, "default") else parse_iters(iters),
        **optional,
    )


def released_first(searcher: Any, point: dict[str, Any]) -> Any:
    """``searcher`` (OptunaSearch) that suggests ``point`` first and is not told its results.

    Not OptunaSearch's own ``points_to_evaluate``: it enqueues the point as fixed Optuna params, and
    a fixed value outside a categorical's choices (the released cfg when ``space.cfg`` does not list
    it) makes ``suggest_categorical`` raise ``ValueError: '6.5' not in (...)`` in Optuna 5.
    """
    from ray.tune.search import Searcher  # deferred: heavy import

    class ReleasedFirst(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=searcher.metric, mode=searcher.mode)
            self.searcher, self.pending, self.own = searcher, [dict(point)], set()

        def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
            ok = self.searcher.set_search_properties(metric, mode, config, **spec)
            self._metric, self._mode = self.searcher.metric, self.searcher.mode
            return ok

        def set_max_concurrency(self, max_concurrent: int) -> bool:
            return self.searcher.set_max_concurrency(max_concurrent)

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            if self.pending:
                self.own.add(trial_id)
                return self.pending.pop(0)
            return self.searcher.suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id not in self.own:
                self.searcher.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id not in self.own:
                self.searcher.on_trial_complete(trial_id, result=result, error=error)

        # a wrapper's own state (Tune's SearchGenerator.save_to_dir saves the wrapped searcher itself)
        def get_state(self) -> dict:
            return {"pending": self.pending, "own": self.own}

        def set_state(self, state: dict) -> None:
            self.pending, self.own = state["pending"], state["own"]

    return ReleasedFirst()


def make_scheduler(cfg: SweepConfig) -> Any:
    """ASHA over the image count (FIFO with a single rung); the released trial is never stopped early."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler  # deferred: heavy import

    rungs = cfg.eval.rungs()
    if len(rungs) == 1:
        return FIFOScheduler()

    class KeepReleased(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)  # records the rung either way
            if action == TrialScheduler.STOP and (trial.config or {}).get("released"):
                return TrialScheduler.CONTINUE
            return action

    return KeepReleased(
        time_attr="num_images", max_t=cfg.eval.num_images, grace_period=rungs[0],
        reduction_factor=cfg.eval.reduction_factor,
    )  # fmt: skip
