"""Every experiments/*.yaml runs end to end through the real CLI, on tiny data in the real layouts."""

import logging
from pathlib import Path

import pytest
import yaml

from deeplab_lit.cli import main
from tests import fakes

EXPERIMENTS = Path(__file__).parents[2] / "experiments"
CONFIGS = sorted(p.name for p in EXPERIMENTS.glob("*.yaml"))
SMALL_MODEL = {"pretrained_backbone": "false"}


def small_overrides(config: Path, tmp_path: Path) -> list[str]:
    """Point a config at fake data of its kind and shrink it to a smoke test."""
    spec = yaml.safe_load(config.read_text())
    data_class = spec["data"]["class_path"].rsplit(".", 1)[-1]
    model_args = spec["model"]["init_args"]
    args = [
        "--trainer.fast_dev_run=1",
        "--trainer.precision=32-true",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path / 'logs'}",
        "--model.init_args.pretrained_backbone=false",
        "--model.init_args.weights=null",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2",
        "--data.init_args.crop_size=33",
    ]
    if model_args.get("backbone", "").startswith("resnet"):
        args.append("--model.init_args.backbone=resnet18")
        if model_args.get("multi_grid"):
            args.append("--model.init_args.multi_grid=[1, 2]")
    if model_args.get("backbone", "").startswith("timm:convnext"):  # the smallest ConvNeXt, as resnet18 above
        args.append("--model.init_args.backbone=timm:convnext_atto")
    if data_class in fakes.FAKE_DATA:  # VOC, Cityscapes, ADE20K, PASCAL-Context, COCO-Stuff
        args.append(f"--data.init_args.root={fakes.FAKE_DATA[data_class](tmp_path / 'data')}")
    elif data_class == "SyntheticDataModule":
        args += [f"--data.init_args.root={tmp_path / 'synthetic'}", "--data.init_args.num_train=4",
                 "--data.init_args.num_val=2", "--data.init_args.image_size=48"]  # fmt: skip
    return args


def test_every_experiment_is_covered():
    assert {
        "v1.yaml",
        "v2.yaml",
        "v3.yaml",
        "v3plus.yaml",
        "cityscapes_v3plus.yaml",
        "quickstart.yaml",
        "ade20k_v3plus.yaml",
        "pascal_context_v2.yaml",
        "cocostuff_v3plus.yaml",
    } <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_experiment_fits_and_validates_with_fast_dev_run(name, tmp_path):
    config = EXPERIMENTS / name
    cli = main(["fit", "--config", str(config), *small_overrides(config, tmp_path)])
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 1
    assert "train/loss" in metrics and "val/mIoU" in metrics
    assert 0.0 <= float(metrics["val/mIoU"]) <= 1.0
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes  # linked from the data


def test_validate_subcommand_returns_metrics(tmp_path):
    config = EXPERIMENTS / "quickstart.yaml"
    cli = main(["validate", "--config", str(config), *small_overrides(config, tmp_path)])
    assert "val/mIoU" in cli.trainer.callback_metrics
    assert "val/pixel_acc" in cli.trainer.callback_metrics


def test_print_config_lists_model_and_data_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(EXPERIMENTS / "v3.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["multi_grid"] == [1, 2, 4]
    assert printed["data"]["init_args"]["crop_size"] == 513
    assert printed["checkpoint"]["monitor"] == "val/mIoU"


def resolved_config(config: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """The configuration ``fit --config <config>`` would run, as ``--print_config`` writes it."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


# The configs that train for a budget: every one carries the same logging and safety set-up, written out
# in each file rather than layered from a shared fragment, because jsonargparse 4.53 cannot compose one
# into a single config: a `config: common/x.yaml` line inside a config is overwritten by any later key of
# the same section (the config's own `trainer:` drops the fragment's logger and callbacks, silently);
# `callbacks+:` appends only to a list from an earlier --config file; a whole-value reference
# (`callbacks: common/x.yaml`) takes no additions, and v1, v2 and quickstart add a CRF callback, two
# configs a smaller gallery. Layering on the command line works, but every paper command would need two
# --config flags, and one alone would train without the NaN guard, exact-resume RNG state and crash-safe
# checkpoints, without a word. So each config stays complete, and this test keeps the copies in step.
TRAINING_CONFIGS = [
    name
    for name in CONFIGS
    if {"max_steps", "max_epochs"} & set(yaml.safe_load((EXPERIMENTS / name).read_text())["trainer"])
]
SHARED_CALLBACKS = {
    "deeplab_lit.loggers.LearningRateMonitor",  # lr of both parameter groups
    "deeplab_lit.callbacks.PredictionGallery",  # fixed validation images, IoU table, confusion matrix
    "deeplab_lit.callbacks.NonFiniteLossGuard",  # stop at a NaN loss, keep the last good checkpoint
    "deeplab_lit.callbacks.RandomStateCheckpoint",  # RNG states in checkpoints: exact resume
}


@pytest.mark.parametrize("name", TRAINING_CONFIGS)
def test_training_configs_resolve_to_the_shared_logger_plugin_and_callbacks(name, capsys):
    trainer = resolved_config(EXPERIMENTS / name, capsys)["trainer"]
    logger = trainer["logger"]
    assert logger["class_path"] == "deeplab_lit.loggers.WandbLogger"
    assert logger["init_args"]["project"] == "deeplab-lit" and logger["init_args"]["name"]
    plugins = [plugin["class_path"] for plugin in trainer["plugins"]]
    assert plugins == ["deeplab_lit.callbacks.AtomicCheckpointIO"]  # crash-safe last.ckpt
    callbacks = {callback["class_path"]: callback.get("init_args", {}) for callback in trainer["callbacks"]}
    assert SHARED_CALLBACKS <= set(callbacks), SHARED_CALLBACKS - set(callbacks)
    assert callbacks["deeplab_lit.loggers.LearningRateMonitor"]["logging_interval"] == "step"


def test_every_training_config_is_checked_for_the_shared_set_up():
    trains = {"quickstart.yaml", "v1.yaml", "v2.yaml", "v3.yaml", "v3plus.yaml", "cityscapes_v3plus.yaml"}
    trains |= {"ade20k_v3plus.yaml", "pascal_context_v2.yaml", "cocostuff_v3plus.yaml"}
    assert trains <= set(TRAINING_CONFIGS)


def test_checkpoints_best_and_last_are_written(tmp_path):
    config = EXPERIMENTS / "quickstart.yaml"
    args = [a for a in small_overrides(config, tmp_path) if not a.startswith("--trainer.fast_dev_run")]
    args += ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
             "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"]  # fmt: skip
    main(["fit", "--config", str(config), *args])
    written = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "last.ckpt" in written
    assert any(name.startswith("epoch000-mIoU") for name in written), written


def test_one_option_adds_the_trainable_crf_to_an_experiment(tmp_path):
    config = EXPERIMENTS / "v2.yaml"
    options = ["--model.init_args.crf_rnn={iterations: 2, network_loss_weight: 0.5}"]
    cli = main(["fit", "--config", str(config), *small_overrides(config, tmp_path), *options])
    metrics = cli.trainer.callback_metrics
    assert cli.model.crf_rnn is not None and cli.model.crf_rnn.iterations == 2
    # network, network + offline CRF (the config's DenseCRFCallback), network + trained CRF: one run
    assert {"val/mIoU", "val/mIoU_crf", "val/mIoU_crf_rnn"} <= set(metrics)


def test_the_models_default_class_count_replaced_by_the_datas_is_said(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    monkeypatch.chdir(tmp_path)  # the quickstart's data root, relative, is not read without running
    quickstart = ["--config", str(EXPERIMENTS / "quickstart.yaml"), "--trainer.logger=false"]
    said = (
        "num_classes: 6, the classes of the data module SyntheticDataModule, replaces the model's default 21"
    )
    cli = main(quickstart, run=False)
    assert cli.model.hparams.num_classes == 6 and said in caplog.text
    caplog.clear()
    main([*quickstart, "--model.init_args.num_classes=6"], run=False)
    assert "num_classes:" not in caplog.text  # given and equal to the data's: nothing to say
