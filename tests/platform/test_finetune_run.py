"""Custom datasets and fine-tuning through ``fractalgen train``: any class count (3 classes, 1 class),
another resolution (a 32x32 model of 3 levels), and a run that starts from released-format weights
with another class count, a class table, a frozen level and per-level learning rates.

The Ray runs use 2 CPU workers (gloo, ZeRO-2, fp32) on the embedded dataset cut to a few classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train_support import local_ray, tiny_config

from fractalgen import storage
from fractalgen.cli import main
from fractalgen.config import ConfigError, TrainRunConfig, load
from fractalgen.models import build_model, load_released, save_released

SIZE_32 = ["model.img_sizes=[32,4,1]", "model.widths=[64,32,16]", "model.blocks=[2,1,1]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from fractalgen.pipelines.embedded import build_embedded_dataset

    root = tmp_path_factory.mktemp("custom")
    three = str(root / "three16")
    one = str(root / "one32")
    build_embedded_dataset(three, size=16, images_per_class=8, num_classes=3)
    build_embedded_dataset(one, size=32, images_per_class=16, num_classes=1)
    return {"three": three, "one": one}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A released-format checkpoint of a 10-class tiny model (plus an optimizer entry, as released)."""
    torch.manual_seed(7)
    model = build_model("fractalmar_tiny16")
    path = tmp_path_factory.mktemp("source") / "checkpoint-last.pth"
    return save_released(model, path, optimizer={"state": {}, "param_groups": []})


def _names(uri: str) -> list[str]:
    from fractalgen.pipelines.summary import read_summary

    return list(read_summary(uri)["class_names"])


# ------------------------------------------------------------------------- checks before Ray starts
def test_finetune_keys_are_checked() -> None:
    cfg = load(TrainRunConfig, None, ["finetune.init=released:x.pth", "finetune.class_map={cat: 281}"])
    assert cfg.finetune.class_map == {"cat": 281}
    with pytest.raises(ConfigError, match=r"finetune\.freeze_level"):
        load(TrainRunConfig, None, ["finetune.freeze_level=[0]"])
    with pytest.raises(ConfigError, match=r"need finetune\.init"):
        load(TrainRunConfig, None, ["finetune.freeze_levels=[0]"])
    with pytest.raises(ConfigError, match="set one"):
        load(TrainRunConfig, None, ["finetune.init=a.pth", "checkpoint.init_from=runs/x/checkpoint_1"])


def test_bad_sources_and_class_tables_fail_before_ray(data, source, tmp_path: Path, capsys) -> None:
    base = tiny_config(name="x", data=data["three"], storage_path=str(tmp_path), stage=2, steps=1, every=1)
    from fractalgen.config import to_dict

    def run(*extra: str) -> str:
        recipe = tmp_path / "recipe.yaml"
        import yaml

        recipe.write_text(yaml.safe_dump(to_dict(base)))
        assert main(["train", "--config", str(recipe), "--dry-run", *extra]) == 2
        return capsys.readouterr().err

    err = run("--init", f"released:{tmp_path / 'missing.pth'}")
    assert "finetune.init" in err and "missing.pth" in err
    (tmp_path / "foreign.pth").write_bytes(b"not a checkpoint")
    assert "finetune.init" in run("--init", str(tmp_path / "foreign.pth"))
    err = run("--init", f"released:{source}", "--set", "finetune.class_map={zebra: 1}")
    assert "finetune.class_map.zebra" in err and _names(data["three"])[0] in err
    err = run(
        "--init", f"released:{source}", "--set", f"finetune.class_map={{{_names(data['three'])[0]}: 10}}"
    )
    assert "out of range" in err and "10 classes" in err
    err = run("--init", f"released:{source}", "--set", "finetune.freeze_levels=[3]")
    assert "finetune.freeze_levels" in err and "3 levels" in err
    other = save_released(build_model("fractalar_tiny16", img_sizes=(16, 2, 1)), tmp_path / "other.pth")
    err = run("--init", str(other))
    assert "finetune.init" in err and "another architecture" in err and "levels [16, 2, 1]" in err


def test_dry_run_shows_the_cost_of_a_custom_resolution(data, tmp_path: Path, capsys) -> None:
    """A 32x32 model of 3 levels (sizes 32, 4, 1): the plan prints its per-level cost table, which
    equals ``fractalgen inspect`` of the same sizes."""
    args = ["--set", "model.name=fractalmar_tiny16", "--set", f"data.train_uri={data['one']}"]
    args += [x for s in SIZE_32 for x in ("--set", s)]
    args += ["--set", f"checkpoint.storage_path={tmp_path}", "--set", "train.global_batch_size=8"]
    args += ["--set", "train.micro_batch_per_gpu=4"]
    assert main(["train", "--config", "configs/demo.yaml", "--dry-run", *args]) == 0
    plan = capsys.readouterr().out
    assert (
        main(
            [
                "inspect",
                "fractalmar_tiny16",
                "--num-classes",
                "1",
                *[x for s in SIZE_32 for x in ("--set", s.split(".", 1)[1])],
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith(("g1", "g2", "g3", "total"))]
    assert len(rows) == 4 and "8x8" in rows[0]  # level 1: a 8x8 grid of 4x4 patches
    for row in rows:
        assert f"# {row}" in plan


def test_level_lr_scales_make_their_own_groups() -> None:
    from fractalgen.platform.training.engine import param_groups
    from fractalgen.platform.training.finetune import freeze_levels

    model = build_model("fractalmar_tiny16")
    frozen = freeze_levels(model, [0])
    assert "class_emb.weight" not in frozen and frozen
    assert all(n.count("next_fractal.") == 0 for n in frozen)
    groups = param_groups(model, 0.05, [1.0, 0.5])
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name in frozen:
            assert id(p) not in by_param
            continue
        g = by_param[id(p)]
        assert g["lr_scale"] == (0.5 if name.count("next_fractal.") == 1 else 1.0), name
        assert g["decays"] == (p.ndim > 1 and not name.endswith(".bias"))
        assert g["weight_decay"] == (0.05 if g["decays"] else 0.0)


# ------------------------------------------------------------------------------------ Ray runs
@pytest.fixture(scope="module")
def cluster():
    with local_ray():
        yield


@pytest.mark.slow
def test_finetune_from_released_weights_with_class_table_frozen_level_and_level_lr(
    cluster, data, source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10-class source -> 3-class dataset: the report lists exactly the class embedding as new (one
    row mapped by the class table), the frozen level 0 and the level with lr scale 0 end equal to the
    source, the pixel head (scale 1) and the class embedding train; MLflow has the report; the model
    samples class-conditionally by class name."""
    from fractalgen.platform.artifacts.checkpoints import export_consolidated
    from fractalgen.platform.training.driver import run_training

    names = _names(data["three"])
    store = tmp_path / "mlflow.db"
    monkeypatch.chdir(source.parent)  # a relative path, as typed in a shell: the Ray workers run elsewhere
    cfg = tiny_config(
        name="ft",
        data=os.path.relpath(data["three"]),  # relative too
        storage_path=str(tmp_path / "runs"),
        stage=2,
        steps=3,
        every=3,
        extra=[
            f"finetune.init=released:{source.name}",
            f"finetune.class_map={{{names[1]}: 7}}",
            "finetune.freeze_levels=[0]",
            "finetune.level_lr_scale=[1.0, 0.0, 1.0]",
            "mlflow.enabled=true",
            f"mlflow.tracking_uri=sqlite:///{store}",
        ],
    )
    out = run_training(cfg)
    assert out.status == "finished" and out.step == 3

    report = storage.read_json(storage.join(out.run_uri, "init_report.json"))
    src = torch.load(source, weights_only=False)["model"]
    assert report["source"] == f"released:{source}"  # made absolute by the driver
    assert report["reinitialised"] == ["class_emb.weight[2 unmapped rows]"]
    assert report["mapped"] == ["class_emb.weight"] and report["unused"] == []
    assert sorted(report["loaded"]) == sorted(k for k in src if k != "class_emb.weight")
    assert set(report["frozen"]) == {
        k for k in src if k.count("next_fractal.") == 0 and k != "class_emb.weight"
    }

    weights = load_released(export_consolidated(out.checkpoint, tmp_path / "ft.pth")).state_dict()
    assert weights["class_emb.weight"].shape == (3, 64)
    assert not torch.equal(weights["class_emb.weight"][1], src["class_emb.weight"][7])  # trained
    for name, tensor in weights.items():
        level = name.count("next_fractal.")
        if name == "class_emb.weight" or name not in src:
            continue
        if level in (0, 1):  # frozen, or lr scale 0
            assert torch.equal(tensor, src[name]), name
    trained = [n for n in weights if n.count("next_fractal.") == 2 and not torch.equal(weights[n], src[n])]
    assert trained, "the pixel head (lr scale 1) did not train"

    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{store}").get_run(out.mlflow_run_id)
    assert run.data.tags["finetune.loaded"] == str(len(report["loaded"]))
    assert run.data.tags["finetune.reinitialised"] == "class_emb.weight[2 unmapped rows]"
    artifacts = MlflowClient(f"sqlite:///{store}").list_artifacts(out.mlflow_run_id, "finetune")
    assert [a.path for a in artifacts] == ["finetune/init_report.json"]

    samples = tmp_path / "samples"
    assert main(["sample", "--model", out.run_uri, "--labels", f"{names[2]},0", "--out", str(samples),
                 "--num-iters", "2,2", "--cfg", "2.0"]) == 0  # fmt: skip
    meta = json.loads((samples / "sample.json").read_text())
    assert meta["class_names"] == [names[2], names[0]]
    assert len(list(samples.glob("0000*_class*.png"))) == 2


@pytest.mark.slow
def test_one_class_32px_three_level_model_trains_unconditionally(
    cluster, data, tmp_path: Path, capsys
) -> None:
    """A 1-class dataset at 32x32 with a 3-level model of custom sizes trains (its end-of-run sample
    grid is unconditional), exports, and refuses guidance when sampled."""
    from fractalgen.platform.training.driver import run_training

    cfg = tiny_config(
        name="uncond",
        data=data["one"],
        storage_path=str(tmp_path / "runs"),
        stage=2,
        steps=4,
        every=4,
        extra=[*SIZE_32, "train.global_batch_size=4", "train.micro_batch_per_gpu=2", "eval.cfg=3.0"],
    )
    out = run_training(cfg)
    assert out.status == "finished" and out.step == 4
    state = storage.read_json(storage.join(out.checkpoint, "state.json"))
    hist = [h["loss"] for h in state["history"]]
    assert len(hist) == 4 and all(torch.isfinite(torch.tensor(hist)))
    assert storage.exists(storage.join(out.checkpoint, "samples.png"))

    assert (
        main(["sample", "--model", out.run_uri, "--labels", "0", "--cfg", "2", "--out", str(tmp_path / "s")])
        == 2
    )
    err = capsys.readouterr().err
    assert "unconditional" in err
    samples = tmp_path / "ok"
    assert (
        main(
            ["sample", "--model", out.run_uri, "--labels", "0,0", "--num-iters", "2,2", "--out", str(samples)]
        )
        == 0
    )
    meta = json.loads((samples / "sample.json").read_text())
    assert meta["settings"]["cfg"] == "1.0" and meta["class_names"] == _names(data["one"]) * 2
    assert Image.open(samples / "00000_class0.png").size == (32, 32)
