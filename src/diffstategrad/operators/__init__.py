"""Forward operators, noise models and task presets.

Operators take batches (B, C, H, W) in [-1, 1] and are differentiable in x; linear ones have an
explicit ``adjoint``. Task presets (configs/tasks/*.yaml) build an operator and a noise model for
an image shape and a list of sample seeds: see docs/tasks.md.
"""

from diffstategrad.operators.base import LinearOperator, MatrixOperator, Operator, check_image_batch
from diffstategrad.operators.blur import Blur
from diffstategrad.operators.hdr import HighDynamicRange
from diffstategrad.operators.inpaint import Inpaint, box_mask, random_mask
from diffstategrad.operators.kernels import gaussian_kernel, motion_blur_kernel
from diffstategrad.operators.noise import GaussianNoise, NoNoise, Noise, PoissonNoise, make_noise
from diffstategrad.operators.nonlinear_blur import (
    KernelWizard,
    KernelWizardConfig,
    KernelWizardMismatchError,
    KernelWizardWeightsError,
    NonlinearBlur,
    load_builtin_kernel_wizard,
    load_kernel_wizard,
    resolve_bkse_weights,
    resolve_blur_network,
)
from diffstategrad.operators.phase import PhaseRetrieval, oversample_padding
from diffstategrad.operators.resize import Resize, resize_matrix
from diffstategrad.operators.tasks import (
    InverseProblem,
    TaskPreset,
    list_tasks,
    load_task,
    make_operator,
    scale_operator_params,
)

__all__ = [
    "Blur",
    "GaussianNoise",
    "HighDynamicRange",
    "Inpaint",
    "InverseProblem",
    "KernelWizard",
    "KernelWizardConfig",
    "KernelWizardMismatchError",
    "KernelWizardWeightsError",
    "LinearOperator",
    "MatrixOperator",
    "NoNoise",
    "Noise",
    "NonlinearBlur",
    "Operator",
    "PhaseRetrieval",
    "PoissonNoise",
    "Resize",
    "TaskPreset",
    "box_mask",
    "check_image_batch",
    "gaussian_kernel",
    "list_tasks",
    "load_builtin_kernel_wizard",
    "load_kernel_wizard",
    "load_task",
    "make_noise",
    "make_operator",
    "motion_blur_kernel",
    "oversample_padding",
    "random_mask",
    "resize_matrix",
    "resolve_bkse_weights",
    "resolve_blur_network",
    "scale_operator_params",
]
