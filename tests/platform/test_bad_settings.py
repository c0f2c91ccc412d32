"""Bad settings are refused with a clear error (exit 2) naming the key, the option or the file:

- every float setting of every config section, and every float command-line option, refuses NaN/inf;
- a recipe file that is not UTF-8, is empty, or gives a key twice is refused, naming the file;
- a failed ``fractalgen sample`` leaves no output behind, and ``fractalgen train --dry-run`` writes
  nothing;
- property-based (hypothesis): random recipes and ``--set`` overrides (unknown and misspelt keys,
  values of the wrong type, NaN/inf, huge numbers, strings, lists, nested mappings, broken YAML)
  either validate or raise ``ConfigError`` naming the key, through the same loading code the
  ``train``, ``cluster plan`` and ``sweep`` commands use, and through ``fractalgen.cli.main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_train_support import REPO, tiny_dataset, tiny_overrides

from fractalgen.cli import build_parser, main
from fractalgen.config import ConfigError, TrainRunConfig, load, to_dict
from fractalgen.platform.tuning.config import SweepConfig

CONFIGS = REPO / "configs"
DEMO = CONFIGS / "demo.yaml"
SWEEP_DEMO = CONFIGS / "sweep_demo.yaml"
CONFIG_CLASSES = (TrainRunConfig, SweepConfig)

# bounded and reproducible: the same examples on every run, no example database written
BOUNDED = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ============================================================================ the config tree
def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _paths(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every dotted key of a config class (sections and fields) with its annotation."""
    for name, tp in _fields(cls).items():
        yield prefix + name, tp
        if _is_section(tp):
            yield from _paths(tp, f"{prefix}{name}.")


def _nonfinite_yaml(tp: Any, bad: str) -> str | None:
    """A YAML value for annotation ``tp`` whose floats are all ``bad`` (None: ``tp`` holds no float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float:
        return bad
    if origin in (typing.Union, types.UnionType):
        arms = [_nonfinite_yaml(a, bad) for a in args if a is not type(None)]
        return next((a for a in arms if a is not None), None)
    if origin is tuple and args:
        items = [args[0]] if args[-1] is Ellipsis else list(args)
        values = [_nonfinite_yaml(a, bad) for a in items]
        if any(v is None for v in values):
            return None
        return "[" + ", ".join(typing.cast(list[str], values)) + "]"
    return None


FLOAT_SETTINGS = [
    (cls, key) for cls in CONFIG_CLASSES for key, tp in _paths(cls) if _nonfinite_yaml(tp, ".nan") is not None
]


def _all_floats_finite(obj: Any) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_all_floats_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(_all_floats_finite(v) for v in obj)
    return True


# ============================================================================ 1. NaN / inf
def test_the_float_settings_are_found() -> None:
    keys = {key for _, key in FLOAT_SETTINGS}
    assert {"train.base_lr", "train.epochs", "train.betas", "model.dropout", "eval.cfg"} <= keys
    assert {"space.cfg", "space.cfg_range", "eval.reduction_factor", "resources.gpus_per_trial"} <= keys


@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf", "1e999", "-1.0e+400"])
@pytest.mark.parametrize(("cls", "key"), FLOAT_SETTINGS, ids=[f"{c.__name__}:{k}" for c, k in FLOAT_SETTINGS])
def test_every_float_setting_refuses_nan_and_inf(cls: type, key: str, bad: str) -> None:
    tp = dict(_paths(cls))[key]
    value = _nonfinite_yaml(tp, bad)
    with pytest.raises(ConfigError) as err:
        load(cls, None, [f"{key}={value}"])
    assert key in str(err.value) and "finite number" in str(err.value), err.value


@pytest.mark.parametrize(
    "override",
    [
        "train.base_lr=.nan",
        "train.epochs=.inf",
        "train.epochs=1e999",
        "model.dropout=.nan",
        f"train.epochs={10**400}",
    ],
)
def test_train_cli_refuses_nonfinite_values_naming_the_key(override: str, capsys) -> None:
    code = main(["train", "--config", str(DEMO), "--set", override, "--dry-run"])
    err = capsys.readouterr().err
    key = override.partition("=")[0]
    assert code == 2 and f"error: {key}:" in err, err


def _float_options() -> list[tuple[tuple[str, ...], str]]:
    """(sub-command path, option) of every command-line option that takes a float."""

    def takes_float(convert: Callable[[str], Any]) -> bool:
        try:
            return isinstance(convert("0.5"), float)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            return False

    found: list[tuple[tuple[str, ...], str]] = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*path, name))
            elif action.option_strings and callable(action.type) and takes_float(action.type):
                found.append((path, action.option_strings[-1]))

    walk(build_parser(), ())
    return found


FLOAT_OPTIONS = _float_options()


def test_the_float_options_are_found() -> None:
    options = set(FLOAT_OPTIONS)
    assert {(("sample",), "--cfg"), (("sample",), "--temperature"), (("sample",), "--fps")} <= options
    assert {(("eval", "fid"), "--cfg"), (("eval", "fid"), "--gpus-per-worker")} <= options
    assert (("cluster", "plan"), "--step-time") in options


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize(("path", "option"), FLOAT_OPTIONS, ids=[" ".join((*p, o)) for p, o in FLOAT_OPTIONS])
def test_every_float_option_refuses_nan_and_inf(path: tuple[str, ...], option: str, bad: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*path, f"{option}={bad}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}: expected a finite number" in err, err


def test_fps_must_be_positive(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--model", "x.pth", "--fps", "0"])
    assert exit_.value.code == 2 and "argument --fps: expected a number > 0" in capsys.readouterr().err


# ============================================================================ 2. recipe files
def test_recipe_that_is_not_utf8_names_the_file(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: demo\nmlflow:\n  experiment: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text \(byte \d+, line 3\)"):
        load(TrainRunConfig, recipe)
    assert main(["train", "--config", str(recipe), "--dry-run"]) == 2
    assert f"{recipe} is not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_recipe_is_refused_naming_the_file(tmp_path: Path, text: str, capsys) -> None:
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml is empty"):
        load(TrainRunConfig, recipe)
    with pytest.raises(ConfigError, match=r"empty\.yaml is empty"):
        load(SweepConfig, recipe)
    assert main(["train", "--config", str(recipe), "--dry-run"]) == 2
    assert f"{recipe} is empty" in capsys.readouterr().err


def test_no_recipe_at_all_still_means_the_defaults() -> None:
    assert load(TrainRunConfig, None) == TrainRunConfig()


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        ("name: a\ntrain:\n  epochs: 5\n  base_lr: 0.1\n  epochs: 6\n", "epochs", 5, 3),
        ("train:\n  epochs: 5\nname: a\ntrain:\n  base_lr: 0.1\n", "train", 4, 1),
        ("finetune:\n  init: x.pth\n  class_map: {cat: 1, dog: 2, cat: 3}\n", "cat", 3, 3),
    ],
)
def test_duplicate_key_in_a_recipe_names_the_key_and_line(
    tmp_path: Path, text: str, key: str, line: int, first: int, capsys
) -> None:
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(text)
    expected = f"config file {recipe}: duplicate key {key!r} on line {line} (first on line {first})"
    with pytest.raises(ConfigError) as err:
        load(TrainRunConfig, recipe)
    assert str(err.value) == expected
    assert main(["train", "--config", str(recipe), "--dry-run"]) == 2
    assert expected in capsys.readouterr().err


def test_duplicate_key_in_an_override_value_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^train: .*duplicate key 'epochs'"):
        load(TrainRunConfig, None, ["train={epochs: 5, epochs: 6}"])


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(
        "finetune:\n  init: x.pth\n  class_map:\n    <<: {cat: 1, dog: 2}\n    cat: 3\n"
        "train:\n  <<: &opt {base_lr: 0.5, min_lr: 0.1}\n  min_lr: 0.2\n"
    )
    cfg = load(TrainRunConfig, recipe)
    assert cfg.finetune.class_map == {"cat": 3, "dog": 2}
    assert (cfg.train.base_lr, cfg.train.min_lr) == (0.5, 0.2)


def test_nested_aliases_are_read_once(tmp_path: Path) -> None:
    """Twelve levels of ten aliases each: 10**12 paths, but each list is checked once."""
    lines = ["a00: &a00 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i:02d}: &a{i:02d} [{', '.join([f'*a{i - 1:02d}'] * 10)}]" for i in range(1, 12)]
    recipe = tmp_path / "aliases.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="unknown key a00"):
        load(TrainRunConfig, recipe)
    assert time.perf_counter() - start < 5.0


# ============================================================================ 3. sample output
def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_failed_sample_creates_no_output_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "new" / "samples"
    code = main(["sample", "--model", str(tmp_path / "missing.pth"), "--out", str(out), "-q"])
    assert code == 2 and "missing.pth" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from fractalgen.models import build_model, save_released

    torch.manual_seed(0)
    return save_released(build_model("fractalmar_tiny16"), tmp_path_factory.mktemp("model") / "mar.pth")


def test_failed_sample_after_loading_the_model_creates_no_output(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "new" / "samples"
    code = main(["sample", "--model", str(tiny_model), "--out", str(out), "--labels", "999", "-q"])
    assert code == 2 and "out of range" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_failed_write_removes_what_the_run_wrote_and_keeps_the_users_files(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "samples"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "grid.png").mkdir()  # in the way of the grid: the write fails after the PNGs
    (out / "grid.png" / "keep.txt").write_text("mine too")
    before = _tree(out)
    argv = ["sample", "--model", str(tiny_model), "--out", str(out), "--labels", "1,2", "--num-iters", "1,1"]
    code = main([*argv, "--batch-size", "2", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and f"--out {out}: cannot write" in err, err
    assert _tree(out) == before
    assert (out / "notes.txt").read_text() == "mine"


def test_sample_out_that_is_a_file_fails_before_sampling(tmp_path: Path, capsys) -> None:
    out = tmp_path / "samples"
    out.write_text("not a folder")
    code = main(["sample", "--model", str(tmp_path / "missing.pth"), "--out", str(out), "-q"])
    assert code == 2 and f"--out {out}: exists and is not a folder" in capsys.readouterr().err


# ============================================================================ 4. train --dry-run
@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def _dry_run_args(dataset: str, storage: Path, *extra: str) -> list[str]:
    overrides = tiny_overrides(name="dry", data=dataset, storage_path=str(storage), stage=2, steps=6, every=3)
    args = ["train", "--config", str(DEMO), "--dry-run"]
    for o in [*overrides, *extra]:
        args += ["--set", o]
    return args


def test_dry_run_writes_nothing(dataset: str, tmp_path: Path, capsys) -> None:
    storage = tmp_path / "runs" / "nested"
    assert main(_dry_run_args(dataset, storage)) == 0
    assert "peak lr" in capsys.readouterr().out
    assert _tree(tmp_path) == set()


def test_dry_run_still_checks_the_storage_path(dataset: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("")
    assert main(_dry_run_args(dataset, tmp_path / "file" / "runs")) == 2
    assert "checkpoint.storage_path: cannot use" in capsys.readouterr().err


def test_epochs_too_many_to_count_name_the_key(dataset: str, tmp_path: Path, capsys) -> None:
    assert main(_dry_run_args(dataset, tmp_path / "runs", "train.epochs=1.0e+308")) == 2
    assert "train.epochs:" in capsys.readouterr().err


# ============================================================================ 5. property-based
TRAIN_KEYS = sorted(key for key, _ in _paths(TrainRunConfig))
TOP_KEYS = set(_fields(TrainRunConfig))
SWEEP_KEYS = sorted(key for key, _ in _paths(SweepConfig))


def _misspell(key: str, n: int) -> str:
    """Drop, double or change one character of ``key``."""
    i = n % len(key)
    return [key[:i] + key[i + 1 :], key[:i] + key[i] + key[i:], key[:i] + "x" + key[i + 1 :]][n % 3]


def keys(valid: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(valid),
        st.builds(_misspell, st.sampled_from(valid), st.integers(0, 1000)),
        st.sampled_from(valid).map(lambda k: k + ".sub"),
        st.from_regex(r"[A-Za-z_ ]{0,8}(\.[A-Za-z_]{0,8}){0,3}", fullmatch=True),
    )


# NaN/inf, numbers beyond the float range, strings, lists and nested mappings
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(10**300, 10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e-320, 0.0, -0.0]),
    st.text(max_size=12),
    st.sampled_from(["bf16", "fp32", "linear", "auto", "runs", "s3://b/p", "1e-4", "nan", "-inf", "1e999"]),
)
# keys that read back from YAML as written (YAML turns line breaks such as U+0085 into spaces)
MAPPING_KEYS = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=8)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(MAPPING_KEYS, inner, max_size=4),
    max_leaves=12,
)
# YAML text that is not a plain document: syntax errors, bad tags, a value holding itself, dates
RAW_YAML = st.sampled_from(
    [
        "[",
        "{a: 1",
        "a: b: c",
        "&a [*a]",
        "&a {x: *a}",
        "2020-13-45",
        "!!int x",
        "!!float x",
        "!!binary ====",
        "!!python/object/apply:os.system ['true']",
        "{a: 1, a: 2}",
        "? [1]\n: 2",
        "a\n---\nb",
        "\x00",
        "9" * 5000,
        "!!set {a, b}",
        "<<: 1",
    ]
)


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True)


OVERRIDE_VALUES = st.one_of(VALUES.map(_yaml), RAW_YAML, st.text(max_size=20))


def _names_the_key(cls: type, key: str, message: str) -> bool:
    """Whether ``message`` names the (single) override ``key``: the unknown part, the field (a
    value below a field that is not a section: the field), or for a check across fields the
    section and the field."""
    if key in message:  # e.g. a value that is not YAML, whatever the key
        return True
    parts = [part.strip() for part in key.split(".")]  # as --set reads the key
    if not all(parts):
        return False
    key = ".".join(parts)
    if key in message:
        return True
    tp: Any = cls
    for i, part in enumerate(parts):
        if not _is_section(tp):
            return ".".join(parts[:i]) in message
        fields = _fields(tp)
        if part not in fields:
            return f"unknown key {'.'.join(parts[: i + 1])}" in message
        tp = fields[part]
    section = ".".join(parts[:-1])
    return bool(section) and f"{section}." in message and parts[-1] in message


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
@BOUNDED
@given(data=st.data())
def test_any_single_override_validates_or_names_the_key(cls: type, data: st.DataObject) -> None:
    key = data.draw(keys(TRAIN_KEYS if cls is TrainRunConfig else SWEEP_KEYS), label="key")
    raw = data.draw(OVERRIDE_VALUES, label="value")
    try:
        cfg = load(cls, None, [f"{key}={raw}"])
    except ConfigError as err:
        assert _names_the_key(cls, key.strip(), str(err)), f"{key}={raw!r}: {err}"
    else:
        assert _all_floats_finite(to_dict(cfg)), to_dict(cfg)


def _recipes(valid: list[str]) -> st.SearchStrategy[Any]:
    """Recipes as Python values: nested mappings over valid and wrong keys, now and then not a mapping."""

    def nest(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            node, parts = out, key.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}  # a later dotted key replaces a value
                node = node[part]
            node[parts[-1]] = value
        return out

    mapping = st.lists(st.tuples(keys(valid), VALUES), max_size=6).map(nest)
    return st.one_of(mapping, mapping, mapping, VALUES)


def _mentions_a_key(message: str, path: Path, recipe: Any, overrides: list[str]) -> bool:
    names = [o.partition("=")[0].strip().split(".")[0] for o in overrides]
    if isinstance(recipe, dict):
        names += [name for k in recipe for name in (str(k), repr(k))]
    return str(path) in message or "override" in message or any(n and n in message for n in names)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
@BOUNDED
@given(data=st.data())
def test_any_recipe_with_overrides_validates_or_names_a_key(cls: type, data: st.DataObject) -> None:
    valid = TRAIN_KEYS if cls is TrainRunConfig else SWEEP_KEYS
    recipe = data.draw(_recipes(valid), label="recipe")
    overrides = data.draw(
        st.lists(st.builds(lambda k, v: f"{k}={v}", keys(valid), OVERRIDE_VALUES), max_size=3),
        label="overrides",
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(_yaml(recipe))
        try:
            cfg = load(cls, path, overrides)
        except ConfigError as err:
            assert _mentions_a_key(str(err), path, recipe, overrides), str(err)
        else:
            assert _all_floats_finite(to_dict(cfg)), to_dict(cfg)


@BOUNDED
@given(content=st.binary(max_size=64) | st.text(max_size=64).map(lambda t: t.encode("utf-16")))
def test_any_file_content_validates_or_names_the_file(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(content)
        try:
            load(TrainRunConfig, path)
        except ConfigError as err:
            # the file, or (content that is a YAML mapping after all) the key
            message = str(err)
            named = message.startswith("unknown key ") or message.split(":")[0].split(".")[0] in TOP_KEYS
            assert str(path) in message or named, message


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(key=keys(SWEEP_KEYS), raw=OVERRIDE_VALUES)
def test_sweep_cli_exits_2_naming_the_key(key: str, raw: str) -> None:
    import contextlib
    import io

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["sweep", "--config", str(SWEEP_DEMO), "--set", f"{key}={raw}", "--print-config"])
    assert code in (0, 2), code
    if code == 2:
        message = err.getvalue().partition("fractalgen sweep: error: ")[2]
        assert message and _names_the_key(SweepConfig, key.strip(), message), err.getvalue()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.zero_stage=true", "train.zero_stage"),
        ("train.betas=&a [*a]", "train.betas"),
        ("name=[", "name"),
        ("name=2020-13-45", "name"),
        ("train.epochs=!!python/object/apply:os.system ['true']", "train.epochs"),
        ("train.min_lr=-1", "train.min_lr"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("eval.temperature=0", "eval.temperature"),
        ("eval.cfg=0.5", "eval.cfg"),
        ("train..epochs=1", "train..epochs"),
        ("trian.epochs=1", "unknown key trian"),
        ("train.epochs=" + "9" * 5000, "train.epochs"),
    ],
)
def test_train_cli_bad_overrides_exit_2_naming_the_key(override: str, named: str, capsys) -> None:
    assert main(["train", "--config", str(DEMO), "--set", override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err


@pytest.mark.parametrize("override", ["train.base_lr=.nan", "model.dropout=.inf"])
def test_cluster_plan_refuses_nonfinite_settings(override: str, capsys) -> None:
    assert main(["cluster", "plan", "--config", str(DEMO), "--set", override]) == 2
    assert override.partition("=")[0] in capsys.readouterr().err
