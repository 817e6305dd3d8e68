"""The frozen-context cache of training: a caption's context must not depend on when it was first seen."""
import pytest
import torch

from conditioning.context_cache import ContextCache


def batch_size_dependent_encoder(log: list):
    """Contexts [B, 2, 3] from each caption's characters, shifted by 1e-3 per extra caption in the batch:
    numerics that follow the batch size, as a batched MiniLM's did at 2 threads on an AMX Xeon."""
    def encode(captions: list[str]) -> torch.Tensor:
        log.append(list(captions))
        codes = torch.tensor([[float(sum(map(ord, c))), float(len(c)), 1.0] for c in captions])
        return codes[:, None, :].repeat(1, 2, 1) + 1e-3 * (len(captions) - 1)
    return encode


def test_a_captions_context_does_not_depend_on_the_captions_new_with_it():
    first_run, resumed = ContextCache(batch_size_dependent_encoder([]), chunk=4), ContextCache(
        batch_size_dependent_encoder([]), chunk=4)
    first_run(["a cat", "a dog", "a red apple"])  # "a cat" first seen with two others
    before = first_run(["a cat", "a blue car"])
    after = resumed(["a cat", "a blue car"])  # an empty cache, as after a resume: "a cat" seen with one other
    assert torch.equal(before, after)


def test_new_captions_are_encoded_once_in_full_chunks_and_kept():
    log = []
    cache = ContextCache(batch_size_dependent_encoder(log), chunk=2)
    first = cache(["b", "a", "b", "c"])
    second = cache(["c", "d"])
    assert log == [["a", "b"], ["c", "c"], ["d", "d"]]  # sorted, each once, the last chunk filled up
    assert torch.equal(first[0], first[2]) and torch.equal(first[3], second[0])
    assert cache.bytes == 4 * first[0].numel() * first.element_size()

    cache.max_bytes = cache.bytes  # full: new captions are encoded every time, not kept
    cache(["e"]), cache(["e"])
    assert log[-2:] == [["e", "e"], ["e", "e"]] and "e" not in cache.contexts


def test_a_trainable_encoder_runs_every_call_on_the_batch_as_given():
    log = []
    cache = ContextCache(batch_size_dependent_encoder(log), frozen=False, chunk=4)
    cache(["a", "a"]), cache(["a"])
    assert log == [["a", "a"], ["a"]] and not cache.contexts


def test_chunk_must_be_positive():
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        ContextCache(lambda captions: torch.zeros(len(captions), 1, 1), chunk=0)
