"""ainfonce.py: adversarial contrastive learning with the asymmetric InfoNCE (A-InfoNCE), in one
file.

Yu et al., "Adversarial Contrastive Learning via Asymmetric InfoNCE", ECCV 2022 (arXiv 2207.08374),
on both of its bases: RoCL (Kim, Tack, Hwang, NeurIPS 2020) and AdvCL (Fan et al., NeurIPS 2021).

Each step takes N unlabeled images, makes two augmented views x1, x2 and an instance-wise
adversarial view x_adv = PGD(x1) that maximises the contrastive loss of [x_adv; x2]. With
z = g(f(view)), z^ = z/|z| and S_ij = z^_i . sg(z^_j) / tau (keys detached: a directed term
l(i->j) moves only i):

    l(i->j) = -log( exp(S_ij) / sum_{k != i} exp(S_ik) )
    rocl    : 1/(3N) sum_n [ l(x1->x2) + l(x2->x1) + l(x1->a) + l(a->x1) + l(x2->a) + l(a->x2) ]
    infpos  : IP, adversarial views are inferior positives: l(clean->a) weighted alpha (0.2),
              l(a->clean) weighted 1-alpha; clean anchors are pulled only weakly toward x_adv
    hardneg : HN, the denominator becomes pos_i + Ng_i (HCL estimator, Robinson et al. 2021):
              Ng_i = max((sum_j w_ij e^S_ij - tau+ M pos_i) / (1 - tau+), M e^(-1/tau)),
              w_ij = e^(beta S_ij) / mean_k e^(beta S_ik) over the M negatives of row i
    both    : HN denominators with IP weights
    + RoCL's regulariser 1/256 * NT-Xent[x_adv; x2]; simclr has no attack.
The AdvCL base (--base advcl) makes AdvCL's loss asymmetric the same way: SupCon over the views
[x_adv, x1, x2, high-frequency x] (keys carry gradient, except in IP's clean<->adversarial
terms), x_adv a joint PGD of the contrastive loss and of the cross-entropy of pseudo-labels, the
pair weights as Asym-AdvCL writes them.

Measured (README.md: the commands, the machines, the tables): one step of every method on either
base, given the official code's settings (--hn-normalise official) and draws, equals the official
code's step, run on the CPU, to fp32 rounding.

Usage:
    python ainfonce.py --method hardneg --dataset cifar10          # paper recipe, one GPU
    python ainfonce.py --preset small --dataset folder --data-dir data/cifar10-jpeg   # a CPU run
    python ainfonce.py --base advcl --method both --dataset cifar10 --pseudo-labels LABELS.pkl
    torchrun --nproc_per_node 8 ainfonce.py --method both         # data parallel
    python ainfonce.py --resume runs/hardneg-cifar10-s0           # continue a run, then evaluate
    python ainfonce.py --eval-only runs/hardneg-cifar10-s0 --eval slf alf aff --autoattack
    python ainfonce.py --eval-only ACL.pt --dataset cifar10 --protocol robustssl --pretraining acl
    python ainfonce.py --benchmark --width 64 --batch-size 512 --amp   # speed
    python -m pytest -q       # tests; AINFONCE_TEST_DEVICE=cuda runs them on a GPU

Reading order: the loss, the attacks, the model, the steps of both bases, the augmentation, the
training loop, evaluation, the command line and main. A reader can stop at the divider; after it
come data and pseudo-label files, checkpoints and the field's layouts, results, processes,
progress and the benchmark.
"""
import argparse
import contextlib
import copy
import functools
import hashlib
import importlib
import io
import json
import math
import os
import pickle
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("simclr", "rocl", "infpos", "hardneg", "both")
SCHEMES = ("slf", "alf", "aff")
# A-InfoNCE: the asymmetries each method adds to the symmetric loss
# (IP: adversarial views are inferior positives, HN: they are hard negatives)
ASYMMETRY = {
    "simclr": (False, False),
    "rocl": (False, False),
    "infpos": (True, False),
    "hardneg": (False, True),
    "both": (True, True),
}


# ==== The loss ====================================================================================
def a_infonce(z, adv_views=(), *, temperature=0.5, ip_alpha=None, adv_weight=1.0,
              hn_beta=None, tau_plus=0.0, hn_normalise="negatives", pair_weights=None,
              detach_keys=True):
    """Generic (asymmetric) InfoNCE of V >= 2 views of N >= 2 instances.

    z: [V, N, D] raw projections (normalised here, in fp32; fp64 stays fp64).
    adv_views: indices of the adversarial views.
    Returns 1/(V N) sum over instances and ordered view pairs u != v of weight(u,v) * l(u->v).
    ip_alpha=None: all weights 1; a float: clean->adv adv_weight*ip_alpha,
    adv->clean adv_weight*(1-ip_alpha), other pairs 1. pair_weights: a V x V table of
    weight(u, v) instead (the AdvCL base's blocks).
    detach_keys=True: every directed term moves only its anchor (RoCL); False: the keys too, as
    SupCon and AdvCL's loss (then (tau/0.07)/(V-1) times this is SupCon's loss of the V views).
    hn_beta=None: plain denominator; a float: the HCL hard-negative estimator with tau_plus,
    its importance weights normalised over row i's negatives (hn_normalise="negatives", HCL's
    definition) or as the official Asym-RoCL code does ("official": column j divided by the mean
    of row j over all V*N columns, positives and self included); "official-advcl", as the
    official Asym-AdvCL code: that slip, the denominator of term (i, j) taken from row j, and its
    clamp (floor M e^-2 on the max-shifted scale).
    With V=2 and nothing else set this is SimCLR's NT-Xent.

    With detached keys the gradient is that of the stop-gradient loss, not the derivative of the
    loss value with respect to z: torch.autograd.gradcheck against the value would fail.

    >>> z = torch.stack([z1, z2, z_adv])
    >>> loss = a_infonce(z, adv_views=(2,), ip_alpha=0.2, hn_beta=1.0, tau_plus=0.12)
    """
    if not (torch.is_tensor(z) and z.dim() == 3):
        shape = getattr(z, "shape", type(z))
        raise ValueError(f"a_infonce needs z of shape [V views, N instances, D], got {shape}")
    V, N = z.shape[:2]
    if V < 2 or N < 2:
        raise ValueError(f"a_infonce needs >= 2 views of >= 2 instances, "
                         f"got z of shape {tuple(z.shape)}")
    try:
        adv = {range(V)[int(i)] for i in adv_views}
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"adv_views must be a sequence of view indices in [0, {V}), "
                         f"got {adv_views!r}")
    forms = ("negatives", "official", "official-advcl")
    rules = [
        ("hn_normalise", hn_normalise, hn_normalise in forms, " or ".join(map(repr, forms))),
        ("temperature", temperature, temperature > 0, "> 0"),
        ("tau_plus", tau_plus, 0 <= tau_plus < 1, "in [0, 1)"),
        ("hn_beta", hn_beta, hn_beta is None or hn_beta >= 0, ">= 0 or None"),
        ("ip_alpha", ip_alpha, ip_alpha is None or 0 <= ip_alpha <= 1, "in [0, 1] or None"),
        ("adv_weight", adv_weight, adv_weight >= 0, ">= 0"),
    ]
    for name, value, ok, rule in rules:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {value!r}")
    if pair_weights is None:
        weights = [[pair_weight(u, v, adv, ip_alpha, adv_weight) for v in range(V)]
                   for u in range(V)]
    else:
        weights = [[float(w) for w in row] for row in pair_weights]
        if ip_alpha is not None or len(weights) != V or any(len(row) != V for row in weights):
            raise ValueError(f"pair_weights must be a {V} x {V} table, without ip_alpha")
        if not all(math.isfinite(w) and w >= 0 for row in weights for w in row):
            raise ValueError("pair_weights must be finite and >= 0")
    if z.dtype != torch.float64:
        z = z.float()
    # the loss runs in fp32, also under --amp
    with torch.autocast(z.device.type, enabled=False):
        # scaled so that |z|^2 neither overflows nor underflows
        z = z / z.abs().amax(-1, keepdim=True).clamp_min(1e-30)
        # V*N rows: row r is view r // N of instance r % N
        zn = F.normalize(z.flatten(0, 1), dim=1)  # [V*N, D]
        # S_ij = z^_i . sg(z^_j) / tau: the gradient reaches the anchors only (or keys too)
        keys = zn.detach() if detach_keys else zn
        S = zn @ keys.T / temperature  # [V*N, V*N]
        instance = torch.arange(V * N, device=z.device) % N
        same = instance[:, None] == instance[None, :]  # [V*N, V*N]: two views of one instance
        eye = torch.eye(V * N, dtype=torch.bool, device=z.device)
        if hn_beta is None:
            # log sum_{k != i} exp(S_ik)
            log_denom = S.masked_fill(eye, -math.inf).logsumexp(1)  # [V*N]
        else:
            log_denom = hard_negative_log_denom(S, same, eye, V, N, temperature,
                                                hn_beta, tau_plus, hn_normalise)
        if hn_normalise == "official-advcl" and hn_beta is not None:
            # official Asym-AdvCL: exp_logits / (pos + Ng) broadcasts row j's denominator
            logp = S - log_denom[None, :]
        else:
            logp = S - log_denom[:, None]
        # l(u->v) of instance n is -logp[u, v, n]
        logp = logp.view(V, N, V, N).diagonal(dim1=1, dim2=3)  # [V, V, N]
        loss = S.new_zeros(())
        for u in range(V):
            for v in range(V):
                weight = weights[u][v]
                if u != v and weight:
                    loss = loss - weight * logp[u, v].sum()
        return loss / (V * N)


def pair_weight(u, v, adv, ip_alpha, adv_weight):
    """The weight of l(u->v): 1, except between a clean and an adversarial view under IP."""
    if ip_alpha is None or (u in adv) == (v in adv):
        return 1.0
    # A-InfoNCE (IP): clean->adv weak (alpha), adv->clean strong (1 - alpha)
    if v in adv:
        return adv_weight * ip_alpha
    return adv_weight * (1 - ip_alpha)


def hard_negative_log_denom(S, same, eye, V, N, temperature, hn_beta, tau_plus, hn_normalise):
    """A-InfoNCE (HN): log(pos_i + Ng_i), HCL's debiased, hardness-weighted negatives, per row i
    over its M = V(N-1) negatives. Exponents are shifted by c = 1/tau >= S: none overflows."""
    M, c = V * (N - 1), 1 / temperature
    e = (S - c).exp()
    # the mean of exp(S_ip) over the V-1 positives of row i
    pos = (e * (same & ~eye)).sum(1) / (V - 1)
    if hn_normalise == "negatives":
        # A-InfoNCE: w_ij over row i's negatives, of mean 1
        w = M * torch.softmax((hn_beta * S).masked_fill(same, -math.inf), 1)
    else:
        # official: imp = (1e-9)^beta on positives and self, and the broadcast divides
        # column j by row j's mean
        imp = torch.where(same, hn_beta * math.log(1e-9), hn_beta * S)
        log_mean = imp.logsumexp(1) - math.log(V * N)
        w = (hn_beta * S - log_mean[None, :]).exp().masked_fill(same, 0)
    ng = ((w * e).sum(1) - tau_plus * M * pos) / (1 - tau_plus)
    # the clamp: M e^(-1/tau); Asym-AdvCL's: M e^(-1/0.5) on its max-shifted (c) scale
    floor = M * math.exp(-2 * c)
    if hn_normalise == "official-advcl":
        floor = M * math.exp(-2)
    return (pos + ng.clamp_min(floor)).log() + c


# ==== Attacks: images in [0, 1] (not 0-255, not mean/std-normalised) in and out ===================
@contextlib.contextmanager
def eval_mode(module):
    """Eval mode (BN running statistics) inside; every submodule's previous mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def flat_norm(t):
    """Per-image L2 norm, shaped to broadcast over [B, C, H, W]."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.dim() - 1))


def ascend(loss_fn, x, x_adv, eps, step, steps, norm="linf"):
    """steps of gradient ascent on loss_fn from x_adv, projected to the eps-ball around x and to
    [0,1]: L_inf takes sign steps, L2 steps along the normalised gradient and projects radially."""
    with torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            grad, = torch.autograd.grad(loss_fn(x_adv), x_adv)
            if norm == "linf":
                x_adv = x_adv.detach() + step * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            else:
                d = x_adv.detach() + step * grad / flat_norm(grad) - x
                x_adv = x + d * (eps / flat_norm(d)).clamp(max=1)
            # moves every pixel toward x: stays inside either ball
            x_adv = x_adv.clamp(0, 1)
    return x_adv.detach()


def start_point(x, eps, norm="linf"):
    """A uniform point of the L_inf ball; in L2, a random direction at a radius uniform in
    [0, eps]."""
    if norm == "linf":
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    d = torch.randn_like(x)
    u = torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device)
    return (x + d / flat_norm(d) * eps * u).clamp(0, 1)


def instance_pgd(embed, x, x_pos, *, eps=8 / 255, step=0.007, steps=7, temperature=0.5,
                 random_start=True):
    """RoCL's instance-wise attack on images x, x_pos in [0, 1] ([N, 3, H, W]): perturb x to
    maximise the NT-Xent of [x_adv; x_pos] over the global batch. embed (encoder + projector) runs
    in eval mode, so x_pos's embedding is fixed: computed once."""
    with eval_mode(embed):
        with torch.no_grad():
            z_pos = embed(x_pos)  # [N, D]

        def loss(xa):
            z = torch.stack([embed(xa), z_pos])  # [2, N, D]
            return a_infonce(gather(z, 1), temperature=temperature)
        x_start = start_point(x, eps) if random_start else x
        return ascend(loss, x, x_start, eps, step, steps)


def pgd(classifier, x, y, *, eps=8 / 255, step=2 / 255, steps=20, norm="linf"):
    """Supervised PGD with a random start on the cross-entropy (Madry et al.), L_inf or L2,
    classifier in eval mode. x: images in [0, 1]; eps and step in the same pixel units."""
    with eval_mode(classifier):
        def loss(xa):
            return F.cross_entropy(classifier(xa), y)
        return ascend(loss, x, start_point(x, eps, norm), eps, step, steps, norm)


def trades_loss(model, x, y, *, beta=6.0, eps=8 / 255, step=2 / 255, steps=10):
    """TRADES (Zhang et al. 2019) on images x in [0, 1]: CE(f(x), y) + beta KL(f(x) || f(x_adv))."""
    with eval_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x), 1)

        def kl(xa):
            return F.kl_div(F.log_softmax(model(xa), 1), p_nat, reduction="sum")
        x_adv = ascend(kl, x, x + 0.001 * torch.randn_like(x), eps, step, steps)
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * robust


# ==== Model: CIFAR ResNet-18 encoder f and MLP projector g; inputs in [0,1], no normalisation ====
def distributed():
    """Several processes share the batch (torchrun); evaluation runs after they part."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(t, dim):
    """t of every process, concatenated along dim (differentiably): the global batch's negatives.
    In one process: t itself."""
    if not distributed():
        return t
    return GatherCat.apply(t, dim)


class BranchedBatchNorm2d(nn.Module):
    """AdvCL's batch norm: one per branch (normal, pgd, pgd_ce) in bn_list.K, as its checkpoints
    name them; `active` is the one a forward uses, set by use_branch."""

    def __init__(self, channels, branches, norm):
        super().__init__()
        self.bn_list = nn.ModuleList([norm(channels) for _ in range(branches)])
        self.active = 0

    def forward(self, x):
        return self.bn_list[self.active](x)


@contextlib.contextmanager
def use_branch(net, branch):
    """Forwards inside run through BN branch `branch` of every branched batch norm of net."""
    norms = [m for m in net.modules() if isinstance(m, BranchedBatchNorm2d)]
    for m in norms:
        m.active = branch
    try:
        yield
    finally:
        for m in norms:
            m.active = 0


class Block(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 in the layout the field's checkpoints share (conv1, bn1, layer1..4,
    shortcut): a 3x3 stride-1 stem (padding 1; solo-learn's has 2), no max-pool, BasicBlocks
    [2,2,2,2]; 8*width features. normalise=True adds the input normalisation (buffers mean, std)
    that some published encoders carry inside; branches > 1 gives every BN that many branches.
    Under torchrun its batch norm spans all processes (SyncBatchNorm2d)."""

    def __init__(self, width=64, normalise=False, stem_padding=1, branches=1):
        super().__init__()
        norm = SyncBatchNorm2d if distributed() else nn.BatchNorm2d
        if branches > 1:
            norm = functools.partial(BranchedBatchNorm2d, branches=branches, norm=norm)
        if normalise:
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("std", torch.ones(3))
        self.conv1 = nn.Conv2d(3, width, 3, 1, stem_padding, bias=False)
        self.bn1 = norm(width)
        chans = [width, width, 2 * width, 4 * width, 8 * width]
        for i in range(4):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(Block(chans[i], chans[i + 1], stride, norm),
                                  Block(chans[i + 1], chans[i + 1], 1, norm))
            setattr(self, f"layer{i + 1}", layer)
        self.dim = 8 * width

    def forward(self, x):  # [B, 3, 32, 32] in [0, 1] -> [B, 8 * width]
        if hasattr(self, "mean"):
            x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        x = F.relu(self.bn1(self.conv1(x)))  # [B, w, 32, 32]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 8w, 4, 4]
        return x.mean((2, 3))  # global average pool


class Net(nn.Module):
    """z = g(f(x)): encoder f, projector g = Linear(8w -> 2048) -> ReLU -> Linear(-> 128), no BN."""

    def __init__(self, width=64):
        super().__init__()
        self.encoder = ResNet18(width)
        self.projector = nn.Sequential(nn.Linear(self.encoder.dim, 2048), nn.ReLU(),
                                       nn.Linear(2048, 128))

    def forward(self, x):
        return self.projector(self.encoder(x))


# The AdvCL base: its BN branches (normal, pgd, pgd_ce), and the cluster counts of its
# pseudo-labels
BN_CLEAN = 0  # x1, x2 and the high-frequency view
BN_ADV = 1  # the contrastive attack's examples: the branch that is evaluated
BN_CE = 2  # the cross-entropy attack's examples
PSEUDO_KS = (2, 10, 50, 100, 500)


class AdvCLNet(nn.Module):
    """AdvCL's network (Fan et al. 2021, and Asym-AdvCL): the encoder with three BN branches and
    its heads: head_proj = Linear -> BatchNorm1d (shared by the branches) -> ReLU -> Linear(-> 128),
    and a linear classifier fc_K per pseudo-label set of K clusters. Convolutions are initialised
    as its code does (kaiming normal, fan-out)."""

    def __init__(self, width=64):
        super().__init__()
        self.encoder = ResNet18(width, branches=3)
        dim = self.encoder.dim
        self.heads = nn.ModuleDict({"head_proj": nn.Sequential(
            nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, 128))})
        for k in PSEUDO_KS:
            self.heads[f"fc_{k:03d}"] = nn.Linear(dim, k)
        for m in self.encoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def project(self, x, branch):
        """z of images x through BN branch `branch`: [B, 3, 32, 32] -> [B, 128]."""
        with use_branch(self.encoder, branch):
            return self.heads["head_proj"](self.encoder(x))

    def classify(self, x, branch):
        """The pseudo-label logits of x, one [B, K] per K; the projection is run too, unused, as
        AdvCL's code runs it (its head_proj's BN statistics move)."""
        with use_branch(self.encoder, branch):
            features = self.encoder(x)
        self.heads["head_proj"](features)
        return [self.heads[f"fc_{k:03d}"](features) for k in PSEUDO_KS]


# ==== The RoCL base's step ========================================================================
WARMUP_PEAK = 15.0  # RoCL: the lr warms up linearly from the base to 15x the base


def lr_at(it, total, warmup, base, peak=WARMUP_PEAK):
    """The lr of step `it`: a linear warm-up from base to peak*base over `warmup` steps, then a
    cosine to 0 at step `total`."""
    if it < warmup:
        return base * (1 + (peak - 1) * it / warmup)
    done = (it - warmup) / max(1, total - warmup)
    return base * peak * 0.5 * (1 + math.cos(math.pi * done))


@torch.no_grad()
def lars_(params, wd, trust=1e-3, eps=1e-8):
    """LARS as torchlars (You et al. 2017), in place on the gradients, before a plain SGD step:
    g <- (g + wd w) * trust |w| / (|g| + wd |w| + eps); returns the global gradient norm."""
    norms = []
    for p in params:
        w_norm, g_norm = p.norm(), p.grad.norm()
        nonzero = (w_norm > 0) & (g_norm > 0)
        scale = torch.where(nonzero, trust * w_norm / (g_norm + wd * w_norm + eps), 1.0)
        p.grad.add_(p, alpha=wd).mul_(scale)
        norms.append(g_norm)
    return torch.stack(norms).norm()


def rocl_loss(net, x1, x2, x_adv, args):
    """The RoCL base's loss of views x1, x2 and x_adv (None for simclr) -> (loss, {term: value}):
    A-InfoNCE of [x1; x2; x_adv] plus RoCL's regulariser, reg_weight * NT-Xent of [x_adv; x2]."""
    n, tau = len(x1), args.temperature
    if x_adv is None:  # SimCLR
        z = net(torch.cat([x1, x2])).view(2, n, -1)  # [2, N, 128]
        loss = a_infonce(gather(z, 1), temperature=tau)
        return loss, {"infonce": loss.detach()}
    if args.reg_forward == "separate":
        # RoCL's regulariser in its own train-mode forward, first, as the official step: the BN
        # running statistics see it before the main forward
        z_reg = net(torch.cat([x_adv, x2])).view(2, n, -1)  # [2, N, 128]
    z = net(torch.cat([x1, x2, x_adv])).view(3, n, -1)  # [3, N, 128]
    if args.reg_forward == "shared":
        # the x_adv and x2 rows of the main forward, with its 3N-batch BN statistics
        z_reg = torch.stack([z[2], z[1]])
    ip, hn = ASYMMETRY[args.method]
    infonce = a_infonce(gather(z, 1), adv_views=(2,), temperature=tau,
                        ip_alpha=args.ip_alpha if ip else None, adv_weight=args.adv_weight,
                        hn_beta=args.hn_beta if hn else None, tau_plus=args.tau_plus,
                        hn_normalise=args.hn_normalise)
    reg = a_infonce(gather(z_reg, 1), temperature=tau)  # the global batch, as the main loss
    terms = {"infonce": infonce.detach(), "reg": reg.detach()}
    return infonce + args.reg_weight * reg, terms


def rocl_step(net, xb, args, gen=None, lap=None):
    """One step of the RoCL base but the optimiser's, on a uint8 batch xb [N, 3, 32, 32]: its two
    augmentations x1, x2 (drawn from gen); x_adv, the instance-wise attack of x1 against x2
    (simclr: none); the loss (bf16 autocast with --amp, the loss itself in fp32); backward;
    gradients averaged over processes; LARS -> (loss, terms, gradient norm before LARS).
    lap(phase), if given, ends each phase."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x1 = augment(xb, gen).contiguous(memory_format=memory_format)
    x2 = augment(xb, gen).contiguous(memory_format=memory_format)
    if lap:
        lap("data_s")
    x_adv = None
    if args.method != "simclr":
        with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=args.amp):
            x_adv = instance_pgd(net, x1, x2, eps=args.eps, step=args.step,
                                 steps=args.attack_steps, temperature=args.temperature)
    if lap:
        lap("attack_s")
    with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=args.amp):
        loss, terms = rocl_loss(net, x1, x2, x_adv, args)
    params = list(net.parameters())
    for p in params:
        p.grad = None
    loss.backward()
    if distributed():  # what DDP's hooks do, once, after the step's only backward
        allreduce_grads(params, dist.get_world_size())
    return loss, terms, lars_(params, args.wd)


# ==== The AdvCL base's step (Fan et al. 2021; Asym-AdvCL) =========================================
CE_WEIGHT = 0.2  # the pseudo-label cross-entropy's weight
HFC_RADIUS = 8  # the high-frequency view: frequencies within this radius of the centre are removed
SUPCON_SCALE = 1 / 0.07  # SupCon's base temperature: its loss is (tau / 0.07) times the mean term


def high_frequency(x, radius=HFC_RADIUS):
    """AdvCL's high-frequency view: per image and channel, the 2-D spectrum (centred) without the
    frequencies within `radius` of the centre, back in pixel space (real part, not clipped)."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device).view(-1, 1).double()
    cols = torch.arange(w, device=x.device).view(1, -1).double()
    low = ((rows - h / 2) ** 2 + (cols - w / 2) ** 2).sqrt() < radius  # [H, W]: the disc
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    spectrum = spectrum * (~low).float()
    back = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1))
    return back.real.to(x.dtype)


def advcl_views(xb, gen=None):
    """AdvCL's views of a uint8 batch [B,3,32,32] -> floats in [0, 1]: x1, x2 = RandomResizedCrop
    (32, scale 0.2-1) + flip, then ColorJitter(0.4,0.4,0.4,0.1) p 0.8 and RandomGrayscale p 0.2;
    x_org = RandomCrop(32, padding 4) + flip (the attacked image). gen: as augment's."""
    views = []
    for _ in range(2):
        x = resized_crop_flip(xb.float() / 255, scale=(0.2, 1.0), gen=gen)
        x = color_jitter(x, *jitter_params(len(x), x.device, gen))
        views.append(random_gray(x, gen))
    return views[0], views[1], crop_flip(xb, gen)


def advcl_weights(args, phase, degree=None):
    """A-InfoNCE on AdvCL: the pair weights of the views [x_adv, x1, x2, hfc] -> (weights of terms
    whose keys carry gradient, weights of terms with detached keys), as the official losses.py
    computes them. rocl: AdvCL's SupCon, every pair 1. Asym-AdvCL writes the adv<->clean blocks
    over: in the attack (and HN's training, no stop-gradient) the block of rows adv takes
    adv_weight * l(adv->clean) and the block of rows clean a view of it, scaled again: adv_weight
    (1 + adv_weight) on adv->clean, 0 on clean->adv; with IP's stop-gradient the two blocks each
    take adv_weight (degree l(clean->adv) + (1 - degree) l(adv->clean)), keys detached."""
    keyed = [[1.0] * 4 for _ in range(4)]
    detached = [[0.0] * 4 for _ in range(4)]
    if args.method == "rocl":
        return keyed, detached
    aw = args.adv_weight
    stop_gradient = phase == "train" and ASYMMETRY[args.method][0]
    for c in (1, 2, 3):
        if stop_gradient:
            # A-InfoNCE (IP): clean anchors toward x_adv weak (degree), x_adv toward clean strong
            keyed[0][c] = keyed[c][0] = 0.0
            detached[c][0] = 2 * aw * degree
            detached[0][c] = 2 * aw * (1 - degree)
        else:
            keyed[0][c] = aw + aw * aw
            keyed[c][0] = 0.0
    return keyed, detached


def advcl_contrastive(z, args, phase, degree=None):
    """The contrastive loss of z [4, N, 128] (views x_adv, x1, x2, hfc): SupCon's scale times
    a_infonce, with HN in training for hardneg and both (the attack of every method is plain)."""
    keyed, detached = advcl_weights(args, phase, degree)
    hn = phase == "train" and ASYMMETRY[args.method][1]
    form = "official-advcl" if args.hn_normalise == "official" else "negatives"
    kw = dict(adv_views=(0,), temperature=args.temperature, tau_plus=args.tau_plus,
              hn_beta=args.hn_beta if hn else None, hn_normalise=form)
    scale = args.temperature * SUPCON_SCALE / 3  # SupCon: the mean over each anchor's positives
    loss = scale * a_infonce(gather(z, 1), pair_weights=keyed, detach_keys=False, **kw)
    if any(any(row) for row in detached):
        loss = loss + scale * a_infonce(gather(z, 1), pair_weights=detached, **kw)
    return loss


def pseudo_label_ce(logits, labels, reduction):
    """The mean over the K sets of the cross-entropies of the pseudo-labels (-1: none). The mean
    of a set is over its labelled images: 0, not NaN, for a batch without one."""
    parts = []
    for lg, lb in zip(logits, labels):
        ce = F.cross_entropy(lg, lb, reduction="sum", ignore_index=-1)
        if reduction == "mean":
            ce = ce / (lb != -1).sum().clamp_min(1)
        parts.append(ce)
    return sum(parts) / len(parts)


def advcl_forwards(net, x_cl, x_ce, x1, x2, hfc):
    """The official step's forwards, in its order (their BN statistics move in it): pgd(x_cl),
    pgd_ce(x_ce), normal(x1, x2, hfc) -> (z [4, N, 128] of [x_cl, x1, x2, hfc], logits)."""
    z_cl = net.project(x_cl, BN_ADV)
    logits = net.classify(x_ce, BN_CE)
    z = [z_cl] + [net.project(x, BN_CLEAN) for x in (x1, x2, hfc)]
    return torch.stack(z), logits


def advcl_attack(net, x1, x2, x_org, hfc, labels, args):
    """AdvCL's joint attack, train mode throughout (BN statistics move): from two uniform random
    starts around x_org (not clipped), PGD steps on contrastive([x_cl, x1, x2, hfc]) + 0.2 *
    summed CE; x_cl gets only the contrastive gradient, x_ce only the CE one. -> (x_cl, x_ce)."""
    eps = args.eps
    x_cl = x_org + torch.zeros_like(x_org).uniform_(-eps, eps)
    x_ce = x_org + torch.zeros_like(x_org).uniform_(-eps, eps)
    with torch.enable_grad():
        for _ in range(args.attack_steps):
            x_cl = x_cl.detach().requires_grad_(True)
            x_ce = x_ce.detach().requires_grad_(True)
            z, logits = advcl_forwards(net, x_cl, x_ce, x1, x2, hfc)
            loss = advcl_contrastive(z, args, "attack")
            loss = loss + CE_WEIGHT * pseudo_label_ce(logits, labels, "sum")
            grad_cl, grad_ce = torch.autograd.grad(loss, [x_cl, x_ce])
            x_cl = x_cl.detach() + args.step * grad_cl.sign()
            x_cl = torch.min(torch.max(x_cl, x_org - eps), x_org + eps).clamp(0, 1)
            x_ce = x_ce.detach() + args.step * grad_ce.sign()
            x_ce = torch.min(torch.max(x_ce, x_org - eps), x_org + eps).clamp(0, 1)
    return x_cl.detach(), x_ce.detach()


def stop_degree(args, epoch, distance, distances, n):
    """A-InfoNCE (IP) on AdvCL, where it adapts (ip_adaptive_from >= 0): the clean anchors'
    weight. Up to epoch ip_adaptive_from (1-based) it is ip_alpha and the distances' sum and count
    go into distances (Asym-AdvCL's dis_avg, weighted by images); after it, it moves from ip_alpha
    to 0.5 as the batch's distance falls from their mean to ip_d_min."""
    if epoch <= args.ip_adaptive_from:
        distances[0] += distance * n
        distances[1] += n
        return args.ip_alpha
    mean = distances[0] / distances[1]
    if distance > mean:
        return args.ip_alpha
    if distance < args.ip_d_min:
        return 0.5
    return (mean - distance) / (mean - args.ip_d_min) * (0.5 - args.ip_alpha) + args.ip_alpha


def advcl_lr_at(it, per_epoch, epochs, base, warmup_epochs, warmup_from=0.01):
    """AdvCL's schedule: per epoch e (1-based), a cosine from base to base * 1e-3 over `epochs`;
    the first warmup_epochs instead rise linearly, per step, from warmup_from to the cosine's
    value at warmup_epochs."""
    e, b = it // per_epoch + 1, it % per_epoch
    eta_min = base * 0.1 ** 3
    if e <= warmup_epochs:
        warm_to = eta_min + (base - eta_min) * (1 + math.cos(math.pi * warmup_epochs / epochs)) / 2
        p = (b + (e - 1) * per_epoch) / (warmup_epochs * per_epoch)
        return warmup_from + p * (warm_to - warmup_from)
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * e / epochs)) / 2


def advcl_step(net, xb, labels, args, epoch, distances, gen=None, lap=None):
    """One step of the AdvCL base but the optimiser's, on a uint8 batch xb and its pseudo-labels
    [5, N]: the views (drawn from gen), the joint attack, the forwards in the official order, IP's
    adaptive degree (epoch 1-based; distances: the sum and count of its distances), the loss
    (contrastive + 0.2 mean CE), backward, gradients averaged over processes -> (loss, terms,
    gradient norm)."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    views = [v.contiguous(memory_format=memory_format) for v in advcl_views(xb, gen)]
    x1, x2 = views[:2]
    x_org = views[2]
    if lap:
        lap("data_s")
    hfc = high_frequency(x_org)
    with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=args.amp):
        x_cl, x_ce = advcl_attack(net, x1, x2, x_org, hfc, labels, args)
    if lap:
        lap("attack_s")
    with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=args.amp):
        z, logits = advcl_forwards(net, x_cl, x_ce, x1, x2, hfc)
        degree = args.ip_alpha
        if ASYMMETRY[args.method][0] and args.ip_adaptive_from >= 0:
            # two forwards without gradient through the normal branch (their BN statistics move)
            with torch.no_grad(), use_branch(net.encoder, BN_CLEAN):
                distance = F.pairwise_distance(net.encoder(x_org), net.encoder(x_cl)).mean()
            world = 1
            if distributed():
                world = dist.get_world_size()
                distance = AllReduce.apply(distance) / world
            degree = float(stop_degree(args, epoch, distance.item(), distances, len(x1) * world))
        contrastive = advcl_contrastive(z, args, "train", degree)
        ce = pseudo_label_ce(logits, labels, "mean")
        loss = contrastive + CE_WEIGHT * ce
    params = list(net.parameters())
    for p in params:
        p.grad = None
    loss.backward()
    if distributed():
        allreduce_grads(params, dist.get_world_size())
    grad_norm = torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm()
    terms = {"contrastive": contrastive.detach(), "ce": ce.detach(),
             "degree": torch.tensor(degree, device=xb.device)}
    return loss, terms, grad_norm


# ==== Augmentation: torchvision's transforms as batched tensor ops on the device =================
def gray(x):
    """ITU-R 601 luma, as torchvision's rgb_to_grayscale: [B, 3, H, W] -> [B, 1, H, W]."""
    rgb = x.unbind(1)
    return (0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[:, None]


def hue_shift(x, shift):
    """Rotate the hue by shift [B] (in turns): RGB -> HSV, H += shift, HSV -> RGB."""
    v, m = x.amax(1), x.amin(1)
    chroma = v - m
    r, g, b = x.unbind(1)
    cd = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h = torch.where(v == g, 2 + (b - r) / cd, 4 + (r - g) / cd)
    h = torch.where(v == r, (g - b) / cd, h)
    h = (torch.where(chroma > 0, h, torch.zeros_like(h)) / 6 + shift.view(-1, 1, 1)) % 1
    # HSV -> RGB: channel n uses (n + 6H) mod 6
    k = torch.stack([5 + 6 * h, 3 + 6 * h, 1 + 6 * h], 1) % 6
    return v[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def adjust(x, op, f):
    """torchvision's ColorJitter ops with a factor per image f [B]: 0 brightness, 1 contrast,
    2 saturation (blend with black, the mean gray, the gray image), 3 hue (shift in turns)."""
    if op == 3:
        return hue_shift(x, f)
    f = f.view(-1, 1, 1, 1)
    if op == 0:
        other = 0.0
    elif op == 1:
        other = gray(x).mean((1, 2, 3), keepdim=True)
    else:
        other = gray(x)
    return (f * x + (1 - f) * other).clamp(0, 1)


def crop_params(b, device, size=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10,
                gen=None):
    """RandomResizedCrop.get_params per image: (w, h, x0, y0), each [b]. Like torchvision, take
    the first of 10 tries that fits, else the whole (square) image. The aspect is log-uniform.
    gen: the generator of the draws (None: the global one), here and in every augmentation."""
    area = size * size * torch.empty(b, tries, device=device).uniform_(*scale, generator=gen)
    log_ratio = torch.empty(b, tries, device=device).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().round()  # [b, tries]
    h = (area / aspect).sqrt().round()
    fits = (w >= 1) & (w <= size) & (h >= 1) & (h <= size)
    first = fits.float().argmax(1, keepdim=True)
    w = torch.where(fits.any(1), w.gather(1, first).squeeze(1), size)  # [b]
    h = torch.where(fits.any(1), h.gather(1, first).squeeze(1), size)
    x0 = (torch.rand(b, device=device, generator=gen) * (size - w + 1)).floor()
    y0 = (torch.rand(b, device=device, generator=gen) * (size - h + 1)).floor()
    return w, h, x0, y0


def jitter_params(b, device, gen=None):
    """ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, per image: (on [b], factors [b, 4],
    order [b, 4]). Brightness, contrast and saturation factors uniform in [0.6, 1.4], hue in
    [-0.1, 0.1]; the four ops in a random order per image (a uniform permutation), as
    torchvision's ColorJitter.get_params."""
    on = torch.rand(b, device=device, generator=gen) < 0.8
    f = torch.cat([torch.empty(b, 3, device=device).uniform_(0.6, 1.4, generator=gen),
                   torch.empty(b, 1, device=device).uniform_(-0.1, 0.1, generator=gen)], 1)
    order = torch.rand(b, 4, device=device, generator=gen).argsort(1)
    return on, f, order


def color_jitter(x, on, f, order):
    """Apply, to the images where on, op order[:, k] with its factor f[:, op], for k = 0..3."""
    for k in range(4):
        for op in range(4):
            where = (on & (order[:, k] == op)).view(-1, 1, 1, 1)
            x = torch.where(where, adjust(x, op, f[:, op]), x)
    return x


def random_gray(x, gen=None):
    """RandomGrayscale(p=0.2) of float images [B, 3, H, W]."""
    to_gray = (torch.rand(len(x), device=x.device, generator=gen) < 0.2).view(-1, 1, 1, 1)
    return torch.where(to_gray, gray(x).expand_as(x), x)


def resized_crop_flip(x, scale=(0.08, 1.0), gen=None):
    """RandomResizedCrop(32, scale) and a horizontal flip (p 0.5) of float images [B,3,32,32]:
    bilinear, as one grid_sample."""
    b, dev = x.size(0), x.device
    w, h, x0, y0 = crop_params(b, dev, scale=scale, gen=gen)
    flip = torch.where(torch.rand(b, device=dev, generator=gen) < 0.5, -1.0, 1.0)
    # the output's [-1, 1] -> the crop box in input coordinates
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = flip * w / 32
    theta[:, 0, 2] = (w + 2 * x0) / 32 - 1
    theta[:, 1, 1] = h / 32
    theta[:, 1, 2] = (h + 2 * y0) / 32 - 1
    grid = F.affine_grid(theta, [b, 3, 32, 32], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(xb, gen=None):
    """The paper's augmentation of a uint8 batch [B,3,32,32] -> float in [0,1], each image with its
    own draws: ColorJitter(0.4,0.4,0.4,0.1) p=0.8 (ops in a random order per image),
    RandomGrayscale p=0.2, horizontal flip p=0.5, RandomResizedCrop(32, scale=(0.08,1))."""
    x = xb.float() / 255
    x = color_jitter(x, *jitter_params(len(x), x.device, gen))
    return resized_crop_flip(random_gray(x, gen), gen=gen)


def crop_flip(xb, gen=None):
    """RandomCrop(32, padding=4) and RandomHorizontalFlip of uint8 images [B,3,32,32] -> [0, 1]."""
    b, dev = len(xb), xb.device
    dy = torch.randint(0, 9, (b, 1, 1, 1), device=dev, generator=gen)
    dx = torch.randint(0, 9, (b, 1, 1, 1), device=dev, generator=gen)
    rows = torch.arange(32, device=dev).view(1, 1, 32, 1) + dy  # [B, 1, 32, 1]
    cols = torch.arange(32, device=dev).view(1, 1, 1, 32) + dx  # [B, 1, 1, 32]
    images = torch.arange(b, device=dev).view(b, 1, 1, 1)
    channels = torch.arange(3, device=dev).view(1, 3, 1, 1)
    x = F.pad(xb, (4, 4, 4, 4))[images, channels, rows, cols]  # [B, 3, 32, 32]
    flip = torch.rand(b, 1, 1, 1, device=dev, generator=gen) < 0.5
    return torch.where(flip, x.flip(3), x).float() / 255


# ==== Pretraining =================================================================================
KNN_BANK = 5000  # the kNN monitor's training images (a fixed shuffle)
KNN_QUERIES = 1000  # and its test images


@torch.no_grad()
def knn_accuracy(encoder, x_bank, y_bank, x_query, y_query, n_classes, k=200, t=0.1, bs=1024):
    """The weighted kNN monitor of InstDisc and MoCo: cosine similarities of eval-mode fp32 encoder
    features; the k nearest bank images vote for their class with weight exp(similarity / t). No
    randomness, no BN update."""
    def features(x):
        parts = [encoder(as_float(x[i])) for i in batches(len(x), bs, x.device)]
        return F.normalize(torch.cat(parts), dim=1)
    with eval_mode(encoder), strict_fp32(x_bank.device):
        bank, query = features(x_bank), features(x_query)
        sim, idx = (query @ bank.T).topk(min(k, len(bank)), dim=1)  # [Q, k]
        votes = torch.zeros(len(query), n_classes, device=query.device)
        votes.scatter_add_(1, y_bank[idx], (sim / t).exp())  # [Q, classes]
    return (votes.argmax(1) == y_query).float().mean().item()


def train(args, net, data, device, rank, world, ck=None, pseudo=None, pseudo_origin=None):
    """The pretraining loop, step by step. A checkpoint after every epoch (and every --ckpt-every
    steps) holds the network, the optimiser, the counters, the epoch log, the RNG states and what
    made the weights; every --knn-every epochs rank 0 adds the kNN monitor's accuracy to the
    epoch's line. SIGTERM or Ctrl-C finishes the step, saves and exits (130). The AdvCL base: its
    step, its SGD (weight decay; RoCL's is inside LARS) and schedule; pseudo: its pseudo-labels
    [5, n_train], pseudo_origin: what made them."""
    advcl = args.base == "advcl"
    x_train = data.x_train.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net.to(device).to(memory_format=memory_format)
    per_epoch = len(x_train) // args.batch_size  # the last partial batch is dropped
    total = per_epoch * args.epochs
    per_rank = args.batch_size // world
    params = list(net.parameters())
    wd = args.wd if advcl else 0.0  # RoCL's weight decay is inside LARS
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=wd)
    if advcl:
        pseudo_on_device = pseudo.to(device)
    # the run's counters (sums: this epoch's loss terms; distances: AdvCL IP's first epochs)
    counters = {"step": 0, "train_s": 0.0, "epoch_s": 0.0, "sums": {}, "history": [],
                "distances": [0.0, 0]}
    if ck:
        opt.load_state_dict(ck["optimizer"])
        counters.update({k: ck[k] for k in counters if k in ck})
        counters["sums"] = {k: torch.tensor(v, device=device) for k, v in ck["sums"].items()}
        if len(ck["rng"]) == world:
            set_rng_state(ck["rng"][rank], device)
        else:  # another number of processes: fresh streams, so not bit-exact
            torch.manual_seed(args.seed + rank + 7919 * counters["step"])
    knn = None
    if args.knn_every and rank == 0:
        bank = fixed_shuffle(len(x_train), KNN_BANK)
        query = fixed_shuffle(len(data.x_test), KNN_QUERIES)
        knn = [x_train[bank.to(device)], data.y_train[bank], data.x_test[query],
               data.y_test[query]]
        knn = [t.to(device) for t in knn]
    model = torch.compile(net) if args.compile else net
    # What made these weights: the arguments as first given, then each invocation's own record:
    # the step it starts at, its command, its flags and what they changed
    run_args = {**vars(args), "n_classes": data.n_classes}
    changes = {}
    for key, value in run_args.items():
        if ck and key not in OWN_KEYS + ("given",) and ck["args"].get(key) != value:
            changes[key] = [ck["args"].get(key), value]
    first_args = ck.get("first_args", ck["args"]) if ck else run_args
    invocations = ck.get("invocations", []) if ck else []
    invocations = invocations + [{"step": counters["step"], "command": args.command,
                                  "given": args.given, "changes": changes}]
    path = os.path.join(args.out, "last.pt")
    resume = command_line("--resume", args.out)  # what continues this run

    def save():
        states = [rng_state(device)] * world
        if world > 1:
            dist.all_gather_object(states, rng_state(device))
        if rank != 0:
            return
        head = net.heads if advcl else net.projector
        state = {"encoder": net.encoder.state_dict(), "projector": head.state_dict(),
                 "optimizer": opt.state_dict(), "epoch": len(counters["history"]), **counters,
                 "sums": {k: float(v) for k, v in counters["sums"].items()}, "args": run_args,
                 "first_args": first_args, "invocations": invocations, "data": data.identity,
                 "rng": states, "env": provenance(device)}
        if advcl:
            state["pseudo_labels"] = pseudo_origin
            state["pseudo_label_values"] = pseudo
        else:
            del state["distances"]
        try:
            atomic_write(path, lambda f: torch.save(state, f))
            for name, text in run_files(state).items():
                atomic_write(os.path.join(args.out, name), lambda f: f.write(text.encode()))
        except WriteFailed as e:
            kept = "no checkpoint yet"
            if os.path.exists(path):
                step = torch.load(path, map_location="cpu", weights_only=True)["step"]
                kept = f"{path} still holds step {step}"
            raise WriteFailed(f"{e}; {kept}; free space, then: {resume}")

    # SIGTERM / SIGINT: finish the step, save, exit
    stopping = []
    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        handlers[sig] = signal.signal(sig, lambda *_: stopping.append(1))
    perm, last = None, time.time()
    try:
        while counters["step"] < total:
            it = counters["step"]
            epoch, in_epoch = divmod(it, per_epoch)
            if perm is None or in_epoch == 0:
                # the same order on every rank
                order = torch.Generator().manual_seed(args.seed * 100003 + epoch)
                perm = torch.randperm(len(x_train), generator=order).to(device)
                tick = progress(f"epoch {epoch + 1} step", per_epoch, quiet=rank != 0)
            start = in_epoch * args.batch_size + rank * per_rank
            idx = perm[start:start + per_rank]
            # the step's augmentations are drawn from a stream of the seed, the rank and the step
            # alone: runs of one seed see the same views whatever their attacks draw
            gen = torch.Generator(device).manual_seed((args.seed << 40) + (rank << 32) + it)
            if advcl:
                lr = advcl_lr_at(it, per_epoch, args.epochs, args.lr, args.warmup_epochs)
                result = advcl_step(model, x_train[idx], pseudo_on_device[:, idx], args,
                                    epoch + 1, counters["distances"], gen)
            else:
                lr = lr_at(it, total, per_epoch * args.warmup_epochs, args.lr)
                result = rocl_step(model, x_train[idx], args, gen)
            loss, terms, grad_norm = result
            for param_group in opt.param_groups:
                param_group["lr"] = lr
            # One host sync per step, and device-resident flags (NCCL has no CPU tensors): a
            # non-finite loss or gradient on any rank, or a stop request to any rank, stops
            # every rank at this step.
            halt = torch.stack([~torch.isfinite(loss.detach() + grad_norm),
                                torch.tensor(bool(stopping), device=device)]).float()
            if world > 1:
                dist.all_reduce(halt, dist.ReduceOp.MAX)
            bad, stop = halt.tolist()
            if bad:  # before the update: the weights stay good
                parts = ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                advice = "no checkpoint yet; restart with a smaller --lr"
                if os.path.exists(path):
                    advice = (f"last good checkpoint: {path} (epoch {len(counters['history'])}); "
                              f"resume it with --resume {args.out} --lr <smaller>")
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1}, step {it} (loss "
                                    f"{loss.item():.4g}: {parts}; grad norm "
                                    f"{grad_norm.item():.4g}); {advice}")
            opt.step()
            counters["step"] += 1
            for k, v in {"loss": loss.detach(), **terms}.items():
                counters["sums"][k] = counters["sums"].get(k, 0) + v
            now = time.time()
            counters["train_s"] += now - last
            counters["epoch_s"] += now - last
            last = now
            # the loss is read (a host sync) only when the line is shown
            tick(in_epoch + 1,
                 lambda: f"loss {float(counters['sums']['loss']) / (in_epoch + 1):.4f}")
            if counters["step"] % per_epoch == 0:
                # the epoch is complete: its log line, then the checkpoint that holds it
                means = {k: float(v) / per_epoch for k, v in counters["sums"].items()}
                speed = per_epoch * args.batch_size / counters["epoch_s"]
                record = {"epoch": epoch + 1, "step": counters["step"], **means, "lr": lr,
                          "images_per_s": speed, "train_s": counters["train_s"]}
                counters["history"].append(record)
                counters["sums"], counters["epoch_s"] = {}, 0.0
                if knn and (epoch + 1) % args.knn_every == 0:  # not in the training time
                    # the branch that is evaluated (AdvCL: pgd)
                    with use_branch(net.encoder, BN_ADV if advcl else 0):
                        record["knn"] = knn_accuracy(net.encoder, *knn, data.n_classes)
                save()
                if rank == 0:
                    eta = hms((total - counters["step"]) * args.batch_size / speed)
                    shown = f"kNN {100 * record['knn']:5.2f}% | " if "knn" in record else ""
                    print(f"epoch {epoch + 1:4d}/{args.epochs} | loss {record['loss']:.4f} | "
                          f"lr {lr:.4f} | {shown}{speed:7.1f} img/s | ETA {eta}", flush=True)
            elif stop or (args.ckpt_every and counters["step"] % args.ckpt_every == 0):
                save()
            last = time.time()
            if stop:
                raise KeyboardInterrupt
        if stopping:  # asked during the last step, after its check: stop before the evaluation
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted: {path} holds step {counters['step']}; continue with: {resume}",
                  file=sys.stderr)
        raise SystemExit(130)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# ==== Evaluation: fine-tune a scheme -> classifier; measure it -> SA, RA (strict fp32) ============
# Finetuning protocols: settings per scheme, recorded with the results. "asym-rocl": the official
# Asym-RoCL finetuning; "asym-advcl": the official Asym-AdvCL finetuning_advCL_SLF.py with the lrs
# of its shell scripts; "robustssl": the field's benchmark (GodXuxilie/RobustSSL_Benchmark,
# vanilla_finetuning.py --mode ALL and setup_hyperparameter in its utils.py), per pretraining
# method; as in its code, a setting made for one scheme carries over to the next (DynACL-AIR's 5
# SLF epochs on CIFAR-10 hold for ALF and AFF). A value per data set is a dict.
_LF = dict(batch_size={"cifar10": 512, "cifar100": 512, "stl10": 128}, milestones=[10, 20])
_ACL = dict(_LF, lr={"cifar10": 0.01, "cifar100": 0.05, "stl10": 0.01})
_AIR = dict(_LF, lr={"cifar10": 0.01, "cifar100": 0.1, "stl10": 0.01})
_AIR2 = dict(_LF, batch_size={"cifar10": 512, "cifar100": 512})
_AFF = dict(batch_size=128, lr=0.1, milestones=[15, 20])
_ADVCL_LF = dict(batch_size=512, lr=0.01, milestones=[15, 20])
_ADVCL_FT = {"slf": _ADVCL_LF, "alf": _ADVCL_LF, "aff": _AFF}
ROBUSTSSL = {
    "acl": {"slf": _ACL, "alf": _ACL, "aff": dict(_AFF, epochs=100, milestones=[40, 60])},
    "dynacl": {"slf": _ACL, "alf": _ACL, "aff": _AFF},
    "dynacl++": {"slf": _ACL, "alf": _ACL, "aff": _AFF},
    "advcl": _ADVCL_FT,
    "a-infonce": _ADVCL_FT,
    "deacl": _ADVCL_FT,
    "dynacl-air": {"slf": dict(_AIR, epochs={"cifar10": 5}), "alf": _AIR, "aff": _AFF},
    "dynacl-air++": {
        "slf": dict(_AIR2, lr={"cifar10": 0.01, "cifar100": 0.09}),
        "alf": dict(_AIR2, lr={"cifar10": 0.01, "cifar100": 0.1}, epochs={"cifar10": 4}),
        "aff": _AFF,
    },
    # its setup_hyperparameter tests for 'DynACL_RCS', its command line says 'DynACL-RCS': defaults
    "dynacl-rcs": {},
}
# Asym-AdvCL's lrs of SLF, ALF, AFF per data set, for AdvCL's own loss and for A-InfoNCE's methods
ASYM_ADVCL_LR = {"cifar10": {"rocl": (0.1, 0.1, 0.1), "asymmetric": (0.01, 0.01, 0.1)},
                 "cifar100": {"rocl": (0.1, 0.1, 0.1), "asymmetric": (0.1, 0.1, 0.1)}}
# the training attacks of ALF and AFF, in every protocol
ATTACKS = {
    "slf": {},
    "alf": dict(eps=8 / 255, attack_steps=10, attack_step=2 / 255),
    "aff": dict(eps=8 / 255, attack_steps=10, attack_step=2 / 255, trades_beta=6.0),
}


def scheme_settings(protocol, method, dataset, ft_epochs, batch_size):
    """Per scheme: epochs, lr milestones (lr/10 at each), lr, momentum, weight decay, batch, the
    training augmentation (RandomCrop(32, padding 4) + flip, or none), the head's initialisation
    (RobustSSL: zeros) and the training attacks at eps 8/255 (ALF: PGD-10 of 2/255, Asym-AdvCL's
    PGD-20; AFF: TRADES, beta 6, 10 steps of 2/255). ft_epochs: the ALF/AFF epochs (asym-rocl:
    milestones at 60 % and 80 %), or every scheme's (the others: milestones scaled)."""
    epochs = ft_epochs or 25
    if protocol == "asym-rocl":
        milestones = [max(1, int(0.6 * epochs)), max(1, int(0.8 * epochs))]
        adversarial = dict(epochs=epochs, milestones=milestones, lr=0.1, wd=2e-4)
        own = {"slf": dict(epochs=150, milestones=[30, 50, 100], lr=0.1, wd=5e-4),
               "alf": adversarial, "aff": adversarial}
        common = dict(momentum=0.9, batch_size=batch_size, augment=False, zero_head=False)
        return {k: dict(v, **common, **ATTACKS[k]) for k, v in own.items()}
    if protocol == "asym-advcl":
        table = ASYM_ADVCL_LR["cifar100" if dataset == "cifar100" else "cifar10"]
        lrs = table["rocl" if method == "rocl" else "asymmetric"]
        milestones = [max(1, 15 * epochs // 25), max(1, 20 * epochs // 25)]
        settings = {}
        for scheme, lr in zip(SCHEMES, lrs):
            settings[scheme] = dict(epochs=epochs, milestones=milestones, lr=lr, momentum=0.9,
                                    wd=2e-4, batch_size=512, augment=True, zero_head=False,
                                    **ATTACKS[scheme])
        settings["alf"]["attack_steps"] = 20  # its training attack runs with train=False: 20 steps
        return settings
    hp = dict(epochs=25, milestones=[15, 20], lr=0.1, momentum=0.9, wd=2e-4, batch_size=128,
              augment=True, zero_head=True)
    settings = {}
    # its argparse defaults, then setup_hyperparameter's changes, carried over (--mode ALL)
    for scheme in SCHEMES:
        for key, value in ROBUSTSSL[method].get(scheme, {}).items():
            if isinstance(value, dict):
                value = value.get("cifar10" if dataset == "folder" else dataset)
            if value is not None:
                hp[key] = value
        settings[scheme] = dict(hp, **ATTACKS[scheme])
        if ft_epochs:  # a shorter run: the milestones keep their place in it
            kept = [max(1, m * ft_epochs // hp["epochs"]) for m in hp["milestones"]]
            settings[scheme].update(epochs=ft_epochs, milestones=kept)
    return settings


@contextlib.contextmanager
def strict_fp32(device):
    """No autocast and no TF32 (cuDNN allows TF32 convolutions by default): for every measured
    number."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def batches(n, bs, device="cpu", shuffle=False):
    if shuffle:
        return torch.randperm(n, device=device).split(bs)
    return torch.arange(n, device=device).split(bs)


def as_float(xb):
    """uint8 images -> [0, 1]; float images (crafted adversarial examples) pass through."""
    if xb.dtype == torch.uint8:
        return xb.float() / 255
    return xb


def attacked(classifier, x, y, bs, attack, label=None):
    """attack(classifier, xb, yb) over images x in batches -> adversarial images, float in [0, 1].
    Progress is shown per attack step (a forward pass of the classifier), so one long batch shows
    it too."""
    tick, out = progress(label or "attack", len(x)), []
    steps = getattr(attack, "keywords", {}).get("steps")  # a threat_attack: its passes per batch
    for idx in batches(len(x), bs, x.device):
        done, calls = sum(len(o) for o in out), [0]

        def count(*_):
            calls[0] += 1
            tick(done + len(idx) * min(calls[0], steps) // steps)
        hook = classifier.register_forward_hook(count) if steps else None
        try:
            out.append(attack(classifier, as_float(x[idx]), y[idx]))
        finally:
            if hook:
                hook.remove()
    return torch.cat(out)


def accuracy(classifier, x, y, bs, attack=None, label=None):
    """Top-1 accuracy of classifier on images x (uint8, or float in [0, 1]), after
    attack(classifier, x, y) if given."""
    if attack:
        x = attacked(classifier, x, y, bs, attack, label)
    correct = 0
    with eval_mode(classifier), torch.no_grad():
        for idx in batches(len(x), bs, x.device):
            correct += (classifier(as_float(x[idx])).argmax(1) == y[idx]).sum().item()
    return correct / len(x)


def threat_attack(norm, eps, step, steps):
    """The RA attack of one threat: PGD, L_inf with step `step`, L2 with step 2.5 eps / steps."""
    if norm != "linf":
        step = 2.5 * eps / max(steps, 1)
    return functools.partial(pgd, eps=eps, step=step, steps=steps, norm=norm)


def train_head(params, loss_fn, n, hp, device, label):
    """SGD with lr/10 at each milestone epoch, settings hp of scheme_settings; loss_fn(idx) -> the
    loss of that batch of the n images. Returns the lr of every epoch."""
    opt = torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["wd"])
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, hp["milestones"], 0.1)
    lrs, epochs_tick = [], progress(f"{label} finetuning, epoch", hp["epochs"])
    for epoch in range(hp["epochs"]):
        tick = progress(f"{label} epoch {epoch + 1}/{hp['epochs']}, images", n)
        lrs.append(opt.param_groups[0]["lr"])
        for k, idx in enumerate(batches(n, hp["batch_size"], device, shuffle=True)):
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tick(min(n, (k + 1) * hp["batch_size"]))
        sched.step()
        epochs_tick(epoch + 1, lambda: f"loss {loss.item():.4f}")
    return lrs


def linear_head(dim, n_classes, zero):
    head = nn.Linear(dim, n_classes)
    if zero:  # RobustSSL's heads start at zero
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return head


def frozen_features(encoder, xb):
    """Features of the frozen encoder: eval mode, no gradient."""
    with eval_mode(encoder), torch.no_grad():
        return encoder(xb)


def finetune_slf(encoder, x, y, n_classes, hp):
    """SLF: a linear head on the frozen encoder's features of uint8 images x -> encoder + head."""
    head = linear_head(encoder.dim, n_classes, hp["zero_head"]).to(x.device)
    if hp["augment"]:
        def loss(idx):  # a new crop and flip of every image in every epoch
            return F.cross_entropy(head(frozen_features(encoder, crop_flip(x[idx]))), y[idx])
    else:
        # the encoder is frozen and the images fixed: their features, once
        chunks = batches(len(x), hp["batch_size"], x.device)
        feats = torch.cat([frozen_features(encoder, as_float(x[i])) for i in chunks])

        def loss(idx):
            return F.cross_entropy(head(feats[idx]), y[idx])
    train_head(head.parameters(), loss, len(x), hp, x.device, label="SLF")
    return nn.Sequential(encoder, head)


def finetune_alf(encoder, x, y, n_classes, hp):
    """ALF: a linear head on PGD examples made through encoder + head -> encoder + head."""
    head = linear_head(encoder.dim, n_classes, hp["zero_head"]).to(x.device)
    clf = nn.Sequential(encoder, head)
    view = crop_flip if hp["augment"] else as_float

    def loss(idx):
        x_adv = pgd(clf, view(x[idx]), y[idx], eps=hp["eps"], step=hp["attack_step"],
                    steps=hp["attack_steps"])
        return F.cross_entropy(head(frozen_features(encoder, x_adv)), y[idx])
    train_head(head.parameters(), loss, len(x), hp, x.device, label="ALF")
    return clf


def finetune_aff(encoder, x, y, n_classes, hp):
    """AFF: TRADES on the whole network, starting from the pretrained encoder -> the network."""
    clf = nn.Sequential(copy.deepcopy(encoder).requires_grad_(True),
                        linear_head(encoder.dim, n_classes, hp["zero_head"]))
    clf = clf.to(x.device).train()
    view = crop_flip if hp["augment"] else as_float

    def loss(idx):
        return trades_loss(clf, view(x[idx]), y[idx], beta=hp["trades_beta"], eps=hp["eps"],
                           step=hp["attack_step"], steps=hp["attack_steps"])
    train_head(clf.parameters(), loss, len(x), hp, x.device, label="AFF")
    return clf


FINETUNE = {"slf": finetune_slf, "alf": finetune_alf, "aff": finetune_aff}


def guards(classifier, x, y, bs, eps, steps, robust=()):
    """Cheap checks that catch masked or broken gradients, on 200 test images of a fixed shuffle:
    RA <= SA, RA falls as eps grows and is ~0 at eps 64/255, 2.5x more PGD steps do not raise RA;
    and on the whole test set, RA under each norm of robust [(norm, eps, RA)] falls as eps grows.
    -> the measurements, the failures in words ("failed"), and "ok"."""
    idx = fixed_shuffle(len(x), 200).to(x.device)
    x, y = x[idx], y[idx]
    tol = 0.01 + 1 / len(x)  # a point, and one image
    tick, done = progress("guards: PGD attacks", 6), [0]

    def ra_at(e, k):
        ra = accuracy(classifier, x, y, bs, threat_attack("linf", e, 2.5 * e / k, k))
        done[0] += 1
        tick(done[0])
        return ra
    g = {"sa": accuracy(classifier, x, y, bs)}
    g["ra_eps"] = {f"{e}/255": ra_at(e / 255, steps) for e in (2, 8, 16, 64)}
    more = 5 * steps // 2
    g[f"ra_{steps}_steps"] = ra_at(eps, steps)
    g[f"ra_{more}_steps"] = ra_at(eps, more)
    chain = [("SA", g["sa"])] + [(f"RA at {k}", ra) for k, ra in g["ra_eps"].items()]
    failed = []
    for (a, ra), (b, rb) in zip(chain, chain[1:]):
        if rb > ra + tol:
            failed.append(f"{b} {100 * rb:.1f}% above {a} {100 * ra:.1f}%")
    if chain[-1][1] > 0.05:
        failed.append(f"RA at 64/255 {100 * chain[-1][1]:.1f}% (should be ~0)")
    if g[f"ra_{more}_steps"] > g[f"ra_{steps}_steps"] + tol:
        failed.append(f"PGD-{more} RA {100 * g[f'ra_{more}_steps']:.1f}% above PGD-{steps}'s "
                      f"{100 * g[f'ra_{steps}_steps']:.1f}%")
    rising = []  # RA under each norm of robust, on the whole test set, as eps grows
    for norm in ("linf", "l2"):
        ras = [(e, ra) for n, e, ra in sorted(robust) if n == norm]
        for (ea, ra), (eb, rb) in zip(ras, ras[1:]):
            if rb > ra + tol:
                rising.append(f"{norm} RA {100 * rb:.1f}% at {eb:.4g} above {100 * ra:.1f}% "
                              f"at {ea:.4g}")
    g["threats_fall"] = not rising
    g["failed"] = failed + rising
    g["ok"] = not g["failed"]
    return g


def autoattack_impl():
    """The AutoAttack that --autoattack runs: Croce and Hein's reference code (RobustBench's)."""
    try:
        import pyautoattack
    except ImportError:
        raise UsageError("AutoAttack needs an optional package: pip install pyautoattack (Croce "
                         "and Hein's reference AutoAttack); --protocol robustssl runs it unless "
                         "--no-autoattack")
    return f"pyautoattack {pyautoattack.__version__}"


def autoattack(classifier, x, y, bs, norm, eps, n_classes, seed):
    """Accuracy under standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) at radius eps."""
    import pyautoattack
    with eval_mode(classifier):
        aa = pyautoattack.AutoAttack(classifier, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                                     version="standard", device=x.device, seed=seed)
        # the targeted attacks aim at every other class, up to the standard 9
        targets = min(9, n_classes - 1)
        aa.apgd_targeted.n_target_classes = targets
        aa.fab.n_target_classes = targets
        x_adv, _ = aa.run_standard_evaluation(as_float(x), y, batch_size=bs)
    return accuracy(classifier, x_adv, y, bs)


def measure(clf, data, args, name, x_transfer):
    """SA, RA under every threat, AutoAttack, transfer RA and (SLF) the guards of a classifier.
    Every attack pass starts from the same random draws (the protocol's seed)."""
    x_te, y_te = data.x_test, data.y_test
    bs = args.eval_batch_size
    r = {"sa": accuracy(clf, x_te, y_te, bs), "robust": {}}
    for key, norm, eps in args.threats:
        torch.manual_seed(args.seed)
        attack = threat_attack(norm, eps, args.eval_step, args.eval_steps)
        label = f"{name.upper()} PGD-{args.eval_steps} {key}"
        r["robust"][key] = accuracy(clf, x_te, y_te, bs, attack, label)
    r["ra"] = r["robust"][args.threats[0][0]]
    if args.autoattack:
        r["aa_robust"] = {}
        for key, norm, eps in args.threats:
            r["aa_robust"][key] = autoattack(clf, x_te, y_te, bs, norm, eps, data.n_classes,
                                             args.seed)
        r["aa"] = r["aa_robust"][args.threats[0][0]]
    if x_transfer is not None:
        r["ra_transfer"] = accuracy(clf, x_transfer, y_te, bs)
    if name == "slf":
        # the guards' more-steps check runs at the first L_inf radius
        guard_eps = next((e for _, n, e in args.threats if n == "linf"), 8 / 255)
        robust = [(n, e, r["robust"][k]) for k, n, e in args.threats]
        r["guards"] = guards(clf, x_te, y_te, bs, guard_eps, args.eval_steps, robust)
    return r


def evaluate(args, encoder, data, device, done=(), source=None):
    """Yields (scheme, numbers) for each scheme of --eval not in done: fine-tune, then measure().
    With a source encoder, transfer RA: PGD crafted on the source's SLF classifier. Finetuning
    runs at PyTorch's default precision; every measured number is strict fp32."""
    def prep(enc):  # a frozen fp32 copy on the device, in the default memory layout
        enc = copy.deepcopy(enc).float().to(device, memory_format=torch.contiguous_format)
        return enc.requires_grad_(False)
    encoder = prep(encoder)
    todo = [s for s in args.eval if s not in done]
    x_transfer = None
    key0 = args.threats[0][0]
    if source is not None and todo:
        torch.manual_seed(args.seed)
        src = finetune_slf(prep(source), data.x_train, data.y_train, data.n_classes,
                           args.schemes["slf"])
        attack = threat_attack(*args.threats[0][1:], args.eval_step, args.eval_steps)
        with strict_fp32(device):
            # the random starts of white-box RA: transfer from itself equals it
            torch.manual_seed(args.seed)
            x_transfer = attacked(src, data.x_test, data.y_test, args.eval_batch_size, attack,
                                  f"transfer source PGD {key0}")
    for name in todo:
        t0 = time.time()
        # each scheme its own draws: one can be (re)run alone
        torch.manual_seed(args.seed + SCHEMES.index(name))
        clf = FINETUNE[name](encoder, data.x_train, data.y_train, data.n_classes,
                             args.schemes[name])
        with strict_fp32(device):
            r = measure(clf, data, args, name, x_transfer)
        r["s"] = time.time() - t0
        print(scheme_line(name, r, key0), flush=True)
        yield name, r


def scheme_line(name, r, key0):
    """How a scheme's numbers r are shown: SA, RA under each threat, AA, transfer RA (of threat
    key0), the guards' verdict, the time it took."""
    shown = {"SA": r["sa"], **{f"RA {k}": v for k, v in r["robust"].items()},
             **{f"AA {k}": v for k, v in r.get("aa_robust", {}).items()},
             f"transfer RA {key0}": r.get("ra_transfer")}
    line = "  ".join(f"{k} {100 * v:.2f}%" for k, v in shown.items() if v is not None)
    if name == "slf":
        verdict = "ok" if r["guards"]["ok"] else "FAILED: " + "; ".join(r["guards"]["failed"])
        line += "  guards " + verdict
    return f"{name.upper()}: {line}  ({hms(r['s'])})"


# ==== The command line: one parse, the recipe from one table, then main ===========================
class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, before anything is written."""


class NonFiniteLoss(Exception):
    """A NaN/inf loss or gradient: the run stops (exit code 3), its last good checkpoint kept."""


def fraction(text, hi=1.0, above=False):
    """A number in [0, hi] (above 0 if above), written as a decimal or a fraction: 8/255 ==
    0.031372..."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or fraction like 8/255")
    low = "(0" if above else "[0"
    if not 0 <= value <= hi or (above and value == 0):
        hint = ""
        if 1 < value <= 255 and "/" not in text:
            hint = f" (pixels are in [0, 1]: did you mean {text}/255?)"
        if above and value == 0:
            hint = " (a PGD step of 0 leaves the attack at its random start)"
        raise argparse.ArgumentTypeError(f"{text} is outside {low}, {hi:g}]{hint}")
    return value


def number(kind, lo, text, above=False):
    """An argparse type (through functools.partial): kind (int or float), finite, at least lo (or
    above it)."""
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    if not math.isfinite(value) or value < lo or (above and value == lo):
        bound = "above" if above else "at least"
        raise argparse.ArgumentTypeError(f"{text} must be {bound} {lo}")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, exit code 2 (argparse would also print the usage block)
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one process says it
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class Help(argparse.HelpFormatter):
    def _get_help_string(self, action):  # a default only where there is one to show
        text = action.help or ""
        default = DEFAULTS.get(action.dest)
        hidden = any(default is v for v in (None, False))
        return text if hidden or "default" in text else f"{text} (default: {default})"


COUNT = functools.partial(number, int, 0)
POSITIVE_INT = functools.partial(number, int, 1)
NON_NEGATIVE = functools.partial(number, float, 0)
STEP = functools.partial(fraction, above=True)
DATASETS = ("cifar10", "cifar100", "stl10", "folder")
PARSER = Parser(prog="ainfonce.py", formatter_class=Help,
                description="Adversarial contrastive pretraining with A-InfoNCE; evaluation of "
                            "robust encoders (SLF/ALF/AFF under PGD and AutoAttack).")
group = PARSER.add_argument_group("data")
group.add_argument("--dataset", choices=DATASETS, default="cifar10",
                   help="torchvision's (STL-10 at 32x32), or DATA_DIR/{train,test}/<class>/<image>")
group.add_argument("--data-dir", default="./data", help="download root, or the folder data set")
group.add_argument("--subset", type=COUNT, default=0,
                   help="first N training images of a fixed shuffle (0: all)")
group.add_argument("--pseudo-labels", metavar="FILE|ENCODER",
                   help="AdvCL base: AdvCL's or A-InfoNCE's pickle, or a run whose features "
                        "k-means clusters")
group = PARSER.add_argument_group("model")
group.add_argument("--width", type=POSITIVE_INT, default=64, help="ResNet-18 base width (paper 64)")
group = PARSER.add_argument_group("attack (pretraining)")
group.add_argument("--eps", type=fraction, default=8 / 255,
                   help="L_inf radius, pixels in [0,1]; fractions parse (default: 8/255)")
group.add_argument("--step", type=STEP, help="PGD step, pixels: RoCL 0.007, AdvCL 2/255")
group.add_argument("--attack-steps", type=COUNT, help="PGD steps: RoCL 7, AdvCL 5")
group = PARSER.add_argument_group("loss")
group.add_argument("--base", choices=("rocl", "advcl"), default="rocl",
                   help="what A-InfoNCE makes asymmetric: RoCL (Kim et al. 2020) or AdvCL (Fan "
                        "et al.)")
group.add_argument("--method", choices=METHODS, default="hardneg",
                   help="rocl: symmetric; infpos: IP; hardneg: HN; both: IP+HN; simclr: no "
                        "adversary")
group.add_argument("--temperature", type=functools.partial(number, float, 0, above=True),
                   default=0.5, help="tau of the loss, the attack and the regulariser")
group.add_argument("--ip-alpha", type=fraction,
                   help="IP weight of clean->adv terms: 0.2; AdvCL: the stop-gradient degree")
group.add_argument("--adv-weight", type=NON_NEGATIVE,
                   help="scale of the clean<->adv terms: 1; AdvCL base: per script")
group.add_argument("--hn-beta", type=NON_NEGATIVE, default=1.0, help="HN concentration beta")
group.add_argument("--hn-normalise", choices=("negatives", "official"), default="negatives",
                   help="HN weights: HCL's, or the official code's")
group.add_argument("--tau-plus", type=NON_NEGATIVE,
                   help="HN class prior in [0,1): per base, data set and method (official scripts)")
group.add_argument("--reg-weight", type=functools.partial(fraction, hi=math.inf), default=1 / 256,
                   help="RoCL regulariser weight (default: 1/256)")
group.add_argument("--reg-forward", choices=("separate", "shared"), default="separate",
                   help="regulariser: its own forward (RoCL), or rows of the main one (faster)")
group = PARSER.add_argument_group("optimisation")
group.add_argument("--epochs", type=POSITIVE_INT, help="pretraining epochs: RoCL 1000, AdvCL 400")
group.add_argument("--batch-size", type=functools.partial(number, int, 2), default=512,
                   help="images per step, all ranks together (paper 2 GPUs x 256)")
group.add_argument("--lr", type=functools.partial(number, float, 0, above=True),
                   help="base lr: per base, data set and method, as the official scripts (README)")
group.add_argument("--warmup-epochs", type=COUNT, default=10, help="linear warm-up")
group.add_argument("--wd", type=NON_NEGATIVE, help="weight decay: RoCL 1e-6 (LARS), AdvCL 1e-4")
group = PARSER.add_argument_group("evaluation")
group.add_argument("--eval", nargs="*", choices=("none",) + SCHEMES,
                   help="slf (linear), alf (linear, PGD-10), aff (all, TRADES) (default: slf; "
                        "robustssl: all)")
group.add_argument("--eval-only", metavar="CKPT",
                   help="evaluate a run, a checkpoint, or a published ResNet-18 (with --dataset)")
group.add_argument("--protocol", choices=("asym-rocl", "asym-advcl", "robustssl"),
                   help="finetuning: the base's own, or the field's benchmark (README)")
group.add_argument("--pretraining", choices=list(ROBUSTSSL),
                   help="robustssl: the encoder's method, where its file does not say it")
group.add_argument("--eval-threats", nargs="+", default=["linf:8/255"], metavar="NORM:EPS",
                   help="e.g. linf:8/255 l2:0.5; RA is the first (default: linf:8/255)")
group.add_argument("--eval-step", type=STEP, default=2 / 255,
                   help="L_inf PGD step (RoCL 0.00314); L2: 2.5 eps/n (default: 2/255)")
group.add_argument("--eval-steps", type=POSITIVE_INT, default=20, help="PGD steps of RA")
group.add_argument("--eval-subset", type=COUNT, default=0,
                   help="first N test images of a fixed shuffle (0: all)")
group.add_argument("--ft-epochs", type=POSITIVE_INT,
                   help="ALF/AFF epochs (asym-rocl: 25); the others: every scheme's")
group.add_argument("--eval-batch-size", type=POSITIVE_INT, default=1024,
                   help="images per finetuning step and attack batch")
group.add_argument("--autoattack", action=argparse.BooleanOptionalAction,
                   help="standard AutoAttack too (pip install pyautoattack; on with robustssl)")
group.add_argument("--transfer-from", metavar="CKPT",
                   help="black-box RA: PGD crafted on this encoder's SLF classifier")
group.add_argument("--eval-dataset", choices=DATASETS, help="finetune and evaluate on another one")
group.add_argument("--eval-data-dir", help="its directory (default: --data-dir)")
group.add_argument("--bn-branch", type=COUNT, help="bn_list.K of a multi-BN file (default: 1)")
group.add_argument("--stem-padding", type=int, choices=(1, 2),
                   help="stem of a torchvision-style file: solo-learn 2, DynACL++/RobustSSL 1")
group.add_argument("--normalise", choices=("inside", "none"),
                   help="whether such a file's normalize.mean/std apply")
group = PARSER.add_argument_group("system")
group.add_argument("--preset", choices=("smoke", "small", "cpu", "medium", "paper"),
                   help="reproduce.sh's scales, as defaults; small: a CPU run of minutes")
group.add_argument("--out", help="run directory (default runs/METHOD-DATASET-sSEED)")
group.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR with its own arguments, then its evaluation")
group.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run; with --eval-only, recompute")
group.add_argument("--ckpt-every", type=COUNT, default=0, help="also checkpoint every N steps")
group.add_argument("--knn-every", type=COUNT, default=2, help="kNN monitor every N epochs (0: off)")
group.add_argument("--seed", type=COUNT, default=0,
                   help="seed of weights, augmentations and attacks")
group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 pretraining (evaluation is fp32)")
group.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="NHWC layout (default: on for CUDA)")
group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the net")
group.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="for bit-exact resume on a GPU")
group.add_argument("--benchmark", action="store_true",
                   help="time pretraining steps on random data, against the official step")
group.add_argument("--benchmark-steps", type=POSITIVE_INT, default=5,
                   help="timed steps, after 2 warm-up steps")
DEFAULTS = vars(PARSER.parse_args([]))
# from here on a parse returns the flags given, in their order, and nothing else
for action in PARSER._actions:
    action.default = argparse.SUPPRESS

# reproduce.sh's scales: what --preset sets (a run of the small one takes 8 minutes on 2 cores);
# small and cpu share their pretraining, cpu measures it on all 10,000 test images by SLF (the CPU
# table of 5 seeds)
_CPU_SCALE = dict(subset=5000, width=8, epochs=6, batch_size=128, attack_steps=3, warmup_epochs=1,
                  eval_batch_size=256, protocol="asym-rocl")
PRESETS = {
    "paper": dict(eval=list(SCHEMES)),
    "medium": dict(width=64, epochs=40, warmup_epochs=2, batch_size=512, amp=True, eval=["slf"]),
    "small": dict(_CPU_SCALE, eval=list(SCHEMES), eval_subset=1000, ft_epochs=3),
    "cpu": dict(_CPU_SCALE, eval=["slf"]),
    "smoke": dict(subset=128, width=4, epochs=1, batch_size=32, attack_steps=1, warmup_epochs=0,
                  eval=list(SCHEMES), eval_subset=64, eval_steps=2, ft_epochs=1,
                  eval_batch_size=128, protocol="asym-rocl"),
}
# The official scripts' recipes: (base, data set) -> {method: values}, "*" for every method; other
# data sets take CIFAR-10's; a value is used where the flag is not given. RoCL: Asym-RoCL's shell
# scripts. AdvCL: Asym-AdvCL's (rocl: AdvCL's own); ip_adaptive_from: the epoch after which IP's
# degree adapts (-1: never), ip_d_min: the distance at which it reaches 0.5; CIFAR-100 IP+HN's
# `--tau 0.01` reaches tau_plus by argparse's prefix matching.
_ROCL = dict(lr=0.1, epochs=1000, step=0.007, attack_steps=7, wd=1e-6, ip_alpha=0.2,
             adv_weight=1.0)
_ADVCL = dict(epochs=400, step=2 / 255, attack_steps=5, wd=1e-4, ip_alpha=0.2, adv_weight=1.0,
              tau_plus=0.1, ip_adaptive_from=-1, ip_d_min=0.4)
_ADVCL_IP100 = dict(lr=2.0, ip_alpha=0.3, adv_weight=1.5, ip_adaptive_from=20, ip_d_min=0.5)
RECIPES = {
    ("rocl", "cifar10"): {"*": dict(_ROCL, tau_plus=0.12), "hardneg": dict(lr=0.2),
                          "both": dict(lr=0.3)},
    ("rocl", "cifar100"): {"*": dict(_ROCL, tau_plus=0.1), "both": dict(lr=0.2)},
    ("advcl", "cifar10"): {
        "*": _ADVCL,
        "rocl": dict(lr=0.5),
        "infpos": dict(lr=1.0, adv_weight=1.2, ip_adaptive_from=30),
        "hardneg": dict(lr=1.2, tau_plus=0.12),
        "both": dict(lr=2.0, adv_weight=0.7, ip_adaptive_from=30),
    },
    ("advcl", "cifar100"): {
        "*": _ADVCL,
        "rocl": dict(lr=0.5),
        "infpos": _ADVCL_IP100,
        "hardneg": dict(lr=2.0, tau_plus=0.01),
        "both": dict(_ADVCL_IP100, tau_plus=0.01),
    },
}
# A resumed run must agree with its checkpoint on everything that defines what a step computes:
# the recipe, the seed and the precision. Not --lr (a smaller one after a non-finite loss), nor
# the flags of how a step runs (--device, --channels-last, --compile, --deterministic: at most
# rounding), nor the data's path (its images are checked instead).
RESUME_KEYS = ("base", "method", "dataset", "subset", "width", "eps", "step", "attack_steps",
               "temperature", "ip_alpha", "adv_weight", "hn_beta", "hn_normalise", "tau_plus",
               "reg_weight", "reg_forward", "epochs", "batch_size", "warmup_epochs", "wd", "seed",
               "amp")
# Flags only pretraining reads: --eval-only refuses them (the seed also seeds evaluation).
PRETRAINING_KEYS = tuple(k for k in RESUME_KEYS if k != "seed")
PRETRAINING_KEYS += ("lr", "ckpt_every", "knn_every", "channels_last", "compile", "pseudo_labels")
# Flags of one invocation: a checkpoint records them but never hands them on.
OWN_KEYS = ("out", "overwrite", "resume", "eval_only", "device", "deterministic", "benchmark",
            "benchmark_steps", "command")
# how a file becomes an encoder: where the file does not say it
READ_FLAGS = ("bn_branch", "stem_padding", "normalise")
# the method a file's layout names, for --protocol robustssl
FIELD_METHODS = {"ainfonce": "a-infonce", "advcl": "advcl", "dynacl": "dynacl", "deacl": "deacl"}


def flag(key):
    return "--" + key.replace("_", "-")


def configure(argv):
    """The arguments, resolved once in this one place -> (args, the checkpoint --resume or
    --eval-only names: load_checkpoint's (encoder, read, checkpoint, net), or None). The flags
    given win; then, for --resume and --eval-only, the flags its run was given; then --preset's;
    then the parser's defaults; what is still unset comes from the recipe of the base, the data
    set and the method. After this, args is only read."""
    given = vars(PARSER.parse_args(argv))
    if "resume" in given and "eval_only" in given:
        raise UsageError("--resume continues a run and --eval-only evaluates one: pass one of them")
    loaded = read = ck = None
    inherited = {}
    named = given.get("resume") or given.get("eval_only")
    if named:
        what = "--resume" if "resume" in given else "--eval-only"
        loaded = load_checkpoint(named, {k: given.get(k) for k in READ_FLAGS}, what)
        read, ck = loaded[1:3]
        if ck is None and "resume" in given:
            raise UsageError(f"{read['checkpoint']} is a plain state dict: --resume needs an "
                             f"ainfonce checkpoint")
        if "resume" in given:
            # a run continues in its own directory, from its last.pt: never onto another run
            run_dir = os.path.dirname(read["checkpoint"]) or "."
            if os.path.basename(read["checkpoint"]) != "last.pt":
                raise UsageError(f"--resume {named}: a run continues from its directory's last.pt; "
                                 f"to continue this file, copy it as last.pt into a new directory "
                                 f"and resume that")
            out = given.get("out", run_dir)
            if not (os.path.isdir(out) and os.path.samefile(out, run_dir)):
                raise UsageError(f"--resume {named} continues the run in {run_dir}; --out {out} is "
                                 f"another directory: leave --out out (to continue a copy, copy "
                                 f"the whole directory and resume that)")
        if ck is None and "dataset" not in given:
            raise UsageError(f"{read['checkpoint']} is a plain state dict: name its data set "
                             f"with --dataset (and --data-dir)")
    if ck:
        # the flags its run was given, over all its invocations (a later one wins)
        for invocation in ck.get("invocations") or [{"given": ck["args"]}]:
            inherited.update(invocation["given"])
        inherited = {k: v for k, v in inherited.items() if k not in OWN_KEYS}
    if "eval_only" in given:
        # --subset picks the finetuning images where --eval-dataset names the data (or no run does)
        open_keys = ()
        if not ck:  # a plain file: its data set is named here
            open_keys = ("dataset", "subset")
        elif "eval_dataset" in {**inherited, **given}:
            open_keys = ("subset",)
        refused = [k for k in given if k in PRETRAINING_KEYS and k not in open_keys]
        if refused:
            names = ", ".join(flag(k) for k in refused)
            theirs = ""
            if ck:
                theirs = "; its run's: " + ", ".join(f"{flag(k)} {ck['args'].get(k)}"
                                                      for k in refused)
            hint = ""
            if {"dataset", "subset"} & set(refused):
                hint = "; to evaluate on other data use --eval-dataset and --eval-data-dir"
            raise UsageError(f"{names}: flags of pretraining do not apply to --eval-only"
                             f"{theirs}{hint}")
        inherited.pop("eval", None)  # its own schemes (default: SLF), under the run's settings
    read_given = [flag(k) for k in READ_FLAGS if k in given]
    if read_given and not {"eval_only", "resume", "transfer_from", "pseudo_labels"} & set(given):
        raise UsageError(f"{', '.join(read_given)}: how a checkpoint file is read, and this run "
                         f"reads none (--eval-only, --resume, --transfer-from or --pseudo-labels "
                         f"names one)")
    preset = PRESETS.get(given.get("preset", inherited.get("preset")), {})
    args = argparse.Namespace(**{**DEFAULTS, **preset, **inherited, **given})
    args.given = given
    if read and args.out is None:
        args.out = os.path.dirname(read["checkpoint"]) or "."
    # the flags of an asymmetry the method does not have change nothing: refused
    ip, hn = ASYMMETRY[args.method]
    used = {"ip_alpha": ip, "adv_weight": ip, "hn_beta": hn, "tau_plus": hn, "hn_normalise": hn}
    if args.base == "advcl":
        used["adv_weight"] = args.method != "rocl"  # it scales Asym-AdvCL's blocks
    unread = [flag(k) for k, is_used in used.items() if k in given and not is_used]
    if unread:
        them = "them" if len(unread) > 1 else "it"
        raise UsageError(f"{', '.join(unread)}: --method {args.method} does not use {them} on the "
                         f"{args.base} base: leave {them} out")
    if args.base == "rocl" and "pseudo_labels" in given:
        raise UsageError("--pseudo-labels: the AdvCL base's (--base advcl); RoCL has none")
    if args.base == "advcl" and args.method == "simclr":
        raise UsageError("--base advcl has no simclr: its methods are rocl (AdvCL's own loss), "
                         "infpos, hardneg and both")
    rocl_only = [flag(k) for k in ("reg_weight", "reg_forward") if k in given]
    if args.base == "advcl" and rocl_only:
        raise UsageError(f"{', '.join(rocl_only)}: RoCL's regulariser; the AdvCL base has none")
    recipe = RECIPES[args.base, "cifar100" if args.dataset == "cifar100" else "cifar10"]
    for key, value in {**recipe["*"], **recipe.get(args.method, {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not 0 <= args.tau_plus < 1:
        raise UsageError(f"--tau-plus {args.tau_plus} must be in [0, 1)")
    if args.protocol is None:
        args.protocol = "asym-advcl" if args.base == "advcl" else "asym-rocl"
    if args.eval is None:
        args.eval = list(SCHEMES) if args.protocol == "robustssl" else ["slf"]
    if "none" in args.eval and len(set(args.eval)) > 1:
        raise UsageError(f"--eval {' '.join(args.eval)}: none and schemes; pass one of them")
    args.eval = [e for e in SCHEMES if e in args.eval]
    # the threats of RA: (key as given, norm, eps), the first one is "ra"
    args.threats = []
    for text in args.eval_threats:
        parts = text.lower().partition(":")
        norm, radius = parts[0], parts[2]
        try:
            if norm not in ("linf", "l2"):
                raise argparse.ArgumentTypeError("expected NORM:EPS with NORM linf or l2, e.g. "
                                                 "linf:8/255 l2:0.5")
            eps = fraction(radius, 1.0 if norm == "linf" else 64.0)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--eval-threats {text}: {e}")
        args.threats.append((f"{norm}:{radius}", norm, eps))
    args.out = args.out or f"runs/{args.method}-{args.dataset}-s{args.seed}"
    if args.protocol == "robustssl" and args.pretraining is None:
        layout = read["layout"] if read else "ainfonce"
        args.pretraining = FIELD_METHODS.get(layout)
        if layout == "ainfonce" and args.base == "advcl" and args.method == "rocl":
            args.pretraining = "advcl"  # AdvCL's own loss
        if args.pretraining is None:
            raise UsageError(f"--protocol robustssl: its settings differ per pretraining method, "
                             f"and {read['checkpoint']} does not say which: name it with "
                             f"--pretraining {{{','.join(ROBUSTSSL)}}}")
    if args.autoattack is None:  # robustssl's preset
        args.autoattack = args.protocol == "robustssl"
    if args.autoattack and args.eval:
        autoattack_impl()  # fails now, not after training, when the package is missing
    method = args.method if args.protocol == "asym-advcl" else args.pretraining
    args.schemes = scheme_settings(args.protocol, method, args.eval_dataset or args.dataset,
                                   args.ft_epochs, args.eval_batch_size)
    if args.channels_last is None:  # on by default on CUDA
        cuda = args.device == "auto" and torch.cuda.is_available()
        args.channels_last = args.device.startswith("cuda") or cuda
    args.command = command_line(*argv)
    if args.resume:
        diff = [f"{flag(k)} {ck['args'].get(k)} (checkpoint) vs {getattr(args, k)}"
                for k in RESUME_KEYS if k in ck["args"] and getattr(args, k) != ck["args"][k]]
        if diff:
            raise UsageError(f"cannot resume {args.resume} with other arguments: "
                             + ", ".join(diff) + "; a run with these needs its own --out")
    return args, loaded


def run(args, loaded=None):
    """Set up the device, read the data, pretrain (unless the run is done or only evaluated), then
    evaluate and record the numbers."""
    t_start = time.time()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device_name = args.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device_name):
        raise UsageError(f"--device {device_name}: only cpu and cuda (or cuda:N) are supported")
    device = torch.device(device_name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world > 1 and not dist.is_initialized():
        # Every collective runs on tensors of `device` (flags included), so one backend per device
        # suffices. device_id binds NCCL's communicator to this rank's GPU.
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if args.benchmark:
        torch.manual_seed(args.seed + rank)
        return benchmark(args, device)
    ck = loaded[2] if loaded else None
    source = None
    # the reading flags read a published file --eval-only names, or else the other files read
    flags = {k: getattr(args, k) for k in READ_FLAGS}
    if loaded and ck is None:
        flags = {}
    if args.transfer_from:
        source = load_checkpoint(args.transfer_from, flags, what="--transfer-from")[:2]
    if world > 1 and args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the {world} "
                         f"processes")
    for key in ("data_dir", "eval_data_dir"):
        # a checkpoint's relative path, read from another directory
        value = getattr(args, key)
        if ck and value and key not in args.given and not os.path.exists(value):
            raise UsageError(f"data directory {value} does not exist (the path came from the "
                             f"checkpoint's {flag(key)}): pass --data-dir (or --eval-data-dir) to "
                             f"say where the images are")
    to_train = not args.eval_only and (ck is None or ck["epoch"] < args.epochs)
    if to_train and args.base == "advcl" and not args.pseudo_labels:
        raise UsageError("--base advcl trains on pseudo-labels: pass --pseudo-labels FILE "
                         "(AdvCL's or A-InfoNCE's pickle) or ENCODER (a run or checkpoint whose "
                         "features k-means clusters, e.g. a --method simclr run)")
    # the training data, and the evaluation data (each read once): a resume trains on the run's
    # training images (its test images may change); an evaluation on other images says so
    eval_set = (args.eval_dataset or args.dataset, args.eval_data_dir or args.data_dir)
    same = eval_set == (args.dataset, args.data_dir)
    data = None
    if to_train or (args.eval and same):
        data = load_data(args.dataset, args.data_dir, args.subset, args.eval_subset)
        if ck and ck["args"].get("n_classes", data.n_classes) != data.n_classes:
            raise UsageError(f"{args.dataset} in {args.data_dir} has "
                             f"{plural(data.n_classes, 'class')}, the checkpoint's data set had "
                             f"{ck['args']['n_classes']}: to evaluate on another data set use "
                             f"--eval-dataset")
        ran = (ck or {}).get("data")
        if ran and ran["train"] != data.identity["train"]:
            if args.resume:
                raise UsageError(f"--resume {args.resume}: the run trained on the images in "
                                 f"{ran['dir']} (fingerprint {ran['train']}); {args.data_dir} is "
                                 f"{data.identity['dir']}, whose training images differ "
                                 f"(fingerprint {data.identity['train']}): pass --data-dir with "
                                 f"the run's images")
            print(f"note: evaluating on other images than the run trained on: {args.data_dir} is "
                  f"{data.identity['dir']} (training images {data.identity['train']}), the run "
                  f"trained on {ran['dir']} ({ran['train']})", flush=True)
    if to_train and args.batch_size > len(data.x_train):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the "
                         f"{len(data.x_train)} training images")
    train_data = data
    if args.eval and not same:
        data = load_data(*eval_set, args.subset, args.eval_subset)
    if args.eval and args.autoattack and data.n_classes < 4:
        raise UsageError(f"--autoattack: standard AutoAttack needs >= 4 classes (its DLR loss uses "
                         f"the 3rd and 4th largest logits); {eval_set[0]} has {data.n_classes}")
    pseudo = pseudo_origin = None
    if to_train and args.base == "advcl":
        pseudo, pseudo_origin = run_pseudo_labels(args, ck, train_data, device, flags)
    # seeded after everything is read: nothing loaded on the way (a transfer source, the encoder
    # of the pseudo-labels) changes the run's draws; ranks draw different augmentations
    torch.manual_seed(args.seed + rank)
    net = loaded[3] if loaded else None
    if net is None:
        net = AdvCLNet(args.width) if args.base == "advcl" else Net(args.width)
    # the first thing written: the lock; every check that can refuse is behind
    with lock(args.out) if rank == 0 else contextlib.nullcontext():
        last = os.path.join(args.out, "last.pt")
        # the run's log and config say what its last.pt holds (not another checkpoint's)
        own = ck and os.path.exists(last) and os.path.samefile(loaded[1]["checkpoint"], last)
        if rank == 0 and own:
            restore_run_files(args.out, ck)
        if to_train:
            if rank == 0 and os.path.exists(last) and not args.resume:
                if not args.overwrite:
                    raise UsageError(f"{args.out} already holds a run: continue it with --resume "
                                     f"{args.out}, or pass --overwrite to start over")
                for name in ("last.pt", "log.jsonl"):  # a new run: its results stay
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(args.out, name))
            if rank == 0:
                # k-means labels are kept in the run's directory, for --pseudo-labels to reuse
                saved = os.path.join(args.out, "pseudo-labels.pkl")
                kmeans_made = pseudo_origin and "kmeans_of" in pseudo_origin
                if kmeans_made and (not ck or not os.path.exists(saved)):
                    save_pseudo_labels(saved, pseudo, train_data)
                per_epoch = len(train_data.x_train) // args.batch_size
                state = "new run"
                if ck:
                    state = (f"resuming last.pt at epoch {ck['step'] // per_epoch + 1}, step "
                             f"{ck['step'] % per_epoch}/{per_epoch}")
                print(f"ainfonce: {args.out} | {device} ({provenance(device)['device_name']}) | "
                      f"{args.dataset} {args.data_dir}: {len(train_data.x_train)} training / "
                      f"{len(train_data.x_test)} test images, "
                      f"{plural(train_data.n_classes, 'class')} | {args.method} on {args.base} | "
                      f"{plural(args.epochs, 'epoch')} of {plural(per_epoch, 'step')} | {state}",
                      flush=True)
            train(args, net, train_data, device, rank, world, ck, pseudo, pseudo_origin)
            if rank == 0:
                # the evaluation measures the saved weights
                loaded = load_checkpoint(args.out)
        if world > 1:
            # evaluation runs on rank 0 alone, with batch norm back to per-process statistics
            dist.barrier()
            dist.destroy_process_group()
        if rank != 0:
            return {}
        if not args.eval:
            done = "pretrained" if to_train else "its run is finished"
            if args.eval_only:
                done = "its checkpoint is read"
            command = command_line("--eval-only", args.eval_only or args.out)
            print(f"{args.out}: {done}; --eval none: nothing evaluated (evaluate with: {command})")
            return {}
        return record_evaluation(args, loaded, data, device, source, t_start, to_train)


def main(argv=None):
    """The command line; returns the results dict (for tests). Bad input: one line on stderr,
    exit 2; a non-finite loss: exit 3; a file that cannot be written: exit 4; Ctrl-C: 130."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        return run(*configure(argv))
    except (UsageError, NonFiniteLoss, WriteFailed, KeyboardInterrupt) as e:
        # an interrupt before training or evaluation began has nothing to keep
        code = {UsageError: 2, NonFiniteLoss: 3, WriteFailed: 4}.get(type(e), 130)
        message = {2: f"error: {e}", 130: "interrupted"}.get(code, str(e))
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one process says it
            print(f"ainfonce.py: {message}", file=sys.stderr)
        raise SystemExit(code)
    finally:
        # on every way out: no rank leaves a live group
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ==================================================================================================
# Support: data and pseudo-label files, checkpoints and the field's layouts, results, processes,
# progress, the benchmark. The method is above; nothing below changes what it computes.
# ==================================================================================================


# ==== Data: whole data sets as uint8 tensors [N, 3, 32, 32] ======================================
class Data(NamedTuple):
    """A data set as uint8 images [N, 3, 32, 32] on the CPU, and what identifies it; train_index:
    the training images' places in the data set's order (a subset picks some)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    identity: dict
    train_index: torch.Tensor


def fixed_shuffle(n_items, n):
    """Indices of the first n items of a fixed permutation (the same for every run, seed and
    method); all items, in order, when n is 0 or not below n_items."""
    if not 0 < n < n_items:
        return torch.arange(n_items)
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(0))[:n]


def load_data(dataset, data_dir, n_train=0, n_test=0):
    """-> Data. --dataset folder reads DATA_DIR/{train,test}/<class>/<image> with torchvision's
    ImageFolder (test labels follow the training split's classes); the others come through
    torchvision, downloaded where missing (STL-10 at 32x32, antialiased). n_train and n_test > 0
    keep the first n images of a fixed shuffle (never a single class); only those are decoded. Its
    identity names the data set, its resolved directory, the fingerprints of its training and of
    its test files (what training depends on, and what evaluation adds: a file's relative path
    and bytes), the subsets and the classes."""
    import torchvision.datasets as tvd
    if dataset == "folder":
        if not os.path.isdir(data_dir):
            what = "is a file, not a directory" if os.path.exists(data_dir) else "does not exist"
            raise UsageError(f"data directory {data_dir} {what}")
        sets = []
        for split in ("train", "test"):
            d = os.path.join(data_dir, split)
            if not os.path.isdir(d):
                raise UsageError(f"{d} is missing: --dataset folder reads DATA_DIR/train/<class>/"
                                 f"<image> and DATA_DIR/test/<class>/<image>")
            try:
                sets.append(tvd.ImageFolder(d))
            except (FileNotFoundError, OSError) as e:
                raise UsageError(f"{d}: {e}".replace("\n", " "))
        train, test = sets
        unknown = sorted(set(test.classes) - set(train.classes))
        if unknown:
            raise UsageError(f"test classes not in train/: {unknown}")
        test.samples = [(p, train.classes.index(test.classes[c])) for p, c in test.samples]
        files = [[p for p, _ in s.samples] for s in sets]
        sizes = [len(s.samples) for s in sets]
    else:
        created = not os.path.exists(data_dir)
        kind = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "stl10": tvd.STL10}[dataset]
        try:
            if dataset == "stl10":
                sets = [kind(data_dir, split=split, download=True) for split in ("train", "test")]
            else:
                sets = [kind(data_dir, train=train, download=True) for train in (True, False)]
        except Exception as e:  # offline (URLError) or a corrupt archive (RuntimeError)
            if created and os.path.isdir(data_dir) and not os.listdir(data_dir):
                os.rmdir(data_dir)  # nothing was downloaded: leave nothing behind
            raise UsageError(f"could not get {dataset} into {data_dir} ({type(e).__name__}: {e}); "
                             f"offline? copy torchvision's archive there, or use --dataset folder"
                             .replace("\n", " "))
        # the files each split reads (not STL-10's unlabeled images)
        base = os.path.join(data_dir, kind.base_folder)
        files = []
        for split in (kind.train_list, kind.test_list):
            files.append([os.path.join(base, f) for f, _ in split if not f.startswith("unlabeled")])
        sizes = [len(s.data) for s in sets]
    tensors, picked = [], []
    for split, s, n, size in zip(("train", "test"), sets, (n_train, n_test), sizes):
        if n > size:
            name = "--subset" if split == "train" else "--eval-subset"
            raise UsageError(f"{name} {n} is larger than the {size} {split} images")
        keep = fixed_shuffle(size, n)
        picked.append(keep)
        if dataset == "folder":
            tensors += decode(s, keep, split)
            continue
        x = torch.from_numpy(s.data)
        if dataset != "stl10":
            x = x.permute(0, 3, 1, 2)  # CIFAR is stored [N, 32, 32, 3]
        labels = s.labels if dataset == "stl10" else s.targets
        x, y = x[keep], torch.as_tensor(labels)[keep]
        if x.shape[-1] != 32:  # STL-10's 96x96 at 32x32, antialiased (as PIL's bilinear resize)
            x = F.interpolate(x.float(), size=32, mode="bilinear", antialias=True)
            x = x.round().clamp(0, 255).byte()
        tensors += [x.contiguous(), y.long()]
    n_classes = len(sets[0].classes)
    if n_classes < 2:
        raise UsageError(f"{dataset} in {data_dir} has {n_classes} class: classification "
                         f"needs at least 2")
    fingerprints = []
    for paths in files:  # equal files give an equal value wherever they lie: about 0.5 s
        h = hashlib.sha256()
        for path in paths:
            h.update(os.path.relpath(path, data_dir).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
        fingerprints.append(h.hexdigest()[:16])
    identity = {"dataset": dataset, "dir": os.path.realpath(data_dir), "train": fingerprints[0],
                "test": fingerprints[1], "subset": n_train, "eval_subset": n_test,
                "n_train": len(tensors[0]), "n_test": len(tensors[2]), "n_classes": n_classes,
                "train_items": sizes[0]}
    return Data(*tensors, n_classes, identity, picked[0])


QUIET_CHOICES = (
    "resized {n} {split} images of another size to 32x32 (bilinear)",
    "dropped the alpha channel of {n} {split} images",
    "repeated {n} grayscale {split} images to RGB",
    "counted {n} {split} images of nested sub-folders in their class folder's class",
)


def decode(ds, idx, split):
    """Decode the images idx of an ImageFolder -> [uint8 [n, 3, 32, 32], labels]. As
    torchvision's loader does, images are converted to RGB (an alpha channel is dropped, gray is
    repeated); other sizes are resized; images in nested sub-folders count in their class; files
    that are not images are skipped. Each of these quiet choices is said once."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    x = torch.empty(len(idx), 32, 32, 3, dtype=torch.uint8)
    tick = progress(f"decoding {split} images", len(idx))

    def one(i):
        path = ds.samples[idx[i]][0]
        try:
            with Image.open(path) as im:
                if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                    # PIL's conversion to RGB would clip them to white (or black)
                    raise ValueError(f"its pixels are 16-bit or float (mode {im.mode}), not 8-bit: "
                                     f"convert the images to 8-bit first")
                alpha = "A" in im.getbands() or "transparency" in im.info
                gray_ = im.mode in ("1", "L", "LA")
                size = im.size
                im = im.convert("RGB")
                if im.size != (32, 32):
                    im = im.resize((32, 32), Image.BILINEAR)
                x[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(32, 32, 3)
        except Exception as e:
            raise UsageError(f"cannot read image {path}: {e}")
        nested = os.path.relpath(path, ds.root).count(os.sep) > 1
        return size != (32, 32), alpha, gray_, nested
    counts = [0] * 4
    # PIL releases the GIL while decoding
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for k, choices in enumerate(pool.map(one, range(len(idx)))):
            counts = [c + f for c, f in zip(counts, choices)]
            tick(k + 1)
    said = [what.format(n=n, split=split) for n, what in zip(counts, QUIET_CHOICES) if n]
    # files in the class folders that ImageFolder passed over (not images by their extension)
    files = sum(len(names) for c in ds.classes
                for _, _, names in os.walk(os.path.join(ds.root, c), followlinks=True))
    if files > len(ds.samples):
        said.insert(0, f"skipped {files - len(ds.samples)} {split} files that are not images")
    if said:
        print("data: " + "; ".join(said))
    labels = torch.tensor([ds.samples[i][1] for i in idx.tolist()])
    return [x.permute(0, 3, 1, 2).contiguous(), labels]


# ==== Pseudo-labels of the AdvCL base: AdvCL's and A-InfoNCE's files, or k-means ==================
SAFE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"), ("numpy", "dtype"), ("numpy", "ndarray"),
                ("_codecs", "encode"), ("collections", "OrderedDict"),
                ("torch._utils", "_rebuild_tensor_v2")}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles arrays and tensors, nothing else: no code runs."""

    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda b: torch.load(io.BytesIO(b), weights_only=True)
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not an array")
        module = module.replace("numpy.core.", "numpy._core.")
        return getattr(importlib.import_module(module), name)


def pseudo_label_file(path, n_items):
    """AdvCL's file (a dict of int arrays pseudo_train_K, numpy's pickle protocols 2 to 5) or
    A-InfoNCE's (torch tensors; a torch.save file too), read without running any pickled code ->
    LongTensor [5, n_items]: one label per training image, in the data set's order, for each K of
    PSEUDO_KS (-1: none)."""
    import zipfile
    try:
        if zipfile.is_zipfile(path):  # torch.save's format, whatever the file's name
            found = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                found = ArrayUnpickler(f).load()
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--pseudo-labels {path}: not a pickle of pseudo-labels ({reason})")
    if not isinstance(found, dict):
        raise UsageError(f"--pseudo-labels {path}: a dict of pseudo_train_K arrays expected")
    rows = []
    for k in PSEUDO_KS:
        key = f"pseudo_train_{k}"
        if key not in found:
            raise UsageError(f"--pseudo-labels {path} has no {key} (the AdvCL base needs K = "
                             f"{', '.join(map(str, PSEUDO_KS))})")
        what = getattr(found[key], "dtype", type(found[key]).__name__)
        try:
            row = torch.as_tensor(found[key]).flatten()
        except (TypeError, ValueError, RuntimeError):
            row = None
        if row is None or row.dtype == torch.bool:
            raise UsageError(f"--pseudo-labels {path}: {key} is not an array of numbers ({what})")
        if row.is_floating_point() and not torch.equal(row, row.round()):
            raise UsageError(f"--pseudo-labels {path}: {key} holds numbers that are not whole: "
                             f"pseudo-labels are cluster indices")
        row = row.long()
        if len(row) != n_items:
            raise UsageError(f"--pseudo-labels {path}: {key} has {len(row)} labels, the data set "
                             f"{n_items} training images")
        if row.min() < -1 or row.max() >= k:
            raise UsageError(f"--pseudo-labels {path}: {key} holds labels outside [-1, {k})")
        rows.append(row)
    return torch.stack(rows)


def kmeans(x, k, seed=0, iters=100):
    """Lloyd's k-means of the rows of x (cosine: rows L2-normalised) from a k-means++ start drawn
    by a fixed generator -> labels [n]. Deterministic on one machine."""
    x = F.normalize(x.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(len(x), (1,), generator=gen)].squeeze(0)]
    nearest = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        chosen = torch.multinomial(nearest.cpu() + 1e-12, 1, generator=gen).item()
        centres.append(x[chosen])
        nearest = torch.minimum(nearest, ((x - x[chosen]) ** 2).sum(1))
    c = torch.stack(centres)  # [k, d]
    labels = None
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    return labels


def pseudo_labels(source, data, device, flags=None):
    """The pseudo-labels of the training images -> (LongTensor [5, n_train], what made them).
    source names a file of AdvCL's or A-InfoNCE's format, or an encoder (a run or a checkpoint):
    k-means of its eval-mode fp32 features of the training images into K = 2, 10, 50, 100, 500
    clusters, the encoder's file read as the reading flags say where it does not. Nothing is
    written."""
    is_pickle = os.path.isfile(source) and source.endswith((".pkl", ".pickle"))
    if is_pickle:
        labels = pseudo_label_file(source, data.identity["train_items"])[:, data.train_index]
        with open(source, "rb") as f:
            made = {"file": os.path.realpath(source),
                    "sha256": hashlib.sha256(f.read()).hexdigest()[:16]}
    else:
        encoder, read = load_checkpoint(source, flags, what="--pseudo-labels")[:2]
        x = data.x_train.to(device)
        encoder = copy.deepcopy(encoder).float().to(device)
        with eval_mode(encoder), torch.no_grad(), strict_fp32(device):
            chunks = batches(len(x), 512, device)
            features = torch.cat([encoder(as_float(x[i])) for i in chunks]).cpu()
        rows = []
        for k in PSEUDO_KS:
            clusters = min(k, len(x))
            fewer = f" (K = {k}: fewer images than that)" if clusters < k else ""
            print(f"pseudo-labels: k-means of {len(x)} encoder features into {clusters} "
                  f"clusters{fewer}", flush=True)
            rows.append(kmeans(features, clusters))
        labels = torch.stack(rows)
        made = {"kmeans_of": weights_digest(encoder), "encoder": read["checkpoint"],
                "ks": list(PSEUDO_KS), "data": data.identity["train"]}
    for k, row in zip(PSEUDO_KS, labels):
        if (row < 0).all():
            raise UsageError(f"--pseudo-labels {source}: pseudo_train_{k} holds no label (all -1) "
                             f"for the {len(row)} training images: the AdvCL base's "
                             f"cross-entropy would be empty")
    made["labels_digest"] = hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16]
    return labels, made


def run_pseudo_labels(args, ck, data, device, flags):
    """The pseudo-labels a run trains on -> (LongTensor [5, n_train], what made them): a resumed
    run's own, from its checkpoint (--pseudo-labels given again must give the same labels); a new
    run's from --pseudo-labels (k-means labels are saved as OUT/pseudo-labels.pkl for reuse)."""
    kept = (ck or {}).get("pseudo_label_values")
    if kept is not None and "pseudo_labels" not in args.given:
        return kept, ck["pseudo_labels"]
    labels, made = pseudo_labels(args.pseudo_labels, data, device, flags)
    ran = (ck or {}).get("pseudo_labels")
    if ran and ran["labels_digest"] != made["labels_digest"]:
        raise UsageError(f"--pseudo-labels {args.pseudo_labels}: other labels (digest "
                         f"{made['labels_digest']}) than the run trained on ("
                         f"{ran['labels_digest']}, from {ran.get('file') or ran.get('encoder')}); "
                         f"leave --pseudo-labels out to continue with the run's own")
    return labels, made


def save_pseudo_labels(path, labels, data):
    """labels [5, n_train] in AdvCL's format (int32 arrays pseudo_train_K, one label per image of
    the data set, -1 for the images a subset left out), for reuse by --pseudo-labels."""
    import numpy as np
    table = {}
    for k, row in zip(PSEUDO_KS, labels):
        full = torch.full((data.identity["train_items"],), -1, dtype=torch.long)
        full[data.train_index] = row
        table[f"pseudo_train_{k}"] = full.numpy().astype(np.int32)
    atomic_write(path, lambda f: pickle.dump(table, f))


# ==== Checkpoints, the field's layouts, and results ===============================================
class WriteFailed(Exception):
    """A file could not be written (a full disk, a quota): one line, exit code 4; the previous file
    is kept."""


# the .tmp of each file a run writes through atomic_write (a new one belongs here too)
OWN_TMP = r"(last\.pt|log\.jsonl|config\.json|pseudo-labels\.pkl|results-\w+\.json)\.tmp"


def atomic_write(path, write):
    """write(f) to path.tmp, fsync, rename: a kill at any moment leaves the old file whole. A failed
    write (a full disk) removes path.tmp, which would keep the disk full, and raises WriteFailed."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    # torch.save reports a full disk as a RuntimeError of its zip writer
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise WriteFailed(f"could not write {path}: {reason}") from None


def run_files(ck):
    """What a run's log.jsonl and config.json hold, as its checkpoint says it."""
    log = "".join(json.dumps(record) + "\n" for record in ck["history"])
    config = {"args": ck.get("first_args", ck["args"]), "invocations": ck.get("invocations", [])}
    return {"log.jsonl": log, "config.json": json.dumps(config, indent=1)}


def restore_run_files(out, ck):
    """Rewrite a run's log.jsonl or config.json that is missing, truncated or edited from its
    checkpoint, and say so."""
    for name, text in run_files(ck).items():
        path = os.path.join(out, name)
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(path) as f:
                if f.read() == text:
                    continue
        atomic_write(path, lambda f: f.write(text.encode()))
        print(f"{path} did not hold what {os.path.join(out, 'last.pt')} says: rebuilt from it")


def load_strict(module, state, what):
    """load_state_dict(strict=True), with a one-line error that names the keys that do not match."""
    own = module.state_dict()
    bad = [f"missing {k}" for k in own if k not in state]
    bad += [f"unexpected {k}" for k in state if k not in own]
    bad += [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
            if k in own and v.shape != own[k].shape]
    if bad:
        raise UsageError(f"{what} does not match the model ({len(bad)} keys): "
                         + "; ".join(bad[:4]))
    module.load_state_dict(state, strict=True)


# The field's ResNet-18 files (README, Published checkpoints), read from their keys: the encoder
# is the sub-network whose keys hold conv1 and layer1..4, after DataParallel's module. and
# compile's _orig_mod. (nested or not); the second encoders below are not it (DynACL's online
# encoder_q, solo-learn's momentum teacher); heads inside it are ignored, and named; every other
# key must fit (strict). What each layout's keys say, and what only a flag can:
# - BN branches: bn_list.K (ACL, DynACL, AdvCL): the only branch, else --bn-branch, else 1 (pgd, as
#   their evaluations); none: one set of statistics.
# - Stem: padding 1 (RoCL, ACL, AdvCL, DynACL: their own key names), 2 in a solo-learn Lightning
#   checkpoint (DeACL); torchvision-style names (downsample.0/1) outside one are written with
#   either: --stem-padding.
# - Normalisation: normalize.mean/std are applied inside, except in a torchvision-style file of
#   padding 1 (DynACL++ applies them, RobustSSL's SLF/ALF files of AdvCL/A-InfoNCE hold them
#   unused): --normalise.
ENCODER = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "normalize.")
HEADS = ("fc", "linear", "classifier", "head", "proj", "predictor")
SECOND_ENCODERS = ("encoder_q.", "momentum_backbone.")
WRAPPERS = r"(^|\.)((module|_orig_mod)\.)+"


def encoder_state(sd, root, bn_branch, normalise):
    """The encoder's tensors under our names (shortcut.0/1 for downsample.conv/bn and
    downsample.0/1, one BN branch) -> (state, {ignored kind: count})."""
    state, ignored = {}, {}
    for k, v in sd.items():
        inside = k.startswith(root)
        name = k[len(root):] if inside else k
        branch = re.search(r"\.bn_list\.(\d+)\.", name)
        other = not inside or name.startswith(HEADS)
        unused = name.startswith("normalize.") and not normalise
        if other or unused or branch and int(branch.group(1)) != bn_branch:
            kind = name.split(".")[0] if other or unused else f"bn_list.{branch.group(1)}"
            ignored[kind] = ignored.get(kind, 0) + 1
            continue
        name = re.sub(r"\.bn_list(\.\d+)?\.", ".", name)
        name = re.sub(r"downsample\.(1|bn)\.", "shortcut.1.", name)
        name = re.sub(r"downsample\.(0|conv)\.", "shortcut.0.", name)
        state[re.sub(r"^normalize\.", "", name)] = v
    return state, ignored


def field_encoder(held, path, flags):
    """A CIFAR ResNet-18 in one of the field's layouts (held: what the file at path holds) ->
    (ResNet18 with exactly its weights, how it was read). flags: the reading flags, accepted where
    they agree with the file, refused where they contradict it, asked for where the file does not
    say."""
    # the state dicts it may hold, in the order RobustSSL's loader looks for them, then the file
    inner = [held[k] for k in ("state_dict_dual", "state_dict", "model")
             if isinstance(held, dict) and isinstance(held.get(k), dict)]
    if isinstance(held, dict):
        inner.append(held)
    candidates = [{k: v for k, v in sd.items() if torch.is_tensor(v)} for sd in inner]
    roots, sd = set(), {}
    for candidate in candidates:
        sd = {re.sub(WRAPPERS, r"\1", k): v for k, v in candidate.items()}
        roots = {k[:-12] for k in sd
                 if k.endswith("conv1.weight") and k[:-12] + "layer1.0.conv1.weight" in sd}
        if roots:
            break
    roots = roots - {r for r in roots if r.endswith(SECOND_ENCODERS)} or roots
    if len(roots) != 1:
        # the keys of the largest state dict it holds (a projector's, say), not its container's
        largest = max(candidates, key=len, default={})
        keys = list(largest) or (list(held) if isinstance(held, dict) else [type(held).__name__])
        if roots:
            found = f"it holds {len(roots)} encoders: {', '.join(sorted(roots))}"
        else:
            found = f"no conv1 and layer1..4; keys: {', '.join(map(str, keys[:4]))} ..."
        raise UsageError(f"{path} is neither an ainfonce checkpoint nor a CIFAR ResNet-18 in the "
                         f"field's layouts ({found})")
    root = roots.pop()
    solo = isinstance(held, dict) and "pytorch-lightning_version" in held and root == "backbone."
    enc = [k[len(root):] for k in sd if k.startswith(root) and k[len(root):].startswith(ENCODER)]
    branches = sorted({int(b) for b in re.findall(r"\.bn_list\.(\d+)\.", " ".join(enc))})
    torchvision_style = any(re.search(r"\.downsample\.[01]\.", k) for k in enc)
    normalising = any(k.startswith("normalize.") for k in enc)
    # what the file says (None where it does not), and in which words
    says = {"bn_branch": "none", "stem_padding": 2 if solo else 1, "normalise": "none"}
    why = {"bn_branch": "one set of BN statistics (no bn_list)",
           "stem_padding": f"a stem its key names fix (padding {says['stem_padding']})",
           "normalise": "no normalize.mean/std"}
    if branches:
        says["bn_branch"] = branches[0] if len(branches) == 1 else None
        why["bn_branch"] = f"BN branches {branches}"
    if torchvision_style and not solo:
        if flags.get("stem_padding") is None:
            raise UsageError(f"{path} has torchvision-style keys (downsample.0/1), which "
                             f"solo-learn/DeACL write with a CIFAR stem of padding 2 and "
                             f"DynACL++/RobustSSL with padding 1: pass --stem-padding 2 or 1")
        says["stem_padding"] = None
    stem_padding = flags.get("stem_padding") or says["stem_padding"]
    if normalising:
        says["normalise"] = "inside"
        why["normalise"] = "normalize.mean/std that its layout applies"
    if normalising and torchvision_style and not solo and stem_padding == 1:
        says["normalise"] = None
        if flags.get("normalise") is None:
            raise UsageError(f"{path} holds normalize.mean/std in torchvision-style keys: "
                             f"DynACL++ and RobustSSL's files apply them, but RobustSSL's SLF/ALF "
                             f"files of AdvCL and A-InfoNCE hold them unused: pass --normalise "
                             f"inside or none")
    for key in READ_FLAGS:
        value = flags.get(key)
        if value is not None and says[key] is not None and value != says[key]:
            raise UsageError(f"{flag(key)} {value}: {path} holds {why[key]}: leave {flag(key)} "
                             f"out")
    normalise = normalising and flags.get("normalise") != "none"
    bn_branch = None
    if branches:
        bn_branch = flags.get("bn_branch")
        if bn_branch is None:
            bn_branch = branches[0] if len(branches) == 1 else 1
        if bn_branch not in branches and flags.get("bn_branch") is None:
            raise UsageError(f"{path} holds BN branches {branches}, none of them 1 (adversarial): "
                             f"pass --bn-branch K")
        if bn_branch not in branches:
            raise UsageError(f"--bn-branch {bn_branch}: {path} holds BN branches {branches}: pass "
                             f"one of them")
    state, ignored = encoder_state(sd, root, bn_branch, normalise)
    width = state["conv1.weight"].shape[0]
    encoder = ResNet18(width, normalise=normalise, stem_padding=stem_padding)
    load_strict(encoder, state, f"{path}: state dict")
    layout = "other"
    if root == "encoder_k.":
        layout = "dynacl"
    elif solo:
        layout = "deacl"
    elif branches == [0, 1, 2]:
        layout = "advcl"
    said = [f"ResNet-18 width {width}", f"stem padding {stem_padding}"]
    if root:
        said[0] += f" from {root.rstrip('.')}"
    if branches:
        said.append(f"BN branch {bn_branch} of {branches}")
    if normalise:
        said.append("normalising inputs inside")
    if ignored:
        kinds = ", ".join(f"{k} ({n})" for k, n in ignored.items())
        said.append(f"ignored {sum(ignored.values())} keys: {kinds}")
    print(f"{path}: " + ", ".join(said))
    read = {"checkpoint": path, "layout": layout, "encoder": root.rstrip(".") or None,
            "bn_branch": bn_branch, "bn_branches": branches or None,
            "stem_padding": stem_padding, "normalise_inside": normalise, "ignored": ignored}
    return encoder, read


def load_checkpoint(path, flags=None, what="checkpoint"):
    """An ainfonce checkpoint (a run directory or its last.pt), or a CIFAR ResNet-18 in one of the
    field's layouts, read as the reading flags say where the file does not -> (the encoder, how it
    was read, the ainfonce checkpoint or None, the whole network or None). what: the flag that
    named it, for the error messages. Nothing is unpickled: tensors and plain containers only."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        held = refused.group(1) if refused else "a Python object"
        raise UsageError(f"{path} holds {held}, which a weights-only load refuses (unpickling it "
                         f"could run code): ainfonce reads tensors only; where the file was made, "
                         f"save the encoder's state dict alone (torch.save(model.state_dict(), "
                         f"...)) and pass that file")
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint: corrupt or truncated "
                         f"({type(e).__name__}); restore a copy of it")
    if not (isinstance(ck, dict) and {"encoder", "projector", "args"} <= set(ck)):
        return (*field_encoder(ck, path, flags), None, None)
    missing = {"optimizer", "epoch", "step", "history", "sums", "rng"} - set(ck)
    if missing:
        raise UsageError(f"{path} is not a complete ainfonce checkpoint: it lacks "
                         f"{sorted(missing)}")
    advcl = ck["args"].get("base", "rocl") == "advcl"
    # what the file says: stem padding 1, no normalisation, one BN (AdvCL base: its pgd branch)
    says = {"stem_padding": 1, "normalise": "none", "bn_branch": BN_ADV if advcl else "none"}
    wrong = [flag(k) for k, v in flags.items() if v != says[k]]
    if wrong:
        names = ", ".join(wrong)
        branch = "BN branch 1 (pgd)" if advcl else "one BN"
        raise UsageError(f"{names}: {path} is an ainfonce checkpoint (stem padding 1, no "
                         f"normalisation, {branch}): leave {names} out")
    read = {"checkpoint": path, "layout": "ainfonce", "encoder": None, "bn_branch": None,
            "stem_padding": 1, "normalise_inside": False}
    net = AdvCLNet(ck["args"]["width"]) if advcl else Net(ck["args"]["width"])
    load_strict(net.encoder, ck["encoder"], f"{path}: encoder")
    load_strict(net.heads if advcl else net.projector, ck["projector"], f"{path}: projector")
    if not advcl:
        return net.encoder, read, ck, net
    # the AdvCL base is evaluated through its pgd branch, as the field does
    state, _ = encoder_state(net.encoder.state_dict(), "", BN_ADV, False)
    encoder = ResNet18(ck["args"]["width"])
    load_strict(encoder, state, f"{path}: encoder, BN branch {BN_ADV}")
    read.update(bn_branch=BN_ADV, bn_branches=[BN_CLEAN, BN_ADV, BN_CE])
    return encoder, read, ck, net


def weights_digest(module):
    """A digest of a module's parameters and buffers: the weights part of a number's identity."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        flat = v.detach().cpu().reshape(-1).contiguous()
        h.update(k.encode() + flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def lock(directory):
    """Owns `directory` while this process writes there: directory/.lock holds the owner's pid and
    host under an flock, which the OS drops when a process dies, so a live owner is refused and a
    dead one's lock is taken over; a clean exit leaves the file empty. A .tmp of a file this program
    writes is then a dead writer's and is removed. A directory this made and left empty (a check
    failed) goes."""
    import fcntl  # POSIX
    created = not os.path.exists(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        f = open(os.path.join(directory, ".lock"), "a+")
    except OSError as e:
        raise UsageError(f"cannot write to {directory}: {e.strerror or e}")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            deadline = time.time() + 1.0  # the owner writes its line right after taking the lock
            f.seek(0)
            while not f.read().strip() and time.time() < deadline:
                time.sleep(0.02)
                f.seek(0)
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise UsageError(f"{directory} is in use by {owner}: wait for it to end, or write "
                             f"elsewhere with --out")
        f.seek(0)
        owner = f.read().strip()
        here = socket.gethostname()
        pid = re.match(rf"pid (\d+) on {re.escape(here)} ", owner + " ")
        if pid and os.path.exists(f"/proc/{pid.group(1)}") and int(pid.group(1)) != os.getpid():
            print(f"{directory}: its lock file names {owner}, which is running but does not hold "
                  f"the lock (a copied directory?): taking it over")
        elif owner:
            print(f"{directory}: taking over the lock of {owner}, which is no longer running")
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {here} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        for name in os.listdir(directory):
            if re.fullmatch(OWN_TMP, name):  # the others are not its to remove
                size = os.path.getsize(os.path.join(directory, name))
                os.remove(os.path.join(directory, name))
                print(f"{directory}: removed {name} ({size / 2**20:.1f} MiB), left by a writer "
                      f"that died")
        try:
            yield
        except UsageError:
            if created and os.listdir(directory) == [".lock"]:
                f.close()
                os.remove(os.path.join(directory, ".lock"))
                os.rmdir(directory)
            raise
        finally:
            if not f.closed:
                f.truncate(0)


def command_line(*argv):
    """The command that runs this file with argv, quoted to paste into a shell."""
    return shlex.join(["python", os.path.relpath(__file__), *argv])


def record_evaluation(args, loaded, data, device, source, t_start, trained):
    """Evaluate and record. A number is filed under everything that made it, computed here: the
    weights (digest of parameters and buffers) and how a file was read into them; the data (data
    set, directory, fingerprints of its files, subsets); the protocol (every setting of every
    scheme, the threats, the attack, AutoAttack, the seed); the transfer source's weights. Its
    hash names OUT/results-<key>.json, which records it: a finished scheme there is reused
    (--overwrite recomputes it), each new one is saved as soon as it is done, and nothing of
    another identity is ever read or rewritten."""
    encoder, read = loaded[:2]
    ck = loaded[2]
    reading = ("layout", "encoder", "bn_branch", "stem_padding", "normalise_inside")
    protocol = {"name": args.protocol, "pretraining": args.pretraining, "schemes": args.schemes,
                "threats": [key for key, _, _ in args.threats], "eval_step": args.eval_step,
                "eval_steps": args.eval_steps, "eval_batch_size": args.eval_batch_size,
                "autoattack": autoattack_impl() if args.autoattack else None, "seed": args.seed,
                "precision": "fp32, no TF32, no autocast"}
    transfer = None
    if source is not None:
        transfer = {"digest": weights_digest(source[0]), **{k: source[1].get(k) for k in reading}}
    identity = {"weights": {"digest": weights_digest(encoder), **{k: read.get(k) for k in reading}},
                "data": data.identity, "protocol": protocol, "transfer": transfer}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(args.out, f"results-{key}.json")
    res = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                res = json.load(f)
        except (ValueError, OSError):
            res = None
        if not isinstance(res, dict):
            raise UsageError(f"{path} is not a readable results file (truncated or edited?): move "
                             f"it away, and its numbers are computed again")
    if res and res.get("identity") != identity:
        raise UsageError(f"{path} holds numbers of another identity than its name says (edited by "
                         f"hand?): move it away")
    if args.eval_only and args.overwrite:
        asked = tuple(f"{s}_" for s in args.eval)
        res = {k: v for k, v in res.items() if not k.startswith(asked)}
    done = [s for s in args.eval if f"{s}_sa" in res]  # finished before: reused, shown again
    for name in done:
        numbers = {k[len(name) + 1:]: v for k, v in res.items() if k.startswith(f"{name}_")}
        print(f"{scheme_line(name, numbers, args.threats[0][0])}, from {path}")
    if not trained and len(done) == len(args.eval):
        print(f"nothing to do: {path} holds every evaluation asked for\nresults: {path}")
        return dict(res, path=path)
    weights = {"checkpoint": read["checkpoint"]}
    training = None
    if ck:
        final = ck["epoch"] >= ck["args"]["epochs"]
        weights.update(step=ck["step"], epoch=ck["epoch"], final=final)
        if not final:
            print(f"note: {read['checkpoint']} holds epoch {ck['epoch']} of "
                  f"{ck['args']['epochs']} (step {ck['step']}): not the end of its run")
        # what made the weights: the arguments as first given, each later invocation (a resume)
        # with its step, command and changes, the training data's identity, time, speed, machine
        speed = ck["step"] * ck["args"]["batch_size"] / max(ck["train_s"], 1e-9)
        training = {"args": ck.get("first_args", ck["args"]),
                    "invocations": ck.get("invocations", []), "data": ck.get("data"),
                    "pretrain_s": ck["train_s"], "images_per_s": speed, "env": ck["env"]}
    invocation = {"command": args.command, "wall_s": 0.0, "env": provenance(device)}
    res.update(identity=identity, key=key, weights=weights, training=training, read=read,
               invocations=res.get("invocations", []) + [invocation])
    # an interrupt repeats this invocation's evaluation: a run that trained now continues
    # through its checkpoint
    again = args.command if args.eval_only or args.resume else command_line("--resume", args.out)

    def save():
        # the whole invocation: data, pretraining, evaluation
        invocation["wall_s"] = time.time() - t_start
        try:
            atomic_write(path, lambda f: f.write(json.dumps(res, indent=1).encode()))
        except WriteFailed as e:
            raise WriteFailed(f"{e}; the finished schemes stay in {path}; free space, then: "
                              f"{again}")
    parts = []
    for name in args.eval:
        hp = args.schemes[name]
        part = f"{name.upper()} {plural(hp['epochs'], 'epoch')} (lr {hp['lr']:g}, "
        part += f"batch {hp['batch_size']}"
        if hp["augment"]:
            part += ", crop+flip"
        if "eps" in hp:
            part += f", PGD at {hp['eps'] * 255:g}/255"
        parts.append(part + ")")
    threats = ", ".join(k for k, _, _ in args.threats)
    also = ", and AutoAttack" if args.autoattack else ""
    print(f"evaluation: {args.protocol} protocol on {data.identity['dataset']} "
          f"{data.identity['dir']} ({len(data.x_train)} training / {len(data.x_test)} test "
          f"images): {'; '.join(parts)}; RA: PGD-{args.eval_steps} (step "
          f"{args.eval_step * 255:g}/255) at {threats}{also} -> {path}", flush=True)
    save()
    # during evaluation SIGTERM is a Ctrl-C
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        on_device = Data(*[t.to(device) if torch.is_tensor(t) else t for t in data])
        source_encoder = source[0] if source else None
        for name, r in evaluate(args, encoder, on_device, device, done, source_encoder):
            res.update({f"{name}_{k}": v for k, v in r.items()})
            save()
    except KeyboardInterrupt:
        print(f"interrupted: the finished schemes are in {path}; finish with: {again}",
              file=sys.stderr)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    print(f"results: {path}", flush=True)
    return dict(res, path=path)


# ==== Processes, progress, provenance =============================================================
class SyncBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span all processes, on gloo and NCCL alike (one code
    path, tested on the CPU; nn.SyncBatchNorm runs on GPUs only). The model uses it under torchrun
    only; after the processes part (evaluation) it is nn.BatchNorm2d again."""

    def forward(self, x):
        if not (self.training and distributed()):
            return super().forward(x)
        xf = x.float()
        n = xf.numel() // xf.size(1) * dist.get_world_size()
        sums = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3))])  # [2C]
        mean, sq = (AllReduce.apply(sums) / n).chunk(2)
        var = sq - mean * mean  # the biased variance of the global batch
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            # unbiased, as nn.BatchNorm2d keeps it
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        y = (xf - mean.view(1, -1, 1, 1)) * (var.view(1, -1, 1, 1) + self.eps).rsqrt()
        y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


class AllReduce(torch.autograd.Function):
    """Sum over ranks, differentiably (the gradient is summed over ranks too).
    torch.distributed.nn's collectives keep the process group alive after destroy_process_group,
    and gloo's threads can then abort a rank at exit (README, Data parallel); these keep no
    reference to the group."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        return AllReduce.forward(ctx, grad)


class GatherCat(torch.autograd.Function):
    """Concatenate t over all ranks along dim; the backward sums every rank's gradient of this
    rank's slice."""

    @staticmethod
    def forward(ctx, t, dim):
        ctx.dim = dim
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        summed = AllReduce.forward(ctx, grad.contiguous())
        return summed.chunk(dist.get_world_size(), ctx.dim)[dist.get_rank()], None


def allreduce_grads(params, world):
    """Average gradients over ranks, with one all-reduce of them all."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, f in zip(grads, flat.div_(world).split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


def rng_state(device):
    """This rank's generators: the CPU one and, on CUDA, its own GPU's (no other GPU's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def hms(seconds):
    return f"{seconds // 3600:.0f}:{seconds % 3600 // 60:02.0f}:{seconds % 60:02.0f}"


def plural(n, word):
    ending = "es" if word.endswith("s") else "s"
    return f"{n} {word}" if n == 1 else f"{n} {word}{ending}"


def progress(label, total, every=10.0, quiet=False):
    """tick(done, extra=None): prints 'label: done/total (rate/s, ETA), extra()' at most every
    `every` seconds, and never for a short phase; extra is a callable, so that what it shows (a
    loss: a host sync) costs only when shown."""
    t0 = last = time.time()

    def tick(done, extra=None):
        nonlocal last
        now = time.time()
        if quiet or now - last < every or done >= total:
            return
        last, rate = now, done / (now - t0)
        # the epochs of a head: seconds each
        speed = f"{rate:.1f}/s" if rate >= 1 else f"{1 / rate:.1f} s each"
        shown = f", {extra()}" if extra else ""
        print(f"  {label}: {done}/{total} ({speed}, ETA {hms((total - done) / rate)}){shown}",
              flush=True)
    return tick


@functools.lru_cache(maxsize=None)
def provenance(device):
    """What the numbers depend on: torch, the device (CPU model or GPU), threads, the code's git
    commit. Computed once per process and device: the code that runs is the code loaded at the
    start, whatever git says later."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError, StopIteration):  # platform.processor() is often empty
            with open("/proc/cpuinfo") as f:
                line = next(line for line in f if line.startswith("model name"))
            name = line.split(":", 1)[1].strip()
    git = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here = os.path.dirname(os.path.abspath(__file__))
        command = ["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=12"]
        described = subprocess.run(command, capture_output=True, text=True, timeout=5)
        git = described.stdout.strip() or None
    return {"torch": str(torch.__version__), "device_name": name,
            "threads": torch.get_num_threads(), "git": git}


# ==== Benchmark: our step against a straightforward version of the official step =================
def official_step(net, x1, x2, args):
    """The official RoCL step's work, but the optimiser's: the attack re-embeds x2 at every PGD
    step, the regulariser has its own forward; fp32, NCHW."""
    n = len(x1)
    with eval_mode(net):
        def loss(xa):
            z = net(torch.cat([xa, x2])).view(2, n, -1)  # [2, N, 128]
            return a_infonce(z, temperature=args.temperature)
        x_start = start_point(x1, args.eps)
        x_adv = ascend(loss, x1, x_start, args.eps, args.step, args.attack_steps)
    total, _ = rocl_loss(net, x1, x2, x_adv, args)
    net.zero_grad(set_to_none=True)
    total.backward()
    lars_(list(net.parameters()), args.wd)


def benchmark(args, device):
    """Seconds per step of our step (split by its laps: data, attack, the rest and the update) and
    of the official step's work (its views not timed; AdvCL: the same forwards in fp32 and NCHW,
    its unused head_pred left out), after 2 warm-up steps, on random images; peak memory on
    CUDA. The last printed line is JSON."""
    cuda = device.type == "cuda"
    advcl = args.base == "advcl"
    warmup, n = 2, args.benchmark_steps
    official = argparse.Namespace(**{**vars(args), "amp": False, "channels_last": False,
                                     "reg_forward": "separate"})
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randint(0, 256, (4 * args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    net = AdvCLNet(args.width) if advcl else Net(args.width)
    net = net.to(device).to(memory_format=memory_format)
    ref = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=args.lr, momentum=0.9)
    model = torch.compile(net) if args.compile else net
    distances = [0.0, 0]
    times = dict.fromkeys(("data_s", "attack_s", "fwd_bwd_s", "official_step_s"), 0.0)
    peak = {}
    for i in range(warmup + n):
        if cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats(device)
        clock = [time.perf_counter()]

        def lap(phase):  # the time since the last lap, the device synchronised (asynchronous)
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if i >= warmup:
                times[phase] = times.get(phase, 0.0) + (now - clock[0]) / n
            clock[0] = now

        def official_lap(phase):  # the official step's views are not timed
            lap("official_data_s" if phase == "data_s" else "official_step_s")
        xb = x[torch.randint(0, len(x), (args.batch_size,), device=device)]
        labels = [torch.randint(0, k, (len(xb),), device=device) for k in PSEUDO_KS]
        if advcl:
            advcl_step(model, xb, labels, args, 1, distances, lap=lap)
        else:
            rocl_step(model, xb, args, lap=lap)
        opt.step()
        lap("fwd_bwd_s")
        if cuda and i == warmup + n - 1:
            peak["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30  # our step's
        if advcl:
            advcl_step(ref, xb, labels, official, 1, distances, lap=official_lap)
        elif args.method != "simclr":
            x1, x2 = augment(xb), augment(xb)
            official_lap("data_s")
            official_step(ref, x1, x2, official)
        ref_opt.step()
        official_lap("step")
    times.pop("official_data_s", None)
    step_s = times["data_s"] + times["attack_s"] + times["fwd_bwd_s"]
    ratio = step_s / times["official_step_s"] if times["official_step_s"] else None
    name = torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}"
    res = {"device": name, "torch": str(torch.__version__), "base": args.base,
           "method": args.method, "width": args.width, "batch_size": args.batch_size,
           "attack_steps": args.attack_steps, "amp": args.amp,
           "channels_last": args.channels_last, "compile": args.compile,
           "reg_forward": args.reg_forward, "steps": n, "step_s": step_s,
           "images_per_s": args.batch_size / step_s, **times, **peak, "ratio_vs_official": ratio}
    print(f"ours {step_s:.3f} s/step ({res['images_per_s']:.1f} img/s): data "
          f"{times['data_s']:.3f}, attack {times['attack_s']:.3f}, fwd+bwd "
          f"{times['fwd_bwd_s']:.3f}; official {times['official_step_s']:.3f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
