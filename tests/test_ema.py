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
    # The warm-up 2/11, 3/12, ..., 9/18 (= 0.5 exactly), then the cap 0.5 (uncapped: 10/19, 11/20).
    assert decays[:8] == [2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16, 8 / 17, 9 / 18]
    assert decays[8:] == [0.5, 0.5]
    # From 0 towards 1, the shadow is 1 - prod(decays) = 1 - (9! / (18! / 10!)) * 0.25 = 1 - 1 / 19448.
    assert ema.shadow.weight.item() == pytest.approx(1 - 1 / 19448, abs=1e-12)
    assert ema.num_updates == 10


def test_long_run_moves_a_tenth_of_the_way_once_the_warm_up_passes_the_cap():
    # decay 0.9: the warm-up (1 + n) / (10 + n) reaches 0.9 at update n = 80 (81 / 90) and would go on to
    # 151 / 160 at n = 150; the cap keeps every later update at 0.9. Each update is asked to move the
    # shadow towards a target one unit above it, so the distance moved is 1 - decay: 9/11 of the way at
    # n = 1, 9/89 at n = 79, then 1/10 for ever (9/160 at n = 150 without the cap).
    model = nn.Linear(1, 1, bias=False).double()
    ema = EMA(model, decay=0.9)
    moved = {}
    for n in range(1, 201):
        before = ema.shadow.weight.item()
        with torch.no_grad():
            model.weight.fill_(before + 1.0)
        ema.update(model)
        moved[n] = ema.shadow.weight.item() - before
    assert moved[1] == pytest.approx(9 / 11, abs=1e-12)
    assert moved[79] == pytest.approx(9 / 89, abs=1e-12)
    assert all(moved[n] == pytest.approx(0.1, abs=1e-12) for n in range(80, 201)), \
        {n: moved[n] for n in (80, 81, 150, 200)}
    assert ema.num_updates == 200 and ema.current_decay() == 0.9


def test_default_decay_is_capped_at_0_9999_once_resumed_far_into_training():
    model = nn.Linear(1, 1, bias=False).double()
    ema = EMA(model)  # SD's 0.9999; the warm-up passes it after 89,991 updates
    ema.load_state_dict(ema.state_dict(), num_updates=10**6)
    with torch.no_grad():
        model.weight.fill_(ema.shadow.weight.item() + 1.0)
    before = ema.shadow.weight.item()
    ema.update(model)
    assert ema.shadow.weight.item() - before == pytest.approx(1e-4, rel=1e-9)  # uncapped: 9 / 1000011


def test_buffers_and_frozen_parameters_follow_the_model_exactly_every_update():
    # BatchNorm statistics (float and integer buffers) and a frozen parameter change at every step; the
    # shadow must hold the model's current values, not an average of the past ones.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    ema = EMA(model, decay=0.9)
    for step in range(12):
        with torch.no_grad():
            model(torch.randn(8, 3) * (step + 1) + step)  # moves running_mean / running_var / count
            model[2].weight.add_(1.0)  # a frozen weight set from outside the optimizer
            model[0].weight.add_(1.0)  # a trained one: averaged, so it lags
        ema.update(model)
        for name, value in model.state_dict().items():
            if name.startswith("0."):
                continue
            assert torch.equal(ema.shadow.state_dict()[name], value), (step, name)
    assert ema.shadow[1].num_batches_tracked.item() == 12
    assert (ema.shadow[0].weight < model[0].weight - 1.0).all()  # 12 units ahead, the average trails by > 1


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
