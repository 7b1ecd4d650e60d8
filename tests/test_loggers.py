"""W&B through the real CLI and config, read back from an offline run's files; CSV as the fallback."""

import json
import struct
import time
from pathlib import Path

import pytest
import yaml

from deeplab_lit.callbacks import AtomicCheckpointIO
from deeplab_lit.cli import main
from deeplab_lit.loggers import WandbLogger, resolve_offline

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

QUICKSTART = Path(__file__).parents[1] / "experiments" / "quickstart.yaml"


def tiny_quickstart(root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(QUICKSTART), "--trainer.accelerator=cpu", "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={root}", "--model.init_args.backbone=resnet18",
            f"--data.init_args.root={root / 'data'}", "--data.init_args.num_train=4",
            "--data.init_args.num_val=3", "--data.init_args.image_size=32", "--data.init_args.crop_size=32",
            "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=2",
            "--data.init_args.num_workers=0", *extra]  # fmt: skip


def wandb_records(path: Path):
    """Records of a ``.wandb`` file: a ``:W&B`` header, then LevelDB-log chunks (32 KiB blocks, 7-byte chunk
    headers: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) holding ``wandb_internal_pb2.Record``s."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, parts = 7, []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:
            position += room
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        if kind == 0 and length == 0:
            position += room
            continue
        if position + 7 + length > len(data):
            return  # a chunk still being written
        parts.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def read_offline_run(root: Path, timeout: float = 60.0) -> tuple[Path, dict, list[dict], dict]:
    """Run folder, run name, history rows and config of the one offline run under ``root``.

    ``wandb.finish()`` can return before wandb-core has written the whole file: wait for its ``exit`` record.
    """
    (run_file,) = root.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
        assert time.monotonic() < deadline, f"{run_file} has no exit record after {timeout} s"
        time.sleep(0.5)
    run_name, history, config = None, [], {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_name = run_name or record.run.display_name
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})  # fmt: skip
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
    return run_file.parent, {"name": run_name}, history, config


def test_fit_writes_metrics_images_tables_and_config_to_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    try:
        cli = main(tiny_quickstart(tmp_path))
        assert isinstance(cli.trainer.logger, WandbLogger) and cli.trainer.logger.offline
    finally:
        wandb.finish()  # Lightning leaves the run open (for a following test/validate); close and flush it
    run_dir, run, history, config = read_offline_run(tmp_path)  # the CLI put wandb/ under default_root_dir
    assert run["name"] == "quickstart"
    keys = set().union(*history)
    assert {"train/loss", "val/mIoU", "val/loss", "val/pixel_acc", "lr-SGD/pg1", "lr-SGD/pg2"} <= keys
    assert {"val/IoU/background", "val/mIoU_crf", "val/trimap_mIoU/2px"} <= keys  # CRF callback's figures too
    last_miou = [h["val/mIoU"] for h in history if "val/mIoU" in h][-1]
    assert last_miou == pytest.approx(float(cli.trainer.callback_metrics["val/mIoU"]), abs=1e-6)
    galleries = [h for h in history if h.get("val/gallery/_type") == "images/separated"]
    assert len(galleries) == 1  # the quickstart's gallery logs every 10th validation: of 2, the first
    assert all(h["val/gallery/count"] == 3 for h in galleries)
    for entry in galleries:
        assert all((run_dir / "files" / name).is_file() for name in entry["val/gallery/filenames"])
        assert set(entry["val/gallery/all_masks"][0]) == {"ground_truth", "prediction", "crf"}  # W&B masks
    assert any(h.get("val/confusion_matrix/_type") == "images/separated" for h in history)
    tables = [h["val/iou_table/path"] for h in history if "val/iou_table/path" in h]
    table = json.loads((run_dir / "files" / tables[-1]).read_text())
    assert table["columns"][:2] == ["class", "IoU"] and len(table["data"]) == cli.datamodule.num_classes
    resolved = config["config"]  # the whole resolved config, not only the module's hparams
    assert resolved["model"]["init_args"]["backbone"] == "resnet18"
    assert resolved["trainer"]["max_epochs"] == 2 and resolved["seed_everything"] == 0
    assert resolved["data"]["init_args"]["image_size"] == 32


def test_no_api_key_means_offline_with_a_sync_hint(tmp_path, monkeypatch, caplog):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    offline, why = resolve_offline(None)
    assert offline and "no W&B API key" in why
    with caplog.at_level("INFO"):
        logger = WandbLogger(name="v3-voc", save_dir=str(tmp_path), log_model=True)
    assert logger.offline and logger._wandb_init["mode"] == "offline" and logger._log_model is False
    assert "wandb sync" in caplog.text and str(tmp_path) in caplog.text
    assert logger._wandb_init["project"] == "deeplab-lit" and logger._wandb_init["name"] == "v3-voc"


def test_the_cli_built_logger_goes_offline_without_a_key(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    cli = main(tiny_quickstart(tmp_path)[1:], run=False)  # as configured, not run
    init = cli.trainer.logger._wandb_init
    assert init["mode"] == "offline" and init["resume"] == "allow" and init["name"] == "quickstart"
    assert init["dir"] == str(tmp_path)  # save_dir defaults to trainer.default_root_dir


def test_api_key_or_explicit_mode_decides(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_offline(None)[0] is False  # online for users with a key
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_offline(None)[0] is True
    assert resolve_offline(False)[0] is False  # an explicit offline= wins
    logger = WandbLogger(offline=False, save_dir=".")
    assert "mode" not in logger._wandb_init


def test_logger_switches_to_csv_from_the_command_line(tmp_path):
    csv = ["--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}", "--trainer.max_epochs=1"]
    cli = main(tiny_quickstart(tmp_path, *csv))
    log_dir = Path(cli.trainer.logger.log_dir)
    assert "val/mIoU" in (log_dir / "metrics.csv").read_text().splitlines()[0]
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["config"]["model"]["init_args"]["backbone"] == "resnet18"  # resolved config, CSV too
    assert (log_dir / "gallery" / "epoch_000.png").is_file()  # the gallery's picture in the run's folder
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # checkpoints: <default_root_dir>/checkpoints
    assert not (tmp_path / "wandb").exists()
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # trainer.plugins in the config
