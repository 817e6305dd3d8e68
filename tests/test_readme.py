"""README's "Train your own" commands, run as written from a folder outside the project, with tiny budgets
appended (later overrides win), so that README and code cannot drift apart."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train.max_steps=2", "train.batch_size=2", "data.shapes_length=8", "train.image_every=0",
         "train.log_every=1"]
TINY = {"ldm-train-stage1": [*TRAIN, "scale_factor_batches=1"], "ldm-train-stage2": TRAIN,
        "ldm-train-controlnet": TRAIN, "ldm-generate": ["--steps", "2"], "python": []}


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block after `heading`, continuation lines joined, comments left out."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index(heading):].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_train_your_own_runs_as_written(tmp_path):
    commands = readme_block("## Train your own")
    assert commands[0] == ". .venv/bin/activate"  # run in the project folder; puts .venv/bin on PATH
    bin_folder = Path(sys.executable).parent  # what activating .venv puts first on PATH
    assert (bin_folder / "ldm-train-stage1").is_file(), "the console scripts are installed with the project"
    env = {**os.environ, "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    for command in commands[1:]:
        program = shlex.split(command)[0]
        assert program in TINY, f"README runs {program!r}, which this test does not know how to shrink"
        shrunk = " ".join([command, *TINY[program]])
        result = subprocess.run(["bash", "-c", shrunk], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    runs = tmp_path / "runs" / "shapes"
    assert (runs / "stage2" / "model.safetensors").is_file() and (runs / "controlnet" / "controlnet.safetensors").is_file()
    images = [p.name for p in (runs / "images").glob("*.png") if not p.name.startswith("grid-")]
    assert len(images) == 5, images  # four text-to-image, then one controlled: none replaced
