"""The training loop against a hand-written plain-torch loop doing the same steps: loss scaling under
gradient accumulation, gradient clipping of the accumulated gradient, LR-scheduler stepping once per
optimizer step (after it), EMA once per optimizer step; and stage 2's linear LR warm-up as the loop
applies it. Learning rates, EMA decays and the clipping rule are written out by hand here, not taken
from the code under test."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from test_training_loop import NoisyRegression
from torch import nn

import train_stage2
from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from common.weights import load_weights
from conditioning import TextEncoderConfig
from data import DataConfig, build_dataset
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.unet import UNetConfig
from training import TrainConfig, TrainingTask, train

STEPS = 6
NET_LR, CRITIC_LR, MOMENTUM = 0.1, 0.05, 0.5
# LambdaLR(min(1, (s + 1) / 3)) read at optimizer steps 0, 1, 2, ...: a third, two thirds, then all of it.
NET_LRS = [NET_LR / 3, NET_LR * 2 / 3, NET_LR, NET_LR, NET_LR, NET_LR]
# EMA decay at updates n = 1..6: the warm-up (1 + n) / (10 + n), below the 0.5 cap throughout.
EMA_DECAYS = [2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15, 7 / 16]


def _init(seed: int = 5) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Linear(6, 2), nn.Linear(2, 1)


class RecordingRegression(TrainingTask):
    """A regressor with an LR schedule and a critic without one, each on plain SGD; deterministic
    (no dropout, no global RNG), and it notes every micro-batch it is given."""

    def __init__(self):
        self.net, self.critic = _init()
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, accelerator):
        opt_net = torch.optim.SGD(self.net.parameters(), lr=NET_LR, momentum=MOMENTUM)
        opt_critic = torch.optim.SGD(self.critic.parameters(), lr=CRITIC_LR)
        opt_net, opt_critic = accelerator.prepare(opt_net, opt_critic)
        self.modules = {"net": self.net, "critic": self.critic}
        self.optimizers = {"net": opt_net, "critic": opt_critic}
        self.schedulers = {"net": torch.optim.lr_scheduler.LambdaLR(opt_net, lambda s: min(1.0, (s + 1) / 3))}
        self.ema_target = self.net

    def training_step(self, batch, step):
        self.batches.append((batch["x"].clone(), batch["y"].clone()))
        pred = self.net(batch["x"])
        loss = (pred - batch["y"]).pow(2).mean()
        yield "net", loss, {"mse": loss.item()}
        critic = (self.critic(pred.detach()) - 1).pow(2).mean()
        yield "critic", critic, {"critic": critic.item()}


def _clip_by_hand(params: list[nn.Parameter], max_norm: float) -> bool:
    """Scale all gradients by max_norm / (||g|| + 1e-6) when that is below 1 (torch's rule); True if it was."""
    total = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    scale = max_norm / (total + 1e-6)
    if scale >= 1:
        return False
    for p in params:
        p.grad.mul_(scale)
    return True


def _reference(batches, grad_accum: int, grad_clip: float | None):
    """The plain loop: per optimizer step, grad_accum micro-batches each adding loss / grad_accum, one
    clip of the summed gradient, one SGD step at the hand-written LR, one EMA update."""
    net, critic = _init()
    opt_net = torch.optim.SGD(net.parameters(), lr=NET_LRS[0], momentum=MOMENTUM)
    opt_critic = torch.optim.SGD(critic.parameters(), lr=CRITIC_LR)
    ema = {k: v.detach().clone().double() for k, v in net.state_dict().items()}
    clipped = []
    assert len(batches) == STEPS * grad_accum
    for step in range(STEPS):
        for x, y in batches[step * grad_accum:(step + 1) * grad_accum]:
            pred = net(x)
            ((pred - y).pow(2).mean() / grad_accum).backward()
            ((critic(pred.detach()) - 1).pow(2).mean() / grad_accum).backward()
        if grad_clip is not None:
            clipped.append(_clip_by_hand(list(net.parameters()), grad_clip))
            _clip_by_hand(list(critic.parameters()), grad_clip)
        for group in opt_net.param_groups:
            group["lr"] = NET_LRS[step]
        opt_net.step()
        opt_critic.step()
        opt_net.zero_grad()
        opt_critic.zero_grad()
        decay = EMA_DECAYS[step]
        ema = {k: decay * ema[k] + (1 - decay) * v.detach().double() for k, v in net.state_dict().items()}
    return net, critic, ema, clipped


# Gradient norms here are 1.2 .. 4.4 per step (about half that per micro-batch under accumulation):
# clip 3.0 bites on some steps only, clip 1.0 on micro-batch gradients too (a loop clipping each
# micro-step's partial sum would then differ).
@pytest.mark.parametrize("grad_accum, grad_clip", [(1, None), (2, None), (1, 3.0), (2, 1.0)])
def test_loop_matches_a_plain_torch_loop(tmp_path, grad_accum, grad_clip):
    task = RecordingRegression()
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=STEPS, grad_accum=grad_accum,
                      grad_clip=grad_clip, ema_decay=0.5, checkpoint_every=100, log_every=100)
    folder = train(task, NoisyRegression(), cfg)
    net, critic, ema, clipped = _reference(task.batches, grad_accum, grad_clip)
    if grad_clip is not None:
        assert any(clipped), clipped
    for name, want in net.state_dict().items():
        torch.testing.assert_close(task.net.state_dict()[name], want, rtol=1e-5, atol=1e-6, msg=f"net.{name}")
    for name, want in critic.state_dict().items():
        torch.testing.assert_close(task.critic.state_dict()[name], want, rtol=1e-5, atol=1e-6, msg=f"critic.{name}")
    saved_ema = load_weights(folder / "ema.safetensors")
    for name, want in ema.items():
        torch.testing.assert_close(saved_ema[name].double(), want, rtol=1e-5, atol=1e-6, msg=f"ema.{name}")
    # The learning rate left for a next step: the schedule's value after STEPS scheduler steps.
    assert task.optimizers["net"].param_groups[0]["lr"] == pytest.approx(NET_LR)


def test_the_settings_checked_change_the_result(tmp_path):
    # Guards against a vacuous comparison: with these data, clipping at 1.0 changes the final weights
    # well beyond the tolerances above, and accumulating two batches equals one batch of both.
    task = RecordingRegression()
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=STEPS, grad_accum=2,
                      grad_clip=None, ema_decay=0.5, checkpoint_every=100, log_every=100)
    train(task, NoisyRegression(), cfg)
    plain = _reference(task.batches, 2, None)[0].weight
    clipped = _reference(task.batches, 2, 1.0)[0].weight
    assert (plain - clipped).abs().max() > 1e-2
    # grad_accum 2 averages the two micro-batch losses: one step on both batches at once gives the same.
    both = _reference([(torch.cat([x1, x2]), torch.cat([y1, y2]))
                      for (x1, y1), (x2, y2) in zip(task.batches[::2], task.batches[1::2])], 1, None)[0].weight
    torch.testing.assert_close(both, plain, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- stage 2 warm-up


def _tiny_stage2(tmp_path, warmup_steps: int, grad_accum: int,
                 weight_decay: float = 0.01) -> tuple[train_stage2.Stage2Config, LatentDiffusion]:
    cfg = train_stage2.Stage2Config(
        model=LatentDiffusionConfig(
            unet=UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
                            num_head_channels=16, image_size=4),
            text=TextEncoderConfig(kind="transformer", n_embed=32, n_layer=1, n_head=2)),
        data=DataConfig(source="shapes", size=8, shapes_length=8),
        train=TrainConfig(output_dir=str(tmp_path), batch_size=2, max_steps=6, grad_accum=grad_accum,
                          checkpoint_every=100, log_every=100),
        optim=train_stage2.OptimConfig(lr=1e-3, warmup_steps=warmup_steps, weight_decay=weight_decay),
        samples=train_stage2.SampleConfig(prompts=[]))
    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(
        z_channels=4, resolution=8, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[]))
    return cfg, LatentDiffusion(cfg.model, build_autoencoder(ae_cfg), ae_cfg, scale_factor=0.5)


class LrRecordingTask(train_stage2.LatentDiffusionTask):
    """The stage-2 task, noting the learning rate each real AdamW step runs with."""

    def setup(self, accelerator):
        super().setup(accelerator)
        self.lrs = []
        inner = self.optimizers["unet"].optimizer  # the torch optimizer inside accelerate's wrapper
        inner.register_step_pre_hook(lambda opt, args, kwargs: self.lrs.append(opt.param_groups[0]["lr"]))


@pytest.mark.parametrize("warmup_steps, grad_accum, expected", [
    # lr * min(1, (step + 1) / warmup) at optimizer steps 0..5, by hand:
    (4, 1, [0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3]),
    (4, 2, [0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3]),  # per optimizer step, not per micro-batch
    (0, 1, [1e-3] * 6),  # no warm-up: the full rate from the first step
])
def test_stage2_learning_rate_warms_up_linearly_per_optimizer_step(tmp_path, warmup_steps, grad_accum, expected):
    cfg, model = _tiny_stage2(tmp_path, warmup_steps, grad_accum)
    task = LrRecordingTask(cfg, model)
    train(task, build_dataset(cfg.data), cfg.train)
    assert task.lrs == pytest.approx(expected, rel=1e-12)


def test_stage2_first_step_moves_the_unet_by_the_warmed_up_rate(tmp_path):
    # Adam's first step moves each weight by lr_0 * |g| / (|g| + 1e-8) (no weight decay here), so the
    # largest move over the U-Net is lr_0 = 1e-3 / 4: a behavioural check of the rate actually used.
    cfg, model = _tiny_stage2(tmp_path, warmup_steps=4, grad_accum=1, weight_decay=0.0)
    cfg.train = replace(cfg.train, max_steps=1)
    before = [p.detach().clone() for p in model.unet.parameters()]
    train(train_stage2.LatentDiffusionTask(cfg, model), build_dataset(cfg.data), cfg.train)
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(model.unet.parameters(), before))
    assert moved == pytest.approx(0.25e-3, rel=1e-4)
