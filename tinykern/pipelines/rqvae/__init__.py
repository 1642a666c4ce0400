"""RQ-VAE text-to-image pipeline: an RQ-VAE image tokenizer (4 residual levels on tinykern's
ResidualVQ), a text-conditioned autoregressive code generator (Q4_K Linear layers at inference), and a
refinement UNet. See README.md beside this file."""

from tinykern.pipelines.rqvae.models import PRESETS, RQVAE, Refiner, TokenGenerator

__all__ = ["PRESETS", "RQVAE", "Refiner", "TokenGenerator"]
