"""Tests for ainfonce.py: property tests of the pure functions, then end-to-end runs of main().

    python -m pytest -q            # about 5 minutes on 2 CPU cores
"""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ainfonce as A

HERE = os.path.dirname(os.path.abspath(__file__))
settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("ci")


def randz(seed, V, N, D, scale=1.0):
    return torch.randn(V, N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale


# ---------------------------------------------------------------------------------------------------
# Independent references, written from SPEC.md section 2 and not from ainfonce.py
# ---------------------------------------------------------------------------------------------------
def ref_weighted(z, weights, t):
    """sum over (u, v) of weights[u][v] * l(u->v), l in cross-entropy form, over all V*N rows."""
    V, N, D = z.shape
    zn = F.normalize(z.reshape(V * N, D).double(), dim=1)
    logits = (zn @ zn.detach().T / t).masked_fill(torch.eye(V * N, dtype=torch.bool), -math.inf)
    logp = F.log_softmax(logits, 1)
    n = torch.arange(N)
    return -sum(w * logp[u * N + n, v * N + n].sum() for (u, v), w in weights.items()) / (V * N)


def ref_ntxent(z1, z2, t):
    """SimCLR's NT-Xent in its usual cross-entropy form: row i's target is its other view."""
    N = len(z1)
    zn = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    logits = (zn @ zn.detach().T / t).masked_fill(torch.eye(2 * N, dtype=torch.bool), -math.inf)
    return F.cross_entropy(logits, torch.cat([torch.arange(N, 2 * N), torch.arange(N)]))


def ref_hn(z, weights, t, beta, tau_plus):
    """The HN loss row by row, straight from the formulas (per-row normalisation over Neg(i))."""
    V, N, D = z.shape
    zn = F.normalize(z.reshape(V * N, D).double(), dim=1)
    S = zn @ zn.detach().T / t
    M, total = V * (N - 1), 0
    for u in range(V):
        for n in range(N):
            i = u * N + n
            pos = torch.stack([S[i, v * N + n].exp() for v in range(V) if v != u]).mean()
            neg = [v * N + m for v in range(V) for m in range(N) if m != n]
            imp = torch.stack([(beta * S[i, j]).exp() for j in neg])
            w = imp / imp.mean()
            ng = ((w * torch.stack([S[i, j].exp() for j in neg])).sum() - tau_plus * M * pos) / (1 - tau_plus)
            ng = torch.clamp(ng, min=M * math.exp(-1 / t))
            for v in range(V):
                if v != u:
                    total = total - weights.get((u, v), 0) * (S[i, v * N + n] - (pos + ng).log())
    return total / (V * N)


def ip_weights(V, adv, alpha, adv_weight=1.0):
    w = {}
    for u in range(V):
        for v in range(V):
            if u != v:
                w[u, v] = 1.0 if (u in adv) == (v in adv) else adv_weight * (alpha if v in adv else 1 - alpha)
    return w


shapes = dict(seed=st.integers(0, 10**6), N=st.integers(2, 6), D=st.integers(2, 16))


# ---------------------------------------------------------------------------------------------------
# a_infonce: values
# ---------------------------------------------------------------------------------------------------
@given(**shapes, t=st.floats(0.1, 2.0))
def test_two_views_is_ntxent(seed, N, D, t):
    z = randz(seed, 2, N, D).requires_grad_(True)
    loss = A.a_infonce(z, temperature=t)
    ours, = torch.autograd.grad(loss, z)
    zr = z.detach().clone().requires_grad_(True)
    ref = ref_ntxent(zr[0], zr[1], t)
    ref_grad, = torch.autograd.grad(ref, zr)
    assert torch.allclose(loss.double(), ref, atol=1e-5)
    assert torch.allclose(ours.double(), ref_grad.double(), atol=1e-6)


@given(**shapes, alpha=st.floats(0, 1), adv_weight=st.floats(0, 3), V=st.integers(2, 4))
def test_ip_matches_weighted_reference(seed, N, D, alpha, adv_weight, V):
    z = randz(seed, V, N, D)
    adv = {V - 1}
    ours = A.a_infonce(z, adv_views=(V - 1,), ip_alpha=alpha, adv_weight=adv_weight)
    ref = ref_weighted(z, ip_weights(V, adv, alpha, adv_weight), 0.5)
    assert torch.allclose(ours.double(), ref, atol=1e-5)


@given(**shapes, V=st.integers(2, 4), beta=st.floats(0, 3), tau_plus=st.floats(0, 0.95),
       alpha=st.one_of(st.none(), st.floats(0, 1)), t=st.floats(0.2, 1.0))
def test_hn_matches_row_by_row_reference(seed, N, D, V, beta, tau_plus, alpha, t):
    z = randz(seed, V, N, D).requires_grad_(True)
    adv = (V - 1,)
    weights = ip_weights(V, set(adv), alpha) if alpha is not None else ip_weights(V, set(), 0)
    ours = A.a_infonce(z, adv_views=adv, ip_alpha=alpha, hn_beta=beta, tau_plus=tau_plus, temperature=t)
    ref = ref_hn(z, weights, t, beta, tau_plus)
    g_ours, = torch.autograd.grad(ours, z)
    g_ref, = torch.autograd.grad(ref, z)
    assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(g_ours.double(), g_ref.double(), atol=1e-5)


@given(**shapes)
def test_special_cases_reduce_to_symmetric(seed, N, D):
    z3, z2 = randz(seed, 3, N, D), randz(seed + 1, 2, N, D)
    sym3, sym2 = A.a_infonce(z3, adv_views=(2,)), A.a_infonce(z2)
    # IP with alpha = 1/2 and twice the adversarial weight is the symmetric loss
    assert torch.allclose(A.a_infonce(z3, adv_views=(2,), ip_alpha=0.5, adv_weight=2.0), sym3, atol=1e-6)
    # IP without adversarial views changes nothing
    assert torch.allclose(A.a_infonce(z3, ip_alpha=0.2), A.a_infonce(z3), atol=1e-6)
    # HN with beta = 0, tau+ = 0 and one positive per anchor is the plain denominator
    assert torch.allclose(A.a_infonce(z2, hn_beta=0.0, tau_plus=0.0), sym2, atol=1e-5)


@given(**shapes, V=st.integers(2, 4), hn=st.sampled_from([None, 1.0]), data=st.data())
def test_invariant_to_row_scale_and_instance_order(seed, N, D, V, hn, data):
    z = randz(seed, V, N, D)
    kw = dict(adv_views=(V - 1,), ip_alpha=0.2, hn_beta=hn, tau_plus=0.1)
    base = A.a_infonce(z, **kw)
    scale = torch.exp(torch.empty(V, N, 1).uniform_(-7, 7, generator=torch.Generator().manual_seed(seed)))
    assert torch.allclose(A.a_infonce(z * scale, **kw), base, atol=1e-5)
    perm = torch.tensor(data.draw(st.permutations(range(N))))
    assert torch.allclose(A.a_infonce(z[:, perm], **kw), base, atol=1e-5)


@pytest.mark.parametrize("hn", [None, 1.0])
@pytest.mark.parametrize("make", [
    lambda: torch.ones(3, 4, 8),                         # identical rows
    lambda: randz(0, 3, 4, 8, scale=1e30),               # |z|^2 overflows float32
    lambda: randz(1, 3, 4, 8, scale=1e-30),              # |z|^2 underflows float32
    lambda: randz(2, 3, 2, 8),                           # N = 2
    lambda: torch.zeros(3, 4, 8),                        # all-zero projections
])
def test_finite_on_extreme_inputs(make, hn):
    z = make().requires_grad_(True)
    loss = A.a_infonce(z, adv_views=(2,), ip_alpha=0.2, hn_beta=hn, tau_plus=0.12)
    grad, = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_large_norms_give_the_unit_norm_value():
    z = randz(3, 3, 4, 8)
    assert torch.allclose(A.a_infonce(z * 1e30, adv_views=(2,)), A.a_infonce(z, adv_views=(2,)), atol=1e-6)


def test_rejects_fewer_than_two_views_or_instances():
    for shape in [(1, 4, 8), (3, 1, 8)]:
        with pytest.raises(ValueError):
            A.a_infonce(torch.randn(shape))


def test_loss_is_float32_under_bf16_autocast():
    z = randz(0, 3, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = A.a_infonce(z.bfloat16(), adv_views=(2,), hn_beta=1.0, tau_plus=0.1)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, A.a_infonce(z.bfloat16().float(), adv_views=(2,), hn_beta=1.0, tau_plus=0.1))


# ---------------------------------------------------------------------------------------------------
# a_infonce: gradients (stop-gradient on keys, IP, HN hardness)
# ---------------------------------------------------------------------------------------------------
@given(**shapes, hn=st.sampled_from([None, 1.0]))
def test_keys_get_no_gradient(seed, N, D, hn):
    # clean->adv terms only (ip_alpha = 1 zeroes adv->clean): the adversarial view is only ever a key
    z = randz(seed, 2, N, D).requires_grad_(True)
    grad, = torch.autograd.grad(A.a_infonce(z, adv_views=(1,), ip_alpha=1.0, hn_beta=hn, tau_plus=0.1), z)
    assert torch.all(grad[1] == 0) and grad[0].abs().sum() > 0


@given(**shapes)
def test_ip_alpha_zero_clean_views_learn_nothing_from_the_adversary(seed, N, D):
    z = randz(seed, 3, N, D).requires_grad_(True)
    grad, = torch.autograd.grad(A.a_infonce(z, adv_views=(2,), ip_alpha=0.0), z)
    clean_only, = torch.autograd.grad(ref_weighted(z, {(0, 1): 1.0, (1, 0): 1.0}, 0.5), z)
    assert torch.allclose(grad[:2].double(), clean_only[:2].double(), atol=1e-6)
    # and with two views [clean, adv], the clean view receives no gradient at all
    z2 = randz(seed, 2, N, D).requires_grad_(True)
    grad2, = torch.autograd.grad(A.a_infonce(z2, adv_views=(1,), ip_alpha=0.0), z2)
    assert torch.all(grad2[0] == 0) and grad2[1].abs().sum() > 0


def negative_coefficients(z, **kw):
    """dL/dS_0k for the negatives k of anchor 0, recovered from the anchor's gradient: with unit rows
    and detached keys, grad_0 = sum_k a_k z_k - z_0 (sum_k a_k z_0.z_k), unique in the basis [keys, z_0]."""
    V, N, D = z.shape
    z = F.normalize(z, dim=-1).requires_grad_(True)
    grad, = torch.autograd.grad(A.a_infonce(z, **kw), z)
    rows = z.detach().reshape(V * N, D)
    basis = torch.cat([rows[1:], rows[:1]]).double().T  # [D, V*N]
    coef = torch.linalg.lstsq(basis, grad.reshape(V * N, D)[0].double()[:, None]).solution[:-1, 0]
    neg = [k - 1 for k in range(1, V * N) if k % N != 0]
    sim = (rows[0] @ rows.T / kw.get("temperature", 0.5))[[k + 1 for k in neg]].double()
    return coef[neg], sim


@pytest.mark.parametrize("seed", range(5))
def test_hard_negatives_get_larger_gradient_weight(seed):
    z = randz(seed, 2, 5, 24)
    coef, sim = negative_coefficients(z)
    plain = coef / sim.exp()  # InfoNCE: each negative weighs exactly e^S_ik / denominator
    assert torch.allclose(plain, plain.mean().expand_as(plain), rtol=1e-5)
    coef, sim = negative_coefficients(z, hn_beta=1.0, tau_plus=0.0)
    hard = coef / sim.exp()  # HN: the weight per unit e^S grows with the similarity
    assert torch.equal(hard.argsort(), sim.argsort())
    assert (hard.max() - hard.min()) > 0.05 * hard.abs().max()


# ---------------------------------------------------------------------------------------------------
# Attacks
# ---------------------------------------------------------------------------------------------------
def tiny_net(seed=0, width=4):
    torch.manual_seed(seed)
    return A.Net(width)


def images(seed, n=6):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", range(3))
def test_instance_pgd_properties(seed):
    net, x, x_pos = tiny_net(seed), images(seed), images(seed + 100)
    net.train()
    net.encoder.stem.eval()  # a mixed state must come back exactly
    eps = 8 / 255
    x_adv = A.instance_pgd(net, x, x_pos, eps=eps, steps=5)
    assert net.training and not net.encoder.stem.training and net.encoder.layers.training
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with A.eval_mode(net), torch.no_grad():
        z_pos = net(x_pos)
        loss = lambda xa: A.a_infonce(torch.stack([net(xa), z_pos])).item()
        assert loss(x_adv) > loss(x)
    assert torch.equal(A.instance_pgd(net, x, x_pos, eps=0.0, steps=3), x)


def test_instance_pgd_embeds_the_positive_once():
    net, calls = tiny_net(), []
    net.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))
    A.instance_pgd(net, images(0, 4), images(1, 4), steps=7)
    assert calls == [4] * 8  # x_pos once, then one forward of x_adv per step, never [x_adv; x_pos]


class Linear2(nn.Module):
    """A linear classifier on flattened images with a known robust accuracy (see linear_data)."""

    def __init__(self, p, scale=50.0):
        super().__init__()
        self.register_buffer("p", p.flatten())
        self.scale = scale

    def forward(self, x):
        s = self.scale * ((x.flatten(1) - 0.5) @ self.p) / self.p.numel()
        return torch.stack([-s, s], 1)


def linear_data(n=400, seed=0, margin_max=0.06):
    """x = 0.5 + y_sign * delta * p, delta ~ U(0, margin_max), p in {-1,1}^d. The classifier's margin is
    m = y_sign * mean((x - 0.5) p); an L_inf attack of radius eps lowers it by exactly eps (the corner
    x - y_sign eps p), so RA(eps) = P(m > eps), computed here on the uint8 images."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 2, (3, 32, 32), generator=g).float() * 2 - 1
    y = torch.randint(0, 2, (n,), generator=g)
    delta = torch.rand(n, generator=g) * margin_max
    x8 = ((0.5 + ((2 * y - 1).float() * delta)[:, None, None, None] * p) * 255).round().to(torch.uint8)
    margin = (2 * y - 1).float() * ((x8.float() / 255 - 0.5) * p).flatten(1).mean(1)
    return Linear2(p), x8, y, margin


def independent_pgd(model, x, y, eps, alpha, steps, seed):
    """PGD from the definition (Madry et al. 2018), written apart from ainfonce.pgd."""
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        loss.backward()
        delta = (delta.detach() + alpha * delta.grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def test_pgd_properties():
    model, x8, y, _ = linear_data(64)
    x = x8.float() / 255
    model.train()
    for eps in (0.0, 4 / 255, 8 / 255):
        x_adv = A.pgd(model, x, y, eps=eps, step=2 / 255, steps=10)
        assert model.training
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert F.cross_entropy(model(x_adv), y) >= F.cross_entropy(model(x), y) - 1e-6
    assert torch.equal(A.pgd(model, x, y, eps=0.0), x)


def test_robust_accuracy_guards_and_parity_with_independent_pgd():
    model, x, y, margin = linear_data(400)
    sa = A.accuracy(model, x, y, 128)
    ra = {e: A.accuracy(model, x, y, 128, lambda m, xb, yb: A.pgd(m, xb, yb, eps=e / 255, step=2 / 255))
          for e in (0, 2, 8, 16, 64)}
    assert ra[0] == sa and sa >= ra[2] >= ra[8] >= ra[16] >= ra[64]
    assert ra[64] == 0 and ra[16] <= 0.02
    assert sa == (margin > 0).float().mean().item()
    assert abs(ra[8] - (margin > 8 / 255).float().mean().item()) <= 0.005
    more = A.accuracy(model, x, y, 128, lambda m, xb, yb: A.pgd(m, xb, yb, eps=8 / 255, step=2 / 255, steps=50))
    assert more <= ra[8] + 0.01
    ind = (model(independent_pgd(model, x.float() / 255, y, 8 / 255, 2 / 255, 20, seed=1)).argmax(1) == y)
    assert abs(ind.float().mean().item() - ra[8]) <= 0.02
    g = A.guards(model, x, y, 128, 8 / 255, 20)
    assert g["ok"] and g["sa"] == A.accuracy(model, x[:200], y[:200], 128)


class Masked(Linear2):
    def forward(self, x):  # quantises its input to 8 bits: identity on clean images, zero gradient
        return super().forward((x * 255).round() / 255)


def test_guards_flag_masked_gradients():
    model, x, y, _ = linear_data(200)
    masked = Masked(model.p.view(3, 32, 32))
    masked_ra = A.accuracy(masked, x, y, 128, lambda m, xb, yb: A.pgd(m, xb, yb, eps=64 / 255, step=2.5 * 64 / 255 / 20))
    assert masked_ra > 0.05  # the attack is fooled ...
    assert not A.guards(masked, x, y, 128, 8 / 255, 20)["ok"]  # ... and the guards say so


def test_evaluation_is_fp32_under_autocast():
    model = nn.Linear(4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16), A.strict_fp32(torch.device("cpu")):
        assert model(torch.randn(3, 4)).dtype == torch.float32


def test_trades_loss_is_ce_plus_kl():
    torch.manual_seed(0)
    model, x, y = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), images(0, 8), torch.arange(8) % 3
    assert torch.allclose(A.trades_loss(model, x, y, eps=0.0), F.cross_entropy(model(x), y), atol=1e-6)
    assert A.trades_loss(model, x, y, beta=6.0) > F.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op,factor", [(0, 0.6), (0, 1.4), (1, 0.6), (1, 1.4), (2, 0.6), (2, 1.4),
                                       (3, -0.1), (3, 0.07), (3, 0.0)])
def test_colour_ops_match_torchvision(op, factor):
    import torchvision.transforms.functional as TF
    x = images(op, 8)
    tv = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
    ref = torch.stack([tv(img, factor) for img in x])
    assert torch.allclose(A.adjust(x, op, torch.full((8,), factor)), ref, atol=1e-5)


def test_crop_params_follow_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop
    n, img = 10000, torch.zeros(3, 32, 32)
    torch.manual_seed(0)
    w, h, x0, y0 = A.crop_params(n, "cpu")
    ref = torch.tensor([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]).float()
    for ours, theirs in ((w * h, ref[:, 2] * ref[:, 3]), (w / h, ref[:, 3] / ref[:, 2]), (x0, ref[:, 1]), (y0, ref[:, 0])):
        q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
        assert torch.allclose(ours.quantile(q), theirs.quantile(q), rtol=0.06, atol=1.0)
        assert ours.min() >= theirs.min() - 1 and ours.max() <= theirs.max() + 1
    assert (x0 >= 0).all() and (x0 + w <= 32).all() and (y0 >= 0).all() and (y0 + h <= 32).all()


def test_augment_rates_range_and_determinism():
    n = 4000
    ramp = torch.linspace(0.2, 0.7, 32).expand(n, 3, 32, 32)  # a gray left-to-right ramp
    torch.manual_seed(0)
    out = A.augment((ramp * 255).round().to(torch.uint8))
    assert out.shape == (n, 3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    flipped = (out[..., :16].mean((1, 2, 3)) > out[..., 16:].mean((1, 2, 3))).float().mean()
    assert abs(flipped - 0.5) < 0.04
    colour = (images(5, n) * 255).to(torch.uint8)
    torch.manual_seed(1)
    out = A.augment(colour)
    gray = ((out[:, 0] == out[:, 1]) & (out[:, 1] == out[:, 2])).flatten(1).all(1).float().mean()
    assert abs(gray - 0.2) < 0.03
    torch.manual_seed(2)
    a = A.augment(colour[:16])
    torch.manual_seed(2)
    assert torch.equal(a, A.augment(colour[:16])) and not torch.equal(a, A.augment(colour[:16]))


# ---------------------------------------------------------------------------------------------------
# Model and optimisation
# ---------------------------------------------------------------------------------------------------
def test_model_shapes():
    net = A.Net(8)
    assert net.encoder.dim == 64 and net.encoder(images(0, 2)).shape == (2, 64)
    assert net(images(0, 2)).shape == (2, 128)
    assert [m.out_features for m in net.projector if isinstance(m, nn.Linear)] == [2048, 128]
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert net.encoder.stem[0].stride == (1, 1) and net.encoder.stem[0].kernel_size == (3, 3)


def test_lr_schedule():
    lrs = [A.lr_at(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == 0.1 and A.lr_at(10, 100, 10, 0.1) == pytest.approx(1.5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert A.lr_at(100, 100, 10, 0.1) == pytest.approx(0, abs=1e-12)


def test_lars_scales_each_tensor():
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([0.0, 10.0])
    A.lars_([p], wd=0.1, trust=1e-3)
    expected = (torch.tensor([0.0, 10.0]) + 0.1 * p.detach()) * 1e-3 * 5 / (10 + 0.1 * 5 + 1e-8)
    assert torch.allclose(p.grad, expected)


# ---------------------------------------------------------------------------------------------------
# End to end: main() on a tiny generated folder data set
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 16), ("test", 8)):
        for c in range(2):
            os.makedirs(root / split / f"class{c}")
            for i in range(n):
                x = (torch.rand(32, 32, 3, generator=g) * 100 + 110 * c).to(torch.uint8).numpy()
                Image.fromarray(x).save(root / split / f"class{c}" / f"{i}.png")
    return str(root)


def tiny(folder, out, *extra):
    return ["--dataset", "folder", "--data-dir", folder, "--width", "8", "--batch-size", "8", "--epochs", "1",
            "--attack-steps", "2", "--warmup-epochs", "0", "--eval-steps", "2", "--ft-epochs", "1",
            "--eval-batch-size", "64", *extra, "--out", str(out)]


@pytest.mark.parametrize("method", A.METHODS)
def test_end_to_end_every_method(folder, tmp_path, method):
    res = A.main(tiny(folder, tmp_path / "run", "--method", method))
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved == json.loads(json.dumps(res))
    for k in ("slf_sa", "slf_ra"):
        assert 0 <= saved[k] <= 1
    assert saved["slf_ra"] <= saved["slf_sa"]
    assert saved["method"] == method and saved["epochs"] == 1 and saved["seed"] == 0
    assert saved["pretrain_s"] > 0 and saved["images_per_s"] > 0 and saved["eval_step"] == 2 / 255
    assert saved["wall_s"] > saved["pretrain_s"]  # the invocation: data, pretraining and evaluation
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["step"] == 4 and ck["args"]["method"] == method
    net = A.Net(8)
    net.encoder.load_state_dict(ck["encoder"], strict=True)
    net.projector.load_state_dict(ck["projector"], strict=True)
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 1 and math.isfinite(log[0]["loss"])


def test_all_schemes_and_eval_only(folder, tmp_path):
    res = A.main(tiny(folder, tmp_path / "run", "--eval", "slf", "alf", "aff", "--eval-subset", "10"))
    for k in ("slf", "alf", "aff"):
        assert 0 <= res[f"{k}_ra"] <= res[f"{k}_sa"] <= 1
    assert res["n_test"] == 10 and res["eval_subset"] == 10 and "guards" in res
    same = A.main(["--eval-only", str(tmp_path / "run"), "--eval", "slf", "alf", "aff", "--eval-subset", "10",
                   "--eval-steps", "2", "--ft-epochs", "1", "--eval-batch-size", "64"])
    assert all(same[k] == res[k] for k in res if k.endswith(("_sa", "_ra")))  # the checkpoint's own numbers
    again = A.main(["--eval-only", str(tmp_path / "run"), "--eval", "slf", "--eval-step", "0.00314"])
    assert again["width"] == 8 and again["eval_step"] == 0.00314 and again["n_test"] == 16
    merged = json.load(open(tmp_path / "run" / "results.json"))
    assert merged["eval_step"] == 0.00314 and "alf_sa" in merged and "pretrain_s" in merged


def test_amp_pretraining_keeps_the_loss_in_fp32(folder, tmp_path):
    res = A.main(tiny(folder, tmp_path / "run", "--amp", "--method", "both", "--eval", "none"))
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert res["images_per_s"] > 0 and math.isfinite(log[0]["loss"])
    saved = json.load(open(tmp_path / "run" / "results.json"))  # written with --eval none too
    assert saved == json.loads(json.dumps(res)) and "slf_sa" not in saved and saved["wall_s"] > 0
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ck["encoder"].values() if v.is_floating_point())


def test_benchmark_prints_json_last(capsys):
    res = A.main(["--benchmark", "--width", "4", "--batch-size", "4", "--attack-steps", "1",
                  "--benchmark-steps", "1", "--method", "rocl"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(res))
    assert last["images_per_s"] > 0 and last["attack_s"] > 0 and last["fwd_bwd_s"] > 0 and last["data_s"] > 0
    assert last["ratio_vs_official"] > 0


# ---------------------------------------------------------------------------------------------------
# Interruption, resume, checkpoints
# ---------------------------------------------------------------------------------------------------
def launch(argv, **env):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "ainfonce.py"), *argv], cwd=HERE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def weights(path):
    ck = torch.load(path, weights_only=True)
    return {**ck["encoder"], **{f"p.{k}": v for k, v in ck["projector"].items()}}, ck


def wait_for_checkpoint(proc, path, done):
    while proc.poll() is None:
        try:
            if done(torch.load(path, weights_only=True)):
                return
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.02)
    pytest.fail(f"run ended before the checkpoint appeared: {proc.communicate()}")


@pytest.mark.parametrize("how", ["sigkill_after_epoch", "sigterm_mid_epoch"])
def test_killed_run_resumes_bit_exactly(folder, tmp_path, how):
    argv = tiny(folder, tmp_path / "full", "--epochs", "3", "--eval", "none", "--ckpt-every", "1")
    assert launch(argv).wait() == 0
    argv = tiny(folder, tmp_path / "cut", "--epochs", "3", "--eval", "none", "--ckpt-every", "1")
    proc = launch(argv)
    if how == "sigkill_after_epoch":
        wait_for_checkpoint(proc, tmp_path / "cut" / "last.pt", lambda ck: ck["epoch"] >= 1)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
    else:
        wait_for_checkpoint(proc, tmp_path / "cut" / "last.pt", lambda ck: ck["step"] >= 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 130 and "--resume" in proc.communicate()[1]
    cut, ck = weights(tmp_path / "cut" / "last.pt")
    assert ck["step"] < 12  # the run really was cut short
    resumed = launch(["--resume", str(tmp_path / "cut"), *argv[:-2]])
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    full, _ = weights(tmp_path / "full" / "last.pt")
    done, ck = weights(tmp_path / "cut" / "last.pt")
    assert ck["epoch"] == 3 and ck["step"] == 12
    assert full.keys() == done.keys() and all(torch.equal(full[k], done[k]) for k in full)


def test_kill_during_save_keeps_previous_checkpoint(folder, tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def dying_save(obj, f):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint dies half-written
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        A.main(tiny(folder, tmp_path / "run", "--epochs", "2", "--eval", "none"))
    _, ck = weights(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(folder, tmp_path, monkeypatch, capsys):
    real, calls = A.pretrain_loss, []

    def poisoned(*a, **kw):
        loss, terms = real(*a, **kw)
        calls.append(1)
        return (loss * math.nan, terms) if len(calls) == 6 else (loss, terms)

    monkeypatch.setattr(A, "pretrain_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        A.main(tiny(folder, tmp_path / "run", "--epochs", "3", "--eval", "none"))
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 2, step 5" in err and "infonce" in err and "--resume" in err
    w, ck = weights(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())
    monkeypatch.setattr(A, "pretrain_loss", real)
    res = A.main(["--resume", str(tmp_path / "run"), *tiny(folder, tmp_path / "run", "--epochs", "3",
                                                           "--eval", "none", "--lr", "0.01")[:-2]])
    assert res["epochs"] == 3 and torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 3


# ---------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback, nothing written
# ---------------------------------------------------------------------------------------------------
def fails(argv, capsys, pattern, out=None):
    with pytest.raises(SystemExit) as e:
        A.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    if out is not None:
        assert not os.path.exists(out)


@pytest.mark.parametrize("extra,pattern", [
    (["--method", "bogus"], r"invalid choice: 'bogus'"),
    (["--dataset", "mnist"], r"invalid choice: 'mnist'"),
    (["--eps", "2"], r"outside \[0, 1\]"),
    (["--eps", "-0.1"], r"outside \[0, 1\]"),
    (["--eps", "eight"], r"not a number or fraction"),
    (["--eps", "8/0"], r"not a number or fraction"),
    (["--step", "1.5"], r"outside \[0, 1\]"),
    (["--eval-step", "nan"], r"not a number or fraction|outside"),
    (["--epochs", "0"], r"must be at least 1"),
    (["--batch-size", "-8"], r"must be at least 2"),
    (["--batch-size", "1"], r"must be at least 2"),
    (["--hn-beta", "nan"], r"finite number >= 0"),
    (["--adv-weight", "-1"], r"finite number >= 0"),
    (["--device", "mps"], r"only cpu and cuda"),
    (["--batch-size", "1000"], r"larger than the 32 training images"),
    (["--epochs", "two"], r"not an integer"),
    (["--lr", "0"], r"finite number > 0"),
    (["--tau-plus", "1"], r"tau-plus"),
])
def test_bad_arguments(folder, tmp_path, capsys, extra, pattern):
    fails(tiny(folder, tmp_path / "run", *extra), capsys, pattern, out=tmp_path / "run")


def test_eps_fraction_parses_exactly():
    assert A.parse_args(["--eps", "8/255"]).eps == 8 / 255
    assert A.parse_args(["--eps", "0.0314"]).eps == 0.0314


def test_bad_data(tmp_path, capsys, folder):
    out = tmp_path / "run"
    fails(tiny(str(tmp_path / "nowhere"), out), capsys, r"does not exist", out)
    (tmp_path / "empty").mkdir()
    fails(tiny(str(tmp_path / "empty"), out), capsys, r"train is missing", out)
    subprocess.run(["cp", "-r", folder, str(tmp_path / "notest")], check=True)
    subprocess.run(["rm", "-r", str(tmp_path / "notest" / "test")], check=True)
    fails(tiny(str(tmp_path / "notest"), out), capsys, r"test is missing", out)
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "test" / "a").mkdir(parents=True)
    fails(tiny(str(tmp_path / "noimg"), out), capsys, r"holds no images", out)
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", folder, str(bad)], check=True)
    (bad / "train" / "class0" / "3.png").write_bytes(b"not an image")
    fails(tiny(str(bad), out), capsys, r"cannot read image .*class0/3\.png", out)


def test_images_of_another_size_are_resized(folder, tmp_path, capsys):
    from PIL import Image
    d = tmp_path / "mixed"
    subprocess.run(["cp", "-r", folder, str(d)], check=True)
    Image.new("RGB", (40, 28), (200, 10, 10)).save(d / "train" / "class1" / "big.png")
    A.main(tiny(str(d), tmp_path / "run", "--eval", "none"))
    assert "resized 1 images" in capsys.readouterr().out


def test_offline_cifar_download(tmp_path, capsys, monkeypatch):
    import urllib.error
    import torchvision

    def offline(self):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    fails(["--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--out", str(tmp_path / "run")],
          capsys, r"could not get cifar10 .* offline\? .*--dataset folder", tmp_path / "run")


def test_refuses_to_clobber_and_checks_resume(folder, tmp_path, capsys):
    run = tmp_path / "run"
    A.main(tiny(folder, run, "--eval", "none"))
    before = open(run / "last.pt", "rb").read()
    fails(tiny(folder, run, "--eval", "none"), capsys, r"already holds a run: pass --resume")
    for extra, name in ((["--method", "rocl"], "--method"), (["--width", "16"], "--width")):
        fails(["--resume", str(run), *tiny(folder, run, "--eval", "none", *extra)[:-2]], capsys,
              rf"cannot resume .*{name} ")
    fails(["--resume", str(run), *tiny(folder, run, "--eval", "none")[:-2], "--dataset", "cifar10"], capsys,
          r"cannot resume .*--dataset folder \(checkpoint\) vs cifar10")
    assert open(run / "last.pt", "rb").read() == before
    A.main(tiny(folder, run, "--eval", "none", "--overwrite"))


def test_corrupt_and_mismatched_checkpoints(folder, tmp_path, capsys):
    run = tmp_path / "run"
    A.main(tiny(folder, run, "--eval", "none"))
    ck = torch.load(run / "last.pt", weights_only=True)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(run / "last.pt", "rb").read()[:1000])
    fails(["--eval-only", str(truncated)], capsys, r"not a readable checkpoint")
    fails(["--resume", str(truncated), "--out", str(tmp_path / "x")], capsys, r"not a readable checkpoint")
    prefixed = dict(ck, encoder={f"module.{k}": v for k, v in ck["encoder"].items()})
    torch.save(prefixed, tmp_path / "prefixed.pt")
    fails(["--eval-only", str(tmp_path / "prefixed.pt")], capsys, r"encoder does not match .*missing stem\.0\.weight")
    wider = dict(ck, args=dict(ck["args"], width=16))
    torch.save(wider, tmp_path / "wider.pt")
    fails(["--eval-only", str(tmp_path / "wider.pt")], capsys, r"stem\.0\.weight \(8, 3, 3, 3\) vs \(16, 3, 3, 3\)")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    fails(["--eval-only", str(tmp_path / "foreign.pt")], capsys, r"not an ainfonce checkpoint")
    fails(["--eval-only", str(tmp_path / "missing.pt")], capsys, r"no checkpoint at")


def test_unwritable_or_full_output_fails_before_training(folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    fails(tiny(folder, tmp_path / "file" / "run"), capsys, r"cannot write to .*not a directory")
    monkeypatch.setattr(A.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=2**40, used=2**40, free=1024))
    fails(tiny(folder, tmp_path / "run"), capsys, r"only 0 MiB free", tmp_path / "run")


def test_autoattack_missing_is_a_clear_error(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    fails(tiny(folder, tmp_path / "run", "--autoattack"), capsys, r"pip install torchattacks", tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu(folder, tmp_path, capsys):
    fails(tiny(folder, tmp_path / "run", "--device", "cuda"), capsys, r"no CUDA GPU", tmp_path / "run")


def test_autoattack_runs_when_installed(folder, tmp_path):
    pytest.importorskip("torchattacks", reason="optional: pip install torchattacks")
    res = A.main(tiny(folder, tmp_path / "run", "--autoattack", "--eval-subset", "4"))
    assert 0 <= res["slf_aa"] <= res["slf_sa"]


# ---------------------------------------------------------------------------------------------------
# Data parallel: 2 ranks x B == 1 rank x 2B (gloo, CPU)
# ---------------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, method):
    import functools
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    A.instance_pgd = functools.partial(A.instance_pgd, random_start=False)  # the only other randomness
    args = A.parse_args(["--method", method, "--attack-steps", "3", "--width", "4"])
    torch.manual_seed(0)
    net = A.Net(4)
    x1, x2 = images(0, 8), images(1, 8)
    b = 8 // world
    x1, x2 = x1[rank * b:(rank + 1) * b], x2[rank * b:(rank + 1) * b]
    gather = A.gather_cat if world > 1 else None
    x_adv = A.attack_views(net, x1, x2, args, gather)
    loss, _ = A.pretrain_loss(net, x1, x2, x_adv, args, gather)
    loss.backward()
    params = list(net.parameters())
    if world > 1:
        A.allreduce_grads(params, world)
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": [p.grad for p in params],
                    "running_mean": net.encoder.stem[1].running_mean}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["both", "simclr"])
def test_two_ranks_equal_one_rank_with_the_global_batch(tmp_path, method):
    import torch.multiprocessing as mp
    for world in (1, 2):
        mp.spawn(_ddp_worker, args=(world, free_port(), str(tmp_path / f"w{world}.pt"), method), nprocs=world)
    one, two = (torch.load(tmp_path / f"w{w}.pt", weights_only=True) for w in (1, 2))
    assert torch.allclose(one["loss"], two["loss"], atol=1e-5)
    assert torch.allclose(one["running_mean"], two["running_mean"], atol=1e-6)
    for g1, g2 in zip(one["grads"], two["grads"]):
        assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-3), (g1 - g2).abs().max()


def test_torchrun_style_launch_trains_and_evaluates(folder, tmp_path):
    port, procs = free_port(), []
    for rank in range(2):
        procs.append(launch(tiny(folder, tmp_path / "run", "--epochs", "2"), WORLD_SIZE="2", RANK=str(rank),
                            LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0].count("epoch ") == 2 and outs[1][0] == ""  # one process logs
    res = json.load(open(tmp_path / "run" / "results.json"))
    assert 0 <= res["slf_ra"] <= res["slf_sa"] <= 1
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 8
