"""Your own images (-d folder) against what a hostile pass tried: the run's own outputs inside
the folder, deep images, linked folders, files that vanish or fail for a moment, damaged caches,
thin and huge images, names that would break a one-line message, empty and many classes.

The folders are built here, tiny; the decoded-image cache goes to a temporary XDG_CACHE_HOME.
"""
import errno
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gan_conf
import gan_trainer
from conftest import assert_one_line_error, load_ckpt, run_main, within


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """The decoded-image cache of these tests lives in their own folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gan_trainer"


def make_classes(root, classes=("cat", "dog"), per_class=6, size=(12, 10)):
    """root/<class>/<k>.png, each class its own shade."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.new("RGB", size, (40 * c + 3 * k, 100, 200 - 5 * k)).save(root / name / f"{k}.png")
    return root


def read(root, size=8, channels=1, **kwargs):
    """read_image_folder(root): (images, names, the lines it said)."""
    said = []
    images, names = gan_trainer.read_image_folder(root, size, channels, log=said.append, **kwargs)
    return images, names, said


def folder_config(size=8, channels=1, batch_size=4):
    return gan_trainer.dataclasses.replace(gan_conf.CONFIGS["folder"], sample_shape=(channels, size, size),
                                           batch_size=batch_size)


def load_folder(root, conditional=True, batch_size=4):
    """load_data on a folder: (training set, the lines it said)."""
    said = []
    data = gan_trainer.load_data(folder_config(batch_size=batch_size), root, "cpu", conditional=conditional,
                                 log=said.append)
    return data, said


# ------------------------------------------------------------------ the run's own outputs

RUN = ["-d", "folder", "--image_size", 8, "--batch_size", 4, "--iters", 2, "--seed", 3, "--use_gpu", 0, "--quiet"]


@pytest.mark.parametrize("out_below", ["", "runs/a"])
def test_a_run_writing_inside_its_image_folder_resumes_on_the_same_images_and_classes(tmp_path, capsys, out_below):
    root = make_classes(tmp_path / "images")
    out = root / out_below
    code, stdout, err = run_main([*RUN, "--conditional", 1, "--passes", 1, "--data_dir", root, "--out_dir", out],
                                 capsys)
    assert code == 0, err
    assert (out / "folder_samples" / "train_pass0.png").exists()  # a picture, in the image folder
    code, stdout, err = run_main(["-d", "folder", "--resume", "--passes", 2, "--use_gpu", 0, "--quiet",
                                  "--out_dir", out], capsys)
    assert code == 0, err
    assert "this trainer's output" in stdout and "the data holds" not in stdout
    config = load_ckpt(out / "folder_params" / "pass_1.pt")["config"]
    assert (config["images"], config["classes"]) == (12, ("cat", "dog"))


def test_other_runs_outputs_in_the_folder_are_left_out_and_a_users_folder_of_that_name_is_not(tmp_path):
    root = make_classes(tmp_path / "images")
    old = root / "old"  # an earlier run's --out_dir
    (old / "mnist_params").mkdir(parents=True)
    (old / "mnist_params" / ".lock").write_text("1\n")
    (old / "mnist_samples").mkdir()
    Image.new("L", (8, 8)).save(old / "mnist_samples" / "train_pass0.png")
    (root / "folder_samples").mkdir()  # no run beside it: the user's own pictures
    Image.new("L", (8, 8)).save(root / "folder_samples" / "mine.png")
    moved = root / "moved" / "folder_samples"  # a run's pictures whose checkpoints were moved away
    moved.mkdir(parents=True)
    Image.new("L", (8, 8)).save(moved / "train_pass0.png")
    Image.new("L", (8, 8)).save(moved / "losses.png")
    _, names, said = read(root)
    assert "folder_samples/mine.png" in names and not any(n.startswith(("old/", "moved/")) for n in names)
    note = [line for line in said if "left out" in line]
    assert len(note) == 1 and "old/mnist_params" in note[0] and "old/mnist_samples" in note[0]
    assert "moved/folder_samples" in note[0]
    with pytest.raises(gan_trainer.UserError, match="this run's own output folder"):
        read(old / "mnist_samples", exclude=[old / "mnist_samples", old / "mnist_params"])


# ------------------------------------------------------------------ deep images

@pytest.mark.parametrize("kind", ["I;16 PNG", "I TIFF", "F TIFF"])
def test_deep_images_are_scaled_by_their_range_not_clipped(tmp_path, kind):
    root = tmp_path / "images"
    root.mkdir()
    ramp = np.arange(16)[None].repeat(16, 0)
    if kind == "I;16 PNG":
        image, form = Image.fromarray((ramp * 4369).astype(np.uint16)), "PNG"  # 0 to 65535
    elif kind == "I TIFF":
        image, form = Image.fromarray((ramp * 4369).astype(np.int32)), "TIFF"
    else:
        image, form = Image.fromarray((ramp / 15).astype(np.float32)), "TIFF"  # 0 to 1
    image.save(root / "deep.png", format=form)  # Pillow reads a file by its content, not its name
    assert Image.open(root / "deep.png").mode == kind.split()[0]
    for _ in range(2):  # decoded, then from the cache
        images, _, said = read(root, size=16, channels=3)
        assert (images[0] == (ramp * 17).astype(np.uint8)).all()  # the 0-255 ramp, in every channel
    assert any("from the cache" in line for line in said)


# ------------------------------------------------------------------ linked folders

def test_a_linked_class_folder_is_read_and_a_link_loop_ends(tmp_path):
    root = make_classes(tmp_path / "images", classes=("cat",))
    make_classes(tmp_path / "elsewhere", classes=("dog",))
    (root / "dog").symlink_to(tmp_path / "elsewhere" / "dog", target_is_directory=True)
    (root / "cat" / "loop").symlink_to(root, target_is_directory=True)
    data, said = load_folder(root)
    assert data.classes == ("cat", "dog") and len(data.x) == 12
    assert any("cat/loop (the same folder as .)" in line for line in said)


# ------------------------------------------------------------------ files that vanish or fail for a moment

def test_a_file_that_vanishes_while_the_folder_is_read_is_no_traceback(tmp_path, monkeypatch):
    root = make_classes(tmp_path / "images")
    before_stat, after_stat = root / "cat" / "0.png", root / "dog" / "0.png"
    real_stat = Path.stat

    def stat(self, **kwargs):
        if self == before_stat:  # gone between the folder's listing and its stat
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(self))
        found = real_stat(self, **kwargs)
        if self == after_stat:  # gone right after its stat
            self.unlink()
        return found

    monkeypatch.setattr(Path, "stat", stat)
    _, names, said = read(root)
    assert len(names) == 10 and "cat/0.png" not in names and "dog/0.png" not in names
    assert any("could not be read this time" in line and "dog/0.png" in line for line in said)


@pytest.mark.parametrize("failure", [
    FileNotFoundError(errno.ENOENT, "No such file or directory"),  # moved away and back
    OSError(errno.EIO, "Input/output error"),
    MemoryError(),
])
def test_a_read_failure_of_the_moment_is_tried_again_by_the_next_run(tmp_path, monkeypatch, failure):
    root = make_classes(tmp_path / "images")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    victim, real_open, failed = root / "dog" / "3.png", Image.open, []

    def open_once_failing(path, *args, **kwargs):
        if Path(path) == victim and not failed:
            failed.append(path)
            raise failure
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_once_failing)
    _, names, said = read(root)
    assert "dog/3.png" not in names and any("could not be read this time" in line for line in said)
    _, names, said = read(root, retry=False)  # another process of the same run takes the cache as it is
    assert "dog/3.png" not in names and any("from the cache" in line for line in said)
    _, names, said = read(root)  # the next run
    assert "dog/3.png" in names and len(names) == 12 and not any("from the cache" in line for line in said)
    _, names, said = read(root)
    assert len(names) == 12 and any("from the cache" in line for line in said)
    assert any("cat/broken.png" in line and "skipped" in line for line in said)  # undecodable: skipped for good


# ------------------------------------------------------------------ damaged caches

def cache_files(cache_home):
    (npy,), (meta,) = cache_home.glob("*.npy"), cache_home.glob("*.json")
    return npy, meta


def rewrite_json(path, change):
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def npz_as_npy(npy, meta):
    images = np.load(npy)
    with open(npy, "wb") as f:
        np.savez(f, images)


def deep_json(npy, meta):
    meta.write_text("[" * 100_000 + "]" * 100_000)


def short_skipped_entry(npy, meta):
    rewrite_json(meta, lambda m: m.update(skipped=[["cat/broken.png"]]))


def null_names(npy, meta):
    rewrite_json(meta, lambda m: m.update(names=None))


def null_name_entries(npy, meta):
    rewrite_json(meta, lambda m: m.update(names=[None] * len(m["names"])))


def one_class_of_two(npy, meta):
    """The names and images of cat only: shapes agree, names do not match the folder's."""
    cats = [k for k, n in enumerate(json.loads(meta.read_text())["names"]) if n.startswith("cat/")]
    images = np.load(npy)[cats]
    with open(npy, "wb") as f:
        np.save(f, images)
    rewrite_json(meta, lambda m: m.update(names=[m["names"][k] for k in cats]))


def huge_header(npy, meta):
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10 ** 14,)})
        f.write(b"\0" * 100)


def fifo_json(npy, meta):
    meta.unlink()
    os.mkfifo(meta)


def fifo_npy(npy, meta):
    npy.unlink()
    os.mkfifo(npy)


@pytest.mark.parametrize("damage", [npz_as_npy, deep_json, short_skipped_entry, null_names, null_name_entries,
                                    one_class_of_two, huge_header, fifo_json, fifo_npy])
def test_a_damaged_cache_is_rebuilt_with_one_line(tmp_path, cache_home, damage):
    root = make_classes(tmp_path / "images")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    first, names, _ = read(root)
    npy, meta = cache_files(cache_home)
    damage(npy, meta)
    with within(10):
        images, again, said = read(root)
    assert np.array_equal(images, first) and again == names
    notes = [line for line in said if "was damaged" in line]
    damaged = npy if damage in (npz_as_npy, huge_header, fifo_npy) else meta  # the note names the file
    assert len(notes) == 1 and str(damaged) in notes[0] and "decoding again" in notes[0], said
    assert npy.is_file() and meta.is_file()  # a FIFO is replaced by the cache
    with within(10):
        _, _, said = read(root)
    assert any("from the cache" in line for line in said)


# ------------------------------------------------------------------ thin and huge images

def test_an_image_too_thin_to_resize_is_skipped_by_name(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("L", (1, 2000), 128).save(root / "thin.png")  # resized to 16 wide, 32,000 tall
    Image.new("L", (16, 1), 128).save(root / "strip.png")  # 16 times as wide as high: still read
    _, names, said = read(root, size=16)
    assert names == ["strip.png"]
    assert any("thin.png" in line and "too elongated" in line for line in said)


def test_an_image_over_pillows_warning_size_is_decoded_with_a_note_not_a_raw_warning(tmp_path, monkeypatch):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("L", (40, 40), 90).save(root / "big.png")
    Image.new("L", (10, 10), 90).save(root / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # big.png is over it, not over twice it
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        _, names, said = read(root)
    assert names == ["big.png", "small.png"] and not raw
    assert any("big.png" in line and "larger than 1000 pixels" in line for line in said)


# ------------------------------------------------------------------ one line, whatever the names

def test_names_that_would_break_a_line_are_escaped(tmp_path, capsys):
    root = make_classes(tmp_path / "images")
    (root / "cat" / "bad\nname.png").write_bytes(b"not an image")
    with open(os.fsencode(root / "cat") + b"/bad\xffbyte.png", "wb") as f:  # a name that is not UTF-8
        f.write(b"not an image")
    _, _, said = read(root)
    assert all("\n" not in line for line in said)
    assert any("cat/bad\\nname.png" in line and "cat/bad\\udcffbyte.png" in line for line in said)
    missing = tmp_path / "no\nsuch"
    code, _, err = run_main(["-d", "folder", "--data_dir", missing, "--use_gpu", 0, "--out_dir", tmp_path / "o"],
                            capsys)
    assert_one_line_error(code, err, "no\\nsuch: not a folder")


@pytest.mark.parametrize("flags", [
    ["-d", "mnist", "--data_dir", "a\nb"],
    ["-d", "cifar", "--data_dir", "a\nb"],
    ["-d", "folder", "--generate", 2, "--out_dir", "a\nb"],
    ["-d", "uniform", "--resume", "a\nb.pt"],
], ids=["mnist", "cifar", "generate", "resume"])
def test_every_error_line_escapes_a_newline_it_quotes(tmp_path, capsys, monkeypatch, flags):
    """Escaped where the line is printed, whatever message quotes the path."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main([*flags, "--use_gpu", 0], capsys)
    assert_one_line_error(code, err, "a\\nb")


# ------------------------------------------------------------------ classes

def test_class_folders_without_images_are_named(tmp_path):
    root = make_classes(tmp_path / "images")
    (root / "empty").mkdir()
    (root / "unreadable").mkdir()
    (root / "unreadable" / "x.png").write_bytes(b"not an image")
    data, said = load_folder(root)
    assert data.classes == ("cat", "dog")
    notes = [line for line in said if "class folder" in line]
    assert len(notes) == 1 and "2 class folders" in notes[0] and "empty, unreadable" in notes[0]
    _, said = load_folder(root, conditional=False)  # no classes, nothing to say
    assert not any("class folder" in line for line in said)


def test_more_classes_than_the_picture_shows_are_said_at_start(tmp_path):
    root = make_classes(tmp_path / "images", classes=[f"c{k:02d}" for k in range(11)], per_class=1)
    data, said = load_folder(root)
    assert len(data.classes) == 11
    assert any("first 10 of the 11 classes, c00 to c09" in line for line in said)


def test_generate_puts_a_class_in_each_column_whatever_the_class_count(tmp_path, capsys):
    root = make_classes(tmp_path / "images", classes=[f"c{k:02d}" for k in range(11)], per_class=1)
    out = tmp_path / "out"
    code, _, err = run_main([*RUN, "--conditional", 1, "--passes", 1, "--data_dir", root, "--out_dir", out], capsys)
    assert code == 0, err
    code, _, err = run_main(["-d", "folder", "--generate", 22, "--use_gpu", 0, "--out_dir", out], capsys)
    assert code == 0, err
    assert np.load(out / "folder_samples" / "generated.labels.npy").tolist() == [k % 11 for k in range(22)]
    assert Image.open(out / "folder_samples" / "generated.png").size == (11 * 8, 2 * 8)  # 11 columns, 2 rows


def test_too_few_images_says_image_for_one(tmp_path):
    root = make_classes(tmp_path / "images", classes=("cat",), per_class=1)
    with pytest.raises(gan_trainer.UserError, match="only 1 image, fewer than a batch of 4"):
        load_folder(root, conditional=False)
