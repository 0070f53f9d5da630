"""Precision / channels-last / compile paths of the prior's network (diffstategrad.precision)."""

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import diffstategrad  # noqa: E402
from diffstategrad import DiffStateGrad  # noqa: E402
from diffstategrad.images import load_image  # noqa: E402
from diffstategrad.metrics import psnr  # noqa: E402
from diffstategrad.operators import load_task  # noqa: E402
from diffstategrad.operators.base import MatrixOperator  # noqa: E402
from diffstategrad.pipeline import solver_kwargs  # noqa: E402
from diffstategrad.precision import NetworkConfig, PrecisionError, check_precision, configure_network, network_config  # noqa: E402
from diffstategrad.priors import GaussianPrior, load_prior  # noqa: E402
from diffstategrad.solvers import solve  # noqa: E402
from tiny_models import TinyLatent, TinyPixel  # noqa: E402

SHAPE = (3, 8, 12)


def _conv_dtypes(module):
    """Record the output dtype of every Conv2d call of ``module``."""
    seen = []
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


def _tiny_problem():
    op = MatrixOperator(torch.randn(20, 3 * 8 * 12, generator=torch.Generator().manual_seed(1)) / 10, SHAPE)
    y = torch.randn(2, 20, generator=torch.Generator().manual_seed(2)) * 0.1
    return op, y


def test_bf16_runs_the_network_in_bf16_and_hands_back_float32():
    prior = configure_network(TinyPixel(), "bf16")
    seen = _conv_dtypes(prior.net)
    x = torch.randn(2, *SHAPE, requires_grad=True)
    eps = prior.eps(x, 500)
    assert eps.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    (grad,) = torch.autograd.grad(eps.square().sum(), x)  # the VJP DPS takes
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    eps2, v = prior.eps_and_variance(x, 500)  # the default eps_and_variance nests eps: still one pass
    assert v is None and eps2.dtype == torch.float32
    torch.testing.assert_close(eps2, eps)
    assert network_config(prior) == NetworkConfig("bf16")
    # back to the defaults: plain float32 again, bit for bit what an unconfigured prior gives
    configure_network(prior)
    seen.clear()
    torch.testing.assert_close(prior.eps(x, 500), TinyPixel().eps(x, 500), rtol=0, atol=0)
    assert set(seen) == {torch.float32} and network_config(prior).is_default


def test_every_solver_runs_in_bf16_with_float32_state_and_projector():
    op, y = _tiny_problem()
    cases = {"dps": dict(steps=4, guidance_scale=0.5), "psld": dict(steps=4), "daps": dict(steps=2, mcmc_steps=2, guidance_scale=1e-5),
             "resample": dict(steps=12, pixel_iters=2, latent_iters=2, early_stop_window=1),
             "latent-daps": dict(steps=2, mcmc_steps=2, guidance_scale=1e-4)}
    for solver, kw in cases.items():
        latent = solver in ("psld", "resample", "latent-daps")
        prior = configure_network(TinyLatent() if latent else TinyPixel(), "bf16")
        seen = _conv_dtypes(prior.net)
        result = solve(solver, prior, op, y, shape=SHAPE, seeds=[0, 1], projector=DiffStateGrad(var_cutoff=0.9), **kw)
        assert result.x.dtype == torch.float32 and torch.isfinite(result.x).all(), solver  # (random nets: worse than grey is fine)
        assert torch.bfloat16 in seen, solver


def test_autoencoder_passes_are_float32_unless_asked():
    prior = configure_network(TinyLatent(), "bf16")
    dec = _conv_dtypes(prior.dec)
    z = torch.randn(1, 3, 4, 6)
    assert prior.decode(z).dtype == torch.float32 and set(dec) == {torch.float32}
    configure_network(prior, "bf16", autoencoder=True)
    dec.clear()
    assert prior.decode(z).dtype == torch.float32 and set(dec) == {torch.bfloat16}
    with pytest.raises(PrecisionError):
        configure_network(TinyPixel(), "bf16", autoencoder=True)


def test_channels_last_and_compile_change_layout_and_speed_not_the_maths():
    op, y = _tiny_problem()
    kw = dict(shape=SHAPE, seeds=[0, 1], steps=4, guidance_scale=0.5, projector=DiffStateGrad(var_cutoff=0.9))
    plain = solve("dps", TinyPixel(), op, y, **kw)
    prior = configure_network(TinyPixel(), channels_last=True)
    assert prior.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(solve("dps", prior, op, y, **kw).x, plain.x, rtol=1e-4, atol=1e-5)
    # compile: the "eager" backend runs dynamo's capture without code generation (seconds, not minutes)
    compiled = configure_network(TinyPixel(), compile="eager")
    torch.testing.assert_close(solve("dps", compiled, op, y, **kw).x, plain.x, rtol=1e-4, atol=1e-5)
    assert set(compiled._network_compiled) == {"eps_and_variance"}
    configure_network(prior)  # back to the contiguous layout
    assert prior.net[0].weight.is_contiguous()


def test_impossible_combinations_are_one_line_errors():
    for precision, device in [("fp16", "cpu"), ("tf32", "cpu"), ("int8", "cpu"), ("bf16", "meta")]:
        with pytest.raises(PrecisionError) as err:
            check_precision(precision, device)
        assert "\n" not in str(err.value)
    check_precision("fp32", "cpu")
    check_precision("bf16", "cpu")
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device"):
        configure_network(TinyPixel(), "fp16")
    with pytest.raises(PrecisionError, match="has no network"):
        configure_network(GaussianPrior.isotropic(SHAPE), "bf16")
    configure_network(GaussianPrior.isotropic(SHAPE))  # the defaults are fine for any prior
    assert issubclass(PrecisionError, ValueError)


def test_bf16_keeps_psnr_of_the_builtin_prior_within_one_db():
    """Stated tolerance: on a fixed problem (built-in pixel prior, DPS with its `builtin`
    defaults at 8 steps, Gaussian deblurring of chelsea at 16x16) bf16 autocast changes the PSNR
    by less than 1 dB (measured: 27.42 dB fp32; bf16 27.48 dB on an AVX2 CPU, emulated, and
    26.70 dB with native AVX512-BF16 kernels). Kept tiny: bf16 is ~50x slower than fp32 on CPUs
    without AVX-512 BF16."""
    x = load_image(pathlib.Path(diffstategrad.__file__).parent / "examples" / "chelsea.jpg", size=16).image
    problem = load_task("gaussian_deblur").build(tuple(x.shape[1:]), seeds=[0])
    y = problem.measure(x, seeds=[0])
    prior = load_prior("builtin")
    kw = solver_kwargs("dps", "gaussian_deblur", profile="builtin", steps=8)
    scores = {}
    for precision in ("fp32", "bf16"):
        configure_network(prior, precision)
        result = solve("dps", prior, problem.operator, y, shape=tuple(x.shape[1:]), seeds=[0], **kw)
        scores[precision] = float(psnr(result.x.clamp(-1, 1), x)[0])
    assert scores["fp32"] > 20  # the problem is solved at all
    assert abs(scores["bf16"] - scores["fp32"]) < 1.0, scores
