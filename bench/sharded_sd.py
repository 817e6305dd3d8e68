"""Fine-tuning an SD 1.x-size U-Net sharded over processes (train.shard=fsdp), on CPUs: peak memory per process.

    python bench/sharded_sd.py                  # 2 sharded processes, then the check
    python bench/sharded_sd.py --unsharded      # and one unsharded process with the same global batch, afterwards
    python bench/sharded_sd.py --latent 16 --out /tmp/sharded_sd --keep

1. `torchrun --nproc_per_node 2` runs this file's worker: each process builds the U-Net of
   configs/sd/v1-inference.yaml (859.5 M parameters, random init, seed 0), and the shared loop
   (`training.loop.train`, train.shard=fsdp) shards it block by block over gloo, takes one AdamW step
   (grad clip 1.0) on one sample per process (random latents [4, L, L], CLIP-size context [77, 768],
   timestep and noise drawn from the sample's own generator) and saves a checkpoint: full tensors,
   gathered by both processes for the main one.
2. With --unsharded, one process then trains the same global batch (2 samples) unsharded: two
   unsharded processes would need about 2 x 14 GB, so it runs alone, after the sharded ones.
3. A fresh process loads the checkpoint's unet.safetensors strictly into a UNetModel (and compares it
   with the unsharded run's).
Each worker reports its peak RSS (`ru_maxrss`) through the optimizer step and in all (with the save:
the main process holds one file's full tensors at a time), and the times of set-up + step and of the save. This orchestrating process imports no torch
(`ru_maxrss` survives fork + exec, so a large parent would inflate its children's figures); it stops
the workers if the machine's available memory falls below --min-free-gib.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs/sd/v1-inference.yaml"
GLOBAL_BATCH = 2


# -- the worker: one training process ------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    from torch.utils.data import Dataset

    from common.randomness import randn, sample_generators
    from ldm.original_config import parse_original_config
    from ldm.unet import UNetModel
    from training import TrainConfig, TrainingTask, train

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    latent = args.latent

    class Samples(Dataset):
        def __len__(self):
            return GLOBAL_BATCH

        def __getitem__(self, key):
            return {"key": torch.tensor(key)}

    class UNetFineTune(TrainingTask):
        """Noise prediction on random latents: the U-Net's part of a stage-2 fine-tune."""

        def __init__(self, unet):
            self.unet = unet

        def setup(self, accelerator):
            self.unet.to(accelerator.device).train()
            opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-5, weight_decay=0.01)
            self.optimizers, self.schedulers = {"unet": accelerator.prepare(opt)}, {}
            self.modules = {"unet": self.unet}
            self.shardable = ("unet",)

        def training_step(self, batch, step):
            g = sample_generators(0, batch["sample_key"])
            x0, noise = randn((len(g), 4, latent, latent), g), randn((len(g), 4, latent, latent), g)
            context = randn((len(g), 77, 768), g)
            t = torch.cat([torch.randint(0, 1000, (1,), generator=gen) for gen in g])
            alpha = (1 - t.float() / 1000).view(-1, 1, 1, 1)
            loss = (self.unet(alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise, t, context=context) - noise).pow(2).mean()
            yield "unet", loss, {"loss": loss.item()}
            # The loop has stepped the optimizer when it resumes this generator: the figures before the save.
            self.stepped = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    tic = time.perf_counter()
    torch.manual_seed(0)
    unet = UNetModel(parse_original_config(CONFIG).ldm.unet)
    built = time.perf_counter() - tic
    cfg = TrainConfig(output_dir=str(args.folder), batch_size=GLOBAL_BATCH // world, max_steps=1, log_every=1,
                      checkpoint_every=1, grad_clip=1.0, shard=args.shard)
    task = UNetFineTune(unet)
    tic = time.perf_counter()
    train(task, Samples(), cfg)
    stepped, step_peak = task.stepped
    report = {"rank": rank, "world": world, "shard": args.shard, "build_s": round(built, 1),
              "step_s": round(stepped - tic, 1), "save_s": round(time.perf_counter() - stepped, 1),
              "peak_rss_to_step_gib": round(step_peak, 2),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    (Path(args.folder) / f"report_rank{rank}.json").write_text(json.dumps(report))


def check(args: argparse.Namespace) -> None:
    """The checkpoint's unet.safetensors into a fresh UNetModel, strictly; the largest difference from another's."""
    import torch

    from common.weights import load_state_dict_strict, load_weights
    from ldm.original_config import parse_original_config
    from ldm.unet import UNetModel

    with torch.device("meta"):
        unet = UNetModel(parse_original_config(CONFIG).ldm.unet)
    path = Path(args.folder) / "checkpoints/step_00000001/unet.safetensors"
    weights = load_weights(path)
    load_state_dict_strict(unet, weights, path, assign=True)
    result = {"loads_strictly": True, "tensors": len(weights)}
    if args.other:
        other = load_weights(Path(args.other) / "checkpoints/step_00000001/unet.safetensors")
        result["max_abs_difference"] = max((weights[k] - other[k]).abs().max().item() for k in weights)
    print(json.dumps(result))


# -- the orchestrator --------------------------------------------------------------------------------

def available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def launch(command: list[str], min_free: float) -> None:
    """Run `command` in its own process group; stop the group if available memory falls below `min_free`."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    low = []

    def watch():
        while proc.poll() is None:
            free = available_gib()
            if free < min_free:
                low.append(free)
                os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    code = proc.wait()
    if low:
        sys.exit(f"stopped: the machine had {low[0]:.1f} GiB available (< --min-free-gib {min_free})")
    if code:
        sys.exit(f"{command[0]} exited with {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=8, help="latent side L (8: 64x64 images)")
    parser.add_argument("--unsharded", action="store_true", help="also one unsharded process (needs about 14 GB)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sharded_sd"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (about 10 GB per run)")
    parser.add_argument("--min-free-gib", type=float, default=1.0)
    parser.add_argument("--port", type=int, default=29537)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="fsdp", help=argparse.SUPPRESS)
    parser.add_argument("--other", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.check:
        return check(args)

    shutil.rmtree(args.out, ignore_errors=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--latent", str(args.latent)]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    runs = {"sharded": [torchrun, "--nproc_per_node", "2", "--master_port", str(args.port), *me[1:], "--worker",
                        "--shard", "fsdp", "--folder", str(args.out / "sharded")]}
    if args.unsharded:
        runs["unsharded"] = [*me, "--worker", "--shard", "none", "--folder", str(args.out / "unsharded")]
    reports = {}
    for name, command in runs.items():
        print(f"== {name}: {' '.join(command)}", flush=True)
        launch(command, args.min_free_gib)
        reports[name] = [json.loads(p.read_text()) for p in sorted((args.out / name).glob("report_rank*.json"))]
    checked = subprocess.run([*me, "--check", "--folder", str(args.out / "sharded"),
                              *(["--other", str(args.out / "unsharded")] if args.unsharded else [])],
                             cwd=ROOT, capture_output=True, text=True, check=True)
    print(json.dumps({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "latent": args.latent,
                      "runs": reports, "check": json.loads(checked.stdout.strip().splitlines()[-1])}, indent=1))
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
