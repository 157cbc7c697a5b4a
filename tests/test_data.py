"""Tests for spgd_jax.train._data: listing, the fixed split, decoding/caching, batch order, device augmentation.

All images are made in tmp_path; nothing from ../shared/data is needed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from spgd_jax.train import _data as data


def _save(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kwargs)
    return path


def test_list_images_recursive_sorted_and_filtered(tmp_path):
    pixel = np.zeros((4, 4, 3), np.uint8)
    _save(tmp_path / "b" / "2.png", pixel)
    _save(tmp_path / "a" / "9.JPG", pixel)
    _save(tmp_path / "a" / "10.jpeg", pixel)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    assert data.list_images(tmp_path) == ["a/10.jpeg", "a/9.JPG", "b/2.png"]


def test_list_images_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.list_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a folder"):
        data.list_images(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        data.list_images(tmp_path / "empty")


def test_split_is_every_50th_from_7_and_order_independent():
    names = [f"img{k:04d}.png" for k in range(203)]
    train, val = data.split_names(names[::-1])
    assert val == ["img0007.png", "img0057.png", "img0107.png", "img0157.png"]
    assert set(train) | set(val) == set(names) and not set(train) & set(val)
    assert len(train) == 199
    assert data.split_names(names, data.Split(every=10, offset=0))[1] == [f"img{k:04d}.png" for k in range(0, 203, 10)]
    with pytest.raises(ValueError, match="offset"):
        data.Split(every=50, offset=50)


def test_load_folder_crops_resizes_and_converts_modes(tmp_path):
    # 40 wide x 20 high: red | green (centre 20x20) | blue -> the centre crop is pure green.
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)
    wide[:, 10:30] = (0, 255, 0)
    wide[:, 30:] = (0, 0, 255)
    _save(tmp_path / "0_wide.png", wide)
    # 10 wide x 30 high: top and bottom rows black, centre 10x10 white.
    tall = np.zeros((30, 10, 3), np.uint8)
    tall[10:20] = 255
    _save(tmp_path / "1_tall.png", tall)
    _save(tmp_path / "2_grey.png", np.full((12, 12), 77, np.uint8), mode="L")
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent -> white
    _save(tmp_path / "3_rgba.png", rgba, mode="RGBA")
    _save(tmp_path / "4_large.jpg", np.full((100, 100, 3), 128, np.uint8), quality=100)
    names = data.list_images(tmp_path)
    images, kept = data.load_folder(tmp_path, names, 16, log=lambda m: None)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert kept == names
    np.testing.assert_array_equal(images[0], np.broadcast_to(np.array([0, 255, 0], np.uint8), (16, 16, 3)))
    np.testing.assert_array_equal(images[1], 255)
    np.testing.assert_array_equal(images[2], 77)
    np.testing.assert_array_equal(images[3], 255)
    assert np.abs(images[4].astype(int) - 128).max() <= 2  # JPEG rounding only


def test_unreadable_images_are_skipped_with_notice_and_count(tmp_path):
    _save(tmp_path / "good.png", np.full((8, 8, 3), 9, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    notices = []
    images, kept = data.load_folder(tmp_path, data.list_images(tmp_path), 8, log=notices.append)
    assert kept == ["good.png"] and images.shape == (1, 8, 8, 3)
    assert sum("broken.jpg" in n for n in notices) == 1 and sum("empty.png" in n for n in notices) == 1
    assert any("skipped 2 unreadable" in n for n in notices)
    with pytest.raises(ValueError, match="none of the 2 image files"):
        data.load_folder(tmp_path, ["broken.jpg", "empty.png"], 8, log=lambda m: None)


def test_cache_is_reused_and_keyed_by_files_and_size(tmp_path):
    folder, cache = tmp_path / "imgs", tmp_path / "cache"
    rng = np.random.default_rng(0)
    for k in range(3):
        _save(folder / f"{k}.png", rng.integers(0, 256, (10 + k, 12, 3), dtype=np.uint8))
    names = data.list_images(folder)
    first, _ = data.load_folder(folder, names, 8, cache_dir=cache, log=lambda m: None)
    assert len(list(cache.glob("*.npy"))) == 1
    messages = []
    second, kept = data.load_folder(folder, names, 8, cache_dir=cache, log=messages.append)
    assert any("cached" in m for m in messages) and kept == names
    np.testing.assert_array_equal(first, second)
    data.load_folder(folder, names, 4, cache_dir=cache, log=lambda m: None)
    data.load_folder(folder, names[:2], 8, cache_dir=cache, log=lambda m: None)
    assert len(list(cache.glob("*.npy"))) == 3


def test_save_resized_copies_keep_order_split_and_pixels(tmp_path):
    src = tmp_path / "src"
    yy, xx = np.mgrid[0:20, 0:30]
    for k in range(12):  # image k: its own colour, a gentle gradient
        picture = np.stack([np.full_like(xx, 20 * k), xx * 4, 255 - 20 * k + yy], -1).astype(np.uint8)
        _save(src / ("a" if k < 6 else "b") / f"{k:02d}.{'png' if k % 2 else 'jpg'}", picture)
    (src / "b" / "99.png").write_bytes(b"broken")
    messages = []
    written = data.save_resized_copies(src, tmp_path / "out", 8, log=messages.append)
    assert written == [n.rsplit(".", 1)[0] + ".webp" for n in data.list_images(src) if n != "b/99.png"]
    assert data.list_images(tmp_path / "out") == written and any("b/99.png" in m for m in messages)
    copies, _ = data.load_folder(tmp_path / "out", written, 8, log=lambda m: None)
    originals, _ = data.load_folder(src, data.list_images(src), 8, log=lambda m: None)
    assert copies.shape == originals.shape == (12, 8, 8, 3)
    assert np.sqrt(np.mean((copies.astype(float) - originals) ** 2)) < 6  # lossy, but the same pictures
    assert np.sqrt(np.mean((copies.astype(float) - originals[::-1]) ** 2)) > 40


def test_batch_indices_cover_each_epoch_once():
    n, b = 10, 4
    stream = np.concatenate([data.batch_indices(3, s, n, b) for s in range(5)])  # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])
    np.testing.assert_array_equal(data.batch_indices(3, 2, n, b), stream[8:12])
    assert not np.array_equal(data.batch_indices(4, 0, n, b), stream[:4])
    assert len(data.batch_indices(0, 0, 3, 8)) == 8  # batch larger than the data


def test_batch_indices_block_is_the_batches_of_consecutive_steps():
    def reference(seed, step, n, b):  # the definition: slices of a stream of per-epoch permutations
        stream = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range((step + 1) * b // n + 1)])
        return stream[step * b:(step + 1) * b]

    n, b = 10, 4
    block = data.batch_indices_block(3, 1, 6, n, b)  # updates 1..6: across three epoch boundaries
    assert block.shape == (6, 4) and block.dtype == np.int32
    np.testing.assert_array_equal(block, np.stack([reference(3, s, n, b) for s in range(1, 7)]))
    np.testing.assert_array_equal(block[2], data.batch_indices(3, 3, n, b))
    np.testing.assert_array_equal(data.batch_indices_block(0, 0, 2, 3, 8),
                                  np.stack([reference(0, s, 3, 8) for s in range(2)]))


def test_source_counts():
    assert data.source_counts(["celeba/1.jpg", "utkface/a/2.jpg", "celeba/3.jpg", "top.png"]) == \
        {".": 1, "celeba": 2, "utkface": 1}


def test_to_model_range_and_random_flip():
    x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (64, 5, 7, 3), dtype=np.uint8))
    f = data.to_model_range(x)
    assert f.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(data.to_model_range(jnp.array([0, 255], jnp.uint8))), [-1.0, 1.0])
    flipped = np.asarray(data.random_flip(jax.random.PRNGKey(3), f))
    same = np.all(flipped == np.asarray(f), axis=(1, 2, 3))
    mirrored = np.all(flipped == np.asarray(f)[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 10 < mirrored.sum() < 54  # both outcomes occur, roughly half each
    np.testing.assert_array_equal(flipped, np.asarray(data.random_flip(jax.random.PRNGKey(3), f)))
