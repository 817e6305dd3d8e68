"""CPU forward-pass speed of ldm.unet.UNetModel against diffusers' UNet2DConditionModel.

Both models hold the SAME weights (ours converted with diffusers' own LDM checkpoint
converter) and run in one process under torch.inference_mode, alternating run by run so that
both see the same machine load. Diffusers runs in NCHW and then in channels_last (model and
input converted); the speed-up is taken against its faster layout. Times are medians (and
minima) over `--runs` forward passes after a warm-up; `max|diff|` compares the outputs.

    HF_HUB_OFFLINE=1 python bench/unet_speed.py                        # tiny and small
    HF_HUB_OFFLINE=1 python bench/unet_speed.py --configs sd1 --runs 3 # ~10 s per forward

On a shared machine, `--threads 1 --cpu-time` measures per-thread CPU time, which other
processes disturb far less than wall time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.unet import UNetModel  # noqa: E402

# name -> (UNetModel params, batch, latent size, context length)
CONFIGS = {
    "tiny": (dict(image_size=16, in_channels=4, out_channels=4, model_channels=64, channel_mult=[1, 2],
                  num_res_blocks=1, attention_resolutions=[1], num_heads=4, use_spatial_transformer=True,
                  transformer_depth=1, context_dim=128, legacy=False), 8, 16, 16),
    "small": (dict(image_size=32, in_channels=4, out_channels=4, model_channels=128, channel_mult=[1, 2, 2],
                   num_res_blocks=2, attention_resolutions=[1, 2], num_heads=8, use_spatial_transformer=True,
                   transformer_depth=1, context_dim=512, legacy=False), 2, 32, 77),
    "sd1": (dict(image_size=64, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4],
                 num_res_blocks=2, attention_resolutions=[4, 2, 1], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, legacy=False), 2, 64, 77),
}


def diffusers_config(params: dict) -> dict:
    """UNet2DConditionModel arguments equivalent to a text-conditioned UNetModel `params` dict."""
    mc, mult = params["model_channels"], list(params["channel_mult"])
    with_attention = [2**level in params["attention_resolutions"] for level in range(len(mult))]
    if params.get("num_head_channels", -1) != -1:
        heads = [mc * m // params["num_head_channels"] for m in mult]
    else:
        heads = params["num_heads"]
    return dict(
        sample_size=params["image_size"], in_channels=params["in_channels"], out_channels=params["out_channels"],
        block_out_channels=[mc * m for m in mult], layers_per_block=params["num_res_blocks"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)],
        cross_attention_dim=params["context_dim"], attention_head_dim=heads,  # diffusers' name for the head count
        use_linear_projection=params.get("use_linear_in_transformer", False),
        transformer_layers_per_block=params.get("transformer_depth", 1))


def diffusers_twin(model: UNetModel, params: dict):
    """A diffusers UNet2DConditionModel holding `model`'s weights (loaded strictly)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_config(params)
    twin = UNet2DConditionModel(**config)
    ldm_state = {"model.diffusion_model." + k: v for k, v in model.state_dict().items()}
    twin.load_state_dict(convert_ldm_unet_checkpoint(ldm_state, config), strict=True)
    return twin.eval()


def randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """Give zero-initialised parameters small random values so that every layer affects the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def bench(name: str, runs: int, clock) -> list[tuple[str, list[float]]]:
    """Times in ms of ours and diffusers (NCHW, channels_last) on config `name`, plus max |diff|."""
    params, batch, size, context_len = CONFIGS[name]
    torch.manual_seed(0)
    ours = UNetModel(**params).eval()
    randomize_zero_init(ours)
    twin = diffusers_twin(ours, params)
    x = torch.randn(batch, params["in_channels"], size, size)
    t = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, context_len, params["context_dim"])

    def timed(fn) -> float:
        start = clock()
        fn()
        return (clock() - start) * 1e3

    times: dict[str, list[float]] = {"ours": [], "diffusers NCHW": [], "diffusers channels_last": []}
    with torch.inference_mode():
        max_diff = (ours(x, t, context) - twin(x, t, context).sample).abs().max().item()
        run_ours = lambda: ours(x, t, context)  # noqa: E731
        for layout in ("NCHW", "channels_last"):
            # Converting in place keeps one diffusers copy in memory (3.4 GB at SD 1.x).
            memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            twin = twin.to(memory_format=memory_format)
            x_layout = x.contiguous(memory_format=memory_format)
            run_twin = lambda: twin(x_layout, t, context).sample  # noqa: E731
            run_twin()  # warm-up: oneDNN builds its kernels on the first call per shape
            run_ours()
            for _ in range(runs):
                times["ours"].append(timed(run_ours))
                times[f"diffusers {layout}"].append(timed(run_twin))
    return [(key, values, max_diff) for key, values in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model and layout (sd1: 2-3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time with the main thread's CPU clock")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'CPU' if args.cpu_time else 'wall'} time, {args.runs} runs per model and layout")
    print(f"{'config':7} {'model':25} {'median ms':>10} {'min ms':>9} {'speed-up':>9} {'max|diff|':>10}")
    for name in args.configs:
        rows = bench(name, args.runs, clock)
        medians = {key: statistics.median(values) for key, values, _ in rows}
        best_diffusers = min(ms for key, ms in medians.items() if key != "ours")
        for key, values, max_diff in rows:
            ours = key == "ours"
            diff = f"{max_diff:10.1e}" if ours else ""
            print(f"{name:7} {key:25} {medians[key]:10.1f} {min(values):9.1f} "
                  f"{best_diffusers / medians[key]:8.2f}x {diff}", flush=True)


if __name__ == "__main__":
    main()
