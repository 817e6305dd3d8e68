"""bench/dreambooth_default.py's tear detector, on real emoji: the subject's mark is found in every subject
picture and in the one training cat face that also cries, and in no other cat face of the training set."""
from __future__ import annotations

import torch

from conftest import load_script
from data import DataConfig, build_dataset

bench = load_script("bench/dreambooth_default.py")


def test_the_tear_is_read_on_every_subject_picture(tmp_path):
    pictures = bench.read_pictures(bench.write_subject(tmp_path))
    assert pictures.shape == (bench.PICTURES, 3, 64, 64)
    assert bench.tear_share(pictures) == 1.0
    _, held_out_picture = bench.subject_emoji()
    assert bench.tear_share(held_out_picture[None]) == 1.0


def test_only_the_crying_cat_faces_of_the_training_set_have_tears():
    train = build_dataset(DataConfig(source="emoji", split="train", size=64))
    cats = {e.name: train[i]["image"] for i, e in enumerate(train.emoji) if "cat face" in e.name}
    assert len(cats) >= 8
    crying = {name for name, image in cats.items() if bench.tear_share(image[None]) == 1.0}
    assert crying == {"cat face with tears of joy"}
    assert bench.tear_share(torch.stack(list(cats.values()))) == round(1 / len(cats), 4)


def test_tear_share_counts_pixels_against_its_threshold():
    white = torch.ones(3, 3, 64, 64)
    blue = torch.tensor([0.3, 0.6, 0.95]) * 2 - 1    # the subject's tear, in [-1, 1]
    white[0, :, :4, :5] = blue[:, None, None]        # 20 pixels: a tear
    white[1, :, :4, :4] = blue[:, None, None]        # 16: not one
    white[2, :, :8, :8] = torch.tensor([0.5, 0.5, 0.7])[:, None, None] * 2 - 1  # grey-blue: not blue enough
    assert bench.tear_share(white) == round(1 / 3, 4)
    assert bench.tear_share(white, min_pixels=16) == round(2 / 3, 4)
