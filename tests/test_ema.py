"""EMA: the warm-up and its cap, buffers, an EMA-learned VQ codebook, and sampling with EMA weights
without disturbing training."""
from __future__ import annotations

import copy

import pytest
import torch
from autoencoder_helpers import pattern_images, tiny_vq
from torch import nn

import train_stage2
from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from common.weights import load_weights, save_weights
from conditioning import TextEncoderConfig
from data import DataConfig, build_dataset
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.unet import UNetConfig
from training import EMA, TrainConfig, ema_weights, train

SIZE = 16  # image pixels; the tiny autoencoder halves once


def test_decay_follows_the_warm_up_until_it_reaches_the_cap():
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    decays = []
    for _ in range(10):
        decays.append(ema.current_decay())
        ema.update(model)
    # (1 + n) / (10 + n) for n = 1..8 (n = 8 gives exactly 0.5), then the cap 0.5 (n = 9: 10/19 > 0.5).
    assert decays[:8] == [(1 + n) / (10 + n) for n in range(1, 9)]
    assert decays[8:] == [0.5, 0.5]
    # From 0 towards 1, the shadow is 1 - prod(decays) = 1 - (9! / (18! / 10!)) * 0.25 = 1 - 1 / 19448.
    assert ema.shadow.weight.item() == pytest.approx(1 - 1 / 19448, abs=1e-12)
    assert ema.num_updates == 10


def test_buffers_are_copied_not_averaged():
    model = nn.BatchNorm1d(3)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        model.num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.equal(ema.shadow.running_mean, model.running_mean)
    assert ema.shadow.num_batches_tracked.item() == 7


def test_ema_vq_codebook_agrees_with_its_statistics(tmp_path):
    # The codebook is learned by EMA k-means updates (no gradient): the EMA copy takes it live with
    # the running sums and counts it is computed from, so an exported EMA model is self-consistent.
    model = tiny_vq(codebook_ema=True, ema_decay=0.5, dead_code_steps=1).train()  # codes re-initialised every step
    ema = EMA(model, decay=0.9)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = pattern_images(2)
    for _ in range(3):
        x_hat, q_loss, _ = model(x)
        optimizer.zero_grad()
        ((x_hat - x).abs().mean() + q_loss).backward()
        optimizer.step()
        ema.update(model)
        assert torch.equal(model.quantize.embedding.weight, model.quantize.codebook_from_statistics())
    save_weights(ema.state_dict(), tmp_path / "ema.safetensors")
    exported = tiny_vq(codebook_ema=True)
    exported.load_state_dict(load_weights(tmp_path / "ema.safetensors"))
    quantizer = exported.quantize
    assert torch.equal(quantizer.embedding.weight, quantizer.codebook_from_statistics())
    assert torch.equal(quantizer.embedding.weight, model.quantize.embedding.weight)
    # The trained weights are still averaged, not copied.
    assert not torch.equal(exported.encoder.conv_in.weight, model.encoder.conv_in.weight)


def test_ema_weights_swaps_in_and_restores_bit_exactly_with_the_modes():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    model[2].eval()  # a submodule kept in eval mode on purpose stays so
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in ema.shadow.parameters():
            p.add_(1.0)
        ema.shadow[1].running_var.fill_(4.0)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with ema_weights(model, ema) as swapped:
        assert swapped is model and not any(m.training for m in model.modules())
        assert all(torch.equal(v, ema.shadow.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == pointers
    assert model.training and model[0].training and not model[2].training
    with pytest.raises(RuntimeError, match="inside"), ema_weights(model, ema):
        raise RuntimeError("inside")
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    with ema_weights(model, None):  # no EMA kept: the live weights, in eval mode
        assert not model.training and torch.equal(model[0].weight, live["0.weight"])
    assert model.training


# ----------------------------------------------------------------------------- stage 2 image grids


def _tiny_stage2_config(tmp_path) -> train_stage2.Stage2Config:
    return train_stage2.Stage2Config(
        model=LatentDiffusionConfig(
            unet=UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                            num_head_channels=16, image_size=SIZE // 2),
            text=TextEncoderConfig(kind="transformer", n_embed=32, n_layer=1, n_head=2)),
        data=DataConfig(source="shapes", size=SIZE, shapes_length=8),
        train=TrainConfig(output_dir=str(tmp_path), batch_size=4, max_steps=3, ema_decay=0.5, image_every=2,
                          checkpoint_every=3, log_every=1),
        optim=train_stage2.OptimConfig(lr=1e-3, warmup_steps=1),
        samples=train_stage2.SampleConfig(prompts=["a red circle"], steps=2))


def _tiny_model(cfg: train_stage2.Stage2Config) -> LatentDiffusion:
    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(
        z_channels=4, resolution=SIZE, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[]))
    return LatentDiffusion(cfg.model, build_autoencoder(ae_cfg), ae_cfg, scale_factor=0.5)


class RecordingTask(train_stage2.LatentDiffusionTask):
    """The stage-2 task, noting the live weights, optimizer state and modes around each image grid."""

    calls: list[tuple[dict, dict]]

    def images(self, batch, ema):
        before = self.snapshot()
        grids = super().images(batch, ema)
        self.calls.append((before, self.snapshot()))
        return grids

    def snapshot(self) -> dict:
        optimizer = self.optimizers["unet"].state_dict()
        return {"weights": {k: v.clone() for k, v in self.trainable.state_dict().items()},
                "optimizer": copy.deepcopy(optimizer["state"]),
                "modes": [m.training for m in self.model.modules()]}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_stage2_image_grids_leave_the_live_weights_and_optimizer_untouched(tmp_path):
    cfg = _tiny_stage2_config(tmp_path)
    task = RecordingTask(cfg, _tiny_model(cfg))
    task.calls = []
    train(task, build_dataset(cfg.data), cfg.train)
    assert len(task.calls) == 1 and (tmp_path / "images" / "samples_00000002.png").is_file()
    before, after = task.calls[0]
    assert before["optimizer"], "the optimizer has state by step 2"
    assert _same(before["weights"], after["weights"])  # not the EMA weights
    assert _same(before["optimizer"], after["optimizer"])
    assert before["modes"] == after["modes"]
