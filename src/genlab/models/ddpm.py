"""DDPM: denoising diffusion probabilistic models in pixel space (Ho et al. 2020).

The diffusion runs on the images themselves; everything else — losses, conditioning, guidance,
EMA, samplers — is the shared :class:`~genlab.models.diffusion_model.DiffusionModel`, which
latent diffusion (``models/ldm.py``) runs on a first stage's latents instead.
"""

from __future__ import annotations

from genlab.models.diffusion_model import DiffusionModel


class DDPM(DiffusionModel):
    """Text-, label- or un-conditional DDPM in pixel space, with classifier-free guidance and
    EMA (the arguments are :class:`DiffusionModel`'s)."""

    config_name = "ddpm"
