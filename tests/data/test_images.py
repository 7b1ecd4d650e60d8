"""Reading image/mask files and listing predict inputs: values, and one clear error per bad file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deeplab_lit.data.images import (
    ImageFileDataset,
    SegmentationDataset,
    list_images,
    read_image,
    read_mask,
    relative_names,
)
from tests.fakes import save_palette_png


def _jpeg_bytes(size=(20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_read_image_rgb_uint8(tmp_path):
    path = tmp_path / "a.png"
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (7, 5, 3)
    np.testing.assert_array_equal(out, pixels)
    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.png")  # grayscale becomes 3 equal channels
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == (7, 5, 3) and (gray[..., 0] == gray[..., 2]).all()


def test_read_mask_reads_palette_indices_not_colours(tmp_path):
    mask = np.array([[0, 1, 15], [255, 20, 3]], dtype=np.uint8)
    save_palette_png(tmp_path / "m.png", mask)
    assert Image.open(tmp_path / "m.png").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)


def test_read_mask_rejects_rgb_masks(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png.*'RGB'.*class index"):
        read_mask(tmp_path / "rgb.png")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.jpg"):
        read_image(tmp_path / "nothere.jpg")
    with pytest.raises(FileNotFoundError, match=r"nothere\.png"):
        read_mask(tmp_path / "nothere.png")


def test_truncated_jpeg_is_an_error(tmp_path):
    data = _jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"Could not decode image file .*cut\.jpg.*truncated"):
        read_image(tmp_path / "cut.jpg")


def test_corrupt_file_is_an_error(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"Could not decode image file .*junk\.png"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(ValueError, match=r"junk\.png"):
        read_mask(tmp_path / "junk.png")


def test_list_images_file_folder_glob(tmp_path):
    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.jpeg").write_bytes(b"x")
    assert list_images(tmp_path / "b.jpg") == [tmp_path / "b.jpg"]
    assert list_images(tmp_path) == [tmp_path / "a.PNG", tmp_path / "b.jpg"]  # sorted, no txt, not recursive
    assert list_images(str(tmp_path / "**" / "*.jp*g")) == [tmp_path / "b.jpg", tmp_path / "sub" / "c.jpeg"]


def test_list_images_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No images found in folder .*empty"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"No images found in glob pattern .*\*\.jpg"):
        list_images(str(tmp_path / "*.jpg"))
    with pytest.raises(FileNotFoundError, match=r"missing.*does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"x\.txt is not an image file"):
        list_images(tmp_path / "x.txt")


def test_relative_names_mirror_the_folders_and_keep_the_extension_only_where_stems_collide(tmp_path):
    a, b, c = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "b" / "y.jpg"
    assert relative_names([b, c]) == ["x", "y"]
    assert relative_names([a, b, c]) == ["a/x", "b/x", "b/y"]
    a_b, a__b = tmp_path / "a" / "b.jpg", tmp_path / "a__b.jpg"  # "a__b" was a/b.jpg's flattened name
    assert relative_names([a_b, a__b]) == ["a/b", "a__b"]
    jpg, png = tmp_path / "x.jpg", tmp_path / "x.png"
    assert relative_names([jpg, png, tmp_path / "y.png"]) == ["x.jpg", "x.png", "y"]
    assert relative_names([tmp_path / "..jpg"]) == ["."]  # Path("..jpg").with_suffix("") would raise


def test_image_file_dataset_items(tmp_path):
    for i, size in enumerate([(10, 12), (14, 9)]):
        Image.fromarray(np.full((*size, 3), 100 + i, np.uint8)).save(tmp_path / f"im{i}.png")
    ds = ImageFileDataset(tmp_path)
    assert len(ds) == 2
    item = ds[1]
    assert set(item) == {"image", "name", "path"}
    assert item["image"].shape == (3, 14, 9) and item["image"].dtype.is_floating_point
    assert item["name"] == "im1" and item["path"].endswith("im1.png")
    with pytest.raises(FileNotFoundError, match="No images found"):
        ImageFileDataset(tmp_path / "none_*.jpg")


# ------------------------------------------------------------------ pixel modes cameras and scanners write
def _gray16() -> np.ndarray:
    """16-bit values at the rounding edges of v / 257 (128 -> 0, 129 -> 1) and the ends of the range."""
    return np.array([[0, 128, 129, 257], [1000, 32768, 65407, 65535]], dtype=np.uint16)


def _as_8bit(values: np.ndarray) -> np.ndarray:
    return np.floor(values.astype(np.float64) / 257 + 0.5).astype(np.uint8)


def test_16bit_grayscale_png_and_tiff_are_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    values = _gray16()
    Image.fromarray(values).save(tmp_path / "g16.png")
    Image.fromarray(values).save(tmp_path / "g16.tif")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"  # what convert("RGB") turned into all 255
    for name in ("g16.png", "g16.tif"):
        out = read_image(tmp_path / name)
        assert out.shape == (2, 4, 3) and out.dtype == np.uint8
        for channel in range(3):
            np.testing.assert_array_equal(out[..., channel], _as_8bit(values))
    assert _as_8bit(values).tolist() == [[0, 0, 1, 1], [4, 128, 255, 255]]


def test_mode_I_holding_16bit_values_reads_as_16bit_and_32bit_values_are_refused(tmp_path):
    values = _gray16().astype(np.int32)
    Image.fromarray(values).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    np.testing.assert_array_equal(read_image(tmp_path / "i32.tif")[..., 1], _as_8bit(values))
    Image.fromarray(values * 100).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match=r"wide\.tif has mode 'I' with values 0\.\.6553500; expected 16-bit"):
        read_image(tmp_path / "wide.tif")


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    colour, alpha = colour.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.floor((colour * alpha + 255 * (255 - alpha)) / 255 + 0.5).astype(np.uint8)


def test_alpha_is_composited_over_white_for_rgba_and_grayscale_alpha(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent black: a viewer shows the background, not black
    rgba[0, 1, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(out, _over_white(rgba[..., :3], rgba[..., 3]))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == tuple(rgba[0, 1, :3])
    la = rgba[..., [0, 3]]
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    gray = _over_white(la[..., :1], la[..., 1])[..., 0]
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), np.stack([gray] * 3, axis=-1))


def test_palette_shows_its_colours_and_a_transparent_index_shows_white(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    colours = np.array([[10, 20, 30], [200, 0, 0], [0, 90, 255]], dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(colours.tobytes())
    image.save(tmp_path / "opaque.png")
    np.testing.assert_array_equal(read_image(tmp_path / "opaque.png"), colours[indices])
    image.save(tmp_path / "keyed.png", transparency=0)  # index 0 transparent (tRNS), as GIFs and icons do
    shown = colours[indices].copy()
    shown[indices == 0] = 255
    np.testing.assert_array_equal(read_image(tmp_path / "keyed.png"), shown)


def test_cmyk_and_1bit_images_read_as_their_colours(tmp_path):
    cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    expected = [[[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0]]]  # cyan, magenta, yellow, black
    assert read_image(tmp_path / "cmyk.tif").tolist() == expected
    bits = np.array([[True, False], [False, True]])
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    np.testing.assert_array_equal(read_image(tmp_path / "bits.png")[..., 2], np.where(bits, 255, 0))


def test_float_images_are_refused_with_the_file_and_mode(tmp_path):
    Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError, match=r"depth\.tif has the unsupported mode 'F': floating-point"):
        read_image(tmp_path / "depth.tif")


# ------------------------------------------------------------------------------------ EXIF orientation
def _jpeg_with_orientation(path, height: int, width: int, orientation: int) -> np.ndarray:
    """Write a (height, width) JPEG tagged with ``orientation``; returns the pixels as decoded."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 3, :, 0] = 255  # a red top band: where it ends up shows the turn
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return np.array(Image.open(path).convert("RGB"))


def test_exif_orientation_6_is_turned_for_predict_and_kept_for_data_sets(tmp_path):
    stored = _jpeg_with_orientation(tmp_path / "phone.jpg", 30, 40, orientation=6)
    assert read_image(tmp_path / "phone.jpg").shape == (30, 40, 3)  # data sets: the stored grid
    shown = read_image(tmp_path / "phone.jpg", exif_transpose=True)
    np.testing.assert_array_equal(shown, np.rot90(stored, k=-1))  # 6: turned 90 degrees clockwise
    item = ImageFileDataset(tmp_path / "phone.jpg")[0]
    assert item["image"].shape == (3, 40, 30)


def _folder_pair(tmp_path, mask_size: tuple[int, int], orientation: int) -> SegmentationDataset:
    _jpeg_with_orientation(tmp_path / "img.jpg", 30, 40, orientation)
    save_palette_png(tmp_path / "img.png", np.zeros(mask_size, np.uint8))
    return SegmentationDataset([tmp_path / "img.jpg"], [tmp_path / "img.png"], num_classes=2)


def test_a_mask_drawn_on_the_exif_turned_view_is_an_error_that_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"is 30x40 .* is 40x30.* EXIF orientation 6 .* fits the turned"):
        _folder_pair(tmp_path, (40, 30), orientation=6)[0]
    with pytest.raises(ValueError, match=r"a mask must have its image's size$"):  # no tag: no EXIF story
        _folder_pair(tmp_path, (40, 30), orientation=1)[0]
    item = _folder_pair(tmp_path, (30, 40), orientation=6)[0]  # mask on the stored grid: read as stored
    assert item["image"].shape == (3, 30, 40) and item["mask"].shape == (30, 40)


def test_unreadable_predict_file_becomes_an_item_with_its_reason(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    dataset = ImageFileDataset(tmp_path)
    bad, good = dataset[0], dataset[1]
    assert bad["image"] is None and bad["path"].endswith("bad.jpg")
    assert "Could not decode image file" in bad["error"] and "bad.jpg" in bad["error"]
    assert good["image"].shape == (3, 8, 8) and "error" not in good
