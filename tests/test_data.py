"""The data package: every source, the shared item format, key semantics and streaming resume."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from conditioning.edges import canny, canny_hint
from data import DataConfig, build_dataset
from data.config import validate_config
from data.emoji import find_emoji_font, is_held_out
from data.fashion_mnist import CLASS_NAMES
from data.shapes import COLORS, POSITIONS, SIZES, render_scene, sample_scene, scene_caption
from common.config import ConfigError, from_dict

SIZE = 16


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def save(image: Image.Image, path, format: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=format)


def check_item(item: dict, size: int = SIZE, hint: bool = False) -> None:
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert isinstance(item["caption"], str)
    assert ("hint" in item) == hint
    if hint:
        assert item["hint"].shape == (3, size, size) and 0.0 <= item["hint"].min() and item["hint"].max() <= 1.0


# ---------------------------------------------------------------- folder


@pytest.fixture
def sidecar_folder(tmp_path):
    """Three captioned images, one in a subfolder, plus one without a caption."""
    for k, rel in enumerate(["a.png", "sub/b.jpg", "sub/deeper/c.png"]):
        save(noise_image(24, 20, k), tmp_path / rel, "JPEG" if rel.endswith("jpg") else "PNG")
        (tmp_path / rel).with_suffix(".txt").write_text(f"caption {k}\n")
    save(noise_image(20, 20, 9), tmp_path / "sub" / "uncaptioned.png")
    return tmp_path


def test_folder_sidecars_recursive(sidecar_folder, caplog):
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(DataConfig(source="folder", path=str(sidecar_folder), size=SIZE))
    assert len(ds) == 4
    captions = [ds[k]["caption"] for k in range(4)]
    assert captions == ["caption 0", "caption 1", "caption 2", ""]  # sorted paths: a, sub/b, sub/deeper/c, sub/unc...
    assert "1 of 4 images" in caplog.text
    for k in range(4):
        check_item(ds[k])


def test_folder_metadata_jsonl_and_csv(tmp_path):
    save(noise_image(20, 20, 0), tmp_path / "x.png")
    save(noise_image(20, 20, 1), tmp_path / "imgs" / "y.png")
    (tmp_path / "x.txt").write_text("from the sidecar")
    rows = [{"file_name": "x.png", "text": "from jsonl"}, {"file_name": "imgs/y.png", "text": "why"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = build_dataset(DataConfig(source="folder", path=str(tmp_path), size=SIZE))
    assert sorted(ds[k]["caption"] for k in range(len(ds))) == ["from jsonl", "why"]  # metadata wins over .txt

    csv_root = tmp_path / "csv"
    save(noise_image(20, 20, 2), csv_root / "p.png")
    save(noise_image(20, 20, 3), csv_root / "q.png")
    (csv_root / "captions.csv").write_text('image,caption\np.png,"a red, round thing"\nq.png,plain\nmissing.png,gone\n')
    ds = build_dataset(DataConfig(source="folder", path=str(csv_root / "captions.csv"), size=SIZE))
    assert [ds[k]["caption"] for k in range(len(ds))] == ["a red, round thing", "plain"]

    (csv_root / "metadata.csv").write_text("file_name,text\np.png,pee\nq.png,queue\n")
    ds = build_dataset(DataConfig(source="folder", path=str(csv_root), size=SIZE))
    assert [ds[k]["caption"] for k in range(len(ds))] == ["pee", "queue"]

    (csv_root / "metadata.csv").write_text("name,words\np.png,pee\n")
    with pytest.raises(ValueError, match="file column"):
        build_dataset(DataConfig(source="folder", path=str(csv_root), size=SIZE))


def test_folder_split_subfolders(tmp_path):
    save(noise_image(20, 20, 0), tmp_path / "train" / "a.png")
    save(noise_image(20, 20, 1), tmp_path / "train" / "b.png")
    save(noise_image(20, 20, 2), tmp_path / "test" / "c.png")
    assert len(build_dataset(DataConfig(source="folder", path=str(tmp_path), size=SIZE))) == 2
    assert len(build_dataset(DataConfig(source="folder", path=str(tmp_path), split="test", size=SIZE))) == 1
    with pytest.raises(FileNotFoundError, match="test/ subfolder"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "train"), split="test", size=SIZE))


def test_folder_train_split_leaves_out_a_test_subfolder(tmp_path):
    save(noise_image(20, 20, 0), tmp_path / "a.png")
    save(noise_image(20, 20, 1), tmp_path / "more" / "b.png")
    save(noise_image(20, 20, 2), tmp_path / "test" / "c.png")
    train = build_dataset(DataConfig(source="folder", path=str(tmp_path), size=SIZE))
    assert sorted(Path(train.describe(i)).name for i in range(len(train))) == ["a.png", "b.png"]


def test_corrupt_images_are_skipped_counted_and_reported_once(tmp_path, caplog):
    save(noise_image(20, 20, 0), tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image at all")
    full = io.BytesIO()
    noise_image(20, 20, 1).save(full, format="PNG")
    (tmp_path / "c.png").write_bytes(full.getvalue()[:60])  # truncated
    save(noise_image(20, 20, 2), tmp_path / "d.png")
    ds = build_dataset(DataConfig(source="folder", path=str(tmp_path), size=SIZE))
    assert len(ds) == 4
    with caplog.at_level(logging.WARNING):
        replacement = ds[1]
        again = ds[5]  # the same index in the next epoch
        ds[2]
    reference = build_dataset(DataConfig(source="folder", path=str(tmp_path), size=SIZE))
    # index 1 and 2 are unreadable: the next valid file (d.png, index 3) is returned, with key 1's augmentation
    assert torch.equal(replacement["image"], reference[3]["image"])
    assert torch.equal(again["image"], replacement["image"])
    assert ds.num_skipped == 2
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 2
    assert any(str(tmp_path / "b.png") in w for w in warnings) and any(str(tmp_path / "c.png") in w for w in warnings)


def test_empty_or_unreadable_dataset_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_dataset(DataConfig(source="folder", path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "nowhere")))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    ds = build_dataset(DataConfig(source="folder", path=str(tmp_path)))
    with pytest.raises(ValueError, match=f"no readable image in {tmp_path}"):
        ds[0]


# ---------------------------------------------------------------- keys, augmentation, collate


def test_keys_wrap_and_seed_augmentation(tmp_path):
    for k in range(3):
        save(noise_image(64, 20, k), tmp_path / f"{k}.png")  # wide: random crops have room to differ
    center = build_dataset(DataConfig(source="folder", path=str(tmp_path), size=SIZE))
    assert len(center) == 3
    for k in range(3):
        assert torch.equal(center[k]["image"], center[k + 3]["image"])
        assert torch.equal(center[k]["image"], center[k + 300]["image"])
    with pytest.raises(IndexError):
        center[-1]

    cfg = DataConfig(source="folder", path=str(tmp_path), size=SIZE, crop="random", flip=True, seed=7)
    first, second = build_dataset(cfg), build_dataset(cfg)
    for key in (0, 1, 5, 1000):
        assert torch.equal(first[key]["image"], second[key]["image"])  # a pure function of (seed, key)
    assert any(not torch.equal(first[k]["image"], first[k + 3]["image"]) for k in range(3))  # new epoch, new crop
    other_seed = build_dataset(DataConfig(source="folder", path=str(tmp_path), size=SIZE, crop="random", seed=8))
    assert any(not torch.equal(first[k]["image"], other_seed[k]["image"]) for k in range(3))


def test_collate_batches_items_with_hints_and_labels(tmp_path):
    ds = build_dataset(DataConfig(source="shapes", size=SIZE, shapes_length=8, condition="shapes-mask"))
    batch = default_collate([ds[k] for k in range(4)])
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["hint"].shape == (4, 3, SIZE, SIZE)
    assert len(batch["caption"]) == 4 and isinstance(batch["caption"][0], str)
    assert batch["labels"]["num_objects"].shape == (4,) and len(batch["labels"]["shape_0"]) == 4

    # worker processes see the same items: everything is a function of the key
    direct = default_collate([ds[k] for k in range(8)])
    batches = list(DataLoader(ds, batch_size=3, num_workers=2))
    assert torch.equal(torch.cat([b["image"] for b in batches]), direct["image"])
    assert [c for b in batches for c in b["caption"]] == direct["caption"]


# ---------------------------------------------------------------- webdataset


def write_shards(root, counts: list[int], corrupt: tuple[str, ...] = ()) -> list[str]:
    """img2dataset layout: per sample NNN.jpg + NNN.txt (even) or NNN.json (odd); returns all captions."""
    root.mkdir(parents=True, exist_ok=True)
    captions, number = [], 0
    for shard, count in enumerate(counts):
        with tarfile.open(root / f"{shard:06d}.tar", "w") as tar:
            for _ in range(count):
                key = f"{number:09d}"
                caption = f"sample {number}"
                captions.append(caption)
                buffer = io.BytesIO()
                noise_image(24, 20, number).save(buffer, format="JPEG")
                image_bytes = b"broken" if key in corrupt else buffer.getvalue()
                if number % 2 == 0:
                    meta = (f"{key}.txt", caption.encode())
                else:
                    meta = (f"{key}.json", json.dumps({"caption": caption, "url": "http://example"}).encode())
                for name, data in ((f"{key}.jpg", image_bytes), meta):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                number += 1
    return captions


def stream_captions(ds, **loader_kwargs) -> list[str]:
    if not loader_kwargs:
        return [item["caption"] for item in ds]
    return [c for batch in DataLoader(ds, **loader_kwargs) for c in batch["caption"]]


def test_webdataset_streams_all_samples_in_img2dataset_layout(tmp_path):
    captions = write_shards(tmp_path / "shards", [5, 4, 3])
    pattern = str(tmp_path / "shards" / "{000000..000002}.tar")
    ds = build_dataset(DataConfig(source="webdataset", path=pattern, size=SIZE, condition="canny", shuffle_buffer=4))
    items = list(ds)
    assert sorted(i["caption"] for i in items) == sorted(captions)
    check_item(items[0], hint=True)
    # a glob and a directory name the same shards; the test split keeps file order
    for path in (str(tmp_path / "shards" / "*.tar"), str(tmp_path / "shards")):
        ordered = build_dataset(DataConfig(source="webdataset", path=path, split="test", size=SIZE))
        assert stream_captions(ordered) == captions
    with pytest.raises(FileNotFoundError, match="5 shard.*000003.tar"):
        build_dataset(DataConfig(source="webdataset", path=str(tmp_path / "shards" / "{000000..000007}.tar")))


def test_webdataset_epochs_are_seeded_shuffles(tmp_path):
    captions = write_shards(tmp_path, [4, 4, 4, 4])
    cfg = DataConfig(source="webdataset", path=str(tmp_path), size=SIZE, shuffle_buffer=5, seed=3)
    a, b = build_dataset(cfg), build_dataset(cfg)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = stream_captions(a)
    assert epoch1 == stream_captions(b) and sorted(epoch1) == sorted(captions)
    a.set_epoch(2)
    assert stream_captions(a) != epoch1


def test_webdataset_splits_shards_over_workers_and_ranks(tmp_path):
    captions = write_shards(tmp_path, [3, 3, 3, 3])
    ds = build_dataset(DataConfig(source="webdataset", path=str(tmp_path), size=SIZE, shuffle_buffer=3))
    ds.set_epoch(4)
    streamed = stream_captions(ds, batch_size=2, num_workers=2)
    assert sorted(streamed) == sorted(captions)  # every sample exactly once across the two workers
    readers = [ds.shards_for(rank, 2, worker, 2) for rank in range(2) for worker in range(2)]
    assert all(len(r) == 1 for r in readers) and sorted(s for r in readers for s in r) == sorted(ds.shards)


def test_webdataset_skip_resumes_without_repeats(tmp_path):
    captions = write_shards(tmp_path, [5, 5, 5, 5])
    cfg = DataConfig(source="webdataset", path=str(tmp_path), size=SIZE, shuffle_buffer=4)
    full = build_dataset(cfg)
    full.set_epoch(2)
    order = stream_captions(full)
    resumed = build_dataset(cfg)
    resumed.skip(7)  # before set_epoch, as a resuming trainer does
    resumed.set_epoch(2)
    assert stream_captions(resumed) == order[7:]
    resumed.set_epoch(3)  # the skip belonged to epoch 2 only
    assert len(stream_captions(resumed)) == len(captions)

    # with workers, batches alternate between them; skipping 3 delivered batches of 2
    # leaves exactly the samples not yet seen
    batches = [b["caption"] for b in DataLoader(full, batch_size=2, num_workers=2)]
    seen = [c for b in batches[:3] for c in b]
    again = build_dataset(cfg)
    again.set_epoch(2)
    again.skip(6, batch_size=2)
    rest = stream_captions(again, batch_size=2, num_workers=2)
    assert sorted(rest) == sorted(set(captions) - set(seen)) and len(rest) == len(captions) - 6


def test_webdataset_epochs_reach_persistent_workers(tmp_path):
    write_shards(tmp_path, [3, 3, 3, 3])
    cfg = DataConfig(source="webdataset", path=str(tmp_path), size=SIZE, shuffle_buffer=3)
    reference, ds = build_dataset(cfg), build_dataset(cfg)
    loader = DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (1, 2):
        reference.set_epoch(epoch)
        ds.set_epoch(epoch)
        expected = stream_captions(reference, batch_size=2, num_workers=2)
        assert [c for batch in loader for c in batch["caption"]] == expected


def test_webdataset_skips_corrupt_samples(tmp_path, caplog):
    captions = write_shards(tmp_path, [4, 4], corrupt=("000000002",))
    ds = build_dataset(DataConfig(source="webdataset", path=str(tmp_path), split="test", size=SIZE))
    with caplog.at_level(logging.WARNING):
        streamed = stream_captions(ds)
        stream_captions(ds)
    assert streamed == [c for c in captions if c != "sample 2"]
    assert ds.num_skipped == 1
    assert sum("000000002" in r.getMessage() for r in caplog.records) == 1

    write_shards(tmp_path / "bad", [2], corrupt=("000000000", "000000001"))
    with pytest.raises(ValueError, match="no readable image in 2 samples"):
        list(build_dataset(DataConfig(source="webdataset", path=str(tmp_path / "bad"), size=SIZE)))


# ---------------------------------------------------------------- emoji


def test_emoji_renders_named_glyphs():
    ds = build_dataset(DataConfig(source="emoji", size=32, emoji_background="black"))
    names = [e.name for e in ds.emoji]
    assert 1500 < len(ds) < 2500, len(ds)
    assert len(set(names)) == len(names)
    index = names.index("grinning face")
    item = ds[index]
    check_item(item, size=32)
    assert item["caption"] == "grinning face"
    pixels = item["image"]
    assert pixels.std() > 0.2  # a glyph, not a flat background
    corners = pixels[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.allclose(corners, torch.full_like(corners, -1.0))  # the black background shows there
    face = pixels[:, 12:20, 12:20].mean(dim=(1, 2))
    assert face[0] > 0.3 and face[1] > 0.0 and face[2] < face[0]  # yellow: red and green over blue
    assert ("flag of japan" in names or "flag of jp" in names) and "keycap 1" in names  # jp: without iso-codes
    assert not any("skin tone" in n for n in names)


def test_emoji_held_out_split_is_fixed_and_disjoint():
    train = build_dataset(DataConfig(source="emoji", size=16))
    test = build_dataset(DataConfig(source="emoji", size=16, split="test", seed=123))
    train_names, test_names = {e.name for e in train.emoji}, {e.name for e in test.emoji}
    assert not train_names & test_names
    assert 0.06 < len(test_names) / (len(train_names) + len(test_names)) < 0.14
    assert "red apple" in test_names and "grinning face" in train_names  # fixed by the hash, not the seed
    assert not is_held_out("\U0001F600") and is_held_out("\U0001F34E")
    with_tones = build_dataset(DataConfig(source="emoji", size=16, emoji_skin_tones=True, split="test"))
    toned = [e for e in with_tones.emoji if "skin tone" in e.name]
    assert toned and all(is_held_out(e.text) for e in toned)  # variants follow their base emoji


def test_emoji_font_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(source="emoji", path=str(tmp_path / "missing.ttf")))
    with pytest.raises(ValueError, match="emoji_background"):
        build_dataset(DataConfig(source="emoji", emoji_background="not-a-colour"))
    (tmp_path / "fake.ttf").write_bytes(b"\x00\x01\x00\x00" + bytes(60))
    with pytest.raises(ValueError, match="fake.ttf"):
        build_dataset(DataConfig(source="emoji", path=str(tmp_path / "fake.ttf")))
    monkeypatch.setattr("data.emoji.DEFAULT_FONT_PATHS", (str(tmp_path / "nope.ttf"),))
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        find_emoji_font(None)


# ---------------------------------------------------------------- shapes


def test_shapes_are_a_pure_function_of_seed_split_index():
    cfg = DataConfig(source="shapes", size=32, shapes_length=50, condition="shapes-edges")
    a, b = build_dataset(cfg), build_dataset(cfg)
    for k in (0, 7, 49):
        assert torch.equal(a[k]["image"], b[k]["image"]) and a[k]["caption"] == b[k]["caption"]
        assert torch.equal(a[k]["hint"], b[k]["hint"])
        assert torch.equal(a[k]["image"], a[k + 50]["image"])
    other = build_dataset(DataConfig(source="shapes", size=32, shapes_length=50, seed=1))
    test = build_dataset(DataConfig(source="shapes", size=32, shapes_length=50, split="test"))
    for changed in (other, test):
        assert sum(torch.equal(a[k]["image"], changed[k]["image"]) for k in range(10)) <= 1
    assert len(a) == 50
    counts = {len(sample_scene(0, "train", k, 2)["objects"]) for k in range(30)}
    assert counts == {1, 2}
    assert {len(sample_scene(0, "train", k, 1)["objects"]) for k in range(30)} == {1}


def test_shapes_captions_labels_and_pixels_agree():
    size = 48
    ds = build_dataset(DataConfig(source="shapes", size=size, shapes_length=40, condition="shapes-mask"))
    for k in range(40):
        item, scene = ds[k], sample_scene(0, "train", k, 2)
        labels = item["labels"]
        assert item["caption"] == scene_caption(scene)
        objects = [
            {key: labels[f"{key}_{n}"] for key in ("shape", "color", "size", "position")}
            for n in range(labels["num_objects"])
        ]
        words = [f"a {o['size']} {o['color']} {o['shape']}" for o in objects]
        assert item["caption"].startswith(words[0]) and all(w in item["caption"] for w in words)
        assert item["caption"].endswith(f"on a {labels['background']} background")
        image, object_ids = render_scene(scene, size)
        assert torch.equal(item["hint"][0], torch.from_numpy(object_ids > 0).float())
        pixels = np.asarray(image).astype(float)
        cell = size / 3
        for n, obj in enumerate(objects, 1):
            inside = object_ids == n
            ys, xs = np.nonzero(inside)
            row, column = divmod(POSITIONS.index(obj["position"]), 3)
            assert row * cell <= ys.min() and ys.max() < (row + 1) * cell  # stays in its grid cell
            assert column * cell <= xs.min() and xs.max() < (column + 1) * cell
            interior = inside & ~np.roll(~inside, 1, 0) & ~np.roll(~inside, -1, 0) & ~np.roll(~inside, 1, 1) & ~np.roll(~inside, -1, 1)
            assert np.abs(pixels[interior].mean(0) - COLORS[obj["color"]]).max() < 2
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert abs(extent - 2 * SIZES[obj["size"]] * size) <= 0.25 * 2 * SIZES[obj["size"]] * size + 1


def test_shapes_edges_outline_the_mask():
    edges = build_dataset(DataConfig(source="shapes", size=32, shapes_length=5, condition="shapes-edges"))[3]["hint"][0]
    mask = build_dataset(DataConfig(source="shapes", size=32, shapes_length=5, condition="shapes-mask"))[3]["hint"][0]
    assert edges.sum() > 0 and torch.all(edges <= mask)  # outlines lie on the objects
    assert edges.sum() < mask.sum()  # and are thinner than them
    with pytest.raises(ValueError, match="flip"):
        build_dataset(DataConfig(source="shapes", flip=True))


# ---------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_items():
    test = build_dataset(DataConfig(source="fashion-mnist", size=32, split="test"))
    assert len(test) == 10000
    item = test[0]
    check_item(item, size=32)
    assert item["caption"] == "ankle boot" and item["labels"]["class_index"] == 9  # the first t10k image
    assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(item["image"][1], item["image"][2])
    assert {test[k]["caption"] for k in range(40)} <= set(CLASS_NAMES)
    assert len(build_dataset(DataConfig(source="fashion-mnist", size=32))) == 60000


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        build_dataset(DataConfig(source="fashion-mnist", path=str(tmp_path), split="test"))


# ---------------------------------------------------------------- canny and config


def test_canny_hint_matches_cv2_on_every_input_type():
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = (200, 30, 30)
    edges = canny(pixels)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 255}
    assert edges[16, 8] == 255 or edges[16, 7] == 255  # the square's left side
    assert edges[16, 16] == 0 and edges[2, 2] == 0
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    from_tensor, from_pil = canny_hint(tensor), canny_hint(Image.fromarray(pixels))
    assert from_tensor.shape == (3, 32, 32) and torch.equal(from_tensor, from_pil)
    assert torch.equal(from_tensor[0], torch.from_numpy(edges).float() / 255)
    assert canny_hint(tensor[None].repeat(2, 1, 1, 1)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="low <= high"):
        canny(pixels, 200, 100)


def test_config_checks():
    cfg = from_dict(DataConfig, {"source": "emoji", "condition": "canny", "size": 32})
    assert cfg.condition == "canny" and cfg.size == 32
    with pytest.raises(ConfigError, match="unknown config key 'colour'"):
        from_dict(DataConfig, {"source": "shapes", "colour": "red"})
    with pytest.raises(ConfigError, match="source"):
        from_dict(DataConfig, {"source": "imagenet"})
    with pytest.raises(ValueError, match="needs data.source='shapes'"):
        validate_config(DataConfig(source="emoji", condition="shapes-mask"))
    with pytest.raises(ValueError, match="data.path is required"):
        build_dataset(DataConfig(source="folder"))


def test_export_writes_a_folder_data_set_that_reads_back_the_same(tmp_path, capsys):
    from data.export import main as export_main

    export_main(["--out", str(tmp_path / "ex"), "--n", "3", "source=shapes", "split=test", "size=32",
                 "condition=shapes-edges"])
    assert "wrote 3 images to" in capsys.readouterr().out
    shapes = build_dataset(DataConfig(source="shapes", split="test", size=32, condition="shapes-edges"))
    folder = build_dataset(DataConfig(source="folder", path=str(tmp_path / "ex" / "images"), size=32))
    assert len(folder) == 3
    for index in range(3):
        original, copy = shapes[index], folder[index]
        assert copy["caption"] == original["caption"]
        assert torch.equal(copy["image"], original["image"])  # 8-bit pixels both ways: exact
        hint = torch.from_numpy(np.array(Image.open(tmp_path / "ex" / "hints" / f"{index:05d}.png"))).float() / 255
        assert torch.equal(hint.permute(2, 0, 1), original["hint"])
    with pytest.raises(ConfigError, match="unknown config key 'sourc'"):
        export_main(["--out", str(tmp_path / "ex"), "sourc=shapes"])
