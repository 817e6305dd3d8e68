"""common.weights writes byte-reproducible files: the same content gives the same sha256 in any process.

A model file's sha256 names the model (a ControlNet records its stage-2 model's), so a `--resume` that
rewrites an unchanged model must write the same bytes. Checked across separate processes with different
PYTHONHASHSEED values, since hash-seeded (and, in safetensors, Rust's per-map random) orders only show
from one process to the next.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.weights import cast_weights_file, file_sha256, load_torch, load_weights, read_metadata, save_weights

ROOT = Path(__file__).resolve().parents[1]

# Written in a fresh interpreter: a model file with several metadata keys (an order that safetensors
# would shuffle), its fp16 copy, and optimizer / trainer state as the training loop saves them.
WRITER = """
import sys
import torch
from common.weights import cast_weights_file, file_sha256, save_torch, save_weights

out = sys.argv[1]
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
metadata = {"format": "ldm-stage2", "config": {"unet": {"ch": 32, "mult": [1, 2]}, "lr": 1e-4},
            "stage1_sha256": "ab" * 32, "scale_factor": 0.18215, "steps": 100, "tags": ["x", "y"],
            "note": "caf\\u00e9 \\u2713", "empty": {}}
save_weights(net.state_dict(), out + "/model.safetensors", metadata)
cast_weights_file(out + "/model.safetensors", out + "/model-fp16.safetensors")
optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
net(torch.randn(2, 3)).sum().backward()
optimizer.step()
save_torch({"optimizers": {"net": optimizer.state_dict()}, "task": {}}, out + "/optimizers.pt")
save_torch({"step": 100, "epoch": 1, "rng": {0: {"torch": torch.get_rng_state()}}}, out + "/trainer_state.pt")
for name in ("model.safetensors", "model-fp16.safetensors", "optimizers.pt", "trainer_state.pt"):
    print(name, file_sha256(out + "/" + name))
"""


def _write_in_fresh_processes(tmp_path: Path, hash_seeds: tuple[int, ...]) -> list[dict[str, str]]:
    """{file name: sha256} from one fresh interpreter per hash seed, run side by side."""
    running = []
    for seed in hash_seeds:
        out = tmp_path / f"p{seed}"
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        running.append(subprocess.Popen([sys.executable, "-c", WRITER, str(out)], env=env, cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    digests = []
    for process in running:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        digests.append(dict(line.split() for line in stdout.splitlines()))
    return digests


def test_the_same_content_gives_the_same_bytes_in_every_process(tmp_path):
    digests = _write_in_fresh_processes(tmp_path, (1, 2, 3))
    assert set(digests[0]) == {"model.safetensors", "model-fp16.safetensors", "optimizers.pt", "trainer_state.pt"}
    differing = [name for name in digests[0] if len({d[name] for d in digests}) > 1]
    assert differing == [], f"different bytes from process to process: {digests}"
    # The canonical files are ordinary files: they load, with their metadata, in any reader.
    model = tmp_path / "p1" / "model.safetensors"
    assert read_metadata(model)["config"] == {"lr": 1e-4, "unet": {"ch": 32, "mult": [1, 2]}}
    assert read_metadata(model)["note"] == "caf\u00e9 \u2713"
    assert load_weights(tmp_path / "p1" / "model-fp16.safetensors")["0.weight"].dtype == torch.float16
    assert load_torch(tmp_path / "p1" / "trainer_state.pt")["step"] == 100


def test_metadata_dicts_built_in_another_order_give_the_same_bytes(tmp_path):
    tensors = {"b": torch.ones(2), "a": torch.zeros(3, dtype=torch.float16), "c": torch.arange(4)}
    save_weights(tensors, tmp_path / "one.safetensors", {"config": {"x": 1, "y": [2, 3]}, "format": "f"})
    save_weights(dict(reversed(tensors.items())), tmp_path / "two.safetensors",
                 {"format": "f", "config": {"y": [2, 3], "x": 1}})
    assert file_sha256(tmp_path / "one.safetensors") == file_sha256(tmp_path / "two.safetensors")
    assert _metadata_keys(tmp_path / "one.safetensors") == ["config", "format"]
    assert read_metadata(tmp_path / "two.safetensors")["config"] == {"x": 1, "y": [2, 3]}
    assert int.from_bytes((tmp_path / "one.safetensors").read_bytes()[:8], "little") % 8 == 0  # data stays aligned


def _metadata_keys(path: Path) -> list[str]:
    data = path.read_bytes()
    return list(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"])


def test_a_cast_copy_of_another_writer_s_file_is_canonical_and_keeps_its_metadata(tmp_path):
    # Another writer's file: plain-string metadata (not JSON), in safetensors' random order.
    metadata = {key: f"value {key}" for key in "hgfedcba"}
    save_file({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"), metadata=metadata)
    cast_weights_file(tmp_path / "other.safetensors", tmp_path / "half.safetensors")
    assert _metadata_keys(tmp_path / "half.safetensors") == sorted(metadata)
    assert read_metadata(tmp_path / "half.safetensors") == metadata
