"""Vector-quantizer behaviour the mutation run (make mutation) found untested: argument checks and their
messages, the codebook's initial range, float32 nearest codes under autocast, remapped indices (random
unknowns in range, the extra code), EMA statistics through checkpoints and strict loading, the EMA
update across two processes (a stand-in for the other), dead codes after one step, and VQModel's
construction options."""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
import torch.distributed as dist
from autoencoder_helpers import TINY_VQ, pattern_images, tiny_vq
from safetensors.torch import save_file

import autoencoder as ae
from autoencoder.config import AutoencoderConfig


def _codebook(vq: ae.VectorQuantizer, rows) -> ae.VectorQuantizer:
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor(rows, dtype=torch.float32))
    return vq


def test_codebook_option_defaults_are_the_config_defaults():
    params = inspect.signature(ae.VectorQuantizer).parameters
    config = AutoencoderConfig()
    shared = [f.name for f in dataclasses.fields(config) if f.name in params and f.name not in ("n_embed", "embed_dim")]
    assert set(shared) >= {"beta", "legacy", "codebook_ema", "ema_decay", "ema_eps", "dead_code_steps",
                           "sane_index_shape"}
    for name in shared:
        assert params[name].default == getattr(config, name), name


def test_a_quantizer_built_with_the_defaults_has_the_config_values():
    config = AutoencoderConfig()
    vq = ae.VectorQuantizer(8, 2)
    for name in ("beta", "legacy", "codebook_ema", "ema_decay", "ema_eps", "dead_code_steps", "sane_index_shape"):
        assert getattr(vq, name) == getattr(config, name), name


def test_argument_checks_and_messages():
    ae.VectorQuantizer(1, 1)  # one code of one dimension is a codebook
    ae.VectorQuantizer(4, 2, codebook_ema=True, ema_decay=0.0)  # decay 0: the batch's means
    for n_embed, embed_dim in ((0, 2), (2, 0)):
        with pytest.raises(ValueError, match=f"^VectorQuantizer needs n_embed >= 1 and embed_dim >= 1, "
                                             f"got {n_embed}, {embed_dim}$"):
            ae.VectorQuantizer(n_embed, embed_dim)
    for decay in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^ema_decay must be in \[0, 1\), got {decay}$"):
            ae.VectorQuantizer(4, 2, ema_decay=decay)
    vq = ae.VectorQuantizer(4, 2)
    with pytest.raises(ValueError, match=r"^VectorQuantizer expects 2 channels, got input of shape \(1, 3, 2, 2\)$"):
        vq(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"^embed_indices expects indices of shape \[B, h, w\], got \(4,\)$"):
        vq.embed_indices(torch.zeros(4, dtype=torch.long))


def test_codebook_starts_uniform_in_plus_minus_one_over_n():
    torch.manual_seed(0)
    w = ae.VectorQuantizer(4, 4000).embedding.weight.detach()
    assert w.shape == (4, 4000)
    assert -0.25 <= w.min().item() < -0.24 and 0.24 < w.max().item() <= 0.25
    assert abs(w.mean().item()) < 0.01


def test_nearest_code_is_exact_in_float32_even_under_autocast():
    """bfloat16 distances (8-bit mantissa) pick a wrong code for some of 1024 random vectors; the quantizer
    must match the float64 brute-force nearest code for all of them, also inside an autocast region."""
    g = torch.Generator().manual_seed(0)
    vq = _codebook(ae.VectorQuantizer(16, 4), torch.randn(16, 4, generator=g).tolist()).eval()
    z = torch.randn(1, 4, 32, 32, generator=g)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4).double()
    nearest = torch.cdist(flat, vq.embedding.weight.detach().double()).argmin(1)
    assert vq(z)[2].indices.tolist() == nearest.tolist()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vq(z)[2].indices.tolist() == nearest.tolist()
    z_q, _, _ = vq(z.bfloat16())
    assert z_q.dtype == torch.bfloat16  # the output keeps the input's dtype


def _remapped(tmp_path, used, **kw) -> ae.VectorQuantizer:
    np.save(tmp_path / "used.npy", np.array(used))
    return _codebook(ae.VectorQuantizer(8, 2, remap=str(tmp_path / "used.npy"), **kw), [[i, -i] for i in range(8)])


def test_unknown_codes_get_random_indices_among_the_used(tmp_path):
    vq = _remapped(tmp_path, [0, 3, 6]).eval()  # unknown_index defaults to "random"
    torch.manual_seed(0)
    z = torch.tensor([5.0, -5.0]).view(1, 2, 1, 1).expand(1, 2, 10, 20)  # code 5 everywhere: not in `used`
    _, _, info = vq(z)
    assert set(info.indices.tolist()) == {0, 1, 2}  # every remapped index, and only those
    known = torch.tensor([3.0, -3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    assert vq(known)[2].indices.tolist() == [1, 1, 1, 1]
    fixed = _remapped(tmp_path, [0, 3, 6], unknown_index=7).eval()
    assert fixed(z)[2].indices.unique().tolist() == [7]


def test_the_extra_index_embeds_as_the_first_used_code(tmp_path):
    vq = _remapped(tmp_path, [2, 3, 6], unknown_index="extra").eval()
    latents = vq.embed_indices(torch.tensor([[[3, 1]]]))  # 3 = len(used): the extra index
    torch.testing.assert_close(latents[0, :, 0, 0], torch.tensor([2.0, -2.0]))  # used[0] = code 2
    torch.testing.assert_close(latents[0, :, 0, 1], torch.tensor([3.0, -3.0]))


def test_remap_files_must_not_hold_pickles(tmp_path):
    np.save(tmp_path / "used.npy", np.array([0, 3, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        ae.VectorQuantizer(8, 2, remap=str(tmp_path / "used.npy"))


def _trained_ema() -> ae.VectorQuantizer:
    torch.manual_seed(0)
    vq = ae.VectorQuantizer(8, 2, codebook_ema=True, ema_decay=0.5).train()
    vq(torch.randn(1, 2, 4, 4))
    return vq


def test_ema_statistics_survive_a_checkpoint_round_trip():
    trained = _trained_ema()
    assert not torch.equal(trained.ema_cluster_size, torch.ones(8))
    fresh = ae.VectorQuantizer(8, 2, codebook_ema=True, ema_decay=0.5)
    fresh.load_state_dict(trained.state_dict(), strict=True)
    assert torch.equal(fresh.ema_cluster_size, trained.ema_cluster_size)
    assert torch.equal(fresh.ema_embed_sum, trained.ema_embed_sum)
    plain = ae.VectorQuantizer(8, 2)
    plain.load_state_dict(ae.VectorQuantizer(8, 2).state_dict(), strict=True)  # no EMA keys either side
    assert "steps_since_used" not in plain.state_dict()


def test_strict_loading_still_reports_the_quantizers_own_keys(tmp_path):
    state = _trained_ema().state_dict()
    partial = {k: v for k, v in state.items() if k != "ema_embed_sum"}  # half the statistics
    with pytest.raises(RuntimeError, match="Missing key.*ema_embed_sum"):
        ae.VectorQuantizer(8, 2, codebook_ema=True).load_state_dict(partial, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key.*bogus"):
        ae.VectorQuantizer(8, 2, codebook_ema=True).load_state_dict({**state, "bogus": torch.zeros(1)}, strict=True)
    with pytest.raises(RuntimeError, match="size mismatch.*ema_cluster_size"):
        ae.VectorQuantizer(8, 2, codebook_ema=True).load_state_dict({**state, "ema_cluster_size": torch.ones(3)})
    remapped = _remapped(tmp_path, [0, 3, 6])
    without_used = {k: v for k, v in remapped.state_dict().items() if k != "used"}
    with pytest.raises(RuntimeError, match="Missing key.*used"):
        _remapped(tmp_path, [0, 3, 6]).load_state_dict(without_used, strict=True)


def test_ema_update_uses_both_processes_statistics(monkeypatch):
    """With two processes the counts and sums are all-reduced; the stand-in for the other process saw
    the same batch, so the reduced statistics are twice this one's."""
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.mul_(2))
    decay = 0.5
    vq = _codebook(ae.VectorQuantizer(8, 2, codebook_ema=True, ema_decay=decay), [[i, -i] for i in range(8)]).train()
    with torch.no_grad():
        vq.ema_embed_sum.copy_(vq.embedding.weight)
    z = torch.tensor([[0.2, 0.4], [-0.2, 0.0], [3.4, -3.0]]).t().reshape(1, 2, 1, 3)
    vq(z)
    counts = torch.zeros(8)
    counts[0], counts[3] = 2 * 2, 2 * 1
    torch.testing.assert_close(vq.ema_cluster_size, decay * torch.ones(8) + (1 - decay) * counts)
    assert vq.ema_embed_sum[3].tolist() == pytest.approx([0.5 * 3 + 0.5 * 2 * 3.4, 0.5 * -3 + 0.5 * 2 * -3.0])


def test_one_dead_code_step_replaces_a_code_unused_for_one_step():
    vq = _codebook(ae.VectorQuantizer(4, 2, dead_code_steps=1), [[0, 0], [10, 10], [20, 20], [30, 30]]).train()
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1]]).t().reshape(1, 2, 1, 2)
    vq(z)
    candidates = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for row in vq.embedding.weight[1:].detach():  # codes 1-3 were unused this step: each now a batch vector
        assert any(torch.equal(row, c) for c in candidates), row


def test_vq_model_options_reach_the_model(tmp_path):
    with pytest.raises(ValueError, match=r"^VQModel: unknown argument\(s\) \['foo'\]$"):
        tiny_vq(foo=1)
    with pytest.raises(ValueError, match=r"^VQModel needs ddconfig.double_z: false \(the encoder emits one latent\)$"):
        ae.VQModel(ddconfig={**TINY_VQ, "double_z": True}, n_embed=8, embed_dim=4)
    model = tiny_vq(colorize_nlabels=5)
    assert model.embed_dim == 4 and model.colorize.shape == (3, 5, 1, 1)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("colorize")}
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("quantize.")},
              tmp_path / "no-codebook.safetensors")
    torch.manual_seed(1)
    loaded = ae.VQModel(ddconfig=TINY_VQ, n_embed=64, embed_dim=4, ckpt_path=tmp_path / "no-codebook.safetensors",
                        ignore_keys=["quantize."])
    x = pattern_images(1)
    torch.testing.assert_close(loaded.encode_latents(x), model.encode_latents(x))
    assert not torch.equal(loaded.quantize.embedding.weight, model.quantize.embedding.weight)  # left as initialised


def test_perplexity_and_usage_of_single_uses():
    vq = _codebook(ae.VectorQuantizer(8, 2), [[i, -i] for i in range(8)]).eval()
    _, _, info = vq(torch.tensor([[0.0, 0.0], [1.0, -1.0], [2.0, -2.0], [3.0, -3.0]]).t().reshape(1, 2, 1, 4))
    assert info.usage.item() == pytest.approx(0.5) and info.perplexity.item() == pytest.approx(4.0, rel=1e-5)
    _, _, info = vq(torch.tensor([3.0, -3.0]).view(1, 2, 1, 1))  # one vector: one code, used by all
    assert info.usage.item() == pytest.approx(1 / 8) and info.perplexity.item() == pytest.approx(1.0, rel=1e-5)


def _four_codes(**kw) -> ae.VectorQuantizer:
    return _codebook(ae.VectorQuantizer(4, 2, dead_code_steps=1, **kw), [[0, 0], [10, 10], [20, 20], [30, 30]]).train()


def test_a_code_used_once_stays_and_a_single_dead_code_is_replaced():
    vq = _four_codes()
    z = torch.tensor([[0.1, 0.0], [10.0, 10.1], [20.1, 20.0]]).t().reshape(1, 2, 1, 3)  # codes 0, 1, 2 once each
    vq(z)
    w = vq.embedding.weight.detach()
    assert w[:3].tolist() == [[0, 0], [10, 10], [20, 20]]
    assert any(torch.equal(w[3], c) for c in z.permute(0, 2, 3, 1).reshape(-1, 2))


def test_dead_codes_are_drawn_from_the_whole_batch():
    torch.manual_seed(0)
    vq = _codebook(ae.VectorQuantizer(64, 2, dead_code_steps=1), [[1000.0 + i, 0.0] for i in range(64)]).train()
    z = torch.randn(1, 2, 4, 4)  # 16 vectors, all nearest code 0: 63 dead codes
    vq(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 2)
    picked = {next(k for k, r in enumerate(rows) if torch.equal(w, r)) for w in vq.embedding.weight.detach()[1:]}
    assert max(picked) >= 2  # not only the first rows (a draw over the embedding width would give 0 and 1)


def test_dead_codes_from_a_bfloat16_batch_land_in_the_float32_codebook():
    vq = _four_codes()
    z = torch.tensor([[0.1, 0.0], [10.0, 10.1], [20.1, 20.0]]).t().reshape(1, 2, 1, 3).bfloat16()
    vq(z)
    assert vq.embedding.weight.dtype == torch.float32
    assert any(torch.equal(vq.embedding.weight.detach()[3], c.float()) for c in z.permute(0, 2, 3, 1).reshape(-1, 2))


def test_an_ema_codebook_restarts_the_statistics_of_a_replaced_code():
    vq = _four_codes(codebook_ema=True, ema_decay=0.5)
    z = torch.tensor([[0.1, 0.0], [10.0, 10.1], [20.1, 20.0]]).t().reshape(1, 2, 1, 3)
    vq(z)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert vq.ema_cluster_size[3].item() == 1.0
    assert any(torch.equal(vq.ema_embed_sum[3], r) for r in rows)
    torch.testing.assert_close(vq.embedding.weight.detach(), vq.codebook_from_statistics())


def test_replacement_codes_come_from_the_first_process(monkeypatch):
    """With two processes every process takes process 0's replacement codes (a stand-in broadcast gives
    7s) after summing the code counts (a stand-in all-reduce)."""
    def broadcast(tensor, src):
        assert src == 0
        tensor.fill_(7.0)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.mul_(2))
    monkeypatch.setattr(dist, "broadcast", broadcast)
    vq = _four_codes()
    vq(torch.tensor([[0.1, 0.0], [10.0, 10.1], [20.1, 20.0]]).t().reshape(1, 2, 1, 3))
    assert vq.embedding.weight.detach().tolist() == [[0, 0], [10, 10], [20, 20], [7, 7]]
