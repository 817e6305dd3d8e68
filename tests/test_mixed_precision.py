"""fp16 with a GradScaler: two optimizers under gradient accumulation, and exact resume.

accelerate gives a CPU run neither fp16 autocast nor a scaler, so the `cpu_fp16` fixture makes `train`
build an accelerator with both (torch has them on CPU); everything else is the loop that users run.
"""
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from test_training_loop import GanLikeTask, NoisyRegression, _cfg
from torch import nn
from torch.utils.data import Dataset

import training.loop
from common.weights import load_torch, load_weights, save_torch
from training import TrainConfig, TrainingTask, train

GEN_INIT = torch.tensor([[0.5, -0.25], [0.75, 1.0]])
DISC_INIT = torch.tensor([[0.25, -0.5]])


@pytest.fixture
def cpu_fp16(monkeypatch):
    """`install(**scaler_kwargs)` makes `train` use fp16 autocast and a GradScaler on CPU; it returns the
    list of accelerators made from then on, so a test can read their scalers."""
    made = []

    def install(**scaler_kwargs):
        class CpuFp16Accelerator(Accelerator):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.native_amp = True
                self.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
                made.append(self)

        monkeypatch.setattr(training.loop, "Accelerator", CpuFp16Accelerator)
        return made

    AcceleratorState._reset_state(True)  # the process's accelerate state is fixed to the first precision used
    yield install
    AcceleratorState._reset_state(True)


class Pairs(Dataset):
    """Fixed (x, y) pairs, exact in fp16 so that autocast rounds only the products."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 2, generator=g).half().float()
        self.y = torch.randn(n, 2, generator=g).half().float()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        return {"x": self.x[key % len(self)], "y": self.y[key % len(self)]}


def _losses(gen, disc, x, y):
    fake = gen(x)
    yield "gen", (fake - y).pow(2).mean()
    yield "disc", (disc(x) - 1).pow(2).mean() + disc(fake.detach()).pow(2).mean()


class Adversaries(TrainingTask):
    """A linear generator and discriminator with plain SGD, the discriminator's loss second, as in stage 1's GAN."""

    def __init__(self, lr: float):
        self.gen, self.disc = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.gen.weight.copy_(GEN_INIT)
            self.disc.weight.copy_(DISC_INIT)
        self.lr = lr

    def setup(self, accelerator):
        opts = accelerator.prepare(*(torch.optim.SGD(m.parameters(), lr=self.lr) for m in (self.gen, self.disc)))
        self.modules = {"gen": self.gen, "disc": self.disc}
        self.optimizers = dict(zip(self.modules, opts))
        self.schedulers = {}

    def training_step(self, batch, step):
        for name, loss in _losses(self.gen, self.disc, batch["x"], batch["y"]):
            yield name, loss, {}


def _reference_step(data: Pairs, lr: float, clip: float) -> dict[str, torch.Tensor]:
    """One SGD step of both players in float64 with plain autograd. Equal micro-batches make the accumulated
    gradient that of the whole set's mean loss; each player's is clipped on its own, as torch clips."""
    weights = {"gen": GEN_INIT.double().requires_grad_(), "disc": DISC_INIT.double().requires_grad_()}
    gen = lambda x: x @ weights["gen"].T  # noqa: E731
    disc = lambda x: x @ weights["disc"].T  # noqa: E731
    out = {}
    for name, loss in _losses(gen, disc, data.x.double(), data.y.double()):
        grad, = torch.autograd.grad(loss, weights[name])
        grad = grad * min(1.0, clip / (grad.norm().item() + 1e-6))
        out[name] = weights[name].detach() - lr * grad
    return out


@pytest.mark.parametrize("growth_interval", [2000, 1], ids=["scale-fixed", "scale-grows-every-update"])
@pytest.mark.parametrize("clip", [1.0, None], ids=["clipped", "unclipped"])
def test_fp16_accumulation_steps_both_optimizers_on_the_whole_gradient(tmp_path, cpu_fp16, growth_interval, clip):
    # A scale growing at every update catches an update between one optimizer's micro-batches.
    made = cpu_fp16(init_scale=2.0 ** 10, growth_interval=growth_interval)  # 2**16 would overflow these gradients
    data, lr, accum = Pairs(8), 0.5, 2
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=len(data) // accum, grad_accum=accum, max_steps=1,
                      mixed_precision="fp16", grad_clip=clip)
    folder = train(Adversaries(lr), data, cfg)
    assert made[0].scaler.get_scale() >= 2.0 ** 10  # no overflow, so both steps were taken
    expected = _reference_step(data, lr, clip or float("inf"))
    for name in ("gen", "disc"):
        got = load_weights(folder / f"{name}.safetensors")["weight"].double()
        torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-3, msg=lambda m: f"{name}: {m}")


SCALE_MOVES = {"init_scale": 2.0 ** 12, "growth_interval": 2}  # grows every other step until it overflows


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fp16_resume_is_exact(tmp_path, cpu_fp16, grad_accum):
    made = cpu_fp16(**SCALE_MOVES)
    data = NoisyRegression()
    straight = train(GanLikeTask(), data, _cfg(tmp_path / "a", grad_accum=grad_accum, mixed_precision="fp16"))
    train(GanLikeTask(), data, _cfg(tmp_path / "b", grad_accum=grad_accum, mixed_precision="fp16", max_steps=7))
    resumed = train(GanLikeTask(), data, _cfg(tmp_path / "b", grad_accum=grad_accum, mixed_precision="fp16"),
                    resume=True)
    assert straight.name == resumed.name == "step_00000014"
    for file in ("net.safetensors", "critic.safetensors", "ema.safetensors"):
        a, b = load_weights(straight / file), load_weights(resumed / file)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{file} {k}: {m}")
    assert made[0].scaler.state_dict() == made[2].scaler.state_dict()
    assert made[0].scaler.get_scale() != SCALE_MOVES["init_scale"]


def test_checkpoints_without_scaler_state_resume_with_a_fresh_scaler(tmp_path, cpu_fp16):
    made = cpu_fp16(**SCALE_MOVES)
    cfg = _cfg(tmp_path, mixed_precision="fp16", max_steps=7)
    folder = train(GanLikeTask(), NoisyRegression(), cfg)
    train(GanLikeTask(), NoisyRegression(), cfg, resume=True)  # no step left to take: the scaler stays as loaded
    assert made[1].scaler.state_dict() == made[0].scaler.state_dict()
    states = load_torch(folder / "optimizers.pt")
    del states["scaler"]  # as written before the scaler was saved
    save_torch(states, folder / "optimizers.pt")
    train(GanLikeTask(), NoisyRegression(), cfg, resume=True)
    fresh = torch.amp.GradScaler("cpu", **SCALE_MOVES).state_dict()
    assert made[2].scaler.state_dict() == fresh != made[0].scaler.state_dict()
