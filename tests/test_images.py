import numpy as np
import pytest
from PIL import Image

from spgd_jax.io import images


def _write(tmp_path, name, array, mode=None):
    path = tmp_path / name
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_rgb_roundtrip_is_exact_at_model_size(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    notices = []
    x = images.load_image(_write(tmp_path, "a.png", rgb), 16, notices)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(images.to_uint8(x), rgb)
    assert notices == []


@pytest.mark.parametrize("kind", ["L", "RGBA", "P", "I;16"])
def test_other_modes_become_rgb_with_a_notice(tmp_path, kind):
    rng = np.random.default_rng(1)
    if kind == "L":
        image = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8))
    elif kind == "RGBA":
        image = Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))
    elif kind == "P":
        image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("P")
    else:
        image = Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16))
    path = tmp_path / "x.png"
    image.save(path)
    notices = []
    x = images.load_image(path, 8, notices)
    assert x.shape == (8, 8, 3)
    assert len(notices) == 1 and kind.split(";")[0] in notices[0]
    if kind == "I;16":  # 16-bit values keep their relative scale
        expected = np.asarray(image, dtype=np.float64) / 65535 * 2 - 1
        np.testing.assert_allclose(x[..., 0], expected, atol=1 / 127.5)


def test_non_square_is_centre_cropped_then_resized(tmp_path):
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)
    rgb[:, 10:30] = 255  # the centre square is white, the sides black
    notices = []
    x = images.load_image(_write(tmp_path, "wide.png", rgb), 10, notices)
    assert x.shape == (10, 10, 3)
    np.testing.assert_allclose(x, 1.0)
    assert any("centre-cropped" in n for n in notices) and any("resized" in n for n in notices)


def test_corrupt_and_truncated_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="bad.png is not a readable image"):
        images.load_image(bad, 8)
    good = _write(tmp_path, "t.jpg", np.full((64, 64, 3), 128, dtype=np.uint8))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.jpg"):
        images.load_image(truncated, 8)


def test_find_images_file_folder_glob_and_errors(tmp_path):
    for name in ("b.png", "a.jpg"):
        _write(tmp_path, name, np.zeros((4, 4, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in images.find_images(str(tmp_path))] == ["a.jpg", "b.png"]
    assert [p.name for p in images.find_images(str(tmp_path / "*.png"))] == ["b.png"]
    with pytest.raises(FileNotFoundError, match="no image"):
        images.find_images(str(tmp_path / "*.gif"))


def test_save_png_is_atomic_and_leaves_no_temp_files(tmp_path):
    x = np.linspace(-1, 1, 4 * 4 * 3, dtype=np.float32).reshape(4, 4, 3)
    images.save_png(tmp_path / "out.png", x)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), images.to_uint8(x))
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_demo_image_ships_with_a_dependency():
    assert images.demo_image_path().is_file()


def test_box_cuts_that_square_and_a_bad_box_is_a_clear_error(tmp_path):
    rgb = np.zeros((30, 20, 3), dtype=np.uint8)
    rgb[5:15, 4:14] = 255  # the box is white, the rest black
    notices = []
    x = images.load_image(_write(tmp_path, "tall.png", rgb), 10, notices, box=(4, 5, 14, 15))
    np.testing.assert_allclose(x, 1.0)
    assert any("cut to the 10x10 box at (4, 5)" in n for n in notices)
    assert not any("centre-cropped" in n or "resized" in n for n in notices)
    for box in ((4, 5, 14, 16), (15, 0, 25, 10), (-1, 0, 9, 10)):  # not square; past the right edge; negative
        with pytest.raises(ValueError, match="not a square inside"):
            images.load_image(tmp_path / "tall.png", 10, box=box)


def test_demo_is_cut_to_a_face_sized_square_inside_the_photo():
    from PIL import Image as PILImage

    with PILImage.open(images.demo_image_path()) as photo:
        width, height = photo.size
    left, top, right, bottom = images.DEMO_FACE_BOX
    side = right - left
    assert side == bottom - top and 0 <= left and right <= width and 0 <= top and bottom <= height
    # the training faces' framing: her eyes (83 px apart, at y ~ 188) 22 % of the side apart, near mid-height
    assert 0.19 <= 83 / side <= 0.25 and 0.4 <= (188 - top) / side <= 0.55
    assert side < min(width, height)  # tighter than the centre square of the whole photo
    notices = []
    x = images.load_demo(64, notices)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    assert any("380x380 box" in n for n in notices)
    cut = np.asarray(PILImage.open(images.demo_image_path()).convert("RGB").crop(images.DEMO_FACE_BOX)
                     .resize((64, 64), PILImage.BICUBIC, reducing_gap=None))
    np.testing.assert_array_equal(images.to_uint8(x), cut)
