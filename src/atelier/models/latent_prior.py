"""Ex-post density estimation in a VAE's latent space (Ghosh et al. 2020, "From variational to deterministic
autoencoders", ICLR, Sec. 4 "Ex-post density estimation").

A VAE trained with the prior ``N(0, I)`` rarely fills it: the aggregate posterior ``q(z) = E_x q(z|x)`` leaves
holes (regions the decoder never saw, which decode to smudges between classes) and mass outside the unit ball.
Ghosh et al. fit a density to the codes of the training set *after* training and sample from it instead; a
Gaussian mixture with ``k`` full-covariance components (``k = 10`` for MNIST) is their cheap, strong choice.

Fitting uses scikit-learn's :class:`~sklearn.mixture.GaussianMixture` (EM, k-means initialisation); the result is
stored as plain torch buffers in :class:`GaussianMixturePrior` (mixture weights ``(k,)``, means ``(k, d)`` and
Cholesky factors of the covariances ``(k, d, d)``), so a checkpoint loads with ``torch.load(weights_only=True)``
and sampling needs torch only. Not done here: the two-stage VAE (Dai & Wipf 2019), which fits a second VAE to the
codes instead of a mixture.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

#: allowed values of ``model.sampling_prior``
SAMPLING_PRIORS = ("gmm", "standard")


@dataclass(frozen=True)
class MixtureFit:
    """A fitted Gaussian mixture and how well it fits.

    Attributes:
        weights: ``(k,)`` mixture weights (sum to 1).
        means: ``(k, d)`` component means.
        scale_tril: ``(k, d, d)`` lower Cholesky factors ``L`` of the component covariances ``Σ = L Lᵀ``.
        mean_log_likelihood: mean ``log p(z)`` (nats per latent) of the fitted points under the mixture.
        standard_log_likelihood: the same under ``N(0, I)``, for comparison.
        num_samples: points fitted.
        converged: whether EM converged within its iteration budget.
    """

    weights: torch.Tensor
    means: torch.Tensor
    scale_tril: torch.Tensor
    mean_log_likelihood: float
    standard_log_likelihood: float
    num_samples: int
    converged: bool


def check_prior_name(name: str) -> str:
    """``name`` if it is one of :data:`SAMPLING_PRIORS`.

    Raises:
        ValueError: for any other value, listing the allowed ones.
    """
    if name not in SAMPLING_PRIORS:
        raise ValueError(f"model.sampling_prior={name!r} is not allowed; choose one of {list(SAMPLING_PRIORS)}")
    return name


def standard_normal_log_likelihood(latents: torch.Tensor) -> float:
    """Mean ``log N(z; 0, I)`` in nats of latents ``(N, d)``."""
    z = latents.double()
    return float((-0.5 * (z.shape[1] * math.log(2 * math.pi) + z.pow(2).sum(1))).mean())


def fit_gaussian_mixture(latents: torch.Tensor, components: int = 10, reg_covar: float = 1e-4,
                         seed: int | None = 0, max_iter: int = 200) -> MixtureFit:
    """Fit a ``components``-component full-covariance Gaussian mixture to ``latents`` ``(N, d)`` with
    scikit-learn's ``GaussianMixture`` (EM from a k-means start; Ghosh et al. 2020, Sec. 4).

    With fewer points than components, ``k = N`` components are fitted (with a warning).

    Args:
        latents: ``(N, d)`` points, e.g. the posterior means ``μ(x)`` of the training set.
        components: ``k``, the number of mixture components.
        reg_covar: added to the diagonal of every covariance (keeps them positive definite, e.g. along latent
            dimensions the encoder does not use, whose ``μ`` barely varies).
        seed: ``random_state`` of the k-means initialisation (``None``: not reproducible).
        max_iter: EM iterations at most.

    Returns:
        The fitted :class:`MixtureFit` (float32 tensors on the CPU).

    Raises:
        ValueError: for ``components < 1``, ``reg_covar < 0``, ``latents`` that are not a non-empty 2-D tensor,
            or non-finite latents.
    """
    if components < 1:
        raise ValueError(f"model.gmm_components must be >= 1, got {components}")
    if reg_covar < 0:
        raise ValueError(f"model.gmm_reg_covar must be >= 0, got {reg_covar}")
    if latents.ndim != 2 or latents.shape[0] == 0:
        raise ValueError(f"latents must be a non-empty (N, d) tensor, got shape {tuple(latents.shape)}")
    x = latents.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(x).all():
        raise ValueError("latents hold NaN or infinite values: the encoder diverged; no mixture can be fitted")
    from sklearn.mixture import GaussianMixture  # only fitting needs scikit-learn, sampling does not

    k = min(components, len(x))
    if k < components:
        log.warning("only %d latents for %d mixture components: fitting %d components", len(x), components, k)
    gm = GaussianMixture(n_components=k, covariance_type="full", reg_covar=reg_covar, random_state=seed,
                         max_iter=max_iter).fit(x)
    if not gm.converged_:
        log.warning("the Gaussian mixture did not converge in %d EM iterations", max_iter)
    covariances = torch.from_numpy(gm.covariances_)
    return MixtureFit(
        weights=torch.from_numpy(gm.weights_).float(),
        means=torch.from_numpy(gm.means_).float(),
        scale_tril=torch.linalg.cholesky(covariances).float(),
        mean_log_likelihood=float(gm.score(x)),
        standard_log_likelihood=standard_normal_log_likelihood(latents),
        num_samples=len(x),
        converged=bool(gm.converged_),
    )


@torch.no_grad()
def posterior_means(encoder: nn.Module, batches: Iterable[Any], max_samples: int | None = None,
                    max_batches: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """The encoder's posterior means ``μ(x)`` ``(N, d)`` (float32, CPU) of the images in ``batches`` (tensors
    ``(B, C, H, W)`` in ``[-1, 1]`` or ``(images, labels)`` pairs), at most ``max_samples`` of them from at most
    ``max_batches`` batches. The encoder runs in eval mode (BatchNorm running statistics) and gets its mode back.

    Raises:
        ValueError: when ``batches`` yields no image.
    """
    was_training = encoder.training
    encoder.eval()
    chunks: list[torch.Tensor] = []
    count = 0
    try:
        for i, batch in enumerate(batches):
            if (max_batches is not None and i >= max_batches) or (max_samples is not None and count >= max_samples):
                break
            x = batch[0] if isinstance(batch, list | tuple) else batch
            mu = encoder(x.to(device))[0].float().cpu()
            if max_samples is not None:
                mu = mu[: max_samples - count]
            chunks.append(mu)
            count += len(mu)
    finally:
        encoder.train(was_training)
    if not count:
        raise ValueError("the training data yielded no images to encode: no mixture can be fitted")
    return torch.cat(chunks)


class GaussianMixturePrior(nn.Module):
    """A Gaussian mixture over ``latent_dim``-dimensional latents held as buffers, so it travels in
    ``state_dict`` and checkpoints: ``weights`` ``(k,)``, ``means`` ``(k, d)``, ``scale_tril`` ``(k, d, d)``.

    Unfitted (all weights zero) until :meth:`set_mixture`. A ``state_dict`` without these keys (a checkpoint
    from before the mixture existed) loads as unfitted; one with another ``k`` resizes the buffers.

    Raises:
        ValueError: for ``components < 1`` or ``latent_dim < 1``.
    """

    weights: torch.Tensor
    means: torch.Tensor
    scale_tril: torch.Tensor

    def __init__(self, latent_dim: int, components: int = 10) -> None:
        super().__init__()
        if components < 1:
            raise ValueError(f"model.gmm_components must be >= 1, got {components}")
        if latent_dim < 1:
            raise ValueError(f"model.latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = latent_dim
        self.register_buffer("weights", torch.zeros(components))
        self.register_buffer("means", torch.zeros(components, latent_dim))
        self.register_buffer("scale_tril", torch.eye(latent_dim).repeat(components, 1, 1))

    @property
    def fitted(self) -> bool:
        """Whether a mixture has been set (weights are not all zero)."""
        return bool(self.weights.sum() > 0)

    @property
    def components(self) -> int:
        return self.weights.shape[0]

    def reset(self) -> None:
        """Forget the mixture (back to unfitted, same ``k``)."""
        self.weights.zero_()
        self.means.zero_()
        self.scale_tril.copy_(torch.eye(self.latent_dim).expand_as(self.scale_tril))

    def set_mixture(self, weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> None:
        """Store a mixture: ``weights`` ``(k,)``, ``means`` ``(k, d)``, Cholesky factors ``(k, d, d)``; in place
        when ``k`` is unchanged, else the buffers are replaced.

        Raises:
            ValueError: when the shapes disagree with each other or with ``latent_dim``.
        """
        k, d = means.shape[0], self.latent_dim
        if weights.shape != (k,) or means.shape != (k, d) or scale_tril.shape != (k, d, d):
            raise ValueError(f"a mixture for latent_dim={d} needs weights (k,), means (k, {d}) and scale_tril "
                             f"(k, {d}, {d}); got {tuple(weights.shape)}, {tuple(means.shape)}, "
                             f"{tuple(scale_tril.shape)}")
        for name, value in (("weights", weights), ("means", means), ("scale_tril", scale_tril)):
            current: torch.Tensor = getattr(self, name)
            if current.shape == value.shape:
                current.copy_(value)
            else:
                self.register_buffer(name, value.detach().to(current.device, current.dtype).clone())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` latents ``(n, d)`` float32 on the CPU: component ``c ~ Categorical(weights)`` by
        ``torch.multinomial``, then ``z = means[c] + scale_tril[c] @ ε`` with ``ε ~ N(0, I)``; both drawn from
        ``generator`` (a CPU generator), so the same seed gives the same latents.

        Raises:
            RuntimeError: when no mixture has been set.
        """
        if not self.fitted:
            raise RuntimeError("no Gaussian mixture has been fitted: call VAE.fit_prior or run "
                               "scripts/fit_vae_prior.py on the checkpoint")
        weights = self.weights.detach().float().cpu()
        means = self.means.detach().float().cpu()
        scale_tril = self.scale_tril.detach().float().cpu()
        if n <= 0:
            return means.new_zeros((0, self.latent_dim))
        comp = torch.multinomial(weights, n, replacement=True, generator=generator)
        eps = torch.randn((n, self.latent_dim, 1), generator=generator)
        return means[comp] + (scale_tril[comp] @ eps).squeeze(-1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("weights", "means", "scale_tril"):
            key = prefix + name
            current: torch.Tensor = getattr(self, name)
            if key not in state_dict:  # a checkpoint from before the mixture: load as unfitted
                state_dict[key] = current
            elif state_dict[key].shape != current.shape:  # another k
                self.register_buffer(name, torch.empty_like(state_dict[key], device=current.device,
                                                            dtype=current.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
