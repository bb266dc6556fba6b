"""Subject image loading, validation, preparation and deterministic batching (no jax needed)."""

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from dreambooth_jax import data
from dreambooth_jax.data import DataError

SIZE = 64  # test images are small; tests pass min_size explicitly


def _gradient(w=SIZE, h=SIZE):
  """An RGB image whose left half is red and right half is blue (orientation is visible)."""
  a = np.zeros((h, w, 3), np.uint8)
  a[:, : w // 2] = (255, 0, 0)
  a[:, w // 2:] = (0, 0, 255)
  return Image.fromarray(a)


def _jpeg_bytes(image, **kw):
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=95, **kw)
  return buf.getvalue()


def _load(folder, **kw):
  kw.setdefault("min_size", 32)
  return data.load_subject_images(folder, **kw)


# ----------------------------------------------------------------------------
# Modes and orientation.
# ----------------------------------------------------------------------------


def test_every_mode_becomes_rgb(tmp_path):
  rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, : SIZE // 2, 3] = 255  # left opaque red, right fully transparent -> white
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  Image.fromarray(np.full((SIZE, SIZE), 100, np.uint8)).save(tmp_path / "l.png")
  Image.fromarray(np.dstack([np.full((SIZE, SIZE), 0, np.uint8), rgba[..., 3]])).save(
      tmp_path / "la.png")
  p = Image.new("P", (SIZE, SIZE), 1)
  p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
  p.paste(0, (0, 0, SIZE // 2, SIZE))
  p.save(tmp_path / "p.png", transparency=0)  # palette entry 0 is transparent
  Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
  g16 = np.full((SIZE, SIZE), 65535, np.uint16)
  g16[:, : SIZE // 2] = 257 * 128
  Image.fromarray(g16).save(tmp_path / "g16.png")
  with Image.open(tmp_path / "g16.png") as g16_file:
    assert g16_file.mode == "I;16"
  Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).save(tmp_path / "rgb.webp", lossless=True)

  loaded = _load(tmp_path)
  got = {p.name: np.asarray(im) for im, p in zip(loaded.images, loaded.paths)}
  assert sorted(got) == sorted(["rgba.png", "l.png", "la.png", "p.png", "cmyk.jpg", "g16.png",
                                "rgb.webp"])
  for name, a in got.items():
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8, name
  assert (got["rgba.png"][0, 0] == (200, 0, 0)).all()
  assert (got["rgba.png"][0, -1] == 255).all()  # transparent composited on white
  assert (got["la.png"][0, 0] == 0).all() and (got["la.png"][0, -1] == 255).all()
  assert (got["p.png"][0, 0] == 255).all() and (got["p.png"][0, -1] == (10, 20, 30)).all()
  assert (got["l.png"] == 100).all()
  r, g, b = got["cmyk.jpg"][SIZE // 2, SIZE // 2].astype(int)
  assert r > 200 and g < 60 and b < 60  # C=0, M=Y=255 is red
  # 16-bit scaled by 255/65535, not clipped: half grey stays half grey.
  assert (got["g16.png"][0, 0] == 128).all() and (got["g16.png"][0, -1] == 255).all()
  assert (got["rgb.webp"] == (1, 2, 3)).all()


def test_16bit_and_int_modes_scale():
  for mode_array in (np.array([[0, 257, 65535]], np.uint16), np.array([[0, 257, 65535]], np.int32)):
    out = np.asarray(data.to_rgb(Image.fromarray(mode_array)))
    assert out[0, :, 0].tolist() == [0, 1, 255]


def test_exif_orientation_is_applied(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  wide = _gradient(w=96, h=48)  # red left, blue right
  (tmp_path / "rot.JPG").write_bytes(_jpeg_bytes(wide, exif=exif.tobytes()))
  (image,), (path,) = _load(tmp_path)
  assert path.name == "rot.JPG"  # upper-case extension accepted
  assert image.size == (48, 96)  # portrait after rotation
  a = np.asarray(image).astype(int)
  # Rotating 90 degrees clockwise puts the former left (red) at the top.
  assert a[5, 24, 0] > 200 and a[5, 24, 2] < 60
  assert a[-5, 24, 2] > 200 and a[-5, 24, 0] < 60


# ----------------------------------------------------------------------------
# Errors: every one names the file, all reported at once.
# ----------------------------------------------------------------------------


def _write_bad(tmp_path, kind):
  """Writes one bad file of `kind`, returns its name."""
  if kind == "truncated":
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), np.uint8))
    b = _jpeg_bytes(noisy)
    (tmp_path / "cut.jpg").write_bytes(b[: len(b) // 2])
    return "cut.jpg"
  if kind == "text_as_jpg":
    (tmp_path / "fake.jpg").write_text("this is not a photo")
    return "fake.jpg"
  if kind == "notes":
    (tmp_path / "notes.txt").write_text("shot on a sunny day")
    return "notes.txt"
  if kind == "heic":
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\0" * 16)
    return "IMG_0001.HEIC"
  if kind == "small":
    _gradient(40, 20).save(tmp_path / "tiny.png")
    return "tiny.png"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "text_as_jpg", "notes", "heic", "small"])
def test_bad_file_is_named(tmp_path, kind):
  _gradient().save(tmp_path / "good.png")
  name = _write_bad(tmp_path, kind)
  with pytest.raises(DataError) as e:
    _load(tmp_path)
  assert name in str(e.value)
  assert [p.name for p, _ in e.value.problems] == [name]
  assert isinstance(e.value, ValueError)


def test_truncated_fails_even_if_someone_enabled_truncated_loading(tmp_path):
  _write_bad(tmp_path, "truncated")
  ImageFile.LOAD_TRUNCATED_IMAGES = True
  try:
    with pytest.raises(DataError, match="truncated"):
      _load(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is restored
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_all_bad_files_reported_at_once(tmp_path):
  _gradient().save(tmp_path / "good.png")
  names = [_write_bad(tmp_path, k) for k in ("truncated", "text_as_jpg", "notes", "small")]
  with pytest.raises(DataError) as e:
    _load(tmp_path)
  assert "4 bad file(s)" in str(e.value)
  for name in names:
    assert name in str(e.value)
  assert "good.png" not in str(e.value)


def test_missing_empty_and_file_folders(tmp_path):
  with pytest.raises(DataError, match="does not exist") as e:
    _load(tmp_path / "nope")
  assert "nope" in str(e.value)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "photos").mkdir()
  with pytest.raises(DataError, match="no images") as e:
    _load(tmp_path / "empty")
  assert "empty" in str(e.value) and "photos" in str(e.value)  # hints at the subfolder
  (tmp_path / "f.png").write_bytes(b"")
  with pytest.raises(DataError, match="not a folder"):
    _load(tmp_path / "f.png")


def test_hidden_files_sidecars_and_subfolders_are_skipped(tmp_path):
  _gradient().save(tmp_path / "a.jpeg")
  (tmp_path / ".DS_Store").write_bytes(b"\0\1junk")
  (tmp_path / "._a.jpeg").write_bytes(b"resource fork")
  (tmp_path / "Thumbs.db").write_bytes(b"junk")
  (tmp_path / "README.md").write_text("my dog")
  (tmp_path / "LICENSE").write_text("CC BY 4.0")
  (tmp_path / "ATTRIBUTION.txt").write_text("by me")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "notes.txt").write_text("ignored: subfolders are not read")
  _, paths = _load(tmp_path)
  assert [p.name for p in paths] == ["a.jpeg"]


def test_min_size_and_exts(tmp_path):
  _gradient(100, 80).save(tmp_path / "a.png")
  with pytest.raises(DataError, match="min_size=81"):
    _load(tmp_path, min_size=81)
  assert len(_load(tmp_path, min_size=80).images) == 1
  with pytest.raises(DataError, match="a.png"):  # png not accepted any more
    _load(tmp_path, exts=("jpg",))


def test_default_subject_loads():
  folder = data.default_subject_dir()
  images, paths = data.load_subject_images(folder)  # default min_size (256) holds
  assert [p.name for p in paths] == [f"0{i}.jpg" for i in range(5)]
  assert all(im.mode == "RGB" and min(im.size) == 256 for im in images)
  assert (folder / "ATTRIBUTION.md").is_file()
  assert sum(p.stat().st_size for p in folder.iterdir()) < 200_000


# ----------------------------------------------------------------------------
# Preparation.
# ----------------------------------------------------------------------------


def test_prepare_shapes_crop_and_ranges():
  wide = np.zeros((40, 120, 3), np.uint8)
  wide[:, 40:80] = 255  # the centre square is white, the sides black
  out = data.prepare([Image.fromarray(wide), Image.new("L", (50, 70), 7)], 16)
  assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
  assert (out[0] == 255).all()  # center crop kept only the white square
  assert (out[1] == 7).all()
  squashed = data.prepare([Image.fromarray(wide)], 16, center_crop=False)
  assert squashed[0, 8, 0].max() < 10 and squashed[0, 8, 8].min() > 240  # black sides kept
  x = data.to_model_range(out)
  assert x.dtype == np.float32 and x.min() >= -1 and x.max() == 1
  np.testing.assert_array_equal(data.to_uint8(x), out)
  assert data.to_uint8(np.array([-1.5, 0.0, 2.0])).tolist() == [0, 128, 255]


# ----------------------------------------------------------------------------
# Batching: deterministic in (seed, step), resumable, sharded per host.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subject():
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)) for _ in range(5)]
  return data.SubjectData.from_images(images, {"base": 8, "sr": 16})


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batches_are_deterministic_and_resume(subject):
  assert len(subject) == 5 and subject.resolutions == {"base": 8, "sr": 16}
  full = list(subject.batches(seed=3, batch_size=4, num_steps=10, flip=True))
  again = list(subject.batches(seed=3, batch_size=4, num_steps=10, flip=True))
  resumed = list(subject.batches(seed=3, batch_size=4, start_step=6, num_steps=4, flip=True))
  for a, b in zip(full, again):
    _equal(a, b)
  for a, b in zip(full[6:], resumed):
    _equal(a, b)
  other = list(subject.batches(seed=4, batch_size=4, num_steps=10, flip=True))
  assert any((a["index"] != b["index"]).any() for a, b in zip(full, other))
  b = full[0]
  assert b["base"].shape == (4, 8, 8, 3) and b["sr"].shape == (4, 16, 16, 3)
  assert b["base"].dtype == np.float32 and -1 <= b["base"].min() and b["base"].max() <= 1
  # Equal coverage: 10 steps x 4 = 40 = 8 epochs of 5 images.
  counts = np.bincount(np.concatenate([x["index"] for x in full]), minlength=5)
  assert counts.tolist() == [8] * 5
  flips = np.concatenate([x["flip"] for x in full])
  assert 0 < flips.sum() < len(flips)


def test_flips_are_consistent_across_stages(subject):
  for step in range(6):
    b = subject.batch(1, step, 5, flip=True, as_float=False)
    assert b["base"].dtype == np.uint8
    for stage in ("base", "sr"):
      expected = subject.images[stage][b["index"]]
      expected[b["flip"]] = expected[b["flip"], :, ::-1]
      np.testing.assert_array_equal(b[stage], expected)
  assert not subject.batch(1, 0, 5)["flip"].any()  # flips are off by default


def test_host_slices_partition_the_global_batch(subject):
  for step in (0, 7):
    whole = subject.batch(5, step, 8, flip=True)
    parts = [subject.batch(5, step, 8, flip=True, process_index=i, process_count=4)
             for i in range(4)]
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  with pytest.raises(ValueError, match="divisible"):
    subject.batch(0, 0, 6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    subject.batch(0, 0, 8, process_index=4, process_count=4)


def test_subject_data_from_folder(tmp_path):
  _gradient(80, 60).save(tmp_path / "a.png")
  sd = data.SubjectData.from_folder(tmp_path, {"base": 32})  # min_size = 32 by default
  assert sd.images["base"].shape == (1, 32, 32, 3) and sd.paths[0].name == "a.png"
  with pytest.raises(DataError, match="min_size=64"):
    data.SubjectData.from_folder(tmp_path, {"base": 32, "sr": 64})
  with pytest.raises(ValueError, match="reserved"):
    data.SubjectData.from_folder(tmp_path, {"index": 32})
