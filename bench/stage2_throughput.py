"""Stage-2 training throughput (samples/s) on this machine, for a stage-2 config.

    python bench/stage2_throughput.py --config configs/ldm/emoji64.yaml --autoencoder configs/autoencoder/kl-f4-emoji64.yaml

Times full optimizer steps as train_stage2.py runs them with the latent cache on: a fresh posterior
sample, caption dropout, text encoder, U-Net forward and backward, AdamW, EMA. Weights are random
(throughput does not depend on them). Prints a line per setting and a markdown row.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoencoder import build_autoencoder  # noqa: E402
from autoencoder.config import AutoencoderConfig  # noqa: E402
from ldm.latent_diffusion import LatentDiffusion  # noqa: E402
from train_stage1 import Stage1Config  # noqa: E402
from train_stage2 import LatentDiffusionTask, Stage2Config  # noqa: E402
from common.config import load_config  # noqa: E402
from training import EMA  # noqa: E402


class _CPU:
    device = torch.device("cpu")

    @staticmethod
    def prepare(optimizer):
        return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ldm/emoji64.yaml")
    parser.add_argument("--autoencoder", default="configs/autoencoder/kl-f4-emoji64.yaml")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    cfg = load_config(args.config, Stage2Config)
    ae_cfg: AutoencoderConfig = load_config(args.autoencoder, Stage1Config, ["data.source=emoji"]).model
    batch = args.batch_size or cfg.train.batch_size
    torch.manual_seed(0)
    model = LatentDiffusion(cfg.model, build_autoencoder(ae_cfg), ae_cfg, scale_factor=1.0)
    task = LatentDiffusionTask(cfg, model)
    task.setup(_CPU())
    ema = EMA(task.ema_target, 0.999)
    side = cfg.data.size // model.latent_factor
    data = {"latent_mean": torch.randn(batch, model.latent_channels, side, side),
            "latent_std": torch.full((batch, model.latent_channels, side, side), 0.05),
            "caption": ["a small red circle at the top left on a white background"] * batch}
    opt = task.optimizers["unet"]

    times = []
    for step in range(args.steps + 2):  # two warm-up steps
        start = time.perf_counter()
        for _, loss, _ in task.training_step(data, step):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        ema.update(task.ema_target)
        if step >= 2:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    unet_m = sum(p.numel() for p in model.unet.parameters()) / 1e6
    print(f"{args.config}: U-Net {unet_m:.1f} M, batch {batch}, latents {model.latent_channels}x{side}x{side}, "
          f"{torch.get_num_threads()} threads: {median * 1000:.0f} ms/step, {batch / median:.1f} samples/s")
    print(f"| {Path(args.config).name} | {unet_m:.1f} M | {batch} | {median * 1000:.0f} ms | {batch / median:.1f} |")


if __name__ == "__main__":
    main()
