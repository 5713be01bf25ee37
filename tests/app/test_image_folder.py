"""The folder data set (``--dataset folder``): layouts, decoding to the input size, statistics,
seeded held-out splits, class-balanced limits, and the errors for an empty folder, a class without
images, an unreadable image and class sets that differ between the splits. The folders are cut
from the shared CIFAR-10 JPEGs (``folder_helpers``)."""
import numpy as np
import pytest
from PIL import Image

from folder_helpers import CLASSES, make_image_folder
from prunekit.app import data
from prunekit.app.image_folder import computed_stats, decode, load_image_folder, parse_normalization
from prunekit.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), per_class=8, val_per_class=4)


def test_train_and_val_folders_are_read_decoded_and_normalised(split_folder):
    ds = data.load_dataset("folder", root=split_folder, image_size=16)
    assert ds.classes == tuple(sorted(CLASSES))
    assert ds.x_train.shape == (24, 16, 16, 3) and ds.x_test.shape == (12, 16, 16, 3)
    assert np.bincount(ds.y_train).tolist() == [8, 8, 8] and np.bincount(ds.y_test).tolist() == [4, 4, 4]
    # a training image is the JPEG decoded and bilinearly resized 32 -> 16 (no crop for a square)
    first = sorted((split_folder / "train" / ds.classes[0]).iterdir())[0]
    with Image.open(first) as im:
        expected = np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR))
    assert np.array_equal(ds.x_train[0], expected)
    mean, std = computed_stats(ds.x_train)
    assert np.allclose(ds.mean, ds.x_train.reshape(-1, 3).mean(0) / 255, atol=1e-5) and np.allclose(ds.std, std)
    x, _ = next(iter(ds.batches("test", 12)))
    assert x.shape == (12, 3, 16, 16)


def test_held_out_split_is_stratified_seeded_and_limits_are_balanced(tmp_path):
    root = make_image_folder(tmp_path, per_class=10, split_layout=False)
    a = load_image_folder(root, image_size=8, val_fraction=0.2, seed=3)
    b = load_image_folder(root, image_size=8, val_fraction=0.2, seed=3)
    c = load_image_folder(root, image_size=8, val_fraction=0.2, seed=4)
    assert np.bincount(a.y_test).tolist() == [2, 2, 2] and len(a.y_train) == 24
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_test, c.x_test)
    # no image is in both parts
    train_rows = {r.tobytes() for r in a.x_train}
    assert not any(r.tobytes() in train_rows for r in a.x_test)
    small = load_image_folder(root, image_size=8, train_limit=7, test_limit=3, seed=3)
    assert np.bincount(small.y_train).tolist() == [3, 2, 2] and np.bincount(small.y_test).tolist() == [1, 1, 1]


def test_non_square_images_are_center_cropped(tmp_path):
    path = tmp_path / "wide.png"
    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, 10:20] = 255  # a white middle third
    Image.fromarray(pixels).save(path)
    out = decode(path, 10)
    assert out.shape == (10, 10, 3) and out.min() == 255


def test_stated_and_named_normalisation(split_folder):
    ds = load_image_folder(split_folder, image_size=8, normalization="0.5,0.4,0.3/0.2,0.2,0.2")
    assert np.allclose(ds.mean, [0.5, 0.4, 0.3]) and np.allclose(ds.std, 0.2)
    assert parse_normalization("imagenet")[0] == (0.485, 0.456, 0.406)
    with pytest.raises(ConfigError, match="normalization '0.5/0'"):
        parse_normalization("0.5/0")


def test_errors_name_the_folder_or_file(tmp_path, split_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"noimg/cat holds no images"):
        load_image_folder(tmp_path / "noimg")
    bad = make_image_folder(tmp_path / "bad", per_class=2, val_per_class=1, classes=("cat",))
    (bad / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode image .*broken.jpg"):
        load_image_folder(bad, image_size=8)
    mixed = make_image_folder(tmp_path / "mixed", per_class=2, val_per_class=1, classes=("cat", "ship"))
    (mixed / "val" / "ship").rename(mixed / "val" / "truck")
    with pytest.raises(DataError, match="only in train: ship; only in val: truck"):
        load_image_folder(mixed, image_size=8)
    with pytest.raises(ConfigError, match="needs --data-root"):
        load_image_folder(None)
