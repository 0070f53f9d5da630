"""ReSample's inner loops: the reference profile follows the official order (AdamW step, then the
stop test on the loss computed before it); the default profile tests first."""

from dataclasses import replace

import torch

from diffstategrad.solvers.resample import DEFAULT, REFERENCE, _optimize


def official_loop(z, target, lr, iters, window, tol, early_stop=True):
    """The official latent_optimization / pixel_optimization loop (batch of one), written out."""
    z = z.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([z], lr=lr)
    losses, steps = [], 0
    for itr in range(iters):
        opt.zero_grad()
        out = torch.nn.functional.mse_loss(z, target)
        out.backward()
        opt.step()
        steps += 1
        cur = out.detach()
        if early_stop:
            if itr < window:
                losses.append(cur)
            else:
                losses.append(cur)
                if losses[0] < cur:
                    break
                losses.pop(0)
        if cur < tol:
            break
    return z.detach(), steps


def per_sample_mse(target):
    return lambda x: ((x - target) ** 2).reshape(x.shape[0], -1).mean(1)


def test_reference_takes_the_step_before_the_window_stop():
    # lr 3 on a quadratic: AdamW overshoots, the loss rises over the window, the window stop fires early
    g = torch.Generator().manual_seed(0)
    z0, target = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    cfg = replace(REFERENCE, early_stop_window=5, loss_tol=0.0)
    ours = _optimize(z0, per_sample_mse(target), 3.0, 200, cfg, None, None, early_stop=True)
    for b in range(2):
        want, steps = official_loop(z0[b:b + 1], target[b:b + 1], 3.0, 200, 5, 0.0)
        assert steps < 200  # the stop fired
        torch.testing.assert_close(ours[b:b + 1], want, rtol=0, atol=1e-6)


def test_reference_takes_the_step_before_the_tolerance_stop():
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 1, 4, 4, generator=g)
    target = z0 + 0.05 * torch.randn(2, 1, 4, 4, generator=g)
    cfg = replace(REFERENCE, loss_tol=1e-4)
    ours = _optimize(z0, per_sample_mse(target), 1e-2, 500, cfg, None, None, early_stop=False)
    fired = []
    for b in range(2):
        want, steps = official_loop(z0[b:b + 1], target[b:b + 1], 1e-2, 500, 200, 1e-4, early_stop=False)
        fired.append(steps)
        torch.testing.assert_close(ours[b:b + 1], want, rtol=0, atol=1e-6)
    assert max(fired) < 500


def test_default_profile_keeps_the_iterate_its_rule_judged():
    """Tested first, a stop at iteration k returns the iterate after k steps: one fewer than the official order."""
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 1, 4, 4, generator=g)
    target = z0 + 0.05 * torch.randn(1, 1, 4, 4, generator=g)
    loss = per_sample_mse(target)
    first = _optimize(z0, loss, 1e-2, 500, replace(DEFAULT, loss_tol=1e-4), None, None, early_stop=False)
    after = _optimize(z0, loss, 1e-2, 500, replace(REFERENCE, loss_tol=1e-4), None, None, early_stop=False)
    assert loss(first).item() < 1e-4  # the returned iterate meets the tolerance
    assert not torch.equal(first, after)
    _, steps = official_loop(z0, target, 1e-2, 500, 200, 1e-4, early_stop=False)
    torch.testing.assert_close(first, official_loop(z0, target, 1e-2, steps - 1, 200, 0.0, early_stop=False)[0], rtol=0, atol=1e-6)
