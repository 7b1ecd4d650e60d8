"""predict: PredictionWriter turns photos into palette PNGs and overlays, through the CLI and the Trainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from torchvision.datasets import Cityscapes

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.callbacks import PredictionWriter
from deeplab_lit.callbacks.prediction_outputs import (
    OutputCollisionError,
    OutputOverInputError,
    PredictionFormatError,
    save_mask,
    save_palette_png,
)
from deeplab_lit.callbacks.prediction_writer import UnreadableImageWarning
from deeplab_lit.cli import main
from deeplab_lit.data import SyntheticDataModule
from deeplab_lit.data.images import read_image, read_mask
from deeplab_lit.data.voc import voc_palette

QUICKSTART = Path(__file__).parents[2] / "experiments" / "quickstart.yaml"
SIZES = {"beach": (37, 45), "street": (50, 29), "room": (33, 61)}  # (height, width), odd on purpose


def write_photos(folder: Path) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (height, width) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    return SIZES


def predict_args(tmp_path: Path, photos: Path | str, out: Path) -> list[str]:
    return ["predict", "--config", str(QUICKSTART), f"--data.init_args.root={tmp_path / 'synthetic'}",
            f"--data.init_args.predict_path={photos}", f"--prediction.output_dir={out}",
            "--data.init_args.num_workers=0", "--data.init_args.val_batch_size=1", "--trainer.logger=false",
            "--trainer.accelerator=cpu"]  # fmt: skip


def test_predict_writes_a_palette_png_and_an_overlay_per_image_at_its_size(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    write_photos(photos)
    cli = main(predict_args(tmp_path, photos, out))
    assert cli.trainer.predict_loop.predictions == []  # written to disk, not kept in memory
    module, normalization = cli.model.eval(), cli.datamodule.normalization
    for name, (height, width) in SIZES.items():
        png = Image.open(out / f"{name}.png")
        assert png.mode == "P" and png.size == (width, height)
        assert np.array_equal(np.array(png.getpalette()).reshape(-1, 3)[:256], voc_palette())
        labels = read_mask(out / f"{name}.png")
        image = torch.from_numpy(read_image(photos / f"{name}.jpg")).permute(2, 0, 1)[None]
        with torch.no_grad():
            logits = module(normalization.normalize(image))[0]
        top2 = logits.topk(2, dim=0).values
        decided = (top2[0] - top2[1] > 1e-3).numpy()  # predict may fold BatchNorm (same to ~1e-5): skip ties
        assert decided.mean() > 0.9
        assert np.array_equal(labels[decided], logits.argmax(0).numpy()[decided])
        assert Image.open(out / f"{name}_overlay.jpg").size == (width, height)


def test_palette_png_round_trips_every_label(tmp_path):
    labels = np.array([list(range(21)) + [255] * 3], dtype=np.uint8).repeat(4, axis=0)
    path = tmp_path / "labels.png"
    save_palette_png(path, labels, voc_palette())
    assert np.array_equal(read_mask(path), labels)
    assert Image.open(path).convert("RGB").getpixel((15, 0)) == tuple(voc_palette()[15])


def test_empty_folder_and_undecodable_image_with_skip_unreadable_false_each_stop_with_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"No images found in folder .*empty"):
        main(predict_args(tmp_path, empty, tmp_path / "out"))
    broken, out = tmp_path / "broken", tmp_path / "out"
    write_photos(broken)
    (broken / "room.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(
        ValueError, match=r"(?s)Could not decode image file .*room\.jpg.*skip_unreadable is false"
    ):
        main([*predict_args(tmp_path, broken, out), "--prediction.skip_unreadable=false"])
    assert (out / "beach.png").is_file() and not (out / "street.png").exists()  # stopped at room, in order


def _writer(cli) -> PredictionWriter:
    return next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))


def test_unreadable_images_are_skipped_with_a_warning_each_and_listed_at_the_end(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("c", "d"):  # one size, so that a batch of two stacks
        Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(photos / f"{name}.jpg")
    (photos / "a_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "b_empty.png").write_bytes(b"")
    whole = (photos / "c.jpg").read_bytes()
    (photos / "e_cut.jpg").write_bytes(whole[: len(whole) // 2])
    bad = ("a_broken.jpg", "b_empty.png", "e_cut.jpg")  # batches [a, b] and [e]: nothing readable in them
    with pytest.warns(UnreadableImageWarning) as caught:
        cli = main([*predict_args(tmp_path, photos, out), "--data.init_args.val_batch_size=2"])
    messages = [str(w.message) for w in caught if issubclass(w.category, UnreadableImageWarning)]
    for name in bad:
        assert any(m.startswith("predict skips") and name in m for m in messages), name
    summary = [m for m in messages if m.startswith("predict skipped 3 unreadable image(s)")]
    assert len(summary) == 1 and all(name in summary[0] for name in bad)
    assert [Path(path).name for path, _ in _writer(cli).skipped] == list(bad)
    assert sorted(p.name for p in out.iterdir()) == ["c.png", "c_overlay.jpg", "d.png", "d_overlay.jpg"]
    assert Image.open(out / "d.png").size == (45, 37)


def test_predict_batches_a_folder_of_one_size_and_runs_mixed_sizes_one_at_a_time(tmp_path):
    mixed, same = tmp_path / "mixed", tmp_path / "same"
    write_photos(mixed)
    same.mkdir()
    for index in range(3):
        Image.fromarray(np.full((30, 40, 3), 60 * index, dtype=np.uint8)).save(same / f"{index}.png")
    batch_two = "--data.init_args.val_batch_size=2"
    cli = main([*predict_args(tmp_path, mixed, tmp_path / "out_mixed"), batch_two])
    assert cli.trainer.num_predict_batches == [3]  # three sizes: one image per batch, none refused
    for name, size in SIZES.items():
        assert np.array(Image.open(tmp_path / "out_mixed" / f"{name}.png")).shape == size
    cli = main([*predict_args(tmp_path, same, tmp_path / "out_same"), batch_two])
    assert cli.trainer.num_predict_batches == [2]  # one size: batches of two (2 + 1)
    assert sorted(p.name for p in (tmp_path / "out_same").glob("*.png")) == ["0.png", "1.png", "2.png"]


def test_a_photo_with_exif_orientation_is_segmented_and_written_as_viewers_show_it(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to display", as phones held upright write
    pixels = np.random.default_rng(1).integers(0, 256, (29, 45, 3), dtype=np.uint8)  # stored 45 wide, 29 high
    Image.fromarray(pixels).save(photos / "phone.jpg", exif=exif, quality=95)
    cli = main(predict_args(tmp_path, photos, out))
    assert Image.open(out / "phone.png").size == (29, 45)  # displayed: 29 wide, 45 high
    assert Image.open(out / "phone_overlay.jpg").size == (29, 45)
    shown = np.ascontiguousarray(np.rot90(read_image(photos / "phone.jpg"), k=-1))  # stored grid, turned
    with torch.no_grad():
        image = torch.from_numpy(shown).permute(2, 0, 1)[None]
        logits = cli.model.eval()(cli.datamodule.normalization.normalize(image))[0]
    top2 = logits.topk(2, dim=0).values
    decided = (top2[0] - top2[1] > 1e-3).numpy()
    assert decided.mean() > 0.9
    assert np.array_equal(read_mask(out / "phone.png")[decided], logits.argmax(0).numpy()[decided])


def tiny_module_and_data(tmp_path: Path) -> tuple[DeepLabV3Plus, SyntheticDataModule]:
    photos = tmp_path / "photos"
    write_photos(photos)
    torch.manual_seed(0)
    module = DeepLabV3Plus(num_classes=6, backbone="resnet18")
    data = SyntheticDataModule(root=str(tmp_path / "synthetic"), predict_path=str(photos), num_workers=0,
                               val_batch_size=1)  # fmt: skip
    return module, data


def test_crf_option_writes_the_crf_refined_labels(tmp_path):
    crf = pytest.importorskip("deeplab_lit.crf")
    module, data = tiny_module_and_data(tmp_path)
    with torch.no_grad():
        module.model.decoder.classifier.weight.mul_(300)  # confident, varied logits for the CRF to work on
    writer = PredictionWriter(output_dir=str(tmp_path / "out"), crf=True, crf_backend="torch")
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False)
    predictions = trainer.predict(module, datamodule=data, return_predictions=True)
    changed = 0
    for prediction in predictions:
        (name,), logits = prediction["name"], prediction["logits"]
        image = torch.from_numpy(read_image(tmp_path / "photos" / f"{name}.jpg")).permute(2, 0, 1)[None]
        params = crf.CRFParams.from_preset("deeplab_v2")
        expected = crf.dense_crf(logits.softmax(1), image, params, backend="torch").argmax(1)[0].numpy()
        assert np.array_equal(read_mask(tmp_path / "out" / f"{name}.png"), expected)
        changed += int((expected != prediction["preds"][0].numpy()).sum())
    assert changed > 0  # the CRF did something, so the test tells CRF and plain labels apart


def test_writer_refuses_an_unknown_crf_preset_and_a_trainer_without_datamodule(tmp_path):
    pytest.importorskip("deeplab_lit.crf")
    with pytest.raises(ValueError, match="unknown CRF preset 'deeplab_v9'"):
        PredictionWriter(crf=True, crf_preset="deeplab_v9")
    module, data = tiny_module_and_data(tmp_path)
    data.setup("predict")
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[PredictionWriter(str(tmp_path / "o"))])
    with pytest.raises(ValueError, match="PredictionWriter needs the datamodule's `palette`"):
        trainer.predict(module, dataloaders=data.predict_dataloader())


# ------------------------------------------------------------------------- names, refusals, unreadable files
def save_photo(
    path: Path, size: tuple[int, int] = (20, 30), seed: int = 0, image_format: str | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=image_format)


def written(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_inputs_that_share_a_stem_get_distinct_outputs_and_a_name_that_still_repeats_is_refused(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    save_photo(photos / "x.jpg", seed=1)
    save_photo(photos / "x.png", seed=2)  # same stem, another extension
    save_photo(photos / "a" / "b.jpg", seed=3)
    save_photo(photos / "a__b.jpg", seed=4)  # what a/b.jpg was flattened to before
    main(predict_args(tmp_path, str(photos / "**" / "*.*"), out))
    assert written(out) == ["a/b.png", "a/b_overlay.jpg", "a__b.png", "a__b_overlay.jpg", "x.jpg.png",
                            "x.jpg_overlay.jpg", "x.png.png", "x.png_overlay.jpg"]  # fmt: skip
    overlays = [np.asarray(Image.open(out / f"x.{ext}_overlay.jpg"), dtype=float) for ext in ("jpg", "png")]
    assert np.abs(overlays[0] - overlays[1]).mean() > 10  # each photo under its own overlay: none overwritten
    save_photo(photos / "x.jpg.png", seed=5)  # its name "x.jpg" is x.jpg's own
    with pytest.raises(OutputCollisionError, match=r"(?s)x\.jpg\.png <- .*x\.jpg, .*x\.jpg\.png"):
        main(predict_args(tmp_path, photos, tmp_path / "out2"))
    assert written(tmp_path / "out2") == []  # refused before any image was predicted


def test_predict_refuses_to_write_over_an_input_image(tmp_path):
    photos = tmp_path / "photos"
    save_photo(photos / "cat.png")
    save_photo(photos / "dog.jpg", seed=1)
    before = (photos / "cat.png").read_bytes()
    with pytest.raises(OutputOverInputError, match=r"(?s)cat\.png is the input image .*cat\.png.*output_dir"):
        main(predict_args(tmp_path, photos, photos))
    assert (photos / "cat.png").read_bytes() == before and not (photos / "dog.png").exists()


def test_a_decompression_bomb_is_skipped_and_a_file_named_dot_jpg_is_predicted(tmp_path, monkeypatch):
    photos, out = tmp_path / "photos", tmp_path / "out"
    save_photo(
        photos / "..jpg", image_format="JPEG"
    )  # stem ".": Pillow cannot tell "..png" a PNG by its name
    save_photo(photos / "ok.jpg", seed=1)
    save_photo(photos / "bomb.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4500)  # bomb.png: 10000 pixels, over twice the limit
    with pytest.warns(UnreadableImageWarning, match=r"(?s)skipped 1 unreadable image.*bomb\.png.*bomb"):
        cli = main([*predict_args(tmp_path, photos, out), "--data.init_args.val_batch_size=2"])
    assert [Path(path).name for path, _ in _writer(cli).skipped] == ["bomb.png"]
    assert written(out) == ["..png", "._overlay.jpg", "ok.png", "ok_overlay.jpg"]
    assert Image.open(out / "..png").size == (30, 20)


# ------------------------------------------------------------------------------- evaluation-server formats
def test_each_format_writes_its_servers_values_for_known_labels(tmp_path):
    labels = np.array([[0, 1, 2], [13, 18, 0]], dtype=np.int64)  # trainIds / class indices
    save_mask("cityscapes", tmp_path / "c.png", labels, voc_palette())
    cityscapes = Image.open(tmp_path / "c.png")
    # labelIds of road, sidewalk, building, car, bicycle (cityscapesScripts' labels.py)
    assert cityscapes.mode == "L" and np.array_equal(np.asarray(cityscapes), [[7, 8, 11], [26, 33, 7]])
    save_mask("ade20k", tmp_path / "a.png", np.array([[0, 1, 149]]), voc_palette())
    ade = Image.open(tmp_path / "a.png")
    assert ade.mode == "L" and np.array_equal(np.asarray(ade), [[1, 2, 150]])  # class + 1; 0 = "other"
    black = np.zeros((256, 3), np.uint8)
    save_mask("voc", tmp_path / "v.png", labels, black)  # the VOC colours, whatever the data set's palette
    voc = Image.open(tmp_path / "v.png")
    assert voc.mode == "P" and np.array_equal(read_mask(tmp_path / "v.png"), labels)
    assert np.array_equal(np.array(voc.getpalette()).reshape(-1, 3)[:256], voc_palette())


@pytest.mark.parametrize(
    ("output_format", "num_classes", "stem", "mask"),
    [
        ("cityscapes", 19, "frankfurt_000000_000294_leftImg8bit", "frankfurt_000000_000294.png"),
        ("voc", 21, "2008_000006", "results/VOC2012/Segmentation/comp6_test_cls/2008_000006.png"),
        ("ade20k", 150, "ADE_test_00000001", "ADE_test_00000001.png"),
    ],
)
def test_server_formats_write_one_mask_per_image_under_the_servers_name(
    tmp_path, output_format, num_classes, stem, mask
):
    photos, out = tmp_path / "photos", tmp_path / "out"
    save_photo(photos / f"{stem}.png", size=(33, 47))
    torch.manual_seed(0)
    module = DeepLabV3Plus(num_classes=num_classes, backbone="resnet18")
    with torch.no_grad():
        module.model.decoder.classifier.weight.mul_(300)  # varied labels, so that the mapping shows
    data = SyntheticDataModule(root=str(tmp_path / "synthetic"), predict_path=str(photos), num_workers=0)
    writer = PredictionWriter(output_dir=str(out), format=output_format)
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False)
    (prediction,) = trainer.predict(module, datamodule=data, return_predictions=True)
    assert written(out) == [mask]  # the mask only: a server reads every PNG it is given
    preds = prediction["preds"][0].numpy()
    assert len(np.unique(preds)) > 1
    if output_format == "cityscapes":
        label_ids = {c.train_id: c.id for c in Cityscapes.classes if 0 <= c.train_id < 19}
        expected = np.vectorize(label_ids.get)(preds)
    else:
        expected = preds + 1 if output_format == "ade20k" else preds
    assert np.array_equal(read_mask(out / mask), expected)


def test_a_server_format_is_refused_before_work_for_another_class_count_or_a_name_it_cannot_match(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    write_photos(photos)  # beach.jpg, street.jpg, room.jpg
    with pytest.raises(
        PredictionFormatError, match=r"format ade20k writes the 150 classes.*the model predicts 6"
    ):
        main([*predict_args(tmp_path, photos, out), "--prediction.format=ade20k"])  # quickstart: 6 classes
    assert written(out) == [] if out.exists() else True
    module = DeepLabV3Plus(num_classes=19, backbone="resnet18")
    data = SyntheticDataModule(root=str(tmp_path / "synthetic"), predict_path=str(photos), num_workers=0)
    writer = PredictionWriter(output_dir=str(tmp_path / "out_cityscapes"), format="cityscapes")
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False)
    with pytest.raises(PredictionFormatError, match=r"<city>_<seq>_<frame>.*the input 'beach' has none"):
        trainer.predict(module, datamodule=data)
    assert not (tmp_path / "out_cityscapes").exists()
