"""CLIP BPE tokenizer (conditioning/tokenizer.py) against open_clip and Hugging Face's CLIP tokenizer."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from conditioning import END_OF_TEXT_ID, START_OF_TEXT_ID, CLIPBPETokenizer
from conditioning.tokenizer import default_vocabulary_path, load_vocabulary

PROMPTS = [
    "a photo of a cat",
    "A   Photo of an ASTRONAUT riding a horse on Mars, 4k, trending on artstation!!",
    "it's what we'd've done; 1999 was 25 years ago",
    "",
    "naïve café Ünïcödé 日本語のテキスト 😀",
]
# ftfy (CLIP, open_clip) and HF's fast tokenizer disagree on these by design: see tokenizer.py.
CLEANING_EDGE_CASES = ["“curly quotes” &amp; entities", "ﬁne ligatures"]


def test_tokenizer_known_ids(tokenizer):
    assert tokenizer.vocab_size == 49408
    ids = tokenizer(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == END_OF_TEXT_ID).all()
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenizer.decode(ids[0]) == "a photo of a cat"


def test_tokenizer_matches_open_clip(tokenizer):
    import open_clip

    long_prompt = " ".join(["word"] * 120)
    prompts = PROMPTS + CLEANING_EDGE_CASES + [long_prompt]
    ours = CLIPBPETokenizer(pad_token_id=0)(prompts)
    assert torch.equal(ours, open_clip.get_tokenizer("ViT-H-14")(prompts))
    simple = open_clip.SimpleTokenizer()
    for prompt in prompts:
        assert tokenizer.encode(prompt) == simple.encode(prompt)


def test_tokenizer_matches_hf_clip_tokenizer_built_from_bundled_vocabulary(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    vocabulary, merge_ranks = load_vocabulary(str(default_vocabulary_path()))
    (tmp_path / "vocab.json").write_text(json.dumps(vocabulary))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merge_ranks) + "\n")
    hf = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(hf) == 49408  # the offline hub trap returns a 2-token tokenizer
    assert hf.pad_token_id == END_OF_TEXT_ID and hf.bos_token_id == START_OF_TEXT_ID
    prompts = PROMPTS + [" ".join(["word"] * 120)]
    expected = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(tokenizer(prompts), expected)


def test_truncation_warns_once_per_batch_and_keeps_end_token(tokenizer, caplog):
    long_a, long_b = " ".join(["cat"] * 100), " ".join(["dog"] * 80)
    with caplog.at_level(logging.WARNING, logger="conditioning.tokenizer"):
        ids = tokenizer([long_a, "short", long_b])
    assert len(caplog.records) == 1
    assert "2 of 3 prompts" in caplog.records[0].getMessage()
    assert (ids[:, 0] == START_OF_TEXT_ID).all()
    assert ids[0, -1] == END_OF_TEXT_ID and ids[2, -1] == END_OF_TEXT_ID
    assert ids[0, 1:76].tolist() == tokenizer.encode(long_a)[:75]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="conditioning.tokenizer"):
        exact = tokenizer([" ".join(["cat"] * 75)])  # 75 tokens + start + end fill the context exactly
    assert not caplog.records
    assert exact[0, -1] == END_OF_TEXT_ID and exact[0, -2] == tokenizer.encode("cat")[0]


def test_padding_modes(tokenizer):
    zero = CLIPBPETokenizer(pad_token_id=0)
    for prompt in ["", "a red bicycle"]:
        end_padded, zero_padded = tokenizer([prompt])[0], zero([prompt])[0]
        n = len(tokenizer.encode(prompt)) + 2
        assert torch.equal(end_padded[:n], zero_padded[:n])
        assert end_padded[n - 1] == END_OF_TEXT_ID
        assert (end_padded[n:] == END_OF_TEXT_ID).all() and (zero_padded[n:] == 0).all()
    assert tokenizer([""])[0, :2].tolist() == [START_OF_TEXT_ID, END_OF_TEXT_ID]
    assert CLIPBPETokenizer(context_length=16)(["a cat"]).shape == (1, 16)


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pad_token_id"):
        CLIPBPETokenizer(pad_token_id=49408)
    with pytest.raises(ValueError, match="context_length"):
        CLIPBPETokenizer(context_length=1)
    with pytest.raises(FileNotFoundError):
        CLIPBPETokenizer(vocabulary_path="/nonexistent/bpe.txt.gz")
    with pytest.raises(ValueError, match="strings"):
        CLIPBPETokenizer()(["fine", None])
