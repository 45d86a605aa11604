"""ainfonce.py: adversarial contrastive learning with the asymmetric InfoNCE (A-InfoNCE), in one file.

Reference implementation of Yu et al., "Adversarial Contrastive Learning via Asymmetric InfoNCE",
ECCV 2022 (arXiv 2207.08374), on top of RoCL: Kim, Tack, Hwang, "Adversarial Self-Supervised
Contrastive Learning", NeurIPS 2020 (arXiv 2006.07589).

Each step takes N unlabeled images, makes two augmented views x1, x2 and an instance-wise adversarial
view x_adv = PGD(x1) that maximises the contrastive loss of [x_adv; x2]. With z = g(f(view)),
z^ = z/|z| and S_ij = z^_i . sg(z^_j) / tau (keys detached: a directed term l(i->j) moves only i):

    l(i->j) = -log( exp(S_ij) / sum_{k != i} exp(S_ik) )
    rocl    : 1/(3N) sum_n [ l(x1->x2) + l(x2->x1) + l(x1->a) + l(a->x1) + l(x2->a) + l(a->x2) ]
    infpos  : IP, adversarial views are inferior positives: l(clean->a) weighted alpha (0.2),
              l(a->clean) weighted 1-alpha; clean anchors are pulled only weakly toward x_adv
    hardneg : HN, the denominator becomes pos_i + Ng_i (HCL estimator, Robinson et al. 2021):
              Ng_i = max((sum_j w_ij e^S_ij - tau+ M pos_i) / (1 - tau+), M e^(-1/tau)),
              w_ij = e^(beta S_ij) / mean_k e^(beta S_ik) over the M negatives of row i
    both    : HN denominators with IP weights
    + RoCL's regulariser 1/256 * NT-Xent[x_adv; x2] for every adversarial method; simclr has no attack.

Usage (README.md has the measured numbers, with machine and command):
    python ainfonce.py --method hardneg --dataset cifar10                   # paper recipe, one GPU
    python ainfonce.py --method hardneg --dataset folder --data-dir data/cifar10-jpeg --subset 5000 \\
        --width 8 --epochs 6 --batch-size 128 --attack-steps 3 --warmup-epochs 1 --eval-subset 1000   # CPU
    torchrun --nproc_per_node 8 ainfonce.py --method both                  # data parallel
    python ainfonce.py --resume runs/hardneg-cifar10-s0                    # continue a run and its evaluation
    python ainfonce.py --eval-only runs/hardneg-cifar10-s0 --eval slf alf aff --autoattack \\
        --eval-threats linf:8/255 l2:0.5 --transfer-from runs/rocl-cifar10-s0 --eval-dataset cifar100
    python ainfonce.py --eval-only ACL.pt --dataset cifar10 --protocol robustssl --pretraining acl   # published
    python ainfonce.py --benchmark --width 64 --batch-size 512 --amp       # speed against the official step
    python -m pytest -q                                  # tests; AINFONCE_TEST_DEVICE=cuda runs them on a GPU
"""
import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
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


# ==== The loss =====================================================================================
def a_infonce(z, adv_views=(), *, temperature=0.5, ip_alpha=None, adv_weight=1.0, hn_beta=None, tau_plus=0.0,
              hn_normalise="negatives"):
    """Generic (asymmetric) InfoNCE of V >= 2 views of N >= 2 instances.

    z: [V, N, D] raw projections (normalised here, in fp32; fp64 stays fp64). adv_views: indices of adversarial
    views. Returns 1/(V N) sum over instances and ordered view pairs u != v of weight(u,v) * l(u->v), where
    every directed term moves only its anchor (keys are detached). ip_alpha=None: all weights 1;
    a float: clean->adv adv_weight*ip_alpha, adv->clean adv_weight*(1-ip_alpha), other pairs 1.
    hn_beta=None: plain denominator; a float: the HCL hard-negative estimator with tau_plus, its importance
    weights normalised over row i's negatives (hn_normalise="negatives", HCL's definition) or as the
    official Asym-RoCL code does ("official": column j divided by the mean of row j over all V*N columns,
    positives and self included). With V=2 and nothing else set this is SimCLR's NT-Xent.

    The gradient is that of the stop-gradient loss (keys detached), not the derivative of the loss value with
    respect to z: torch.autograd.gradcheck against the value is not expected to pass.

    >>> loss = a_infonce(torch.stack([z1, z2, z_adv]), adv_views=(2,), ip_alpha=0.2, hn_beta=1.0, tau_plus=0.12)
    """
    if not (torch.is_tensor(z) and z.dim() == 3):
        raise ValueError(f"a_infonce needs z of shape [V views, N instances, D], got {getattr(z, 'shape', type(z))}")
    V, N, _ = z.shape
    if V < 2 or N < 2:
        raise ValueError(f"a_infonce needs >= 2 views of >= 2 instances, got z of shape {tuple(z.shape)}")
    try:
        adv = {range(V)[int(i)] for i in adv_views}
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"adv_views must be a sequence of view indices in [0, {V}), got {adv_views!r}")
    for name, value, ok, rule in (("hn_normalise", hn_normalise, hn_normalise in ("negatives", "official"),
                                   "'negatives' or 'official'"),
                                  ("temperature", temperature, temperature > 0, "> 0"),
                                  ("tau_plus", tau_plus, 0 <= tau_plus < 1, "in [0, 1)"),
                                  ("hn_beta", hn_beta, hn_beta is None or hn_beta >= 0, ">= 0 or None"),
                                  ("ip_alpha", ip_alpha, ip_alpha is None or 0 <= ip_alpha <= 1, "in [0, 1] or None"),
                                  ("adv_weight", adv_weight, adv_weight >= 0, ">= 0")):
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {value!r}")
    with torch.autocast(z.device.type, enabled=False):  # the loss runs in fp32, also under --amp
        return _a_infonce(z if z.dtype == torch.float64 else z.float(), adv, temperature, ip_alpha, adv_weight,
                          hn_beta, tau_plus, hn_normalise)


def _a_infonce(z, adv, temperature, ip_alpha, adv_weight, hn_beta, tau_plus, hn_normalise):
    V, N, _ = z.shape
    z = z / z.abs().amax(-1, keepdim=True).clamp_min(1e-30)  # so |z|^2 neither overflows nor underflows
    zn = F.normalize(z.flatten(0, 1), dim=1)  # [M, D], M = V*N; row m is view m // N of instance m % N
    S = zn @ zn.detach().T / temperature  # S_ij = z^_i . sg(z^_j) / tau: gradient reaches anchors only
    inst = torch.arange(V * N, device=z.device) % N
    same = inst[:, None] == inst[None, :]
    eye = torch.eye(V * N, dtype=torch.bool, device=z.device)
    if hn_beta is None:
        log_denom = S.masked_fill(eye, -math.inf).logsumexp(1)  # log sum_{k != i} exp(S_ik)
    else:  # A-InfoNCE (HN): HCL's debiased, hardness-weighted negatives, per row i over its M negatives
        M, c = V * (N - 1), 1 / temperature  # S <= 1/tau: exponents are shifted by c, none overflows
        e = (S - c).exp()
        pos = (e * (same & ~eye)).sum(1) / (V - 1)  # mean over the V-1 positives of exp(S_ip)
        if hn_normalise == "negatives":
            w = M * torch.softmax((hn_beta * S).masked_fill(same, -math.inf), 1)  # A-InfoNCE: w_ij, mean 1
        else:  # official: imp_jk = (1e-9)^beta on positives and self; the broadcast divides column j by row j's mean
            log_mean = torch.where(same, hn_beta * math.log(1e-9), hn_beta * S).logsumexp(1) - math.log(V * N)
            w = (hn_beta * S - log_mean[None, :]).exp().masked_fill(same, 0)
        ng = ((w * e).sum(1) - tau_plus * M * pos) / (1 - tau_plus)
        log_denom = (pos + ng.clamp_min(M * math.exp(-2 * c))).log() + c  # clamp: M e^(-1/tau)
    logp = (S - log_denom[:, None]).view(V, N, V, N).diagonal(dim1=1, dim2=3)  # [V, V, N]: l = -logp
    loss = S.new_zeros(())
    for u in range(V):
        for v in range(V):
            weight = 1.0
            if ip_alpha is not None and (u in adv) != (v in adv):  # A-InfoNCE (IP): inferior positives
                weight = adv_weight * (ip_alpha if v in adv else 1 - ip_alpha)  # clean->adv weak, adv->clean strong
            if u != v and weight:
                loss = loss - weight * logp[u, v].sum()
    return loss / (V * N)


# ==== Attacks: inputs are images in [0, 1] (not 0-255, not mean/std-normalised); outputs stay in [0, 1] ====
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


def _flat_norm(t):  # per-image L2 norm, shaped to broadcast over [B, C, H, W]
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (t.dim() - 1))


def _ascend(loss_fn, x, x_adv, eps, step, steps, norm="linf"):
    """steps of gradient ascent on loss_fn from x_adv, projected to the eps-ball around x and to [0,1]:
    L_inf takes sign steps, L2 steps along the normalised gradient and projects radially."""
    with torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            grad, = torch.autograd.grad(loss_fn(x_adv), x_adv)
            if norm == "linf":
                x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps)
            else:
                d = x_adv.detach() + step * grad / _flat_norm(grad) - x
                x_adv = x + d * (eps / _flat_norm(d)).clamp(max=1)
            x_adv = x_adv.clamp(0, 1)  # moves every pixel toward x: stays inside either ball
    return x_adv.detach()


def _random_start(x, eps, norm="linf"):
    if norm == "linf":
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    d = torch.randn_like(x)  # a random direction, at a radius uniform in [0, eps]
    return (x + d / _flat_norm(d) * eps * torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device)).clamp(0, 1)


def instance_pgd(embed, x, x_pos, *, eps=8 / 255, step=0.007, steps=7, temperature=0.5,
                 random_start=True, gather=None):
    """RoCL's instance-wise attack on images x, x_pos in [0, 1]: perturb x to maximise the NT-Xent of
    [x_adv; x_pos]. embed (encoder + projector) runs in eval mode, so x_pos's embedding is fixed: computed
    once. gather(t, dim) concatenates over ranks, so that the attack sees the global batch's negatives."""
    gather = gather or (lambda t, dim: t)
    with eval_mode(embed):
        with torch.no_grad():
            z_pos = embed(x_pos)  # [N, D]
        loss = lambda xa: a_infonce(gather(torch.stack([embed(xa), z_pos]), 1), temperature=temperature)
        return _ascend(loss, x, _random_start(x, eps) if random_start else x, eps, step, steps)


def pgd(classifier, x, y, *, eps=8 / 255, step=2 / 255, steps=20, norm="linf"):
    """Supervised PGD with random start on cross-entropy (Madry et al.), L_inf or L2, classifier in eval
    mode. x: images in [0, 1]; eps and step in the same pixel units."""
    with eval_mode(classifier):
        return _ascend(lambda xa: F.cross_entropy(classifier(xa), y), x, _random_start(x, eps, norm), eps, step,
                       steps, norm)


def trades_loss(model, x, y, *, beta=6.0, eps=8 / 255, step=2 / 255, steps=10):
    """TRADES (Zhang et al. 2019) on images x in [0, 1]: CE(f(x), y) + beta KL(f(x) || f(x_adv))."""
    with eval_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x), 1)
        kl = lambda xa: F.kl_div(F.log_softmax(model(xa), 1), p_nat, reduction="sum")
        x_adv = _ascend(kl, x, x + 0.001 * torch.randn_like(x), eps, step, steps)
    logits = model(x)
    return F.cross_entropy(logits, y) + beta * F.kl_div(
        F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")


# ==== Model: CIFAR ResNet-18 encoder f and MLP projector g. Inputs in [0,1], no normalisation (RoCL). ====
class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span all ranks, on gloo and NCCL alike (one code path,
    tested on CPU; nn.SyncBatchNorm runs on GPUs only). One process: plain BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        n = xf.numel() // xf.size(1) * dist.get_world_size()
        mean, sq = (AllReduce.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3))])) / n).chunk(2)
        var = sq - mean * mean  # biased variance of the global batch
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        y = (xf - mean.view(1, -1, 1, 1)) * (var.view(1, -1, 1, 1) + self.eps).rsqrt()
        return (y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 in the layout the field's checkpoints share (conv1, bn1, layer1..4, shortcut): 3x3
    stride-1 stem (padding 1; solo-learn's has 2), no max-pool, BasicBlocks [2,2,2,2]; 8*width features.
    normalise=True adds the input normalisation (buffers mean, std) some published encoders carry inside."""

    def __init__(self, width=64, normalise=False, stem_padding=1):
        super().__init__()
        if normalise:
            self.register_buffer("mean", torch.zeros(3))
            self.register_buffer("std", torch.ones(3))
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, 1, stem_padding, bias=False), BatchNorm2d(width)
        chans = [width, width, 2 * width, 4 * width, 8 * width]
        for i in range(4):
            setattr(self, f"layer{i + 1}", nn.Sequential(Block(chans[i], chans[i + 1], 1 if i == 0 else 2),
                                                         Block(chans[i + 1], chans[i + 1], 1)))
        self.dim = 8 * width

    def forward(self, x):  # [B,3,32,32] in [0,1] -> [B, 8*width]
        if hasattr(self, "mean"):
            x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x)))).mean((2, 3))  # global average pool


class Net(nn.Module):
    """z = g(f(x)): encoder f, projector g = Linear(8w -> 2048) -> ReLU -> Linear(-> 128), no BN."""

    def __init__(self, width=64):
        super().__init__()
        self.encoder = ResNet18(width)
        self.projector = nn.Sequential(nn.Linear(self.encoder.dim, 2048), nn.ReLU(), nn.Linear(2048, 128))

    def forward(self, x):
        return self.projector(self.encoder(x))


# ==== The training step ============================================================================
@torch.no_grad()
def lars_(params, wd, trust=1e-3, eps=1e-8):
    """LARS as torchlars (You et al. 2017), in place on the gradients, before a plain SGD step:
    g <- (g + wd w) * trust |w| / (|g| + wd |w| + eps); returns the global gradient norm."""
    norms = []
    for p in params:
        w_norm, g_norm = p.norm(), p.grad.norm()
        scale = torch.where((w_norm > 0) & (g_norm > 0), trust * w_norm / (g_norm + wd * w_norm + eps), 1.0)
        p.grad.add_(p, alpha=wd).mul_(scale)
        norms.append(g_norm)
    return torch.stack(norms).norm()


def lr_at(step, total, warmup, base, mult=15.0):
    """Linear warm-up from base to mult*base over `warmup` steps, then cosine to 0 (per step)."""
    if step < warmup:
        return base * (1 + (mult - 1) * step / warmup)
    return base * mult * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def attack_views(net, x1, x2, args, gather=None):
    """x_adv: RoCL's instance-wise attack of x1 against its positive x2, at the run's eps, step and steps."""
    return instance_pgd(net, x1, x2, eps=args.eps, step=args.step, steps=args.attack_steps,
                        temperature=args.temperature, gather=gather)


def pretrain_loss(net, x1, x2, x_adv, args, gather=None):
    """The step's loss on views x1, x2 and (adversarial methods) x_adv; -> (loss, {term: value})."""
    gather, n = gather or (lambda t, dim: t), len(x1)
    if args.method == "simclr":
        loss = a_infonce(gather(net(torch.cat([x1, x2])).view(2, n, -1), 1), temperature=args.temperature)
        return loss, {"infonce": loss.detach()}
    if args.reg_forward == "separate":  # RoCL's regulariser in its own train-mode forward, first, as the
        z_reg = net(torch.cat([x_adv, x2])).view(2, n, -1)  # official step: BN running statistics see it first
    z = net(torch.cat([x1, x2, x_adv])).view(3, n, -1)  # [V=3, N, D]: the main train-mode forward
    infonce = a_infonce(gather(z, 1), adv_views=(2,), temperature=args.temperature,
                        ip_alpha=args.ip_alpha if args.method in ("infpos", "both") else None,
                        adv_weight=args.adv_weight, tau_plus=args.tau_plus, hn_normalise=args.hn_normalise,
                        hn_beta=args.hn_beta if args.method in ("hardneg", "both") else None)
    if args.reg_forward == "shared":  # x_adv and x2 rows of the main forward: its 3N-batch BN statistics
        z_reg = torch.stack([z[2], z[1]])
    reg = a_infonce(gather(z_reg, 1), temperature=args.temperature)  # global batch, as the main loss
    return infonce + args.reg_weight * reg, {"infonce": infonce.detach(), "reg": reg.detach()}


def train_step(model, params, x1, x2, args, gather=None, mark=lambda phase: None):
    """One step up to the optimiser's: x_adv, the loss (bf16 autocast with --amp, the loss itself in fp32),
    backward, gradients averaged over ranks (gather: several processes), LARS. mark(phase) is called after the
    attack and at the end (the benchmark's clock). -> (loss, its terms, the gradient norm before LARS)."""
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=args.amp):
        x_adv = None if args.method == "simclr" else attack_views(model, x1, x2, args, gather)
        mark("attack_s")
        loss, terms = pretrain_loss(model, x1, x2, x_adv, args, gather)
    for p in params:
        p.grad = None
    loss.backward()
    if gather:  # what DDP's hooks do, done once after the step's only backward
        allreduce_grads(params, dist.get_world_size())
    grad_norm = lars_(params, args.wd)
    mark("fwd_bwd_s")
    return loss, terms, grad_norm


# ==== Pretraining ==================================================================================
@torch.no_grad()
def knn_accuracy(encoder, x_bank, y_bank, x_query, y_query, n_classes, k=200, t=0.1, bs=1024):
    """The weighted kNN monitor of InstDisc and MoCo: cosine similarities of eval-mode fp32 encoder features; the k
    nearest bank images vote for their class with weight exp(similarity / t). No randomness, no BN update."""
    def features(x):
        return F.normalize(torch.cat([encoder(as_float(x[i])) for i in batches(len(x), bs, x.device)]), dim=1)
    with eval_mode(encoder), strict_fp32(x_bank.device):
        bank, query = features(x_bank), features(x_query)
        sim, idx = (query @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(query), n_classes, device=query.device).scatter_add_(1, y_bank[idx], (sim / t).exp())
    return (votes.argmax(1) == y_query).float().mean().item()


def ck_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def pretrain(args, net, data, device, rank, world, ck=None):
    """Pretraining loop, step by step; checkpoints after every epoch (and every --ckpt-every steps). The
    checkpoint holds the epoch log, so log.jsonl has one line per completed epoch, resumed or not. Every
    --knn-every epochs, rank 0 adds the kNN accuracy of fixed train/test subsets to the epoch's line."""
    x_train, y_train, x_test, y_test, n_classes = data[:5]
    x_train, b = x_train.to(device), args.batch_size // world  # b: instances per rank
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    net.to(device).to(memory_format=layout)
    steps = len(x_train) // args.batch_size  # per epoch: the last partial batch is dropped
    total, warmup = steps * args.epochs, steps * args.warmup_epochs
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)  # weight decay lives inside LARS
    path, step, train_s, epoch_s, sums, history = os.path.join(args.out, "last.pt"), 0, 0.0, 0.0, {}, []
    if ck:
        opt.load_state_dict(ck["optimizer"])
        step, train_s, epoch_s, history = ck["step"], ck["train_s"], ck["epoch_s"], ck["history"]
        sums = {k: torch.tensor(v, device=device) for k, v in ck["sums"].items()}
        if len(ck["rng"]) == world:
            set_rng_state(ck["rng"][rank], device)
        else:  # another number of processes: fresh streams, so not bit-exact
            torch.manual_seed(args.seed + rank + 7919 * step)
    if args.knn_every and rank == 0:
        bank, query = fixed_shuffle(len(x_train), KNN_BANK), fixed_shuffle(len(x_test), KNN_QUERIES)
        knn_data = [t.to(device) for t in (x_train[bank.to(device)], y_train[bank], x_test[query], y_test[query])]
    model = torch.compile(net) if args.compile else net
    gather = GatherCat.apply if world > 1 else None
    stopping = []  # SIGTERM / SIGINT: finish the step, save, exit
    handlers = {s: signal.signal(s, lambda *_: stopping.append(1)) for s in (signal.SIGTERM, signal.SIGINT)}
    # What made these weights: the arguments as first given, then each invocation's own record (never rewritten)
    run_args = {**vars(args), "n_classes": n_classes}
    first_args = ck.get("first_args", ck["args"]) if ck else run_args
    changes = {k: [ck["args"].get(k), v] for k, v in run_args.items()
               if ck and k not in OWN_KEYS + ("given",) and ck["args"].get(k) != v}
    invocations = (ck.get("invocations", []) if ck else []) + [
        {"step": step, "command": args.command, "given": args.given, "changes": changes}]
    if rank == 0:
        write_json(os.path.join(args.out, "config.json"), {"args": first_args, "invocations": invocations})

    def save():
        states = [rng_state(device)] * world
        if world > 1:
            dist.all_gather_object(states, rng_state(device))
        if rank == 0:
            state = {"encoder": net.encoder.state_dict(), "projector": net.projector.state_dict(),
                     "optimizer": opt.state_dict(), "epoch": len(history), "step": step, "train_s": train_s,
                     "epoch_s": epoch_s, "sums": {k: float(v) for k, v in sums.items()}, "history": history,
                     "args": run_args, "first_args": first_args, "invocations": invocations, "data": data.identity,
                     "rng": states, "env": provenance(device)}
            lines = "".join(json.dumps(r) + "\n" for r in history).encode()
            try:
                atomic_write(path, lambda f: torch.save(state, f))
                atomic_write(os.path.join(args.out, "log.jsonl"), lambda f: f.write(lines))
            except WriteFailed as e:
                kept = f"{path} still holds step {ck_step(path)}" if os.path.exists(path) else "no checkpoint yet"
                raise WriteFailed(f"{e}; {kept}; free space, then: {resume_command(args.out)}")

    perm, last = None, time.time()
    try:
        while step < total:
            epoch, s = divmod(step, steps)
            if perm is None or s == 0:
                g = torch.Generator().manual_seed(args.seed * 100003 + epoch)  # the same order on every rank
                perm = torch.randperm(len(x_train), generator=g).to(device)
                tick = progress(f"epoch {epoch + 1} step", steps) if rank == 0 else (lambda *_: None)
            idx = perm[s * args.batch_size + rank * b:s * args.batch_size + (rank + 1) * b]
            x1, x2 = (augment(x_train[idx]).contiguous(memory_format=layout) for _ in range(2))
            lr = lr_at(step, total, warmup, args.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, terms, grad_norm = train_step(model, params, x1, x2, args, gather)
            # One host sync per step, and device-resident flags (NCCL has no CPU tensors): a non-finite loss or
            # gradient on any rank, or a stop request to any rank, stops every rank at this step.
            flags = torch.stack([~torch.isfinite(loss.detach() + grad_norm),
                                 torch.tensor(bool(stopping), device=device)]).float()
            if world > 1:
                dist.all_reduce(flags, dist.ReduceOp.MAX)
            bad, stop = flags.tolist()
            if bad:  # before the update: the weights stay good
                raise NonFiniteLoss(
                    f"non-finite loss at epoch {epoch + 1}, step {step} (loss {loss.item():.4g}: "
                    + ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                    + f"; grad norm {grad_norm.item():.4g}); "
                    + (f"last good checkpoint: {path} (epoch {len(history)}); resume it with --resume {args.out} "
                       f"--lr <smaller>" if os.path.exists(path) else "no checkpoint yet; restart with a smaller --lr"))
            opt.step()
            step += 1
            for k, v in {"loss": loss.detach(), **terms}.items():
                sums[k] = sums.get(k, 0) + v
            now = time.time()
            train_s, epoch_s, last = train_s + now - last, epoch_s + now - last, now
            tick(s + 1, lambda: f"loss {float(sums['loss']) / (s + 1):.4f}")
            if step % steps == 0:  # epoch complete: its log line, then the checkpoint that holds it
                history.append({"epoch": epoch + 1, "step": step, **{k: float(v) / steps for k, v in sums.items()},
                                "lr": lr, "images_per_s": steps * args.batch_size / epoch_s, "train_s": train_s})
                if args.knn_every and rank == 0 and (epoch + 1) % args.knn_every == 0:  # not in the training time
                    history[-1]["knn"] = knn_accuracy(net.encoder, *knn_data, n_classes)
                sums, epoch_s = {}, 0.0
                save()
                if rank == 0:
                    rec = history[-1]
                    eta = hms((total - step) * args.batch_size / rec["images_per_s"])
                    print(f"epoch {epoch + 1:4d}/{args.epochs} | loss {rec['loss']:.4f} | lr {lr:.4f} | "
                          + (f"kNN {100 * rec['knn']:5.2f}% | " if "knn" in rec else "")
                          + f"{rec['images_per_s']:7.1f} img/s | ETA {eta}", flush=True)
            elif stop or (args.ckpt_every and step % args.ckpt_every == 0):
                save()
            last = time.time()
            if stop:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted: {path} holds step {step}; continue with: {resume_command(args.out)}",
                  file=sys.stderr)
        raise SystemExit(130)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


# ==== Evaluation: fine-tune a scheme -> classifier; measure a classifier -> SA, RA (strict fp32) ====
# Finetuning protocols: settings per scheme, recorded with the results. "asym-rocl" (the default): the official
# Asym-RoCL finetuning. "robustssl": the field's benchmark (GodXuxilie/RobustSSL_Benchmark, vanilla_finetuning.py
# --mode ALL and setup_hyperparameter in its utils.py), per pretraining method; as in its code, a setting made for
# one scheme carries over to the next (DynACL-AIR's 5 SLF epochs on CIFAR-10 hold for ALF and AFF).
_LF = dict(batch_size={"cifar10": 512, "cifar100": 512, "stl10": 128}, milestones=[10, 20])
_ACL = dict(_LF, lr={"cifar10": 0.01, "cifar100": 0.05, "stl10": 0.01})
_AIR = dict(_LF, lr={"cifar10": 0.01, "cifar100": 0.1, "stl10": 0.01})
_AIR2 = dict(_LF, batch_size={"cifar10": 512, "cifar100": 512})
_AFF = dict(batch_size=128, lr=0.1, milestones=[15, 20])
_ADVCL = {"slf": dict(batch_size=512, lr=0.01, milestones=[15, 20]), "alf": dict(batch_size=512, lr=0.01,
          milestones=[15, 20]), "aff": _AFF}
ROBUSTSSL = {
    "acl": {"slf": _ACL, "alf": _ACL, "aff": dict(_AFF, epochs=100, milestones=[40, 60])},
    "dynacl": {"slf": _ACL, "alf": _ACL, "aff": _AFF}, "dynacl++": {"slf": _ACL, "alf": _ACL, "aff": _AFF},
    "advcl": _ADVCL, "a-infonce": _ADVCL, "deacl": _ADVCL,
    "dynacl-air": {"slf": dict(_AIR, epochs={"cifar10": 5}), "alf": _AIR, "aff": _AFF},
    "dynacl-air++": {"slf": dict(_AIR2, lr={"cifar10": 0.01, "cifar100": 0.09}), "alf": dict(
        _AIR2, lr={"cifar10": 0.01, "cifar100": 0.1}, epochs={"cifar10": 4}), "aff": _AFF},
    "dynacl-rcs": {},  # setup_hyperparameter tests for 'DynACL_RCS', its command line says 'DynACL-RCS': defaults
}


def scheme_settings(protocol, method, dataset, ft_epochs, batch_size):
    """Per scheme: epochs, lr milestones (lr/10 at each), lr, momentum, weight decay, batch, training augmentation
    (RobustSSL: RandomCrop(32, padding 4) + flip), the head's initialisation (RobustSSL: zeros; asym-rocl:
    nn.Linear's), and the training attacks at eps 8/255 (ALF: PGD-10 of 2/255; AFF: TRADES, beta 6, 10 steps of
    2/255). ft_epochs: the ALF/AFF epochs (asym-rocl), or every scheme's (robustssl)."""
    attacks = {"slf": {}, "alf": dict(eps=8 / 255, attack_steps=10, attack_step=2 / 255),
               "aff": dict(eps=8 / 255, attack_steps=10, attack_step=2 / 255, trades_beta=6.0)}
    if protocol == "asym-rocl":
        e = ft_epochs or 25
        s = {"slf": dict(epochs=150, milestones=[30, 50, 100], lr=0.1, wd=5e-4)}
        s["alf"] = s["aff"] = dict(epochs=e, milestones=[max(1, int(0.6 * e)), max(1, int(0.8 * e))], lr=0.1, wd=2e-4)
        return {k: dict(v, momentum=0.9, batch_size=batch_size, augment=False, zero_head=False, **attacks[k])
                for k, v in s.items()}
    s = dict(epochs=25, milestones=[15, 20], lr=0.1, momentum=0.9, wd=2e-4, batch_size=128, augment=True,
             zero_head=True)
    out = {}
    for scheme in SCHEMES:  # its argparse defaults, then setup_hyperparameter's changes, carried over (--mode ALL)
        for k, v in ROBUSTSSL[method].get(scheme, {}).items():
            v = v.get("cifar10" if dataset == "folder" else dataset) if isinstance(v, dict) else v
            s[k] = s[k] if v is None else v
        out[scheme] = dict(s, **attacks[scheme])
        if ft_epochs:  # a shorter run: the milestones keep their place in it
            out[scheme].update(epochs=ft_epochs, milestones=[max(1, m * ft_epochs // s["epochs"])
                                                             for m in s["milestones"]])
    return out


@contextlib.contextmanager
def strict_fp32(device):
    """No autocast and no TF32 (cuDNN allows TF32 convolutions by default): for every measured number."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def batches(n, bs, device="cpu", shuffle=False):
    return (torch.randperm(n, device=device) if shuffle else torch.arange(n, device=device)).split(bs)


def as_float(xb):  # uint8 images -> [0, 1]; float images (crafted adversarial examples) pass through
    return xb.float() / 255 if xb.dtype == torch.uint8 else xb


def attacked(classifier, x, y, bs, attack, label=None):
    """attack(classifier, xb, yb) over images x in batches -> adversarial images, float in [0, 1]. Progress is
    shown per attack step (a forward pass of the classifier), so one long batch shows it too."""
    tick, out = progress(label or "attack", len(x)), []
    steps = getattr(attack, "keywords", {}).get("steps")  # a pgd_attack: its forward passes per batch
    for idx in batches(len(x), bs, x.device):
        done, calls = sum(len(o) for o in out), [0]

        def step(*_):
            calls[0] += 1
            tick(done + len(idx) * min(calls[0], steps) // steps)
        hook = classifier.register_forward_hook(step) if steps else None
        try:
            out.append(attack(classifier, as_float(x[idx]), y[idx]))
        finally:
            if hook:
                hook.remove()
    return torch.cat(out)


def accuracy(classifier, x, y, bs, attack=None, label=None):
    """Top-1 accuracy of classifier on images x (uint8, or float in [0, 1]), after attack(classifier, x, y)."""
    x = attacked(classifier, x, y, bs, attack, label) if attack else x
    correct = 0
    with eval_mode(classifier), torch.no_grad():
        for idx in batches(len(x), bs, x.device):
            correct += (classifier(as_float(x[idx])).argmax(1) == y[idx]).sum().item()
    return correct / len(x)


def pgd_attack(norm, eps, step, steps):
    """The RA attack of one threat: L_inf with step `step`, L2 with step 2.5 eps / steps."""
    step = step if norm == "linf" else 2.5 * eps / max(steps, 1)
    return functools.partial(pgd, eps=eps, step=step, steps=steps, norm=norm)


def train_head(params, loss_fn, n, s, device, label):
    """SGD with lr/10 at each milestone epoch, settings s of scheme_settings; loss_fn(idx) -> loss of that batch.
    Returns the lr of every epoch."""
    opt = torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"], weight_decay=s["wd"])
    sched, lrs, epochs_tick = torch.optim.lr_scheduler.MultiStepLR(opt, s["milestones"], 0.1), [], progress(
        f"{label} finetuning, epoch", s["epochs"])
    for epoch in range(s["epochs"]):
        tick = progress(f"{label} epoch {epoch + 1}/{s['epochs']}, images", n)
        lrs.append(opt.param_groups[0]["lr"])
        for k, idx in enumerate(batches(n, s["batch_size"], device, shuffle=True)):
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tick(min(n, (k + 1) * s["batch_size"]))
        sched.step()
        epochs_tick(epoch + 1, lambda: f"loss {loss.item():.4f}")
    return lrs


def crop_flip(xb):
    """RandomCrop(32, padding=4) and RandomHorizontalFlip of uint8 images [B,3,32,32] -> float in [0, 1]."""
    b, dev = len(xb), xb.device
    dy, dx = (torch.randint(0, 9, (b, 1, 1, 1), device=dev) for _ in range(2))
    rows, cols = torch.arange(32, device=dev).view(1, 1, 32, 1) + dy, torch.arange(32, device=dev).view(1, 1, 1, 32)
    x = F.pad(xb, (4, 4, 4, 4))[torch.arange(b, device=dev).view(b, 1, 1, 1), torch.arange(3, device=dev).view(
        1, 3, 1, 1), rows, cols + dx]
    return torch.where(torch.rand(b, 1, 1, 1, device=dev) < 0.5, x.flip(3), x).float() / 255


def linear_head(dim, n_classes, zero):
    head = nn.Linear(dim, n_classes)
    if zero:  # RobustSSL's heads start at zero
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return head


def finetune(scheme, encoder, x, y, n_classes, s):
    """Fine-tune one scheme on uint8 images x with settings s -> classifier (encoder + linear head). SLF: a head on
    the frozen encoder's features (eval mode; without augmentation computed once); ALF: a head on PGD examples made
    through encoder + head; AFF: TRADES on the whole network, from the pretrained encoder. ALF/AFF attack at
    s["eps"]."""
    device, view, eps = x.device, crop_flip if s["augment"] else as_float, s.get("eps")

    def features(xb):  # of the frozen encoder
        with eval_mode(encoder), torch.no_grad():
            return encoder(xb)
    if scheme == "aff":
        clf = nn.Sequential(copy.deepcopy(encoder).requires_grad_(True),
                            linear_head(encoder.dim, n_classes, s["zero_head"]))
        params, clf = clf.parameters(), clf.to(device).train()
        loss = lambda i: trades_loss(clf, view(x[i]), y[i], beta=s["trades_beta"], eps=eps, step=s["attack_step"],
                                     steps=s["attack_steps"])
    else:
        head = linear_head(encoder.dim, n_classes, s["zero_head"]).to(device)
        params, clf = head.parameters(), nn.Sequential(encoder, head)
        if scheme == "alf":
            loss = lambda i: F.cross_entropy(head(features(pgd(clf, view(x[i]), y[i], eps=eps, step=s["attack_step"],
                                                               steps=s["attack_steps"]))), y[i])
        elif s["augment"]:
            loss = lambda i: F.cross_entropy(head(features(view(x[i]))), y[i])
        else:
            feats = torch.cat([features(view(x[i])) for i in batches(len(x), s["batch_size"], device)])
            loss = lambda i: F.cross_entropy(head(feats[i]), y[i])
    train_head(params, loss, len(x), s, device, label=scheme.upper())
    return clf


def guards(classifier, x, y, bs, eps, steps, robust=()):
    """Cheap checks that catch masked or broken gradients, on 200 test images of a fixed shuffle: RA <= SA,
    RA falls as eps grows and is ~0 at eps 64/255, 2.5x more PGD steps do not raise RA; and on the whole
    test set, RA under each norm of robust [(norm, eps, RA)] falls as eps grows."""
    idx = fixed_shuffle(len(x), 200).to(x.device)
    x, y = x[idx], y[idx]
    tol = 0.01 + 1 / len(x)  # a point, and one image
    tick, done = progress("guards: PGD attacks", 6), [0]

    def at(e, k):
        ra = accuracy(classifier, x, y, bs, pgd_attack("linf", e, 2.5 * e / k, k))
        done[0] += 1
        tick(done[0])
        return ra
    g = {"sa": accuracy(classifier, x, y, bs), "ra_eps": {f"{e}/255": at(e / 255, steps) for e in (2, 8, 16, 64)}}
    more = 5 * steps // 2
    g[f"ra_{steps}_steps"], g[f"ra_{more}_steps"] = at(eps, steps), at(eps, more)
    chain = [("SA", g["sa"])] + [(f"RA at {k}", ra) for k, ra in g["ra_eps"].items()]
    failed = [f"{b} {100 * rb:.1f}% above {a} {100 * ra:.1f}%" for (a, ra), (b, rb) in zip(chain, chain[1:])
              if rb > ra + tol]
    if chain[-1][1] > 0.05:
        failed.append(f"RA at 64/255 {100 * chain[-1][1]:.1f}% (should be ~0)")
    if g[f"ra_{more}_steps"] > g[f"ra_{steps}_steps"] + tol:
        failed.append(f"PGD-{more} RA {100 * g[f'ra_{more}_steps']:.1f}% above PGD-{steps}'s "
                      f"{100 * g[f'ra_{steps}_steps']:.1f}%")
    rising = []  # RA under each norm of robust, on the whole test set, as eps grows
    for norm in ("linf", "l2"):
        ras = [(e, ra) for n, e, ra in sorted(robust) if n == norm]
        rising += [f"{norm} RA {100 * rb:.1f}% at {eb:.4g} above {100 * ra:.1f}% at {ea:.4g}"
                   for (ea, ra), (eb, rb) in zip(ras, ras[1:]) if rb > ra + tol]
    g["threats_fall"] = not rising
    g["failed"] = failed + rising
    g["ok"] = not g["failed"]
    return g


def autoattack_impl():
    """The AutoAttack that --autoattack runs: Croce and Hein's reference code (the one RobustBench uses)."""
    try:
        import pyautoattack
    except ImportError:
        raise UsageError("AutoAttack needs an optional package: pip install pyautoattack (Croce and Hein's "
                         "reference AutoAttack); --protocol robustssl runs it unless --no-autoattack")
    return f"pyautoattack {pyautoattack.__version__}"


def autoattack(classifier, x, y, bs, norm, eps, n_classes, seed):
    """Accuracy under standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) at radius eps."""
    import pyautoattack
    with eval_mode(classifier):
        aa = pyautoattack.AutoAttack(classifier, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard",
                                     device=x.device, seed=seed)
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = min(9, n_classes - 1)
        x_adv, _ = aa.run_standard_evaluation(as_float(x), y, batch_size=bs)
    return accuracy(classifier, x_adv, y, bs)


def evaluate(args, encoder, data, device, done=(), source=None):
    """Yields (scheme, numbers) for each scheme of args.eval not in done: fine-tune (settings args.schemes), then
    measure SA, RA under every threat, AutoAttack, and transfer RA from source's SLF classifier. Finetuning uses
    PyTorch's default precision; every measured number is strict fp32."""
    x_tr, y_tr, x_te, y_te, n_classes = data[:5]
    bs, (key0, norm0, eps0) = args.eval_batch_size, args.threats[0]
    guard_eps = next((e for _, n, e in args.threats if n == "linf"), 8 / 255)  # the guards' more-steps check

    def prep(enc):  # a frozen fp32 copy on the device, in the default memory layout
        return copy.deepcopy(enc).float().to(device, memory_format=torch.contiguous_format).requires_grad_(False)
    encoder, x_transfer, todo = prep(encoder), None, [s for s in SCHEMES if s in args.eval and s not in done]
    if source is not None and todo:
        torch.manual_seed(args.seed)
        src = finetune("slf", prep(source), x_tr, y_tr, n_classes, args.schemes["slf"])
        with strict_fp32(device):
            torch.manual_seed(args.seed)  # the random starts of white-box RA: transfer from itself equals it
            x_transfer = attacked(src, x_te, y_te, bs, pgd_attack(norm0, eps0, args.eval_step, args.eval_steps),
                                  f"transfer source PGD {key0}")
    for name in todo:
        t0 = time.time()
        torch.manual_seed(args.seed + SCHEMES.index(name))  # each scheme its own draws: one can be (re)run alone
        clf = finetune(name, encoder, x_tr, y_tr, n_classes, args.schemes[name])
        with strict_fp32(device):
            r = {"sa": accuracy(clf, x_te, y_te, bs), "robust": {}}
            for key, norm, eps in args.threats:
                torch.manual_seed(args.seed)  # every attack pass starts from the same random draws
                r["robust"][key] = accuracy(clf, x_te, y_te, bs, pgd_attack(norm, eps, args.eval_step, args.eval_steps),
                                            f"{name.upper()} PGD-{args.eval_steps} {key}")
            r["ra"] = r["robust"][key0]
            if args.autoattack:
                r["aa_robust"] = {key: autoattack(clf, x_te, y_te, bs, norm, eps, n_classes, args.seed)
                                  for key, norm, eps in args.threats}
                r["aa"] = r["aa_robust"][key0]
            if x_transfer is not None:
                r["ra_transfer"] = accuracy(clf, x_transfer, y_te, bs)
            if name == "slf":
                r["guards"] = guards(clf, x_te, y_te, bs, guard_eps, args.eval_steps,
                                     [(n, e, r["robust"][k]) for k, n, e in args.threats])
        r["s"] = time.time() - t0
        shown = {"SA": r["sa"], **{f"RA {k}": v for k, v in r["robust"].items()},
                 **{f"AA {k}": v for k, v in r.get("aa_robust", {}).items()},
                 f"transfer RA {key0}": r.get("ra_transfer")}
        line = "  ".join(f"{k} {100 * v:.2f}%" for k, v in shown.items() if v is not None)
        if name == "slf":
            line += "  guards " + ("ok" if r["guards"]["ok"] else "FAILED: " + "; ".join(r["guards"]["failed"]))
        print(f"{name.upper()}: {line}  ({hms(r['s'])})", flush=True)
        yield name, r


# ==== Data: whole data sets as uint8 tensors [N, 3, 32, 32]; augmentation as batched tensor ops ====
def fixed_shuffle(n_items, n):
    """Indices of the first n items of a fixed permutation (the same for every run, seed and method)."""
    if not 0 < n < n_items:
        return torch.arange(n_items)
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(0))[:n]


def pick(n_items, n, split):
    if n > n_items:
        raise UsageError(f"{'--subset' if split == 'train' else '--eval-subset'} {n} is larger than the {n_items} "
                         f"{split} images")
    return fixed_shuffle(n_items, n)


def image_folder(root, split, classes=None):
    """torchvision's ImageFolder (it skips files that are not images and refuses empty class folders);
    test labels follow the training split's class indices."""
    from torchvision.datasets import ImageFolder
    d = os.path.join(root, split)
    if not os.path.isdir(root):
        raise UsageError(f"data directory {root} "
                         + ("is a file, not a directory" if os.path.exists(root) else "does not exist"))
    if not os.path.isdir(d):
        raise UsageError(f"{d} is missing: --dataset folder reads DATA_DIR/train/<class>/<image> and "
                         f"DATA_DIR/test/<class>/<image>")
    try:
        ds = ImageFolder(d)
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"{d}: {e}".replace("\n", " "))
    if classes is not None:
        if set(ds.classes) - set(classes):
            raise UsageError(f"test classes not in train/: {sorted(set(ds.classes) - set(classes))}")
        ds.samples = [(p, classes.index(ds.classes[c])) for p, c in ds.samples]
    return ds


def decode(ds, idx, split):
    """Decode the images idx of an ImageFolder -> (uint8 [n, 3, 32, 32], labels). As torchvision's loader does,
    images are converted to RGB (an alpha channel is dropped, gray is repeated); other sizes are resized; images in
    nested sub-folders count in their class. Each of these quiet choices is said once."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image
    x, tick = torch.empty(len(idx), 32, 32, 3, dtype=torch.uint8), progress(f"decoding {split} images", len(idx))

    def one(i):
        path = ds.samples[idx[i]][0]
        try:
            with Image.open(path) as im:
                alpha = "A" in im.getbands() or "transparency" in im.info
                gray, size = im.mode in ("1", "L", "LA", "I", "I;16", "F"), im.size
                im = im.convert("RGB")
                x[i] = torch.frombuffer(bytearray((im if im.size == (32, 32) else im.resize((32, 32), Image.BILINEAR))
                                                  .tobytes()), dtype=torch.uint8).view(32, 32, 3)
        except Exception as e:
            raise UsageError(f"cannot read image {path}: {e}")
        return size != (32, 32), alpha, gray, os.path.relpath(path, ds.root).count(os.sep) > 1
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL releases the GIL while decoding
        counts = [0] * 4
        for k, flags in enumerate(pool.map(one, range(len(idx)))):
            counts = [c + f for c, f in zip(counts, flags)]
            tick(k + 1)
    said = [what.format(n=n, split=split) for n, what in zip(counts, (
        "resized {n} {split} images of another size to 32x32 (bilinear)", "dropped the alpha channel of {n} {split} "
        "images", "repeated {n} grayscale {split} images to RGB", "counted {n} {split} images of nested sub-folders in "
        "their class folder's class")) if n]
    if said:
        print("data: " + "; ".join(said))
    return x.permute(0, 3, 1, 2).contiguous(), torch.tensor([ds.samples[i][1] for i in idx.tolist()])


class Data(NamedTuple):
    """A data set as uint8 images [N, 3, 32, 32] on the CPU, and what identifies it (data_identity)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    identity: dict


def fingerprint(paths, root):
    """sha256 of the files' paths (relative to root) and bytes: equal images give an equal value wherever
    they lie; a file changed, added, renamed or moved to another class changes it. About 0.5 s for CIFAR-10."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def load_data(dataset, data_dir, n_train=0, n_test=0):
    """-> Data. n_train and n_test > 0 keep the first n images of a fixed shuffle (never a single class); only
    those are decoded. Its identity names the data set, its resolved directory, the fingerprint of its files,
    the subsets and the classes."""
    if dataset == "folder":
        train = image_folder(data_dir, "train")
        test = image_folder(data_dir, "test", train.classes)
        files = [p for p, _ in train.samples + test.samples]
        x_tr, y_tr = decode(train, pick(len(train.samples), n_train, "train"), "train")
        x_te, y_te = decode(test, pick(len(test.samples), n_test, "test"), "test")
        n_classes = len(train.classes)
    else:
        x_tr, y_tr, x_te, y_te, n_classes, files = torchvision_data(dataset, data_dir, n_train, n_test)
    if n_classes < 2:
        raise UsageError(f"{dataset} in {data_dir} has {n_classes} class: classification needs at least 2")
    identity = {"dataset": dataset, "dir": os.path.realpath(data_dir), "fingerprint": fingerprint(files, data_dir),
                "subset": n_train, "eval_subset": n_test, "n_train": len(x_tr), "n_test": len(x_te),
                "n_classes": n_classes}
    return Data(x_tr, y_tr, x_te, y_te, n_classes, identity)


def torchvision_data(dataset, data_dir, n_train, n_test):
    import torchvision.datasets as tvd
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
        raise UsageError(f"could not get {dataset} into {data_dir} ({type(e).__name__}: {e}); offline? copy "
                         f"torchvision's archive there, or use --dataset folder".replace("\n", " "))
    out = []
    for s, n in zip(sets, (n_train, n_test)):
        x = torch.from_numpy(s.data)
        x = x if dataset == "stl10" else x.permute(0, 3, 1, 2)  # CIFAR is stored [N, 32, 32, 3]
        keep = pick(len(x), n, "train" if s is sets[0] else "test")
        x, y = x[keep], torch.as_tensor(s.labels if dataset == "stl10" else s.targets)[keep]
        if x.shape[-1] != 32:  # STL-10's 96x96 at 32x32, antialiased (as PIL's bilinear resize)
            x = F.interpolate(x.float(), size=32, mode="bilinear", antialias=True).round().clamp(0, 255).byte()
        out += [x.contiguous(), y.long()]
    base = os.path.join(data_dir, kind.base_folder)
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(base) for f in names)
    return (*out, len(sets[0].classes), files)


def _gray(x):  # ITU-R 601 luma, as torchvision's rgb_to_grayscale: [B,3,H,W] -> [B,1,H,W]
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def _hue(x, shift):
    """Rotate hue by shift [B] (in turns): RGB -> HSV, H += shift, HSV -> RGB."""
    v, m = x.amax(1), x.amin(1)
    c = v - m  # chroma
    r, g, b = x.unbind(1)
    cd = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, (g - b) / cd, torch.where(v == g, 2 + (b - r) / cd, 4 + (r - g) / cd))
    h = (torch.where(c > 0, h, torch.zeros_like(h)) / 6 + shift.view(-1, 1, 1)) % 1
    k = torch.stack([5 + 6 * h, 3 + 6 * h, 1 + 6 * h], 1) % 6  # HSV -> RGB: channel n uses (n + 6H) mod 6
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def adjust(x, op, f):
    """torchvision's ColorJitter ops with a factor per image f [B]: 0 brightness, 1 contrast,
    2 saturation (blend with black, the mean gray, the gray image), 3 hue (shift in turns)."""
    if op == 3:
        return _hue(x, f)
    f = f.view(-1, 1, 1, 1)
    other = 0.0 if op == 0 else _gray(x).mean((1, 2, 3), keepdim=True) if op == 1 else _gray(x)
    return (f * x + (1 - f) * other).clamp(0, 1)


def crop_params(b, device, size=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop.get_params per image: (w, h, x0, y0), each [b]. Like torchvision, take the
    first of 10 tries that fits, else the whole (square) image."""
    area = size * size * torch.empty(b, tries, device=device).uniform_(*scale)
    aspect = torch.empty(b, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w >= 1) & (w <= size) & (h >= 1) & (h <= size)
    first = fits.float().argmax(1, keepdim=True)
    w = torch.where(fits.any(1), w.gather(1, first).squeeze(1), size)
    h = torch.where(fits.any(1), h.gather(1, first).squeeze(1), size)
    x0 = (torch.rand(b, device=device) * (size - w + 1)).floor()
    y0 = (torch.rand(b, device=device) * (size - h + 1)).floor()
    return w, h, x0, y0


def jitter_params(b, device):
    """ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, per image: (on [b], factors [b, 4], order [b, 4]). Factors of
    brightness, contrast and saturation uniform in [0.6, 1.4], hue in [-0.1, 0.1]; the four ops in a random order
    per image (a uniform permutation), as torchvision's ColorJitter.get_params."""
    on = torch.rand(b, device=device) < 0.8
    f = torch.cat([torch.empty(b, 3, device=device).uniform_(0.6, 1.4),
                   torch.empty(b, 1, device=device).uniform_(-0.1, 0.1)], 1)
    order = torch.rand(b, 4, device=device).argsort(1)
    return on, f, order


def color_jitter(x, on, f, order):
    """Apply, to the images where on, op order[:, k] with its factor f[:, op], for k = 0..3."""
    for k in range(4):
        for op in range(4):
            x = torch.where((on & (order[:, k] == op)).view(-1, 1, 1, 1), adjust(x, op, f[:, op]), x)
    return x


def augment(xb):
    """The paper's augmentation on a uint8 batch [B,3,32,32] -> float in [0,1], each image with its own draws:
    ColorJitter(0.4,0.4,0.4,0.1) p=0.8 (ops in a random order per image), RandomGrayscale p=0.2,
    horizontal flip p=0.5, RandomResizedCrop(32, scale=(0.08,1)); bilinear, as one grid_sample."""
    x = xb.float() / 255
    b, dev = x.size(0), x.device
    x = color_jitter(x, *jitter_params(b, dev))
    x = torch.where((torch.rand(b, device=dev) < 0.2).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    w, h, x0, y0 = crop_params(b, dev)
    flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)  # output [-1,1] -> crop box in input coordinates
    theta[:, 0, 0], theta[:, 0, 2] = flip * w / 32, (w + 2 * x0) / 32 - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / 32, (h + 2 * y0) / 32 - 1
    grid = F.affine_grid(theta, [b, 3, 32, 32], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ==== Checkpoints, the field's state dicts, and results ============================================
class WriteFailed(Exception):
    """A file could not be written (a full disk, a quota): one line, exit code 4; the previous file is kept."""


def atomic_write(path, write):
    """write(f) to path.tmp, fsync, rename: a kill at any moment leaves the old file whole. A failed write (a full
    disk) removes path.tmp, which would keep the disk full, and raises WriteFailed."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports ENOSPC as a RuntimeError from its zip writer
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise WriteFailed(f"could not write {path}: {reason}") from None


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(path):
    return json.load(open(path)) if os.path.exists(path) else {}


def load_strict(module, state, what):
    """load_state_dict(strict=True), with a one-line error that names the keys that do not match."""
    own = module.state_dict()
    bad = ([f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
           + [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape])
    if bad:
        raise UsageError(f"{what} does not match the model ({len(bad)} keys): " + "; ".join(bad[:4]))
    module.load_state_dict(state, strict=True)


ENCODER = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "normalize.")
HEADS = ("fc", "linear", "classifier", "head", "proj", "predictor")  # inside the encoder's module; all else must fit
SECOND_ENCODERS = ("encoder_q.", "momentum_backbone.")  # DynACL's online encoder, solo-learn's momentum teacher
WRAPPERS = r"(^|\.)((module|_orig_mod)\.)+"  # DataParallel's and torch.compile's, nested in any order
READ_FLAGS = {"bn_branch": "--bn-branch", "stem_padding": "--stem-padding", "normalise": "--normalise"}


def state_dicts(ck):
    """The state dicts a checkpoint may hold, in the order RobustSSL's loader looks for them, then the file itself."""
    if not isinstance(ck, dict):
        return []
    inner = [ck[k] for k in ("state_dict_dual", "state_dict", "model") if isinstance(ck.get(k), dict)]
    return [{k: v for k, v in sd.items() if torch.is_tensor(v)} for sd in inner + [ck]]


def field_encoder(ck, path, flags):
    """A CIFAR ResNet-18 in one of the field's layouts -> (ResNet18 with exactly its weights, how it was read).

    The encoder is the sub-network whose keys hold conv1 and layer1..4 (after DataParallel's module. and
    compile's _orig_mod., nested or not), DynACL's encoder_k rather than encoder_q, solo-learn's backbone rather
    than its momentum_backbone; the other sub-networks, heads and other BN branches are ignored and named; every
    other key must fit the encoder (strict). How to read it is taken from the file where its keys say it, and
    from flags (bn_branch, stem_padding, normalise) only where they do not: a flag the file answers is refused.
    - BN branch: bn_list.K (ACL, DynACL, AdvCL): the only branch, else --bn-branch, else 1 (pgd, as their
      evaluations). downsample.conv/bn and downsample.0/1 are our shortcut.0/1.
    - Stem: padding 1 (RoCL, ACL, AdvCL, DynACL: their own key names), 2 in a solo-learn Lightning checkpoint
      (DeACL); torchvision-style names (downsample.0/1) outside one are written with either: --stem-padding.
    - Normalisation: normalize.mean/std are applied inside, except in a torchvision-style file of padding 1
      (DynACL++ applies them, RobustSSL's SLF/ALF files of AdvCL/A-InfoNCE hold them unused): --normalise."""
    lightning = isinstance(ck, dict) and "pytorch-lightning_version" in ck
    roots, sd = set(), {}
    for candidate in state_dicts(ck):
        sd = {re.sub(WRAPPERS, r"\1", k): v for k, v in candidate.items()}
        roots = {k[:-12] for k in sd if k.endswith("conv1.weight") and k[:-12] + "layer1.0.conv1.weight" in sd}
        if roots:
            break
    roots = roots - {r for r in roots if r.endswith(SECOND_ENCODERS)} or roots
    if len(roots) != 1:
        keys = list(sd) or (list(ck) if isinstance(ck, dict) else [type(ck).__name__])
        found = f"it holds {len(roots)} encoders: {', '.join(sorted(roots))}" if roots else \
            f"no conv1 and layer1..4; keys: {', '.join(map(str, keys[:4]))} ..."
        raise UsageError(f"{path} is neither an ainfonce checkpoint nor a CIFAR ResNet-18 in the field's layouts "
                         f"({found})")
    root = roots.pop()
    enc = [k[len(root):] for k in sd if k.startswith(root) and k[len(root):].startswith(ENCODER)]
    branches = sorted({int(b) for b in re.findall(r"\.bn_list\.(\d+)\.", " ".join(enc))})
    torchvision_style = any(re.search(r"\.downsample\.[01]\.", k) for k in enc)
    solo = lightning and root == "backbone."
    normalising = any(k.startswith("normalize.") for k in enc)
    ask = {"bn_branch": len(branches) > 1, "stem_padding": torchvision_style and not solo}
    answers = {"bn_branch": f"BN branches {branches}" if branches else "one set of BN statistics (no bn_list)",
               "stem_padding": "a stem its key names fix"}
    if ask["stem_padding"] and flags.get("stem_padding") is None:
        raise UsageError(f"{path} has torchvision-style keys (downsample.0/1), which solo-learn/DeACL write with "
                         f"a CIFAR stem of padding 2 and DynACL++/RobustSSL with padding 1: pass --stem-padding 2 "
                         f"or 1")
    stem_padding = flags.get("stem_padding") or (2 if solo else 1)
    ask["normalise"] = normalising and ask["stem_padding"] and stem_padding == 1
    answers["normalise"] = "normalize.mean/std that its layout applies" if normalising else "no normalize.mean/std"
    for key, flag in READ_FLAGS.items():
        if flags.get(key) is not None and not ask[key]:
            raise UsageError(f"{flag} {flags[key]}: {path} holds {answers[key]}: leave {flag} out")
    if ask["normalise"] and flags.get("normalise") is None:
        raise UsageError(f"{path} holds normalize.mean/std in torchvision-style keys: DynACL++ and RobustSSL's files "
                         f"apply them, but RobustSSL's SLF/ALF files of AdvCL and A-InfoNCE hold them unused: pass "
                         f"--normalise inside or none")
    bn_branch = flags.get("bn_branch")
    if branches and bn_branch is None:
        bn_branch = branches[0] if len(branches) == 1 else 1
    if branches and bn_branch not in branches:
        if flags.get("bn_branch") is None:
            raise UsageError(f"{path} holds BN branches {branches}, none of them 1 (adversarial): pass --bn-branch K")
        raise UsageError(f"--bn-branch {bn_branch}: {path} holds BN branches {branches}: pass one of them")
    normalise = normalising and flags.get("normalise") != "none"
    state, ignored = {}, {}
    for k, v in sd.items():
        inside = k.startswith(root)
        name = k[len(root):] if inside else k
        m, other = re.search(r"\.bn_list\.(\d+)\.", name), not inside or name.startswith(HEADS)
        unused = name.startswith("normalize.") and not normalise
        if other or unused or m and int(m.group(1)) != bn_branch:
            kind = name.split(".")[0] if other or unused else f"bn_list.{m.group(1)}"
            ignored[kind] = ignored.get(kind, 0) + 1
            continue
        name = re.sub(r"\.bn_list(\.\d+)?\.", ".", name)
        name = re.sub(r"downsample\.(0|conv)\.", "shortcut.0.", re.sub(r"downsample\.(1|bn)\.", "shortcut.1.", name))
        state[re.sub(r"^normalize\.", "", name)] = v
    encoder = ResNet18(state["conv1.weight"].shape[0], normalise=normalise, stem_padding=stem_padding)
    load_strict(encoder, state, f"{path}: state dict")
    layout = "other"
    if root == "encoder_k.":
        layout = "dynacl"
    elif solo:
        layout = "deacl"
    elif branches == [0, 1, 2]:
        layout = "advcl"
    said = [f"ResNet-18 width {encoder.dim // 8}", f"stem padding {stem_padding}"]
    if root:
        said[0] += f" from {root.rstrip('.')}"
    if branches:
        said.append(f"BN branch {bn_branch} of {branches}")
    if normalise:
        said.append("normalising inputs inside")
    if ignored:
        said.append(f"ignored {sum(ignored.values())} keys: " + ", ".join(f"{k} ({n})" for k, n in ignored.items()))
    print(f"{path}: " + ", ".join(said))
    return encoder, {"checkpoint": path, "layout": layout, "encoder": root.rstrip(".") or None, "bn_branch": bn_branch,
                     "bn_branches": branches or None, "stem_padding": stem_padding, "normalise_inside": normalise,
                     "ignored": ignored}


def load_checkpoint(path, flags=None, what="checkpoint"):
    """-> (path, ainfonce checkpoint or None, Net or ResNet18 with its weights, how it was read). An ainfonce
    checkpoint (a run directory or its last.pt), or a CIFAR ResNet-18 in one of the field's layouts, read as
    flags (bn_branch, stem_padding, normalise) say where the file does not. what: the flag that named it."""
    import pickle
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path} holds Python objects that weights_only=True refuses to load; if you trust it, keep "
                         f"its dictionaries of tensors: python -c \"import torch; c = torch.load('{path}', "
                         f"weights_only=False); torch.save({{k: v for k, v in c.items() if isinstance(v, dict)}}, "
                         f"'weights.pt')\"")
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint: corrupt or truncated ({type(e).__name__}); "
                         f"restore a copy of it")
    if not (isinstance(ck, dict) and {"encoder", "projector", "args"} <= set(ck)):
        return (path, None, *field_encoder(ck, path, flags))
    missing = {"optimizer", "epoch", "step", "history", "sums", "rng"} - set(ck)
    if missing:
        raise UsageError(f"{path} is not a complete ainfonce checkpoint: it lacks {sorted(missing)}")
    if flags:
        wrong = ", ".join(READ_FLAGS[k] for k in flags)
        raise UsageError(f"{wrong}: {path} is an ainfonce checkpoint (one BN, stem padding 1, no normalisation): "
                         f"leave {wrong} out")
    net = Net(ck["args"]["width"])
    load_strict(net.encoder, ck["encoder"], f"{path}: encoder")
    load_strict(net.projector, ck["projector"], f"{path}: projector")
    return path, ck, net, {"checkpoint": path, "layout": "ainfonce", "encoder": None, "bn_branch": None,
                           "stem_padding": 1, "normalise_inside": False}


def weights_digest(module):
    """A digest of a module's weights and buffers: an evaluation records it, and counts only for those weights."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_bytes(n_params):
    """About what last.pt takes: fp32 weights and SGD momentum, and a MiB for the rest."""
    return 8 * n_params + 2**20


def prepare_out(args, n_params):
    """Before training writes (the lock held): refuse to clobber another run; fail if the disk cannot hold the
    run's checkpoints (last.pt and last.pt.tmp side by side during a save)."""
    last = os.path.join(args.out, "last.pt")
    if os.path.exists(last) and not args.resume and not args.overwrite:
        raise UsageError(f"{args.out} already holds a run: continue it with --resume {args.out}, "
                         f"or pass --overwrite to start over")
    have = os.path.getsize(last) if os.path.exists(last) and args.resume else 0
    need = 2 * checkpoint_bytes(n_params) - have
    free = shutil.disk_usage(args.out).free
    if free < need:
        raise UsageError(f"only {free / 2**20:.0f} MiB free for {args.out}; its checkpoints need "
                         f"{need / 2**20:.0f} MiB more (last.pt and last.pt.tmp during a save)")


def lock_owner(f, wait=1.0):
    """The owner's line of a lock held by another process; it writes the line right after taking the lock."""
    deadline = time.time() + wait
    while True:
        f.seek(0)
        owner = f.read().strip()
        if owner or time.time() > deadline:
            return owner or "another process"
        time.sleep(0.02)


@contextlib.contextmanager
def owning(directory):
    """Owns `directory` while this process writes there: directory/.lock holds the owner's pid and host under an
    flock, which the OS drops when a process dies, so a live owner is refused and a dead one's lock is taken over;
    a clean exit leaves the file empty. Any *.tmp inside is then a dead writer's and is removed. A directory this
    made and left empty (a check failed) is removed again."""
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
            raise UsageError(f"{directory} is in use by {lock_owner(f)}: wait for it to end, or write elsewhere with "
                             f"--out")
        f.seek(0)
        owner = f.read().strip()
        pid = re.match(rf"pid (\d+) on {re.escape(socket.gethostname())} ", owner + " ")
        if pid and os.path.exists(f"/proc/{pid.group(1)}") and int(pid.group(1)) != os.getpid():
            print(f"{directory}: its lock file names {owner}, which is running but does not hold the lock (a copied "
                  f"directory?): taking it over")
        elif owner:
            print(f"{directory}: taking over the lock of {owner}, which is no longer running")
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        for name in os.listdir(directory):
            if name.endswith(".tmp"):
                size = os.path.getsize(os.path.join(directory, name))
                os.remove(os.path.join(directory, name))
                print(f"{directory}: removed {name} ({size / 2**20:.1f} MiB), left by a writer that died")
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


READ_KEYS = ("layout", "encoder", "bn_branch", "stem_padding", "normalise_inside")  # how a file became an encoder


def results_identity(args, encoder, read, data, source):
    """What a number depends on, computed in this one place: the weights (digest of parameters and buffers) and how
    a file was read into them; the data (data set, directory, fingerprint of its files, subsets); the protocol
    (every setting of every scheme, the threats, the attack, AutoAttack, the seed); the transfer source's weights.
    Its hash names the results file, and the file records it: numbers are reused only under an equal identity."""
    protocol = {"name": args.protocol, "pretraining": args.pretraining, "schemes": args.schemes,
                "threats": [k for k, _, _ in args.threats], "eval_step": args.eval_step,
                "eval_steps": args.eval_steps, "eval_batch_size": args.eval_batch_size,
                "autoattack": autoattack_impl() if args.autoattack else None, "seed": args.seed,
                "precision": "fp32, no TF32, no autocast"}
    transfer = None
    if source is not None:
        transfer = {"digest": weights_digest(source[0]), **{k: source[1].get(k) for k in READ_KEYS}}
    return {"weights": {"digest": weights_digest(encoder), **{k: read.get(k) for k in READ_KEYS}},
            "data": data.identity, "protocol": protocol, "transfer": transfer}


def training_record(ck):
    """What made a run's weights, as its checkpoint holds it: the arguments as first given, each later invocation
    (a resume) with its step, command and changes, the training data's identity, time, speed and machine."""
    return {"args": ck.get("first_args", ck["args"]), "invocations": ck.get("invocations", []),
            "data": ck.get("data"), "pretrain_s": ck["train_s"],
            "images_per_s": ck["step"] * ck["args"]["batch_size"] / max(ck["train_s"], 1e-9), "env": ck["env"]}


def plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def describe(args, data, path):
    """One line that says which protocol and settings this evaluation runs, on what, and where the numbers go."""
    parts = []
    for name in args.eval:
        s = args.schemes[name]
        parts.append(f"{name.upper()} {plural(s['epochs'], 'epoch')} (lr {s['lr']:g}, batch {s['batch_size']}"
                     + (", crop+flip" if s["augment"] else "") + (f", PGD at {s['eps'] * 255:g}/255" if "eps" in s
                                                                   else "") + ")")
    threats = ", ".join(k for k, _, _ in args.threats)
    return (f"evaluation: {args.protocol} protocol on {data.identity['dataset']} {data.identity['dir']} "
            f"({len(data.x_train)} training / {len(data.x_test)} test images): {'; '.join(parts)}; RA: "
            f"PGD-{args.eval_steps} (step {args.eval_step * 255:g}/255) at {threats}"
            + (", and AutoAttack" if args.autoattack else "") + f" -> {path}")


def resume_command(out):
    return shlex.join(["python", os.path.relpath(__file__), "--resume", out])


def report(args, ck, encoder, read, data, device, source, t_start, train):
    """Evaluate and record: the numbers go to OUT/results-<key>.json, key the hash of their identity
    (results_identity), which the file records; a finished scheme there is reused (--overwrite recomputes it),
    each new one is saved as soon as it is done. Nothing of another identity is ever read or rewritten."""
    identity = results_identity(args, encoder, read, data, source)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(args.out, f"results-{key}.json")
    res = read_json(path)
    if res and res.get("identity") != identity:
        raise UsageError(f"{path} holds numbers of another identity than its name says (edited by hand?): move it "
                         f"away")
    if args.eval_only and args.overwrite:
        res = {k: v for k, v in res.items() if not k.startswith(tuple(f"{s}_" for s in args.eval))}
    if not train and all(f"{s}_sa" in res for s in args.eval):
        print(f"nothing to do: {path} holds every evaluation asked for\nresults: {path}")
        return dict(res, path=path)
    weights = {"checkpoint": read["checkpoint"]}
    if ck:
        weights.update(step=ck["step"], epoch=ck["epoch"], final=ck["epoch"] >= ck["args"]["epochs"])
        if not weights["final"]:
            print(f"note: {read['checkpoint']} holds epoch {ck['epoch']} of {ck['args']['epochs']} "
                  f"(step {ck['step']}): not the end of its run")
    invocation = {"command": args.command, "wall_s": 0.0, "env": provenance(device)}
    res.update(identity=identity, key=key, weights=weights, training=training_record(ck) if ck else None,
               read=read, invocations=res.get("invocations", []) + [invocation])
    # an interrupt repeats this invocation's evaluation: a run that trained now continues through its checkpoint
    again = args.command if args.eval_only or args.resume else resume_command(args.out)

    def save():
        invocation["wall_s"] = time.time() - t_start  # the whole invocation: data, pretraining, evaluation
        try:
            write_json(path, res)
        except WriteFailed as e:
            raise WriteFailed(f"{e}; the finished schemes stay in {path}; free space, then: {again}")
    print(describe(args, data, path), flush=True)
    save()
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)  # during evaluation SIGTERM is a Ctrl-C
    try:
        on_device = Data(*[t.to(device) if torch.is_tensor(t) else t for t in data])
        done = [s for s in SCHEMES if f"{s}_sa" in res]
        for name, r in evaluate(args, encoder, on_device, device, done, source and source[0]):
            res.update({f"{name}_{k}": v for k, v in r.items()})
            save()
    except KeyboardInterrupt:
        print(f"interrupted: the finished schemes are in {path}; finish with: {again}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    print(f"results: {path}", flush=True)
    return dict(res, path=path)


# ==== Processes, devices, progress =================================================================
def setup(args):
    """The process group (torchrun sets WORLD_SIZE/RANK), this rank's device, and the seed -> (device, rank, world)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UsageError(f"--device {name}: only cpu and cuda (or cuda:N) are supported")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA GPU is visible")
        device = device if device.index is not None else torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if world > 1 and not dist.is_initialized():
        # Every collective runs on tensors of `device` (flags included), so one backend per device suffices.
        # device_id binds NCCL's communicator to this rank's GPU (barrier and object collectives use it).
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kw)
    torch.manual_seed(args.seed + rank)  # ranks draw different augmentations
    return device, rank, world


class AllReduce(torch.autograd.Function):
    """Sum over ranks, differentiably (the gradient is summed over ranks too). torch.distributed.nn's collectives
    keep the process group alive after destroy_process_group, and gloo's threads can then abort a rank at exit
    (README, Data parallel); these keep no reference to the group."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        return AllReduce.forward(ctx, grad)


class GatherCat(torch.autograd.Function):
    """Concatenate t over all ranks along dim; the backward sums every rank's gradient of this rank's slice."""

    @staticmethod
    def forward(ctx, t, dim):
        parts, ctx.dim = [torch.empty_like(t) for _ in range(dist.get_world_size())], dim
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        return AllReduce.forward(ctx, grad.contiguous()).chunk(dist.get_world_size(), ctx.dim)[dist.get_rank()], None


def allreduce_grads(params, world):
    """Average gradients over ranks, with one all-reduce of them all."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, f in zip(grads, flat.div_(world).split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


def rng_state(device):  # this rank's generators: the CPU one and, on CUDA, its own GPU's (no other GPU's)
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(s, device):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)


def hms(s):
    return f"{s // 3600:.0f}:{s % 3600 // 60:02.0f}:{s % 60:02.0f}"


def progress(label, total, every=10.0):
    """tick(done, extra=None): prints 'label: done/total (rate/s, ETA), extra()' at most every `every` seconds, and
    never for a short phase; extra is a callable, so that what it shows (a loss: a host sync) costs only when shown."""
    t0 = last = time.time()

    def tick(done, extra=None):
        nonlocal last
        now = time.time()
        if now - last >= every and done < total:
            last, rate = now, done / (now - t0)
            speed = f"{rate:.1f}/s" if rate >= 1 else f"{1 / rate:.1f} s each"  # epochs of a head: seconds each
            print(f"  {label}: {done}/{total} ({speed}, ETA {hms((total - done) / rate)})"
                  + (f", {extra()}" if extra else ""), flush=True)
    return tick


@functools.lru_cache(maxsize=None)
def provenance(device):
    """What the numbers depend on: torch, the device (CPU model or GPU), threads, the code's git commit. Computed once
    per process and device: the code that runs is the code loaded at the start, whatever git says later."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # platform.processor() is often empty on Linux
        name = name if device.type == "cuda" else next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    git = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here = os.path.dirname(os.path.abspath(__file__))
        git = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5).stdout.strip() or None
    return {"torch": str(torch.__version__), "device_name": name, "threads": torch.get_num_threads(), "git": git}


# ==== Command line =================================================================================
DATASETS = ("cifar10", "cifar100", "stl10", "folder")
# Base lr of the official scripts (Asym-RoCL/shell); every other method uses 0.1.
BASE_LR = {"cifar100": {"hardneg": 0.1, "both": 0.2}, "other": {"hardneg": 0.2, "both": 0.3}}
KNN_BANK, KNN_QUERIES = 5000, 1000  # the kNN monitor's training and test images (a fixed shuffle)
# A resumed run must agree with its checkpoint on everything that defines its math (not --lr, not the data's path).
RESUME_KEYS = ("method", "dataset", "subset", "width", "eps", "step", "attack_steps", "temperature", "ip_alpha",
               "adv_weight", "hn_beta", "hn_normalise", "tau_plus", "reg_weight", "reg_forward", "epochs",
               "batch_size", "warmup_epochs", "wd", "seed")
# Flags that only pretraining reads: --eval-only refuses them (the seed also seeds the evaluation).
PRETRAINING_KEYS = tuple(k for k in RESUME_KEYS if k != "seed") + ("lr", "ckpt_every", "knn_every", "amp",
                                                                   "channels_last", "compile")
# Flags of one invocation: a checkpoint records them but never hands them on.
OWN_KEYS = ("out", "overwrite", "resume", "eval_only", "device", "deterministic", "benchmark", "benchmark_steps",
            "command")
FIELD_METHODS = {"ainfonce": "a-infonce", "advcl": "advcl", "dynacl": "dynacl", "deacl": "deacl"}  # a file's method


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, before anything is written."""


class NonFiniteLoss(Exception):
    """A NaN/inf loss or gradient: the run stops (exit code 3) and keeps its last good checkpoint."""


def fraction(s, hi=1.0):
    """A number in [0, hi], written as a decimal or a fraction: 8/255 == 0.031372..."""
    try:
        v = float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a number or fraction like 8/255")
    if not 0 <= v <= hi:
        hint = f" (pixels are in [0, 1]: did you mean {s}/255?)" if 1 < v <= 255 and "/" not in s else ""
        raise argparse.ArgumentTypeError(f"{s} is outside [0, {hi:g}]{hint}")
    return v


def threat(s):
    """NORM:EPS, e.g. linf:8/255 or l2:0.5 (pixel units) -> (key, norm, eps)."""
    norm, _, eps = s.lower().partition(":")
    try:
        if norm not in ("linf", "l2"):
            raise argparse.ArgumentTypeError("expected NORM:EPS with NORM linf or l2, e.g. linf:8/255 l2:0.5")
        return f"{norm}:{eps}", norm, fraction(eps, 1.0 if norm == "linf" else 64.0)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--eval-threats {s}: {e}")


def number(kind, lo, inclusive=True):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}")
        if not (math.isfinite(v) and (v >= lo if inclusive else v > lo)):
            raise argparse.ArgumentTypeError(f"{s} must be {'at least' if inclusive else 'above'} {lo}")
        return v
    return parse


def say(message):
    """An error for the user, printed by one process: under torchrun, rank 0."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse would also print the usage block)
        say(f"{self.prog}: error: {message}")
        sys.exit(2)


class Help(argparse.HelpFormatter):
    def _get_help_string(self, action):  # a default only where there is one to show
        h = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and "default" not in h
        return h + (" (default: %(default)s)" if shown else "")


def build_parser():
    p = Parser(prog="ainfonce.py", formatter_class=Help, description="Adversarial contrastive pretraining with "
               "A-InfoNCE; evaluation of robust encoders (SLF/ALF/AFF under PGD and AutoAttack).")
    D, I, P, N = number(int, 1), number(int, 0), number(float, 0, False), number(float, 0)
    g = p.add_argument_group("data").add_argument
    g("--dataset", choices=DATASETS, help="torchvision's (STL-10 at 32x32), or DATA_DIR/{train,test}/<class>/<image>")
    g("--data-dir", default="./data", help="download root, or the folder data set")
    g("--subset", type=I, default=0, help="first N training images of a fixed shuffle (0: all)")
    g = p.add_argument_group("model").add_argument
    g("--width", type=D, default=64, help="ResNet-18 base width: 64 is the paper's; the README's CPU runs use 8")
    g = p.add_argument_group("attack (pretraining)").add_argument
    g("--eps", type=fraction, default="8/255", help="L_inf radius in [0,1] pixel units; fractions parse (code 0.0314)")
    g("--step", type=fraction, default="0.007", help="PGD step, pixel units (paper 0.007)")
    g("--attack-steps", type=I, default=7, help="PGD steps (paper 7)")
    g = p.add_argument_group("loss").add_argument
    g("--method", choices=METHODS, default="hardneg", help="rocl: symmetric; infpos: inferior positives (IP); "
      "hardneg: hard negatives (HN); both: IP+HN; simclr: no adversary")
    g("--temperature", type=P, default=0.5, help="tau of the loss, the attack and the regulariser (paper 0.5)")
    g("--ip-alpha", type=fraction, default=0.2, help="IP weight of clean->adv terms (paper 0.2)")
    g("--adv-weight", type=N, default=1.0, help="IP scale of the clean<->adv terms")
    g("--hn-beta", type=N, default=1.0, help="HN concentration beta (paper 1.0)")
    g("--hn-normalise", choices=("negatives", "official"), default="negatives", help="HN weights: HCL's, or the code's")
    g("--tau-plus", type=N, help="HN class prior in [0,1): 0.1 on cifar100, else 0.12 (official scripts)")
    g("--reg-weight", type=lambda v: fraction(v, math.inf), default="1/256", help="RoCL regulariser weight")
    g("--reg-forward", choices=("separate", "shared"), default="separate", help="regulariser: own forward (RoCL) or "
      "the main one's rows (faster; other BN statistics)")
    g = p.add_argument_group("optimisation").add_argument
    g("--epochs", type=D, default=1000, help="pretraining epochs (paper 1000)")
    g("--batch-size", type=number(int, 2), default=512, help="images per step, all ranks together (paper 2 GPUs x 256)")
    g("--lr", type=P, help="base lr, warmed up to 15x: 0.1; hardneg 0.2, both 0.3 (cifar100: 0.1, 0.2)")
    g("--warmup-epochs", type=I, default=10, help="linear warm-up (paper 10)")
    g("--wd", type=N, default=1e-6, help="weight decay inside LARS (paper 1e-6)")
    g = p.add_argument_group("evaluation").add_argument
    g("--eval", nargs="*", choices=("none",) + SCHEMES, help="after pretraining: slf (linear, clean), "
      "alf (linear, PGD-10), aff (all, TRADES) (default: slf; robustssl: all three)")
    g("--eval-only", metavar="CKPT", help="evaluate a run, a checkpoint, or a published ResNet-18 (with --dataset)")
    g("--protocol", choices=("asym-rocl", "robustssl"), default="asym-rocl", help="finetuning protocol (README)")
    g("--pretraining", choices=list(ROBUSTSSL), help="robustssl: the encoder's method, where its file does not "
      "say it")
    g("--eval-threats", nargs="+", default=["linf:8/255"], metavar="NORM:EPS", help="e.g. linf:8/255 l2:0.5; RA is "
      "the first (default: linf:8/255)")
    g("--eval-step", type=fraction, default="2/255", help="L_inf PGD step (AdvCL 2/255, RoCL 0.00314); L2: 2.5 eps/n")
    g("--eval-steps", type=D, default=20, help="PGD steps of RA")
    g("--eval-subset", type=I, default=0, help="first N test images of a fixed shuffle (0: all)")
    g("--ft-epochs", type=D, help="ALF/AFF epochs (asym-rocl: 25, lr/10 at 60%% and 80%%); robustssl: all schemes'")
    g("--eval-batch-size", type=D, default=1024, help="images per finetuning step and attack batch (official 1024)")
    g("--autoattack", action=argparse.BooleanOptionalAction, help="standard AutoAttack too (pip install pyautoattack; "
      "on with robustssl)")
    g("--transfer-from", metavar="CKPT", help="black-box RA: PGD crafted on this encoder's SLF classifier")
    g("--eval-dataset", choices=DATASETS, help="finetune and evaluate on another data set")
    g("--eval-data-dir", help="its directory (default: --data-dir)")
    g("--bn-branch", type=I, help="bn_list.K of a multi-BN state dict (default: its only one, else 1)")
    g("--stem-padding", type=int, choices=(1, 2), help="stem of a torchvision-style state dict: solo-learn 2, "
      "DynACL++ and RobustSSL 1")
    g("--normalise", choices=("inside", "none"), help="whether a torchvision-style file's normalize.mean/std apply "
      "(RobustSSL's AdvCL/A-InfoNCE SLF/ALF files: none)")
    g = p.add_argument_group("system").add_argument
    g("--out", help="run directory (default runs/METHOD-DATASET-sSEED)")
    g("--resume", metavar="DIR", help="continue the run in DIR with its own arguments, then its evaluation")
    g("--overwrite", action="store_true", help="start over in an --out that holds a run; with --eval-only, recompute")
    g("--ckpt-every", type=I, default=0, help="also checkpoint every N steps (0: off)")
    g("--knn-every", type=I, default=2, help="kNN monitor every N epochs (0: off)")
    g("--seed", type=I, default=0, help="seed of weights, augmentations and attacks")
    g("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 pretraining (evaluation is fp32)")
    g("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC layout (default: on for CUDA)")
    g("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the net")
    g("--deterministic", action=argparse.BooleanOptionalAction, default=False, help="for bit-exact resume on a GPU")
    g("--benchmark", action="store_true", help="time pretraining steps on random data, against the official step")
    g("--benchmark-steps", type=D, default=5, help="timed steps, after 2 warm-up steps")
    return p


def flag(key):
    return "--" + key.replace("_", "-")


def given_flags(argv):
    """The flags given on the command line as {key: value}, without defaults: what an invocation records."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


def recorded_flags(ck):
    """The flags a run was given, over all its invocations (a later one wins): what --resume and --eval-only
    start from. A checkpoint from before invocations were recorded: its resolved arguments."""
    merged = {}
    for invocation in ck.get("invocations") or [{"given": ck["args"]}]:
        merged.update(invocation["given"])
    return {k: v for k, v in merged.items() if k not in OWN_KEYS}


def parse_args(argv=None):
    """The arguments, resolved once, in one place -> (args, loaded). With --resume or --eval-only the checkpoint is
    loaded (loaded: its path, the checkpoint, the network, how it was read) and the flags its run was given become
    the parser's defaults, so that flags given here win; then come the values derived from others. --eval-only
    refuses flags that only pretraining reads. After this, args is only read."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    p = build_parser()
    args, loaded, given = p.parse_args(argv), None, given_flags(argv)
    if args.resume and args.eval_only:
        raise UsageError("--resume continues a run and --eval-only evaluates one: pass one of them")
    if args.resume or args.eval_only:
        read_flags = {k: getattr(args, k) for k in READ_FLAGS}
        loaded = load_checkpoint(args.resume or args.eval_only, read_flags, flag("resume" if args.resume else
                                                                                 "eval_only"))
        path, ck = loaded[:2]
        if ck is None and args.resume:
            raise UsageError(f"{path} is a plain state dict: --resume needs an ainfonce checkpoint")
        if ck is None and args.dataset is None:
            raise UsageError(f"{path} is a plain state dict: name its data set with --dataset (and --data-dir)")
        refused = [k for k in given if args.eval_only and k in PRETRAINING_KEYS and (ck or k not in ("dataset",
                                                                                                       "subset"))]
        if refused:
            what = "; its run's: " + ", ".join(f"{flag(k)} {ck['args'].get(k)}" for k in refused) if ck else ""
            raise UsageError(f"{', '.join(flag(k) for k in refused)}: flags of pretraining do not apply to --eval-only"
                             f"{what}" + ("; to evaluate on other data use --eval-dataset and --eval-data-dir" if
                                          {"dataset", "subset"} & set(refused) else ""))
        if ck:  # the run's flags; --eval-only asks for its own schemes (default: SLF), under the run's settings
            p.set_defaults(**{k: v for k, v in recorded_flags(ck).items() if not (args.eval_only and k == "eval")})
            args = p.parse_args(argv)
        if args.out is None:
            args.out = os.path.dirname(path) or "."
    # derived values
    args.dataset = args.dataset or "cifar10"
    if args.lr is None:
        args.lr = BASE_LR["cifar100" if args.dataset == "cifar100" else "other"].get(args.method, 0.1)
    if args.tau_plus is None:
        args.tau_plus = 0.1 if args.dataset == "cifar100" else 0.12
    if not 0 <= args.tau_plus < 1:
        raise UsageError(f"--tau-plus {args.tau_plus} must be in [0, 1)")
    if args.eval is None:
        args.eval = list(SCHEMES) if args.protocol == "robustssl" else ["slf"]
    args.eval = [e for e in SCHEMES if e in args.eval]
    args.threats = [threat(t) for t in args.eval_threats]
    args.out = args.out or f"runs/{args.method}-{args.dataset}-s{args.seed}"
    if args.protocol == "robustssl" and args.pretraining is None:
        args.pretraining = FIELD_METHODS.get(loaded[3]["layout"] if loaded else "ainfonce")
        if args.pretraining is None:
            raise UsageError(f"--protocol robustssl: its settings differ per pretraining method, and {loaded[0]} does "
                             f"not say which: name it with --pretraining {{{','.join(ROBUSTSSL)}}}")
    args.autoattack = args.protocol == "robustssl" if args.autoattack is None else args.autoattack  # its preset
    if args.autoattack and args.eval:
        autoattack_impl()  # fails now, not after training, when the package is missing
    args.schemes = scheme_settings(args.protocol, args.pretraining, args.eval_dataset or args.dataset, args.ft_epochs,
                                   args.eval_batch_size)
    if args.channels_last is None:  # on by default on CUDA
        args.channels_last = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    args.command = shlex.join(["python", os.path.relpath(__file__), *argv])  # pastes back into a shell
    args.given = given
    ck = loaded[1] if loaded else None
    diff = [f"{flag(k)} {ck['args'].get(k)} (checkpoint) vs {getattr(args, k)}"
            for k in RESUME_KEYS if args.resume and k in ck["args"] and getattr(args, k) != ck["args"][k]]
    if diff:
        raise UsageError(f"cannot resume {args.resume} with other arguments: " + ", ".join(diff)
                         + "; a run with these needs its own --out")
    return args, loaded


def run(args, loaded=None):
    """Set up, read the data, pretrain (unless the run is done or only evaluated), then evaluate and report."""
    t_start = time.time()
    device, rank, world = setup(args)
    if args.benchmark:
        return benchmark(args, device)
    path, ck, net, read = loaded or (None, None, None, {})
    source = None
    if args.transfer_from:
        _, _, source_net, source_read = load_checkpoint(args.transfer_from, what="--transfer-from")
        source = (source_net.encoder if isinstance(source_net, Net) else source_net, source_read)
    if world > 1 and args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    for key in ("data_dir", "eval_data_dir"):  # a checkpoint's relative path, read from another directory
        given = getattr(args, key)
        if ck and given and key not in args.given and not os.path.exists(given):
            raise UsageError(f"data directory {given} does not exist (the path came from the checkpoint's "
                             f"{flag(key)}): pass --data-dir (or --eval-data-dir) to say where the images are")
    train = not args.eval_only and (ck is None or ck["epoch"] < args.epochs)
    eval_set = (args.eval_dataset or args.dataset, args.eval_data_dir or args.data_dir)
    same = eval_set == (args.dataset, args.data_dir)
    data = None
    if train or (args.eval and same):
        data = load_data(args.dataset, args.data_dir, args.subset, args.eval_subset)
        if ck and ck["args"].get("n_classes", data.n_classes) != data.n_classes:
            raise UsageError(f"{args.dataset} in {args.data_dir} has {plural(data.n_classes, 'class')}, the "
                             f"checkpoint's data set had {ck['args']['n_classes']}: to evaluate on another data set "
                             f"use --eval-dataset")
    trained_on = (ck or {}).get("data")
    if train and trained_on and trained_on["fingerprint"] != data.identity["fingerprint"]:
        raise UsageError(f"--resume {args.resume}: the run trained on the images in {trained_on['dir']} (fingerprint "
                         f"{trained_on['fingerprint']}); {args.data_dir} is {data.identity['dir']}, whose images "
                         f"differ (fingerprint {data.identity['fingerprint']}): pass --data-dir with the run's images")
    if train and args.batch_size > len(data.x_train):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(data.x_train)} training images")
    train_data = data
    if args.eval and not same:
        data = load_data(*eval_set, args.subset, args.eval_subset)
    if args.eval and args.autoattack and data.n_classes < 4:
        raise UsageError(f"--autoattack: standard AutoAttack needs >= 4 classes (its DLR loss uses the 3rd and 4th "
                         f"largest logits); {args.eval_dataset or args.dataset} has {data.n_classes}")
    net = net if net is not None else Net(args.width)
    with owning(args.out) if rank == 0 else contextlib.nullcontext():  # the first thing written: the lock
        if train:
            if rank == 0:
                prepare_out(args, sum(p.numel() for p in net.parameters()))
                if args.overwrite and not args.resume:  # a new run: the old one's checkpoint and log go
                    for name in ("last.pt", "log.jsonl"):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(os.path.join(args.out, name))
                steps, at = len(train_data.x_train) // args.batch_size, ck["step"] if ck else 0
                resuming = f"resuming last.pt at epoch {at // steps + 1}, step {at % steps}/{steps}"
                print(f"ainfonce: {args.out} | {device} ({provenance(device)['device_name']}) | {args.dataset} "
                      f"{args.data_dir}: {len(train_data.x_train)} training / {len(train_data.x_test)} test images, "
                      f"{plural(train_data.n_classes, 'class')} | {args.method} | {plural(args.epochs, 'epoch')} of "
                      f"{plural(steps, 'step')} | " + (resuming if at else "new run"), flush=True)
            pretrain(args, net, train_data, device, rank, world, ck)
            if rank == 0:
                path, ck, net, read = load_checkpoint(args.out)  # the evaluation measures the saved weights
        if world > 1:  # evaluation runs on rank 0 alone, with batch norm back to per-process statistics
            dist.barrier()
            dist.destroy_process_group()
        if rank != 0 or not args.eval:
            return {}
        encoder = net.encoder if isinstance(net, Net) else net
        return report(args, ck, encoder, read, data, device, source, t_start, train)


def main(argv=None):
    """CLI entry point; returns the results dict (for tests). Bad input: one line on stderr, exit 2."""
    try:
        return run(*parse_args(argv))
    except UsageError as e:
        say(f"ainfonce.py: error: {e}")
        raise SystemExit(2)
    except NonFiniteLoss as e:
        say(f"ainfonce.py: {e}")
        raise SystemExit(3)
    except WriteFailed as e:
        say(f"ainfonce.py: {e}")
        raise SystemExit(4)
    except KeyboardInterrupt:  # before training or evaluation began: nothing to keep
        say("ainfonce.py: interrupted")
        raise SystemExit(130)
    finally:
        if dist.is_available() and dist.is_initialized():  # on every way out: no rank leaves a live group
            dist.destroy_process_group()


# ==== Benchmark: our step against a straightforward version of the official step, on random data ====
def official_step(net, opt, x1, x2, args):
    """The official step's work: the attack re-embeds x2 at every PGD step, fp32, NCHW."""
    n = len(x1)
    with eval_mode(net):
        x_adv = _ascend(lambda xa: a_infonce(net(torch.cat([xa, x2])).view(2, n, -1), temperature=args.temperature),
                        x1, _random_start(x1, args.eps), args.eps, args.step, args.attack_steps)
    loss, _ = pretrain_loss(net, x1, x2, x_adv, argparse.Namespace(**{**vars(args), "reg_forward": "separate"}))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    lars_(list(net.parameters()), args.wd)
    opt.step()


def benchmark(args, device):
    """Seconds per step of train_step (split: data, attack, forward-backward-LARS) and of official_step, after 2
    warm-up steps, on random images; peak memory on CUDA. The last printed line is JSON."""
    cuda, warmup, n = device.type == "cuda", 2, args.benchmark_steps
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randint(0, 256, (4 * args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    net = Net(args.width).to(device).to(memory_format=layout)
    ref = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for m in (net, ref))
    model, params = torch.compile(net) if args.compile else net, list(net.parameters())
    times, mem = dict.fromkeys(("data_s", "attack_s", "fwd_bwd_s", "official_step_s"), 0.0), {}
    for i in range(warmup + n):
        if cuda and i == warmup:
            torch.cuda.reset_peak_memory_stats(device)
        marks = []  # (phase, time): the time since the previous mark counts for `phase`
        mark = lambda phase: (sync(), marks.append((phase, time.perf_counter())))
        mark(None)
        xb = x[torch.randint(0, len(x), (args.batch_size,), device=device)]
        x1, x2 = [augment(xb).contiguous(memory_format=layout) for _ in range(2)]
        mark("data_s")
        train_step(model, params, x1, x2, args, mark=mark)  # marks attack_s, fwd_bwd_s
        opt.step()
        mark("fwd_bwd_s")
        if cuda and i == warmup + n - 1:
            mem["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30  # our step only
        if args.method != "simclr":
            mark(None)
            official_step(ref, ref_opt, x1.contiguous(), x2.contiguous(), args)
            mark("official_step_s")
        for (_, t0), (phase, t1) in zip(marks, marks[1:]):
            times[phase or "none"] = times.get(phase or "none", 0.0) + (t1 - t0) / n * (i >= warmup)
    step_s = times["data_s"] + times["attack_s"] + times["fwd_bwd_s"]
    res = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}",
           "torch": str(torch.__version__), "method": args.method, "width": args.width, "batch_size": args.batch_size,
           "attack_steps": args.attack_steps, "amp": args.amp, "channels_last": args.channels_last,
           "compile": args.compile, "reg_forward": args.reg_forward, "steps": n, "step_s": step_s,
           "images_per_s": args.batch_size / step_s, **times, **mem,
           "ratio_vs_official": step_s / times["official_step_s"] if times["official_step_s"] else None}
    res.pop("none")
    print(f"ours {step_s:.3f} s/step ({res['images_per_s']:.1f} img/s): data {times['data_s']:.3f}, "
          f"attack {times['attack_s']:.3f}, fwd+bwd {times['fwd_bwd_s']:.3f}; official {times['official_step_s']:.3f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
