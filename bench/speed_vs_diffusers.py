"""Speed against diffusers (issue 8): U-Net forward, autoencoder decode, DDIM sampling with
classifier-free guidance, and a stage-2 training step, side by side in one process.

Both sides hold the SAME weights: diffusers' model is built from ours through diffusers' own LDM
checkpoint converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`) and then shares
our parameter tensors (`load_state_dict(assign=True)`), so an SD 1.x pair costs one copy of the
weights. Every case reports max |ours - diffusers| of its output. Timed calls alternate between the
sides run by run so both see the same machine load; diffusers runs in NCHW and in channels_last.
The speed-up is the median over runs of each diffusers call's time over that of ours just before it
(paired, so drift in this shared machine's speed during a run cancels), the smaller of the two
layouts'. Denormals are flushed to zero on both sides. Each case runs in a fresh process, so no
allocator or oneDNN kernel-cache state carries over from the one before. The training step (fused
AdamW on both sides; `--precision bf16`: both in bf16 autocast) is paired like the rest at tiny and
small; at SD 1.x it runs one side at a time and frees its gradients and AdamW state before the other
side starts (a step needs 13 GiB), and the speed-up is a ratio of medians.

Peak memory (`--memory`): each case runs again in a fresh subprocess with glibc's mmap threshold
fixed at 64 KiB (freed tensors leave the resident set at once instead of staying in malloc's heap).
For each side, after one warm-up call, it resets the kernel's resident high-water mark
(/proc/self/clear_refs), makes one call and reports VmHWM minus the resident size before it: the
working memory on top of the weights and inputs (activations, oneDNN scratch; for the training
step the gradients and temporaries, the AdamW moments being resident already after the warm-up).

GFLOP/s: FLOPs of matmuls, convolutions and attention, counted once on diffusers' side with
torch.utils.flop_counter (ours runs fused oneDNN ops the counter does not know; the arithmetic
is the same), divided by each side's median time.

    HF_HUB_OFFLINE=1 python bench/speed_vs_diffusers.py --threads 1 --cpu-time --memory
    HF_HUB_OFFLINE=1 python bench/speed_vs_diffusers.py --configs sd1 --runs 2 --threads 1 --cpu-time --memory
    HF_HUB_OFFLINE=1 python bench/speed_vs_diffusers.py --cases unet --configs tiny small sd1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unet_speed import CONFIGS as UNET_CONFIGS  # noqa: E402
from unet_speed import diffusers_config, randomize_zero_init  # noqa: E402

from autoencoder.config import DDConfig  # noqa: E402
from autoencoder.kl import AutoencoderKL  # noqa: E402
from ldm.denoiser import Denoiser  # noqa: E402
from ldm.diffusion import Diffusion  # noqa: E402
from ldm.generation import sample_latents  # noqa: E402
from ldm.guidance import ClassifierFreeGuidance  # noqa: E402
from layers import compile_for_inference  # noqa: E402
from common.randomness import randn  # noqa: E402
from ldm.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402
from ldm.unet import UNetModel  # noqa: E402

CASES = ("unet", "vae", "sampling", "train")
CASE_CONFIGS = {"unet": ("tiny", "small", "sd1"), "vae": ("tiny", "sd1"), "sampling": ("tiny", "sd1"),
                "train": ("tiny", "small", "sd1")}
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}

# Autoencoders: tiny = the built-in emoji model's kl-f4 (configs/autoencoder/kl-f4-emoji64.yaml),
# sd1 = SD's kl-f8. (ddconfig, latents decoded per call [B, 4, h, w])
VAE_CONFIGS = {
    "tiny": (DDConfig(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, resolution=64, norm_num_groups=8), (8, 4, 16, 16)),
    "sd1": (DDConfig(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, resolution=256), (1, 4, 32, 32)),
}
# Sampling and training reuse the U-Net configs. (prompts, latent side, DDIM steps) and (batch, side).
SAMPLING = {"tiny": (4, 16, 20), "sd1": (1, 32, 10)}
TRAINING = {"tiny": (8, 16), "small": (2, 32), "sd1": (1, 32)}
GUIDANCE = 7.5
PRECISION = "fp32"  # of the training step: --precision


@dataclass
class Case:
    """One comparison: zero-argument callables per side returning the output to compare.

    `theirs` maps a memory layout to diffusers' runner in that layout (converting the model when
    called). `compare` gives max |ours - diffusers| when comparing the first outputs does not (the
    training step changes the shared weights). `release` frees a side's persistent state.
    """

    description: str
    ours: Callable[[], torch.Tensor]
    theirs: Callable[[str], Callable[[], torch.Tensor]]
    layouts: tuple[str, ...] = ("NCHW", "channels_last")
    compiled: Callable[[], torch.Tensor] | None = None  # ours through layers.compile_for_inference
    compare: Callable[[], float] | None = None
    release: Callable[[str], None] = lambda side: None
    sequential: bool = False  # run all of one side, release it, then the other (memory)


# -- shared weights ---------------------------------------------------------------------------------

def share_weights(twin: torch.nn.Module, converted: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load `converted` (views of our tensors) into `twin` by assignment, so both models use one copy."""
    twin.load_state_dict({k: v.detach() for k, v in converted.items()}, strict=True, assign=True)
    return twin.eval()


def unet_pair(name: str) -> tuple[UNetModel, torch.nn.Module, dict]:
    """Our U-Net for config `name` (deterministic random weights) and diffusers' twin sharing them."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    params = UNET_CONFIGS[name][0]
    torch.manual_seed(0)
    ours = UNetModel(**params).eval()
    randomize_zero_init(ours)
    config = diffusers_config(params)
    with torch.device("meta"):
        twin = UNet2DConditionModel(**config)
    state = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    return ours, share_weights(twin, convert_ldm_unet_checkpoint(state, config)), params


def vae_pair(name: str) -> tuple[AutoencoderKL, torch.nn.Module]:
    """Our AutoencoderKL and diffusers' AutoencoderKL with the same (random) weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg, _ = VAE_CONFIGS[name]
    torch.manual_seed(0)
    ours = AutoencoderKL(ddconfig=cfg, embed_dim=4).eval()
    levels = len(cfg.ch_mult)
    config = dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.z_channels,
                  block_out_channels=[cfg.ch * m for m in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
                  down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                  norm_num_groups=cfg.norm_num_groups, sample_size=cfg.resolution)
    with torch.device("meta"):
        twin = DiffusersAutoencoderKL(**config)
    state = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
    return ours, share_weights(twin, convert_ldm_vae_checkpoint(state, config))


def in_layout(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    return model.to(memory_format=LAYOUTS[layout])


# -- cases ------------------------------------------------------------------------------------------

def unet_case(name: str, compile_ours: bool = False) -> Case:
    ours, twin, params = unet_pair(name)
    _, batch, size, context_len = UNET_CONFIGS[name]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, params["in_channels"], size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, context_len, params["context_dim"], generator=generator)

    def theirs(layout: str):
        model, x_layout = in_layout(twin, layout), x.contiguous(memory_format=LAYOUTS[layout])
        return lambda: model(x_layout, t, context).sample
    compiled = compile_for_inference(ours) if compile_ours else None
    return Case(f"U-Net forward, batch {batch}, {size}x{size} latents, context {context_len}x{params['context_dim']}",
                lambda: ours(x, t, context), theirs, compiled=None if compiled is None else lambda: compiled(x, t, context))


def vae_case(name: str, compile_ours: bool = False) -> Case:
    ours, twin = vae_pair(name)
    shape = VAE_CONFIGS[name][1]
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def theirs(layout: str):
        model, z_layout = in_layout(twin, layout), z.contiguous(memory_format=LAYOUTS[layout])
        return lambda: model.decode(z_layout).sample
    factor = 2 ** (len(VAE_CONFIGS[name][0].ch_mult) - 1)
    return Case(f"VAE decode {shape[0]}x{shape[1]}x{shape[2]}x{shape[3]} -> {shape[2] * factor}x{shape[3] * factor}",
                lambda: ours.decode(z), theirs)


def sd_schedulers() -> tuple[Diffusion, object]:
    """SD's noise schedule on both sides; our 'uniform' spacing is diffusers' 'leading' + steps_offset 1 when
    the step count divides 1000 (the cases here)."""
    from diffusers import DDIMScheduler

    diffusion = Diffusion(NoiseSchedule.from_config(ScheduleConfig(kind="ldm-linear")))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return diffusion, scheduler


def sampling_case(name: str, compile_ours: bool = False) -> Case:
    ours, twin, params = unet_pair(name)
    prompts, side, steps = SAMPLING[name]
    context_len = UNET_CONFIGS[name][3]
    diffusion, scheduler = sd_schedulers()
    generator = torch.Generator().manual_seed(1)
    cond = torch.randn(prompts, context_len, params["context_dim"], generator=generator)
    uncond = torch.randn(prompts, context_len, params["context_dim"], generator=generator)
    shape = (prompts, params["in_channels"], side, side)
    seeds = lambda: [torch.Generator().manual_seed(i) for i in range(prompts)]  # noqa: E731

    def run_ours(unet: Callable[..., torch.Tensor] = ours) -> torch.Tensor:
        denoiser = Denoiser(ClassifierFreeGuidance(unet, diffusion, cond, uncond, GUIDANCE), diffusion)
        return sample_latents(denoiser, shape, generators=seeds(), sampler="ddim", steps=steps, spacing="uniform")

    def theirs(layout: str):
        model, memory_format = in_layout(twin, layout), LAYOUTS[layout]
        context = torch.cat([uncond, cond])

        @torch.inference_mode()
        def run() -> torch.Tensor:  # the loop of diffusers' StableDiffusionPipeline, latents only
            scheduler.set_timesteps(steps)
            latents = randn(shape, seeds()) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                both = scheduler.scale_model_input(torch.cat([latents] * 2), t).contiguous(memory_format=memory_format)
                eps_uncond, eps_cond = model(both, t, encoder_hidden_states=context).sample.chunk(2)
                eps = eps_uncond + GUIDANCE * (eps_cond - eps_uncond)
                latents = scheduler.step(eps, t, latents).prev_sample
            return latents
        return run
    compiled = compile_for_inference(ours) if compile_ours else None
    return Case(f"DDIM {steps} steps, CFG {GUIDANCE}, {prompts} x {side}x{side} latents", run_ours, theirs,
                compiled=None if compiled is None else lambda: run_ours(compiled))


def train_case(name: str, compile_ours: bool = False) -> Case:
    """One optimizer step of eps-MSE training. Ours as train_stage2.py runs it (`Diffusion.training_losses`,
    `training.optimizers.adam`: fused AdamW); diffusers' as its train_text_to_image.py, in NCHW and in
    channels_last, with the fused AdamW too (its best setting). Under `--precision bf16` both sides run
    in bf16 autocast, as `train.mixed_precision=bf16` and accelerate's `--mixed_precision bf16` do.
    `compile_ours`: also ours through plain `torch.compile` (inductor, weights not frozen: they train),
    with an optimizer of its own over the same parameters; its "max |compiled - eager|" is the loss
    after the eager warm-up step's update (lr 1e-5), not at the same weights."""
    from training.optimizers import adam

    ours, twin, params = unet_pair(name)
    batch, side = TRAINING[name]
    context_len = UNET_CONFIGS[name][3]
    ours.train()
    twin.train()
    diffusion, _ = sd_schedulers()
    from diffusers import DDPMScheduler
    noiser = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, params["in_channels"], side, side, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, context_len, params["context_dim"], generator=generator)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16")  # noqa: E731

    def step(key: str, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in optimizers:  # (channels_last gives diffusers' model weights of its own)
            optimizers[key] = adam(model.parameters(), decoupled_weight_decay=True, lr=1e-5)
        with autocast():
            loss = loss_fn()
        loss.backward()
        optimizers[key].step()
        optimizers[key].zero_grad(set_to_none=True)
        return loss.detach()

    def ours_loss(model: torch.nn.Module = ours) -> torch.Tensor:  # model: ours, or ours compiled
        return diffusion.training_losses(model, x0, {"context": context}, t=t, noise=noise)["loss"].mean()

    def theirs_loss(model: torch.nn.Module, memory_format: torch.memory_format) -> torch.Tensor:
        noisy = noiser.add_noise(x0, noise, t).contiguous(memory_format=memory_format)
        return F.mse_loss(model(noisy, t, context).sample.float(), noise)

    def compare() -> float:  # the loss at the initial weights, through each side's training path
        with autocast():
            return (ours_loss() - theirs_loss(twin, torch.contiguous_format)).abs().item()

    def theirs(layout: str):
        model = in_layout(twin, layout)
        return lambda: step(layout, model, lambda: theirs_loss(model, LAYOUTS[layout]))

    def release(side_name: str) -> None:
        for key in [k for k in optimizers if k.startswith("ours") == (side_name == "ours")]:
            del optimizers[key]
    compiled = None
    if compile_ours:
        net = torch.compile(ours, dynamic=False)
        compiled = lambda: step("ours compiled", net, lambda: ours_loss(net))  # noqa: E731
    return Case(f"training step (eps-MSE forward + backward + fused AdamW, {PRECISION}), batch {batch}, "
                f"{side}x{side} latents", lambda: step("ours", ours, ours_loss), theirs, compare=compare,
                compiled=compiled, release=release, sequential=name == "sd1")


BUILDERS = {"unet": unet_case, "vae": vae_case, "sampling": sampling_case, "train": train_case}


# -- measuring --------------------------------------------------------------------------------------

def count_flops(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(FLOPs of one call, its output). Adds the CPU flash-attention kernels the counter lacks."""
    aten = torch.ops.aten

    def forward(q, k, v, *args, **kwargs):
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def resident_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def working_memory(fn: Callable[[], object]) -> float:
    """Peak resident MiB above the current resident size during one call of fn."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident size
    before = resident_mib("VmRSS")
    fn()
    return resident_mib("VmHWM") - before


def probe_memory(case_name: str, config: str) -> dict[str, float]:
    """Working memory of each side (MiB), measured in a fresh subprocess (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, __file__, "--probe-memory", case_name, config, "--threads", str(torch.get_num_threads()),
               "--precision", PRECISION]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_probe(case_name: str, config: str) -> None:
    case = BUILDERS[case_name](config, False)
    grad = torch.enable_grad() if case_name == "train" else torch.inference_mode()
    memory = {}
    with grad:
        # Each side is warmed up first (oneDNN's kernels, the optimizer's state), then measured.
        case.ours()
        memory["ours"] = working_memory(case.ours)
        case.release("ours")
        for layout in case.layouts:
            run_theirs = case.theirs(layout)
            run_theirs()
            memory[f"diffusers {layout}"] = working_memory(run_theirs)
    print(json.dumps(memory))


def timed_runs(case: Case, runs: int, clock) -> tuple[dict[str, list[float]], dict[str, list[float]], float, float,
                                                     float]:
    """Times (s) per side and layout; paired speed-ups (each diffusers call over the call of ours, or
    of ours compiled, just before it; keys "diffusers <layout>" and "compiled <layout>"), which
    drift in the machine's speed during a run does not bias; max |diff| of the outputs; FLOPs per
    call; compile seconds."""
    times: dict[str, list[float]] = {"ours": []}
    ratios: dict[str, list[float]] = {}

    def timed(fn) -> float:
        start = clock()
        fn()
        return clock() - start

    max_diff = case.compare() if case.compare else float("nan")
    reference = case.ours()  # warm-up (oneDNN builds its kernels per shape) and the output to compare
    compile_seconds = float("nan")
    if case.compiled:
        start = time.perf_counter()
        compiled_diff = (case.compiled().float() - reference.float()).abs().max().item()
        compile_seconds = time.perf_counter() - start
        print(f"  compiled in {compile_seconds:.1f} s wall (first call); max |compiled - eager| {compiled_diff:.1e}",
              flush=True)
        times["ours compiled"] = []
    if case.sequential:
        times["ours"] = [timed(case.ours) for _ in range(runs)]
        case.release("ours")
    for layout in case.layouts:
        key = f"diffusers {layout}"
        run_theirs = case.theirs(layout)
        if layout == "NCHW":
            flops, output = count_flops(run_theirs)
            if case.compare is None:
                max_diff = (reference.float() - output.float()).abs().max().item()
        else:
            run_theirs()
        times[key] = []
        for _ in range(runs):
            if not case.sequential:
                times["ours"].append(timed(case.ours))
            if case.compiled:
                times["ours compiled"].append(timed(case.compiled))
            times[key].append(timed(run_theirs))
            if not case.sequential:
                ratios.setdefault(key, []).append(times[key][-1] / times["ours"][-1])
            if case.compiled:
                ratios.setdefault(f"compiled {layout}", []).append(times[key][-1] / times["ours compiled"][-1])
    case.release("theirs")
    return times, ratios, max_diff, flops, compile_seconds


def run_case(case_name: str, config: str, args: argparse.Namespace, clock) -> str:
    """Time one case in this process; print and return its table row."""
    case = BUILDERS[case_name](config, args.compile)
    print(f"{case_name} {config}: {case.description}", flush=True)
    grad = torch.enable_grad() if case_name == "train" else torch.inference_mode()
    with grad:
        times, ratios, max_diff, flops, compile_seconds = timed_runs(case, args.runs, clock)
    del case
    medians = {key: statistics.median(values) for key, values in times.items()}
    best_key = min((k for k in medians if k.startswith("diffusers")), key=medians.get)
    best = medians[best_key]
    # Against diffusers' faster layout: the smaller of the per-layout paired speed-ups.
    speedup = min((statistics.median(ratios[k]) for k in ratios if k.startswith("diffusers")),
                  default=best / medians["ours"])
    compiled_speedup = min((statistics.median(ratios[k]) for k in ratios if k.startswith("compiled")),
                           default=float("nan"))
    memory = probe_memory(case_name, config) if args.memory else {}
    fmt = lambda s: f"{s * 1e3:,.1f} ms" if s < 1 else f"{s:,.2f} s"  # noqa: E731
    cells = {key: fmt(medians[key]) for key in medians}
    mem = (f"{memory['ours']:,.0f} / {memory[best_key]:,.0f}" if memory else "-")
    row = (f"| {case_name} | {config} | {cells['ours']} | {cells.get('diffusers NCHW', '-')} | "
           f"{cells.get('diffusers channels_last', '-')} | {speedup:.2f}x | {flops / 1e9:,.1f} | "
           f"{flops / medians['ours'] / 1e9:.0f} / {flops / best / 1e9:.0f} | {mem} | {max_diff:.1e} | ")
    if "ours compiled" in cells:
        row += f"{cells['ours compiled']} ({compiled_speedup:.2f}x; {compile_seconds:.0f} s) |"
    else:
        row += "- |"
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "sd1"],
                        help="configs to run (each case runs those it has: vae and sampling have no 'small')")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side and layout")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true", help="time with the main thread's CPU clock")
    parser.add_argument("--compile", action="store_true",
                        help="also time ours through layers.compile_for_inference (U-Net, sampling) "
                             "or plain torch.compile (train)")
    parser.add_argument("--memory", action="store_true", help="also measure working memory in subprocesses")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the training step's precision on both sides (bf16: autocast)")
    parser.add_argument("--probe-memory", nargs=2, metavar=("CASE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PRECISION
    PRECISION = args.precision
    if args.threads:
        torch.set_num_threads(args.threads)
    # Denormal floats (random weights make some) slow both sides' CPU kernels unevenly: measured
    # up to 16% on diffusers' tiny U-Net forward, 4% on ours. Flushing them to zero times the
    # kernels, not the artifact, and is what CPU inference should run with anyway.
    torch.set_flush_denormal(True)
    if args.probe_memory:
        run_probe(*args.probe_memory)
        return
    clock = time.thread_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time, "
          f"median of {args.runs} runs", flush=True)
    rows = ["| case | config | ours | diffusers NCHW | diffusers channels_last | speed-up | GFLOP | "
            "GFLOP/s ours / diffusers | working memory ours / diffusers (MiB) | max abs diff | "
            "ours compiled (speed-up; compile s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = [(c, config) for c in args.cases for config in args.configs if config in CASE_CONFIGS[c]]
    for case_name, config in pairs:
        if len(pairs) == 1:
            row = run_case(case_name, config, args, clock)
        else:  # a fresh process per case: no allocator or kernel-cache state carried over from the last one
            command = [sys.executable, __file__, *sys.argv[1:], "--cases", case_name, "--configs", config]
            result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            lines = result.stdout.strip().splitlines()
            print("\n".join(lines[1:lines.index("")]), flush=True)  # its progress and row, not its table
            row = lines[-1]
        rows.append(row)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
