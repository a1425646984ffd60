"""The diagonal Gaussian posterior shared by every VAE in shapeflow (VecSet and voxel-grid)."""

from __future__ import annotations

import torch


class DiagonalGaussian:
    """``N(mean, diag(exp(logvar)))`` with the reparameterisation trick.

    ``mean`` and ``logvar`` have any identical shape: ``(b, m, c)`` token latents or ``(b, c, d, h, w)``
    grid latents. ``logvar`` is clamped to ``[-30, 20]`` (as in the public VAEs) so ``exp`` stays finite.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        if mean.shape != logvar.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ in shape")
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor, dim: int) -> "DiagonalGaussian":
        """Split ``moments`` in two halves along ``dim`` into mean and log-variance."""
        mean, logvar = moments.chunk(2, dim=dim)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised sample ``mean + std * eps``, ``eps ~ N(0, I)`` (differentiable in mean/std)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The posterior mean (deterministic encoding)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """``KL(q || N(0, I))`` per sample, **averaged** over all latent elements: shape ``(b,)``.

        Closed form per element: ``0.5 * (mean^2 + var - 1 - logvar)``. The mean over elements (not the
        sum) follows Hunyuan3D-2.1 and TRELLIS, so KL weights transfer between token and grid latents.
        """
        per_elem = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return per_elem.flatten(1).mean(dim=1)
