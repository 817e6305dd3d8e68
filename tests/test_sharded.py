"""Sharded data parallelism (train.shard=fsdp, torch FSDP2 over gloo): 2 CPU processes train the model the
unsharded processes train, save checkpoints in the same format (full tensors that load strictly into
`UNetModel`), and resume, sharded or not."""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from accelerate.utils import DistributedType
from torch import nn

from common.config import ConfigError
from common.weights import load_state_dict_strict
from ldm.latent_diffusion import LatentDiffusion
from ldm.unet import UNetModel
import training.loop
from training import TrainConfig, TrainingTask, train

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ONE = [sys.executable]
TWO = [BIN / "torchrun", "--nproc_per_node", "2", "--master_port", "29527"]
# grad_clip 1.1: the first step's gradient norm (1.05) is below it and the second's (1.17) above, so the Adam
# moments show both the gradients' scale (FSDP's average) and the clipping of sharded gradients (global norm).
STAGE2 = ["--config", "ldm/tiny", "data.shapes_length=16", "train.log_every=1", "train.checkpoint_every=1",
          "latent_cache=true", "optim.lr=1e-4", "train.grad_clip=1.1", "train.max_steps=2", "train.ema_decay=0.9",
          "train.image_every=2", "samples.prompts=[a red circle]", "samples.steps=2"]


def _run(command: list) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _stage2(launcher: list, stage1: Path, out: Path, batch: int, *extra: str) -> subprocess.CompletedProcess:
    return _run([*launcher, ROOT / "train_stage2.py", *STAGE2, "--first-stage", stage1, f"train.output_dir={out}",
                 f"train.batch_size={batch}", *extra])


def _weights(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / f"{name}.safetensors")


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_sharded_processes_train_save_and_resume_like_unsharded_ones(tmp_path):
    stage1 = tmp_path / "stage1"
    _run([sys.executable, ROOT / "train_stage1.py", "--config", "autoencoder/tiny-kl", "data.shapes_length=8",
          "train.batch_size=2", "scale_factor_batches=1", "train.max_steps=1", f"train.output_dir={stage1}"])
    stage1 = stage1 / "autoencoder.safetensors"
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    _stage2(TWO, stage1, plain, 2)
    log = _stage2(TWO, stage1, sharded, 2, "train.shard=fsdp").stderr
    assert log.count("unet, text_encoder sharded over 2 processes") == 2

    # Full tensors, as an unsharded run saves them: the U-Net's load strictly into UNetModel.
    unet = LatentDiffusion.load(sharded / "model.safetensors").unet
    assert isinstance(unet, UNetModel)
    load_state_dict_strict(unet, _weights(sharded, 2, "unet"), "unet.safetensors")
    for step in (1, 2):  # the same global batch gives the same model, EMA and optimizer state
        for name in ("unet", "text_encoder", "ema"):
            assert _max_difference(_weights(plain, step, name), _weights(sharded, step, name)) < 1e-5, (step, name)
    optimizers = [torch.load(run / "checkpoints/step_00000002/optimizers.pt", weights_only=True)["optimizers"]["unet"]
                  for run in (plain, sharded)]
    assert optimizers[0]["param_groups"] == optimizers[1]["param_groups"]
    for index, state in optimizers[0]["state"].items():
        for key, value in state.items():
            assert torch.allclose(value, optimizers[1]["state"][index][key], rtol=1e-4, atol=1e-9), (index, key)
    # The image grid ran the sharded model on both processes; the main one wrote it, once.
    assert [p.name for p in (sharded / "images").iterdir()] == ["samples_00000002.png"]

    # Resume the sharded run's step 1: sharded (without EMA, so the export takes the trained weights from
    # the last checkpoint) and on one unsharded process; both reach the uninterrupted run's step 2.
    for resumed in ("again", "one"):
        shutil.copytree(sharded / "checkpoints" / "step_00000001", tmp_path / resumed / "checkpoints" / "step_00000001")
    _stage2(TWO, stage1, tmp_path / "again", 2, "train.shard=fsdp", "train.ema_decay=null", "--resume")
    _stage2(ONE, stage1, tmp_path / "one", 4, "--resume")
    for name in ("unet", "text_encoder"):
        assert torch.equal(torch.cat([v.flatten() for v in _weights(tmp_path / "again", 2, name).values()]),
                           torch.cat([v.flatten() for v in _weights(sharded, 2, name).values()])), name
        assert _max_difference(_weights(tmp_path / "one", 2, name), _weights(sharded, 2, name)) < 1e-5, name
    exported = load_file(tmp_path / "again" / "model.safetensors")
    assert _max_difference({k[len("unet."):]: v for k, v in exported.items() if k.startswith("unet.")},
                           _weights(sharded, 2, "unet")) == 0


class _Task(TrainingTask):
    def setup(self, accelerator):
        net = nn.Linear(2, 2)
        self.modules, self.optimizers, self.schedulers = {"net": net}, {"net": torch.optim.SGD(net.parameters())}, {}


def test_what_cannot_be_sharded_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"_Task cannot shard its module\(s\) \['net'\]"):
        train(_Task(), [{"x": torch.zeros(2)}] * 4, TrainConfig(output_dir=str(tmp_path), batch_size=2, shard="fsdp"))
    with pytest.raises(ValueError, match="fp16"):
        TrainConfig(shard="fsdp", mixed_precision="fp16")


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_accelerates_own_sharding_configs_are_refused(tmp_path, monkeypatch, kind):
    """They shard only models handed to accelerator.prepare (on GPUs: untestable here), so a run would not be sharded."""
    monkeypatch.setattr(training.loop, "Accelerator", lambda **kwargs: SimpleNamespace(scaler=None, distributed_type=kind))
    with pytest.raises(ConfigError, match=r"configs/accelerate/fsdp-8gpu.yaml, and set train.shard=fsdp"):
        train(_Task(), [], TrainConfig(output_dir=str(tmp_path)))
