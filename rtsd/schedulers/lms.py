"""Linear multistep (k-diffusion sample_lms, order 4), as diffusers' LMSDiscreteScheduler.

The Adams coefficients integrate Lagrange basis polynomials of degree < 4 between consecutive sigmas; a 4-point
Gauss-Legendre rule integrates them exactly (diffusers uses scipy.integrate.quad for the same numbers).
"""

from __future__ import annotations

import numpy as np

from rtsd.schedulers.base import SigmaScheduler, TrainSchedule, denoised_from_sigma_prediction, discrete_sigma_timesteps

LMS_ORDER = 4
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(4)


def lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node i-j (nodes i .. i-order+1)."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    tau = (b - a) / 2 * _GAUSS_NODES + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - nodes[k]) / (nodes[j] - nodes[k])
    return float((b - a) / 2 * (_GAUSS_WEIGHTS @ basis))


class LMS(SigmaScheduler):
    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    train_defaults = {"timestep_spacing": "linspace"}
    unsupported_train_fields = ("rescale_betas_zero_snr",)
    fixed_diffusers_keys = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

    def __init__(
        self, num_inference_steps: int, schedule: TrainSchedule | None = None, *, use_karras_sigmas: bool = False
    ):
        super().__init__(num_inference_steps, schedule)
        self.timesteps, sigmas = discrete_sigma_timesteps(
            self.schedule, self.alphas_cumprod, num_inference_steps, use_karras_sigmas
        )
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.init_noise_sigma = self._init_noise_sigma()
        self.derivatives: list = []  # multistep history, newest last, at most LMS_ORDER

    def _step(self, model_output, i, x, noise):
        sigma = float(self.sigmas[i])
        x0 = denoised_from_sigma_prediction(model_output, x, sigma, self.prediction_type)
        self.derivatives = (self.derivatives + [(x - x0) / sigma])[-LMS_ORDER:]
        # Order grows with the history this generation has (diffusers uses the step index, the same for a full loop).
        order = len(self.derivatives)
        prev = x
        for j, derivative in enumerate(reversed(self.derivatives)):
            prev = prev + lms_coefficient(self.sigmas, i, order, j) * derivative
        return prev
