"""Peak memory of loading an SD 1.x-size original checkpoint, against the file's size.

    python bench/load_memory.py                     # fp32 file (about 4.3 GB, 3.97 GiB) in /tmp, deleted afterwards
    python bench/load_memory.py --dtype fp16 --keep

1. Writes an original-format `.safetensors` with the tensor names and shapes of SD 1.x
   (configs/sd/v1-inference.yaml: U-Net, kl-f8 autoencoder, CLIP ViT-L/14 text encoder, schedule
   buffers) and random values, streaming one tensor at a time, in a subprocess.
2. Loads it as float32 with `load_original_model` in another fresh subprocess and reports that
   process's peak RSS (`ru_maxrss`) after the imports, after loading, and after reading every weight
   once (weights whose dtype matches the file stay mapped from it, so pages arrive when first used), plus its peak
   anonymous memory (RssAnon polled every 20 ms: RSS minus the file-backed pages, which the kernel
   can drop and share). Two full copies would show as a peak of about twice the file size.
   This orchestrating process imports no torch: `ru_maxrss` survives fork + exec, so a large parent
   would inflate the child's figure.
"""
from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs/sd/v1-inference.yaml"
DTYPES = {"fp32": ("float32", "F32"), "fp16": ("float16", "F16")}


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name][0])


def sd1_tensor_shapes() -> dict[str, tuple[list[int], bool]]:
    """Original key -> (shape, is_float) for SD 1.x, read off a model built on the meta device."""
    from ldm.original_config import parse_original_config
    from ldm.original_format import AUTOENCODER_PREFIX, TEXT_PREFIX, UNET_PREFIX, build_empty_model

    model = build_empty_model(parse_original_config(CONFIG))
    shapes = {}
    for prefix, module in ((UNET_PREFIX, model.unet), (AUTOENCODER_PREFIX, model.autoencoder),
                           (TEXT_PREFIX, model.text_encoder)):
        for k, v in module.state_dict().items():
            shapes[prefix + k] = (list(v.shape), v.is_floating_point())
    for k, v in model.diffusion.schedule.buffers().items():
        shapes[k] = (list(v.shape), True)
    return shapes


def write_random_safetensors(path: Path, dtype_name: str, seed: int = 0) -> int:
    """Stream random tensors of SD 1.x's shapes into `path` (safetensors layout); returns the byte size."""
    import torch

    dtype, tag = torch_dtype(dtype_name), DTYPES[dtype_name][1]
    shapes = sd1_tensor_shapes()
    header, offset = {}, 0
    for key, (shape, is_float) in shapes.items():
        size = (torch.tensor([], dtype=dtype if is_float else torch.int64).element_size()
                * int(torch.Size(shape).numel()))
        header[key] = {"dtype": tag if is_float else "I64", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, (shape, is_float) in shapes.items():
            if is_float:
                value = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            else:
                value = torch.zeros(shape, dtype=torch.int64)
            if not key.startswith(("model.", "first_stage_model.", "cond_stage_model.")):  # schedule buffers
                value = _schedule_value(key).to(dtype)
            f.write(value.contiguous().numpy().tobytes())
    return path.stat().st_size


def _schedule_value(key: str) -> torch.Tensor:
    from ldm.schedule import NoiseSchedule, make_betas

    return NoiseSchedule(make_betas("ldm-linear")).buffers()[key]


class AnonPeak:
    """Polls /proc/self/status RssAnon (kB) in a thread and keeps the maximum."""

    def __init__(self, period: float = 0.02):
        self.peak, self.period, self._stop = 0, period, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.period)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def measure_load(path: str) -> dict:
    """Run in the subprocess: import, load, touch every weight, report kB figures."""
    import torch

    from ldm.original_format import load_original_model

    torch.set_num_threads(1)
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    baseline_kb = maxrss()
    start = time.perf_counter()
    with AnonPeak() as anon:
        model = load_original_model(path, CONFIG, dtype=torch.float32)  # CPU inference precision
        seconds = time.perf_counter() - start
        loaded_kb = maxrss()
        with torch.no_grad():
            checksum = sum(float(p.float().sum()) for p in model.parameters())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"baseline_kb": baseline_kb, "loaded_kb": loaded_kb, "peak_rss_kb": maxrss(), "checksum": checksum,
            "peak_anon_kb": anon.peak, "param_bytes": params, "load_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the subprocess entry points
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_load(args.measure)))
        return
    if args.write:
        write_random_safetensors(Path(args.write), args.dtype)
        return
    path = Path(args.dir) / f"sd1-random-{args.dtype}.safetensors"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--write", str(path), "--dtype", args.dtype], check=True)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s", flush=True)
    try:
        out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--dtype", args.dtype],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    gib = 2**20  # kB per GiB
    print(f"file {size / 2**30:.2f} GiB; weights in memory {result['param_bytes'] / 2**30:.2f} GiB; "
          f"loaded in {result['load_seconds']:.1f} s")
    print(f"peak RSS: imports {result['baseline_kb'] / gib:.2f} GiB, after loading {result['loaded_kb'] / gib:.2f} GiB, "
          f"after reading every weight {result['peak_rss_kb'] / gib:.2f} GiB "
          f"({result['peak_rss_kb'] * 1024 / size:.2f} x file size); peak anonymous {result['peak_anon_kb'] / gib:.2f} GiB")
    print("| file | size | peak RSS imports / loaded / all weights read | peak anonymous | load time |")
    print(f"| SD 1.x original, {args.dtype}, random | {size / 2**30:.2f} GiB | {result['baseline_kb'] / gib:.2f} / "
          f"{result['loaded_kb'] / gib:.2f} / {result['peak_rss_kb'] / gib:.2f} GiB | "
          f"{result['peak_anon_kb'] / gib:.2f} GiB | {result['load_seconds']:.1f} s |")


if __name__ == "__main__":
    main()
