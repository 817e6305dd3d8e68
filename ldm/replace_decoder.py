"""Put a fine-tuned decoder into a stage-2 model file, as SD swapped in its fine-tuned VAE decoders.

    python train_stage1.py --config configs/autoencoder/kl-f4-emoji64.yaml \\
        init_from=models/default/model.safetensors train_part=decoder train.output_dir=runs/decoder
    python -m ldm.replace_decoder models/default/model.safetensors runs/decoder/autoencoder.safetensors \\
        --out runs/decoder/model.safetensors

Only the decoder side (`post_quant_conv`, `decoder`) may differ: an autoencoder whose encoder, latent
config or scale factor differ from the model's maps images to other latents than its U-Net learned, and
is refused. The written file is the model file with those tensors replaced (in the model file's dtypes)
and its metadata plus `same_unet_as`: the sha256 of every file whose U-Net it shares, so that ControlNets
and LoRAs trained on the original still count as trained on it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from autoencoder.model_file import load_autoencoder
from common.cli import ArgumentParser, run
from common.weights import CheckpointError, load_weights, read_metadata, save_weights
from ldm.latent_diffusion import LatentDiffusion, same_unet_as

DECODER_PARTS = ("post_quant_conv.", "decoder.")
PREFIX = "autoencoder."


def replace_decoder(model_path: str | Path, autoencoder_path: str | Path, out: str | Path) -> list[str]:
    """Write `model_path` with the decoder of `autoencoder_path` (a stage-1 or stage-2 file) to `out`.

    Returns the names of the autoencoder tensors that changed. A CheckpointError when the autoencoder is
    not a decoder fine-tune of the model's (another config, scale factor or any non-decoder tensor)."""
    _, model_ae_cfg, model_scale = LatentDiffusion.read_configs(model_path)
    autoencoder, ae_cfg, scale = load_autoencoder(autoencoder_path)
    if ae_cfg != model_ae_cfg or scale != model_scale:
        raise CheckpointError(f"{autoencoder_path} is another autoencoder than {model_path}'s (config or scale "
                              f"factor {scale} against {model_scale}); fine-tune its decoder with train_stage1.py "
                              f"init_from={model_path} train_part=decoder")
    tensors, meta = load_weights(model_path), read_metadata(model_path)
    changed = []
    for key, value in autoencoder.state_dict().items():
        current = tensors[PREFIX + key]
        value = value.to(current.dtype)
        if torch.equal(value, current):
            continue
        if not key.startswith(DECODER_PARTS):
            raise CheckpointError(f"{autoencoder_path}: its '{key}' differs from {model_path}'s, so it maps images to "
                                  f"other latents than the U-Net was trained on; only a decoder fine-tuned with "
                                  f"train_stage1.py init_from={model_path} train_part=decoder can replace it")
        tensors[PREFIX + key] = value
        changed.append(key)
    meta["same_unet_as"] = sorted(same_unet_as(model_path))
    save_weights(tensors, out, meta)
    return changed


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a stage-2 model.safetensors")
    parser.add_argument("autoencoder", help="autoencoder.safetensors from train_stage1.py ... train_part=decoder")
    parser.add_argument("--out", required=True, help="the new model file")
    args = parser.parse_args()
    changed = replace_decoder(args.model, args.autoencoder, args.out)
    print(f"wrote {args.out}: {len(changed)} decoder tensors replaced")


if __name__ == "__main__":
    run(main)
