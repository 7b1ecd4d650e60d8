"""Reading image/mask files and listing predict inputs: values, and one clear error per bad file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fakes import save_palette_png
from PIL import Image

from deeplab_lit.data.images import ImageFileDataset, list_images, read_image, read_mask, unique_names


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


def test_unique_names_keep_outputs_apart(tmp_path):
    a, b, c = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "b" / "y.jpg"
    assert unique_names([a, c]) == ["x", "y"]
    assert unique_names([a, b, c]) == ["a__x", "b__x", "b__y"]


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
