"""Tests for ainfonce.py: property tests of the pure functions, then end-to-end runs of main().

python -m pytest -q                              # all (README, Tests: how long they take)
AINFONCE_QUICK=1 python -m pytest -q             # without the slowest (subprocesses, scripts)
AINFONCE_TEST_DEVICE=cuda python -m pytest -q    # on a GPU; fails at once without one
"""

import argparse
import glob
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import ainfonce as A

HERE = os.path.dirname(os.path.abspath(__file__))
settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("ci")

DEVICE = os.environ.get("AINFONCE_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.exit(
        f"AINFONCE_TEST_DEVICE={DEVICE}, but torch {torch.__version__} sees no CUDA GPU: "
        f"refusing to run "
        f"the CUDA tests on the CPU",
        returncode=4,
    )
if not DEVICE.startswith(("cpu", "cuda")):
    pytest.exit(f"AINFONCE_TEST_DEVICE={DEVICE}: expected cpu, cuda or cuda:N", returncode=4)
DEV = torch.device(DEVICE)
CUDA = DEV.type == "cuda"
cpu_only = pytest.mark.skipif(CUDA, reason="runs gloo processes on the CPU; NCCL would need 2 GPUs")
slow = pytest.mark.skipif(
    os.environ.get("AINFONCE_QUICK") == "1", reason="slow: AINFONCE_QUICK=1 leaves it out"
)


# --------------------------------------------------------------------------------------------------
# Shared set-up: tiny networks, images, folder data sets, runs of main()
# --------------------------------------------------------------------------------------------------
def randz(seed, V, N, D, scale=1.0):
    return (
        torch.randn(
            V, N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        ).float()
        * scale
    ).to(DEV)


def tiny_net(seed=0, width=4):
    torch.manual_seed(seed)
    return A.Net(width).to(DEV)


def images(seed, n=6):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(DEV)


def make_folder(root, classes=2, n_train=16, n_test=8, seed=0, mislabelled=0.25):
    """Noise images whose brightness says their class (class c: pixels uniform in [110 c / (classes
    - 1), + 100]), except for the first quarter of each class, which look like the next class: a
    classifier that learns the brightness is right on 75 % of the images, so SA lies well inside (0,
    1) and says whether it learned."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"))
            for i in range(n):
                looks = (c + 1) % classes if i < mislabelled * n else c
                x = (
                    torch.rand(32, 32, 3, generator=g) * 100 + 110 * looks / max(1, classes - 1)
                ).to(torch.uint8)
                Image.fromarray(x.numpy()).save(os.path.join(root, split, f"class{c}", f"{i}.png"))
    return str(root)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


GPU_FLAGS = ["--device", DEVICE, "--amp", "--channels-last", "--deterministic"] if CUDA else []


def tiny(folder, out, *extra):
    return [
        "--dataset",
        "folder",
        "--data-dir",
        folder,
        "--width",
        "8",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--attack-steps",
        "2",
        "--warmup-epochs",
        "0",
        "--eval-steps",
        "2",
        "--ft-epochs",
        "1",
        "--eval-batch-size",
        "64",
        *GPU_FLAGS,
        *extra,
        "--out",
        str(out),
    ]


def weights(path):
    ck = torch.load(path, weights_only=True)
    return {**ck["encoder"], **{f"p.{k}": v for k, v in ck["projector"].items()}}, ck


def eval_only(run, *extra):
    return A.main(
        [
            "--eval-only",
            str(run),
            "--eval-steps",
            "2",
            "--ft-epochs",
            "1",
            "--eval-batch-size",
            "64",
            *GPU_FLAGS[:2],
            *extra,
        ]
    )


def on_disk(res):
    """The results file an invocation wrote, as written (main() also returns its path)."""
    saved = json.load(open(res["path"]))
    assert saved == json.loads(json.dumps({k: v for k, v in res.items() if k != "path"}))
    return saved


def results_files(out):
    return sorted(glob.glob(os.path.join(str(out), "results-*.json")))


def only_results(out):
    files = results_files(out)
    assert len(files) == 1, files
    return json.load(open(files[0]))


def scheme_keys(res):
    return {k: v for k, v in res.items() if k.startswith(A.SCHEMES) and not k.endswith("_s")}


def interrupt_as_alf_starts(monkeypatch):
    """Ctrl-C when ALF's head starts training (SLF is done); returns the real train_head, to put
    back."""
    real = A.train_head

    def interrupted(*a, label=None, **kw):
        if label == "ALF":
            raise KeyboardInterrupt
        return real(*a, label=label, **kw)

    monkeypatch.setattr(A, "train_head", interrupted)
    return real


def fails(argv, capsys, pattern, out=None, code=2):
    with pytest.raises(SystemExit) as e:
        A.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    if out is not None:
        assert not os.path.exists(out)


def launch(argv, **env):
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "ainfonce.py"), *argv],
        cwd=HERE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(proc, path, done):
    while proc.poll() is None:
        try:
            if done(torch.load(path, weights_only=True)):
                return
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.02)
    pytest.fail(f"run ended before the checkpoint appeared: {proc.communicate()}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# The loss: independent references, written from the definitions and not from ainfonce.py
# --------------------------------------------------------------------------------------------------
def ref_weighted(z, weights, t):
    """sum over (u, v) of weights[u][v] * l(u->v), l in cross-entropy form, over all V*N rows."""
    V, N, D = z.shape
    zn = F.normalize(z.reshape(V * N, D).double().cpu(), dim=1)
    logits = (zn @ zn.detach().T / t).masked_fill(torch.eye(V * N, dtype=torch.bool), -math.inf)
    logp = F.log_softmax(logits, 1)
    n = torch.arange(N)
    return -sum(w * logp[u * N + n, v * N + n].sum() for (u, v), w in weights.items()) / (V * N)


def ref_ntxent(z1, z2, t):
    """SimCLR's NT-Xent in its usual cross-entropy form: row i's target is its other view."""
    N = len(z1)
    zn = F.normalize(torch.cat([z1, z2]).double().cpu(), dim=1)
    logits = (zn @ zn.detach().T / t).masked_fill(torch.eye(2 * N, dtype=torch.bool), -math.inf)
    return F.cross_entropy(logits, torch.cat([torch.arange(N, 2 * N), torch.arange(N)]))


def ref_hn(z, weights, t, beta, tau_plus):
    """The HN loss row by row, straight from HCL's formulas (per-row normalisation over Neg(i))."""
    V, N, D = z.shape
    zn = F.normalize(z.reshape(V * N, D).double().cpu(), dim=1)
    S = zn @ zn.detach().T / t
    M, total = V * (N - 1), 0
    for u in range(V):
        for n in range(N):
            i = u * N + n
            pos = torch.stack([S[i, v * N + n].exp() for v in range(V) if v != u]).mean()
            neg = [v * N + m for v in range(V) for m in range(N) if m != n]
            imp = torch.stack([(beta * S[i, j]).exp() for j in neg])
            w = imp / imp.mean()
            ng = ((w * torch.stack([S[i, j].exp() for j in neg])).sum() - tau_plus * M * pos) / (
                1 - tau_plus
            )
            ng = torch.clamp(ng, min=M * math.exp(-1 / t))
            for v in range(V):
                if v != u:
                    total = total - weights.get((u, v), 0) * (S[i, v * N + n] - (pos + ng).log())
    return total / (V * N)


def ref_official_hn(z, weights, t, beta, tau_plus):
    """NT_xent_HN of the official Asym-RoCL loss.py (yqy2001/A-InfoNCE), transcribed line by line
    for V views, in float64: masks built as there, imp = exp(beta log(e + 1e-9)), and `imp * e /
    imp.mean(dim=-1)`."""
    V, N, D = z.shape
    out = z.reshape(V * N, D).double().cpu()
    N2 = V * N
    out_norm = out / (out.norm(dim=1).view(N2, 1) + 1e-8)
    sim_exp = torch.exp((1.0 / t) * torch.mm(out_norm, out_norm.transpose(0, 1).detach()))
    N_neg = (N - 1) * V
    mask = torch.eye(N, dtype=torch.float64).repeat(V, V)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(N2).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits_neg = sim_exp * (1 - mask) * logits_mask
    pos = (sim_exp * mask).sum(dim=1) / mask.sum(1)
    imp = (beta * (exp_logits_neg + 1e-9).log()).exp()
    reweight_logits_neg = (imp * exp_logits_neg) / imp.mean(dim=-1)
    Ng = (-tau_plus * N_neg * pos + reweight_logits_neg.sum(dim=-1)) / (1 - tau_plus)
    Ng = torch.clamp(Ng, min=N_neg * math.e ** (-1 / t))
    loss = -torch.log(sim_exp / ((pos + Ng).view(N2, 1)))
    n = torch.arange(N)
    return sum(w * loss[u * N + n, v * N + n].sum() for (u, v), w in weights.items()) / N2


def ip_weights(V, adv, alpha, adv_weight=1.0):
    w = {}
    for u in range(V):
        for v in range(V):
            if u != v:
                w[u, v] = (
                    1.0
                    if (u in adv) == (v in adv)
                    else adv_weight * (alpha if v in adv else 1 - alpha)
                )
    return w


shapes = dict(seed=st.integers(0, 10**6), N=st.integers(2, 6), D=st.integers(2, 16))


@given(**shapes, t=st.floats(0.1, 2.0))
def test_two_views_is_ntxent(seed, N, D, t):
    z = randz(seed, 2, N, D).requires_grad_(True)
    loss = A.a_infonce(z, temperature=t)
    (ours,) = torch.autograd.grad(loss, z)
    zr = z.detach().clone().requires_grad_(True)
    ref = ref_ntxent(zr[0], zr[1], t)
    (ref_grad,) = torch.autograd.grad(ref, zr)
    assert torch.allclose(loss.double().cpu(), ref, atol=1e-5)
    assert torch.allclose(
        ours.double().cpu(), ref_grad.double().cpu(), atol=5e-6
    )  # fp32 rounding at tau 0.1


@given(**shapes, alpha=st.floats(0, 1), adv_weight=st.floats(0, 3), V=st.integers(2, 4))
def test_ip_matches_weighted_reference(seed, N, D, alpha, adv_weight, V):
    z = randz(seed, V, N, D)
    ours = A.a_infonce(z, adv_views=(V - 1,), ip_alpha=alpha, adv_weight=adv_weight)
    ref = ref_weighted(z, ip_weights(V, {V - 1}, alpha, adv_weight), 0.5)
    assert torch.allclose(ours.double().cpu(), ref, atol=1e-5)


@given(
    **shapes,
    V=st.integers(2, 4),
    beta=st.floats(0, 3),
    tau_plus=st.floats(0, 0.95),
    alpha=st.one_of(st.none(), st.floats(0, 1)),
    t=st.floats(0.2, 1.0),
)
def test_hn_matches_row_by_row_reference(seed, N, D, V, beta, tau_plus, alpha, t):
    z = randz(seed, V, N, D).requires_grad_(True)
    weights = ip_weights(V, {V - 1}, alpha) if alpha is not None else ip_weights(V, set(), 0)
    ours = A.a_infonce(
        z, adv_views=(V - 1,), ip_alpha=alpha, hn_beta=beta, tau_plus=tau_plus, temperature=t
    )
    ref = ref_hn(z, weights, t, beta, tau_plus)
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    assert torch.allclose(ours.double().cpu(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(g_ours.double().cpu(), g_ref.double().cpu(), atol=1e-5)


@given(
    **shapes,
    V=st.integers(2, 4),
    beta=st.floats(0, 3),
    tau_plus=st.floats(0, 0.95),
    alpha=st.one_of(st.none(), st.floats(0, 1)),
    t=st.floats(0.2, 1.0),
)
def test_official_hn_matches_the_official_code(seed, N, D, V, beta, tau_plus, alpha, t):
    z = randz(seed, V, N, D).requires_grad_(True)
    weights = ip_weights(V, {V - 1}, alpha) if alpha is not None else ip_weights(V, set(), 0)
    ours = A.a_infonce(
        z,
        adv_views=(V - 1,),
        ip_alpha=alpha,
        hn_beta=beta,
        tau_plus=tau_plus,
        temperature=t,
        hn_normalise="official",
    )
    ref = ref_official_hn(z, weights, t, beta, tau_plus)
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    assert torch.allclose(ours.double().cpu(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(g_ours.double().cpu(), g_ref.double().cpu(), atol=1e-5)


def test_the_two_hn_normalisations_differ_as_documented():
    z = randz(7, 3, 64, 32).requires_grad_(True)
    kw = dict(adv_views=(2,), hn_beta=1.0, tau_plus=0.12)
    ours, off = (A.a_infonce(z, hn_normalise=h, **kw) for h in ("negatives", "official"))
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_off,) = torch.autograd.grad(off, z)
    assert ours != off and not torch.allclose(g_ours, g_off, rtol=1e-3)
    # the official normaliser of column j is row j's mean: gradient reaches a view that is only ever
    # a key
    z2 = randz(8, 2, 6, 8).requires_grad_(True)
    kw = dict(
        adv_views=(1,), ip_alpha=1.0, hn_beta=1.0, tau_plus=0.1
    )  # adv->clean weight 0: adv is only a key
    (g_neg,) = torch.autograd.grad(A.a_infonce(z2, **kw), z2)
    (g_off,) = torch.autograd.grad(A.a_infonce(z2, hn_normalise="official", **kw), z2)
    assert torch.all(g_neg[1] == 0) and g_off[1].abs().sum() > 0


@given(**shapes)
def test_special_cases_reduce_to_symmetric(seed, N, D):
    z3, z2 = randz(seed, 3, N, D), randz(seed + 1, 2, N, D)
    sym3, sym2 = A.a_infonce(z3, adv_views=(2,)), A.a_infonce(z2)
    # IP with alpha = 1/2 and twice the adversarial weight is the symmetric loss
    assert torch.allclose(
        A.a_infonce(z3, adv_views=(2,), ip_alpha=0.5, adv_weight=2.0), sym3, atol=1e-6
    )
    # IP without adversarial views changes nothing
    assert torch.allclose(A.a_infonce(z3, ip_alpha=0.2), A.a_infonce(z3), atol=1e-6)
    # HN with beta = 0, tau+ = 0 and one positive per anchor is the plain denominator
    assert torch.allclose(A.a_infonce(z2, hn_beta=0.0, tau_plus=0.0), sym2, atol=1e-5)


@given(
    **shapes,
    V=st.integers(2, 4),
    hn=st.sampled_from([None, "negatives", "official"]),
    data=st.data(),
)
def test_invariant_to_row_scale_and_instance_order(seed, N, D, V, hn, data):
    z = randz(seed, V, N, D)
    kw = dict(
        adv_views=(V - 1,),
        ip_alpha=0.2,
        hn_beta=hn and 1.0,
        tau_plus=0.1,
        hn_normalise=hn or "negatives",
    )
    base = A.a_infonce(z, **kw)
    scale = torch.exp(
        torch.empty(V, N, 1).uniform_(-7, 7, generator=torch.Generator().manual_seed(seed))
    ).to(DEV)
    assert torch.allclose(A.a_infonce(z * scale, **kw), base, atol=1e-5)
    perm = torch.tensor(data.draw(st.permutations(range(N))))
    assert torch.allclose(A.a_infonce(z[:, perm], **kw), base, atol=1e-5)


@pytest.mark.parametrize("hn", [None, "negatives", "official"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.ones(3, 4, 8, device=DEV),  # identical rows
        lambda: randz(0, 3, 4, 8, scale=1e30),  # |z|^2 overflows float32
        lambda: randz(1, 3, 4, 8, scale=1e-30),  # |z|^2 underflows float32
        lambda: randz(2, 3, 2, 8),  # N = 2
        lambda: torch.zeros(3, 4, 8, device=DEV),  # all-zero projections
    ],
)
def test_finite_on_extreme_inputs(make, hn):
    z = make().requires_grad_(True)
    loss = A.a_infonce(
        z,
        adv_views=(2,),
        ip_alpha=0.2,
        hn_beta=hn and 1.0,
        tau_plus=0.12,
        hn_normalise=hn or "negatives",
    )
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_large_norms_give_the_unit_norm_value():
    z = randz(3, 3, 4, 8)
    assert torch.allclose(
        A.a_infonce(z * 1e30, adv_views=(2,)), A.a_infonce(z, adv_views=(2,)), atol=1e-6
    )


@pytest.mark.parametrize(
    "z,kw,pattern",
    [
        (torch.randn(1, 4, 8), {}, r">= 2 views of >= 2 instances"),
        (torch.randn(3, 1, 8), {}, r">= 2 views of >= 2 instances"),
        (torch.randn(6, 8), {}, r"shape \[V views, N instances, D\]"),
        (
            torch.randn(3, 4, 8),
            {"adv_views": 2},
            r"adv_views must be a sequence of view indices in \[0, 3\)",
        ),
        (torch.randn(3, 4, 8), {"adv_views": (5,)}, r"adv_views must be .*got \(5,\)"),
        (torch.randn(3, 4, 8), {"hn_beta": 1.0, "hn_normalise": "rows"}, r"hn_normalise must be"),
        (
            torch.randn(3, 4, 8),
            {"hn_beta": 1.0, "tau_plus": 1.0},
            r"tau_plus must be in \[0, 1\), got 1.0",
        ),
        (torch.randn(3, 4, 8), {"hn_beta": 1.0, "tau_plus": -0.1}, r"tau_plus must be in \[0, 1\)"),
        (torch.randn(3, 4, 8), {"temperature": 0.0}, r"temperature must be > 0, got 0.0"),
        (torch.randn(3, 4, 8), {"temperature": -0.5}, r"temperature must be > 0"),
        (torch.randn(3, 4, 8), {"hn_beta": -1.0}, r"hn_beta must be >= 0"),
        (
            torch.randn(3, 4, 8),
            {"adv_views": (2,), "ip_alpha": 1.5},
            r"ip_alpha must be in \[0, 1\]",
        ),
        (
            torch.randn(3, 4, 8),
            {"adv_views": (2,), "ip_alpha": -0.1},
            r"ip_alpha must be in \[0, 1\]",
        ),
    ],
)
def test_loss_rejects_bad_input_with_a_message(z, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        A.a_infonce(z, **kw)


def test_float64_in_gives_float64_out():
    z = randz(1, 3, 5, 8).double()
    for kw in ({}, dict(adv_views=(2,), ip_alpha=0.2, hn_beta=1.0, tau_plus=0.1)):
        loss = A.a_infonce(z, **kw)
        assert loss.dtype == torch.float64 and torch.allclose(
            loss.float(), A.a_infonce(z.float(), **kw), atol=1e-5
        )
    ref = ref_hn(z, ip_weights(3, {2}, 0.2), 0.5, 1.0, 0.1)
    assert (
        abs(
            A.a_infonce(z, adv_views=(2,), ip_alpha=0.2, hn_beta=1.0, tau_plus=0.1).item()
            - ref.item()
        )
        < 1e-12
    )


def test_loss_is_float32_under_bf16_autocast():
    z = randz(0, 3, 4, 8)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        loss = A.a_infonce(z.bfloat16(), adv_views=(2,), hn_beta=1.0, tau_plus=0.1)
    assert loss.dtype == torch.float32
    assert torch.allclose(
        loss, A.a_infonce(z.bfloat16().float(), adv_views=(2,), hn_beta=1.0, tau_plus=0.1)
    )


# --------------------------------------------------------------------------------------------------
# The loss: gradients (stop-gradient on keys, IP, HN hardness)
# --------------------------------------------------------------------------------------------------
@given(**shapes, hn=st.sampled_from([None, 1.0]))
def test_keys_get_no_gradient(seed, N, D, hn):
    # clean->adv terms only (ip_alpha = 1 zeroes adv->clean): the adversarial view is only ever a
    # key
    z = randz(seed, 2, N, D).requires_grad_(True)
    (grad,) = torch.autograd.grad(
        A.a_infonce(z, adv_views=(1,), ip_alpha=1.0, hn_beta=hn, tau_plus=0.1), z
    )
    assert torch.all(grad[1] == 0) and grad[0].abs().sum() > 0


@given(**shapes)
def test_ip_alpha_zero_clean_views_learn_nothing_from_the_adversary(seed, N, D):
    z = randz(seed, 3, N, D).requires_grad_(True)
    (grad,) = torch.autograd.grad(A.a_infonce(z, adv_views=(2,), ip_alpha=0.0), z)
    (clean_only,) = torch.autograd.grad(ref_weighted(z, {(0, 1): 1.0, (1, 0): 1.0}, 0.5), z)
    assert torch.allclose(grad[:2].double().cpu(), clean_only[:2].double().cpu(), atol=1e-6)
    # and with two views [clean, adv], the clean view receives no gradient at all
    z2 = randz(seed, 2, N, D).requires_grad_(True)
    (grad2,) = torch.autograd.grad(A.a_infonce(z2, adv_views=(1,), ip_alpha=0.0), z2)
    assert torch.all(grad2[0] == 0) and grad2[1].abs().sum() > 0


def negative_coefficients(z, **kw):
    """dL/dS_0k for the negatives k of anchor 0, recovered from the anchor's gradient: with unit
    rows and detached keys, grad_0 = sum_k a_k z_k - z_0 (sum_k a_k z_0.z_k), unique in the basis
    [keys, z_0]."""
    V, N, D = z.shape
    z = F.normalize(z, dim=-1).requires_grad_(True)
    (grad,) = torch.autograd.grad(A.a_infonce(z, **kw), z)
    rows, grad = z.detach().reshape(V * N, D).cpu(), grad.cpu()
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


# --------------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_instance_pgd_properties(seed):
    net, x, x_pos = tiny_net(seed), images(seed), images(seed + 100)
    net.train()
    net.encoder.layer1.eval()  # a mixed state must come back exactly
    eps = 8 / 255
    x_adv = A.instance_pgd(net, x, x_pos, eps=eps, steps=5)
    assert net.training and not net.encoder.layer1.training and net.encoder.layer2.training
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
    """x = 0.5 + y_sign * delta * p, delta ~ U(0, margin_max), p in {-1,1}^d. The classifier's
    margin is m = y_sign * mean((x - 0.5) p). An L_inf attack of radius eps lowers it by exactly eps
    (the corner x - y_sign eps p), an L2 attack by eps |p| / d = eps / sqrt(d) (the point x - y_sign
    eps p / |p|; no pixel leaves [0, 1] here), so RA(eps) = P(m > eps) and P(m > eps / sqrt(d)),
    computed on the uint8 images."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 2, (3, 32, 32), generator=g).float() * 2 - 1
    y = torch.randint(0, 2, (n,), generator=g)
    delta = torch.rand(n, generator=g) * margin_max
    x8 = (
        ((0.5 + ((2 * y - 1).float() * delta)[:, None, None, None] * p) * 255)
        .round()
        .to(torch.uint8)
    )
    margin = (2 * y - 1).float() * ((x8.float() / 255 - 0.5) * p).flatten(1).mean(1)
    return Linear2(p).to(DEV), x8.to(DEV), y.to(DEV), margin.to(DEV)


@pytest.mark.parametrize(
    "norm,radii", [("linf", (0.0, 4 / 255, 8 / 255)), ("l2", (0.0, 0.25, 1.0))]
)
def test_pgd_stays_in_its_ball_and_box_and_does_not_lower_the_loss(norm, radii):
    torch.manual_seed(0)
    model, x8, y, _ = linear_data(64)
    x = x8.float() / 255
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2)).to(
        DEV
    )
    for m in (model, conv):
        m.train()
        for eps in radii:
            x_adv = A.pgd(m, x, y, eps=eps, step=2.5 * eps / 10, steps=10, norm=norm)
            assert m.training and x_adv.min() >= 0 and x_adv.max() <= 1
            d = (x_adv - x).flatten(1)
            assert (d.abs().amax(1) if norm == "linf" else d.norm(dim=1)).max() <= eps + 1e-5
            assert F.cross_entropy(m(x_adv), y) >= F.cross_entropy(m(x), y) - 1e-6
        assert torch.equal(A.pgd(m, x, y, eps=0.0, norm=norm), x)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_attacks_start_at_a_random_point_in_the_ball(norm, eps):
    model, x8, y, _ = linear_data(64)
    x = x8.float() / 255
    for start in (
        A.pgd(model, x, y, eps=eps, steps=0, norm=norm),
        A.threat_attack(norm, eps, 2 / 255, 0)(model, x, y),
    ):
        d = (start - x).flatten(1)
        assert (d.abs().amax(1) if norm == "linf" else d.norm(dim=1)).max() <= eps + 1e-6
        assert (d.abs().amax(1) > 0).float().mean() > 0.9 and 0 <= start.min() and start.max() <= 1
        # both sides of x alike: a uniform draw in the ball, not in one of its corners
        assert 0.45 < (d < 0).float().mean() < 0.55
    if norm == "linf":  # the training attack too
        net = tiny_net()
        start = A.instance_pgd(net, images(0, 4), images(1, 4), eps=eps, steps=0)
        assert (start - images(0, 4)).abs().max() > eps / 2 and (
            start - images(0, 4)
        ).abs().max() <= eps + 1e-6


def test_trades_loss_is_ce_plus_kl():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)).to(DEV)
    x, y = images(0, 8), torch.arange(8, device=DEV) % 3
    assert torch.allclose(
        A.trades_loss(model, x, y, eps=0.0), F.cross_entropy(model(x), y), atol=1e-6
    )
    assert A.trades_loss(model, x, y, beta=6.0) > F.cross_entropy(model(x), y)


def test_the_trades_kl_is_the_batch_mean_of_each_images_kl():
    """KL(f(x) || f(x_adv)) summed over the classes, averaged over the images (TRADES' batchmean),
    with x_adv the same inner attack recomputed here."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).to(DEV)
    x, y = images(0, 8), torch.arange(8, device=DEV)
    torch.manual_seed(1)
    beta = 1000.0  # the KL term well above the rounding of the cross-entropy
    kl_term = (A.trades_loss(model, x, y, beta=beta) - F.cross_entropy(model(x), y)) / beta
    torch.manual_seed(1)
    log_nat = F.log_softmax(model(x), 1).detach()
    p_nat = log_nat.exp()

    def kl_sum(xa):
        return (p_nat * (log_nat - F.log_softmax(model(xa), 1))).sum()

    x_adv = A.ascend(kl_sum, x, x + 0.001 * torch.randn_like(x), 8 / 255, 2 / 255, 10)
    log_adv = F.log_softmax(model(x_adv), 1)
    per_image = (p_nat * (log_nat - log_adv)).sum(1)  # [8]
    assert per_image.mean() > 1e-4
    assert torch.allclose(kl_term, per_image.mean(), rtol=1e-3)


def test_trades_beta_weighs_the_kl_term():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)).to(DEV)
    x, y = images(0, 8), torch.arange(8, device=DEV) % 3
    ce = F.cross_entropy(model(x), y)
    losses = {}
    for beta in (0.0, 1.0, 6.0):
        torch.manual_seed(1)  # the same inner attack for every beta
        losses[beta] = A.trades_loss(model, x, y, beta=beta)
    kl = losses[1.0] - ce
    assert torch.allclose(losses[0.0], ce, atol=1e-6) and kl > 1e-4
    assert torch.allclose(losses[6.0], ce + 6 * kl, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# The model and the RoCL base's step
# --------------------------------------------------------------------------------------------------
def test_model_shapes_and_the_fields_layout():
    net = A.Net(8).to(DEV)
    assert net.encoder.dim == 64 and net.encoder(images(0, 2)).shape == (2, 64)
    assert net(images(0, 2)).shape == (2, 128)
    assert [m.out_features for m in net.projector if isinstance(m, nn.Linear)] == [2048, 128]
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert net.encoder.conv1.stride == (1, 1) and net.encoder.conv1.kernel_size == (3, 3)
    keys = set(net.encoder.state_dict())
    assert {
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer4.1.bn2.weight",
        "layer2.0.shortcut.0.weight",
        "layer4.0.shortcut.1.running_var",
    } <= keys


def test_lars_scales_each_tensor():
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([0.0, 10.0])
    A.lars_([p], wd=0.1, trust=1e-3)
    expected = (torch.tensor([0.0, 10.0]) + 0.1 * p.detach()) * 1e-3 * 5 / (10 + 0.1 * 5 + 1e-8)
    assert torch.allclose(p.grad, expected)


def torchlars_step(params, sgd, wd, eps=1e-8, trust_coef=0.001):
    """kakaobrain/torchlars LARS.step, transcribed (lars.py and compute_adaptive_lr in
    adaptive_lr.cc): the wrapped SGD's weight decay is hidden, each gradient becomes (g + wd w) *
    adaptive_lr, then the SGD steps."""
    with torch.no_grad():
        for p in params:
            param_norm, grad_norm = p.norm(), p.grad.norm()
            if param_norm > 0 and grad_norm > 0:
                adaptive_lr = param_norm / (grad_norm + wd * param_norm + eps) * trust_coef
            else:
                adaptive_lr = 1.0
            p.grad.add_(p.data, alpha=wd)
            p.grad.mul_(adaptive_lr)
    sgd.step()


def test_lars_equals_torchlars_over_steps():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        net[2].bias.zero_()  # a zero tensor: torchlars leaves its gradient unscaled
    ref = [p.detach().clone().requires_grad_(True) for p in net.parameters()]
    ours = list(net.parameters())
    sgd_ours = torch.optim.SGD(ours, lr=0.5, momentum=0.9)
    sgd_ref = torch.optim.SGD(ref, lr=0.5, momentum=0.9)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for step in range(4):
        for params in (ours, ref):
            w1, b1, w2, b2 = params
            loss = F.cross_entropy(F.linear(F.relu(F.linear(x, w1, b1)), w2, b2), y)
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
        if step == 2:
            ours[0].grad.zero_()
            ref[0].grad.zero_()  # a zero gradient: unscaled too
        A.lars_(ours, wd=1e-2)
        sgd_ours.step()
        torchlars_step(ref, sgd_ref, wd=1e-2)
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), step


def test_lr_schedule():
    lrs = [A.lr_at(s, 100, 10, 0.1, A.WARMUP_PEAK) for s in range(100)]
    assert (
        A.WARMUP_PEAK == 15
        and lrs[0] == 0.1
        and A.lr_at(10, 100, 10, 0.1, 15) == pytest.approx(1.5)
    )
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11])) and all(
        a >= b for a, b in zip(lrs[10:], lrs[11:])
    )
    assert A.lr_at(100, 100, 10, 0.1, 15) == pytest.approx(0, abs=1e-12)


def test_the_step_uses_the_recipe(monkeypatch):
    """The training step passes the recipe's numbers to the attack and the losses, and its loss is
    the main term plus 1/256 of RoCL's regulariser, both as logged."""
    args = A.configure(["--method", "both", "--width", "4", "--attack-steps", "2"])[0]
    calls = {"pgd": [], "loss": []}
    real_pgd, real_loss = A.instance_pgd, A.a_infonce
    monkeypatch.setattr(
        A, "instance_pgd", lambda *a, **kw: calls["pgd"].append(kw) or real_pgd(*a, **kw)
    )
    monkeypatch.setattr(
        A,
        "a_infonce",
        lambda z, *a, **kw: calls["loss"].append((z.shape[0], kw)) or real_loss(z, *a, **kw),
    )
    net, x1, x2 = tiny_net(), images(0, 4), images(1, 4)
    A.rocl_step(net, (x1 * 255).to(torch.uint8), args)
    assert calls["pgd"][0] == dict(eps=8 / 255, step=0.007, steps=2, temperature=0.5)
    x_adv = A.instance_pgd(net, x1, x2, **calls["pgd"][0])
    calls["loss"].clear()
    loss, terms = A.rocl_loss(net.train(), x1, x2, x_adv, args)
    [(_, main)], [(_, reg)] = [c for c in calls["loss"] if c[0] == 3], [
        c for c in calls["loss"] if c[0] == 2
    ]
    assert main == dict(
        adv_views=(2,),
        temperature=0.5,
        ip_alpha=0.2,
        adv_weight=1.0,
        tau_plus=0.12,
        hn_normalise="negatives",
        hn_beta=1.0,
    )
    assert reg == dict(temperature=0.5)
    assert terms["reg"] > 0 and torch.allclose(
        loss, terms["infonce"] + terms["reg"] / 256, rtol=1e-6
    )
    z = net(torch.cat([x1, x2, x_adv])).view(3, 4, -1)
    assert torch.allclose(
        terms["infonce"], real_loss(z, adv_views=(2,), ip_alpha=0.2, hn_beta=1.0, tau_plus=0.12)
    )
    assert torch.allclose(terms["reg"], real_loss(net(torch.cat([x_adv, x2])).view(2, 4, -1)))


def test_regulariser_forward_runs_before_the_main_forward():
    """BN running statistics after one step equal the official order's: [x_adv; x2] first, then [x1;
    x2; x_adv]."""
    args = A.configure(["--method", "rocl", "--width", "4"])[0]
    x1, x2, xa = images(0, 4), images(1, 4), images(2, 4)
    ours, official, reverse = tiny_net(), tiny_net(), tiny_net()
    A.rocl_loss(ours.train(), x1, x2, xa, args)
    official.train()(torch.cat([xa, x2]))
    official(torch.cat([x1, x2, xa]))
    reverse.train()(torch.cat([x1, x2, xa]))
    reverse(torch.cat([xa, x2]))
    stats = lambda n: torch.cat([b for k, b in n.state_dict().items() if "running" in k])
    assert torch.equal(stats(ours), stats(official)) and not torch.allclose(
        stats(ours), stats(reverse)
    )


# --------------------------------------------------------------------------------------------------
# The AdvCL base's step
# --------------------------------------------------------------------------------------------------
def advcl_args(method, **kw):
    """The settings the AdvCL base's step reads, as a run of CIFAR-10 IP+HN's script would hold
    them."""
    values = dict(
        method=method,
        eps=8 / 255,
        step=2 / 255,
        attack_steps=5,
        temperature=0.5,
        adv_weight=1.0,
        ip_alpha=0.2,
        ip_adaptive_from=30,
        ip_d_min=0.4,
        hn_beta=1.0,
        tau_plus=0.1,
        hn_normalise="negatives",
        amp=False,
        channels_last=False,
    )
    return argparse.Namespace(**{**values, **kw})


def ref_asym_supcon(
    features,
    *,
    adv_weight=1.0,
    stop_grad=False,
    degree=0.2,
    hn=False,
    tau_plus=0.1,
    beta=1.0,
    t=0.5,
    symmetric=False,
):
    """AdvCL's SupConLoss (symmetric=True) and Asym-AdvCL's ori_SupConLoss / SupConLoss (hn=True),
    transcribed from their losses.py in float64: features [B, 4, D], view 0 adversarial."""
    B, V = features.shape[:2]
    feats = features.double()
    contrast = torch.cat(torch.unbind(feats, dim=1), dim=0)

    def log_probs(keys):
        adc = contrast @ keys.T / t
        logits = adc - adc.max(1, keepdim=True).values.detach()
        mask = torch.eye(B, dtype=torch.float64).repeat(V, V)
        lmask = torch.ones_like(mask).scatter(1, torch.arange(B * V).view(-1, 1), 0)
        mask = mask * lmask
        if not hn:
            exp = torch.exp(logits) * lmask
            return mask * (logits - torch.log(exp.sum(1, keepdim=True))), mask
        N = (B - 1) * V
        exp = torch.exp(logits)
        neg = exp * (1 - mask) * lmask
        pos = (exp * mask).sum(1) / mask.sum(1)
        imp = (beta * (neg + 1e-9).log()).exp()
        ng = (-tau_plus * N * pos + ((imp * neg) / imp.mean(dim=-1)).sum(-1)) / (1 - tau_plus)
        ng = torch.clamp(ng, min=N * math.e ** (-1 / 0.5))
        return -mask * -torch.log(exp / (pos + ng)), mask  # its log_prob is negated: sign back

    square, mask = log_probs(contrast)
    if not symmetric:
        if stop_grad:
            tmp, _ = log_probs(contrast.detach())
            ac = degree * tmp[B:, :B].T + (1 - degree) * tmp[:B, B:]
        else:
            ac = square[:B, B:]
        square[:B, B:] = ac * adv_weight
        square[B:, :B] = ac.T * adv_weight
    return -(t / 0.07) * (square.sum(1) / mask.sum(1)).mean()


@pytest.mark.parametrize(
    "method,phase,hn_form",
    [
        ("rocl", "train", "negatives"),
        ("infpos", "attack", "negatives"),
        ("infpos", "train", "negatives"),
        ("hardneg", "train", "official"),
        ("hardneg", "attack", "official"),
        ("both", "train", "official"),
    ],
)
def test_advcl_loss_is_the_official_supcon(method, phase, hn_form):
    """The AdvCL base's contrastive loss, its value and its gradient, against the transcribed
    official losses: SupCon's scale, keys carrying gradient, Asym-AdvCL's blocks, HN's form."""
    aw = {"infpos": 1.2, "both": 0.7}.get(method, 1.0)
    args = advcl_args(method, adv_weight=aw, hn_normalise=hn_form)
    z = randz(11, 4, 6, 16).double().requires_grad_(True)  # [views, N, D]
    ours = A.advcl_contrastive(z, args, phase, degree=0.3)
    feats = F.normalize(z.transpose(0, 1), dim=-1)  # [N, views, D], as its model normalises
    hn = phase == "train" and method in ("hardneg", "both")
    stop_grad = phase == "train" and method in ("infpos", "both")
    ref = ref_asym_supcon(
        feats, adv_weight=aw, stop_grad=stop_grad, degree=0.3, hn=hn, symmetric=method == "rocl"
    )
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    assert torch.allclose(ours.double(), ref, rtol=1e-6)
    assert torch.allclose(g_ours.double(), g_ref, atol=1e-6, rtol=1e-5)


def test_advcl_keys_carry_gradient_where_the_official_loss_lets_them():
    z = randz(2, 4, 5, 8).requires_grad_(True)
    plain = A.a_infonce(z, pair_weights=[[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])
    full = A.a_infonce(
        z, pair_weights=[[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], detach_keys=False
    )
    (g_plain,) = torch.autograd.grad(plain, z)
    (g_full,) = torch.autograd.grad(full, z)
    assert torch.equal(plain, full)  # the same value
    assert torch.all(g_plain[0] == 0) and g_full[0].abs().sum() > 0  # view 0 is only ever a key


def test_high_frequency_view_removes_exactly_the_disc():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    low = (0.5 + 0.2 * torch.cos(2 * math.pi * 3 * xx / 32)).expand(2, 3, 32, 32)  # frequency 3
    high = (0.5 + 0.2 * torch.cos(math.pi * (xx + yy))).expand(2, 3, 32, 32)  # the checkerboard
    assert A.high_frequency(low).abs().max() < 1e-5
    assert torch.allclose(A.high_frequency(high), high - 0.5, atol=1e-5)  # all but its mean
    spectrum = torch.fft.fftshift(
        torch.fft.fftn(A.high_frequency(torch.rand(1, 1, 32, 32)), dim=(-2, -1))
    )
    assert (spectrum.abs() < 1e-4).sum() == 193  # radius < 8 around the centre (16, 16)


def test_a_forward_through_one_branch_moves_only_its_statistics():
    net = A.AdvCLNet(4).train()
    stats = lambda: {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k}
    before = stats()
    net.project(images(0, 4).cpu(), A.BN_ADV)
    moved = {k for k, v in stats().items() if not torch.equal(v, before[k])}
    assert moved and all(".bn_list.1." in k or k.startswith("heads.head_proj") for k in moved)
    assert any(k.startswith("heads.head_proj") for k in moved)  # its BatchNorm1d is shared


def test_the_joint_attack_stays_in_its_ball_and_raises_its_losses():
    torch.manual_seed(0)
    net = A.AdvCLNet(4).train()
    args = advcl_args("both", attack_steps=3, adv_weight=0.7)
    x1, x2, org = images(1, 8).cpu(), images(2, 8).cpu(), images(3, 8).cpu()
    labels = [torch.randint(0, k, (8,)) for k in A.PSEUDO_KS]
    hfc = A.high_frequency(org)
    x_cl, x_ce = A.advcl_attack(net, x1, x2, org, hfc, labels, args)
    for x in (x_cl, x_ce):
        assert (x - org).abs().max() <= 8 / 255 + 1e-6 and x.min() >= 0 and x.max() <= 1

    def losses(cl, ce):  # the attack's own objectives, in train mode as it runs (on a copy)
        copy_ = __import__("copy").deepcopy(net)
        with torch.no_grad():
            z = torch.stack(
                [copy_.project(v, b) for v, b in ((cl, A.BN_ADV), (x1, 0), (x2, 0), (hfc, 0))]
            )
            ce_loss = A.pseudo_label_ce(copy_.classify(ce, A.BN_CE), labels, "mean")
            return A.advcl_contrastive(z, args, "attack").item(), ce_loss.item()

    attacked, clean = losses(x_cl, x_ce), losses(org, org)
    assert attacked[0] > clean[0] and attacked[1] > clean[1]


def test_the_adaptive_degree_and_the_schedule_follow_asym_advcl():
    args = advcl_args("infpos", adv_weight=1.2, ip_adaptive_from=2)
    seen = [0.0, 0]
    assert (
        A.stop_degree(args, 1, 3.0, seen, 10) == 0.2
        and A.stop_degree(args, 2, 1.0, seen, 30) == 0.2
    )
    mean = (3.0 * 10 + 1.0 * 30) / 40  # its dis_avg: weighted by images, epochs 1..2
    assert A.stop_degree(args, 3, 2.0, seen, 5) == 0.2  # farther than the mean: as it was
    assert A.stop_degree(args, 3, 0.3, seen, 5) == 0.5  # nearer than d_min
    assert A.stop_degree(args, 3, 1.0, seen, 5) == pytest.approx(
        (mean - 1.0) / (mean - 0.4) * 0.3 + 0.2
    )
    assert seen == [60.0, 40]  # recorded only in the first epochs
    # utils.py adjust_learning_rate (per epoch) then warmup_learning_rate (per step), transcribed
    lr, epochs, steps = 2.0, 40, 5
    eta = lr * 0.1**3
    warm_to = eta + (lr - eta) * (1 + math.cos(math.pi * 10 / epochs)) / 2
    for s in range(epochs * steps):
        e, b = s // steps + 1, s % steps
        want = eta + (lr - eta) * (1 + math.cos(math.pi * e / epochs)) / 2
        if e <= 10:
            want = 0.01 + (b + (e - 1) * steps) / (10 * steps) * (warm_to - 0.01)
        assert A.advcl_lr_at(s, steps, epochs, lr, 10) == pytest.approx(want, rel=1e-12)


def test_advcl_convolutions_start_at_kaimings_fan_out_scale():
    torch.manual_seed(0)
    net = A.AdvCLNet(16)
    for conv in (net.encoder.conv1, net.encoder.layer4[0].conv1, net.encoder.layer3[0].shortcut[0]):
        w = conv.weight  # kaiming normal, fan-out: std sqrt(2 / (c_out k k))
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        assert abs(w.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.05, conv


def test_the_pseudo_label_cross_entropy_is_the_mean_over_the_sets():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(6, k, generator=g) for k in A.PSEUDO_KS]
    labels = [torch.randint(-1, k, (6,), generator=g) for k in A.PSEUDO_KS]
    labels[0][0] = -1  # no label: ignored
    for reduction in ("mean", "sum"):
        each = [
            F.cross_entropy(lg, lb, reduction=reduction, ignore_index=-1)
            for lg, lb in zip(logits, labels)
        ]
        assert torch.allclose(A.pseudo_label_ce(logits, labels, reduction), sum(each) / 5)
    # a batch without a label of one set (a file saved by a --subset run, reused on more images):
    # that set adds 0, and the others their means, never NaN
    labels[0][:] = -1
    rest = [F.cross_entropy(lg, lb, ignore_index=-1) for lg, lb in zip(logits[1:], labels[1:])]
    ce = A.pseudo_label_ce(logits, labels, "mean")
    assert torch.isfinite(ce) and torch.allclose(ce, sum(rest) / 5)


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------
def test_crop_flip_is_a_padded_crop_and_a_flip():
    import torchvision.transforms.functional as TF

    x = (images(6, 400) * 255).to(torch.uint8)
    torch.manual_seed(0)
    out = A.crop_flip(x).cpu()
    padded = F.pad(x.cpu().float() / 255, (4, 4, 4, 4))
    seen, flips = set(), 0
    for img, p in zip(out, padded):
        hits = [
            (dy, dx, f)
            for dy in range(9)
            for dx in range(9)
            for f in (0, 1)
            if torch.equal(
                img, TF.crop(p, dy, dx, 32, 32).flip(2) if f else TF.crop(p, dy, dx, 32, 32)
            )
        ]
        assert len(hits) == 1
        seen.add(hits[0][:2])
        flips += hits[0][2]
    assert (
        len(seen) > 70 and abs(flips / len(out) - 0.5) < 0.1
    )  # offsets 0..8 each way, flips half the time


@pytest.mark.parametrize(
    "op,factor",
    [(0, 0.6), (0, 1.4), (1, 0.6), (1, 1.4), (2, 0.6), (2, 1.4), (3, -0.1), (3, 0.07), (3, 0.0)],
)
def test_colour_ops_match_torchvision(op, factor):
    import torchvision.transforms.functional as TF

    x = images(op, 8)
    tv = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
    ref = torch.stack([tv(img, factor) for img in x.cpu()])
    assert torch.allclose(
        A.adjust(x, op, torch.full((8,), factor, device=DEV)).cpu(), ref, atol=1e-5
    )


def test_color_jitter_applies_each_images_ops_in_its_order_as_torchvision():
    import torchvision.transforms.functional as TF

    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    x = images(7, 24)
    torch.manual_seed(3)
    on, f, order = A.jitter_params(24, DEV)
    ours = A.color_jitter(x, on, f, order).cpu()
    for i, img in enumerate(x.cpu()):
        ref = img
        for op in order[i].tolist() if on[i] else []:
            ref = ops[op](ref, f[i, op].item())
        assert torch.allclose(ours[i], ref, atol=2e-5), i


def test_jitter_draws_follow_color_jitter():
    """Over many images: applied with p 0.8, factors uniform in their ranges, and the order a
    uniform permutation of the four ops per image (each of the 24 orders about equally often), as
    torchvision's get_params."""
    n = 24000
    torch.manual_seed(0)
    on, f, order = (t.cpu() for t in A.jitter_params(n, DEV))
    assert abs(on.float().mean() - 0.8) < 0.01
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and f[:, 3].abs().max() <= 0.1
    assert abs(f[:, :3].mean() - 1.0) < 0.01 and abs(f[:, 3].mean()) < 0.002
    assert (order.sort(1).values == torch.arange(4)).all()  # a permutation per image
    counts = torch.unique(order, dim=0, return_counts=True)[1].float()
    assert len(counts) == 24 and (counts / n - 1 / 24).abs().max() < 0.006
    for k in range(4):  # each op at each position a quarter of the time
        assert ((order[:, k : k + 1] == torch.arange(4)).float().mean(0) - 0.25).abs().max() < 0.015


def test_crop_params_follow_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    n, img = 10000, torch.zeros(3, 32, 32)
    torch.manual_seed(0)
    w, h, x0, y0 = (t.cpu() for t in A.crop_params(n, DEV))
    ref = torch.tensor(
        [RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    ).float()
    pairs = (
        (w * h, ref[:, 2] * ref[:, 3]),
        (w / h, ref[:, 3] / ref[:, 2]),
        (x0, ref[:, 1]),
        (y0, ref[:, 0]),
    )
    for ours, theirs in pairs:
        q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
        assert torch.allclose(ours.quantile(q), theirs.quantile(q), rtol=0.06, atol=1.0)
        assert ours.min() >= theirs.min() - 1 and ours.max() <= theirs.max() + 1
    assert (x0 >= 0).all() and (x0 + w <= 32).all() and (y0 >= 0).all() and (y0 + h <= 32).all()
    # the aspect ratio is log-uniform: as many crops lean wide as tall, as torchvision's (0.46 /
    # 0.46 here, where a
    # ratio drawn uniformly would lean wide: 0.52 / 0.40)
    for ours, theirs in (((w > h), ref[:, 3] > ref[:, 2]), ((w < h), ref[:, 3] < ref[:, 2])):
        assert abs(ours.float().mean() - theirs.float().mean()) < 0.025


def test_augment_rates_range_and_determinism():
    n = 4000
    ramp = torch.linspace(0.2, 0.7, 32, device=DEV).expand(
        n, 3, 32, 32
    )  # a gray left-to-right ramp
    torch.manual_seed(0)
    out = A.augment((ramp * 255).round().to(torch.uint8))
    assert (
        out.shape == (n, 3, 32, 32)
        and out.dtype == torch.float32
        and 0 <= out.min()
        and out.max() <= 1
    )
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


# --------------------------------------------------------------------------------------------------
# Pretraining, end to end
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", A.METHODS)
def test_end_to_end_every_method(folder, tmp_path, method):
    res = A.main(tiny(folder, tmp_path / "run", "--method", method))
    saved = on_disk(res)
    assert results_files(tmp_path / "run") == [res["path"]]
    assert (
        0 <= saved["slf_ra"] <= saved["slf_sa"]
        and saved["slf_ra"] == saved["slf_robust"]["linf:8/255"]
    )
    assert (
        0 < saved["slf_sa"] < 1
    )  # a quarter of the test images look like the other class: never all right
    run, identity = saved["training"]["args"], saved["identity"]
    assert (
        run["method"] == method
        and run["epochs"] == 1
        and run["seed"] == 0
        and run["n_classes"] == 2
    )
    assert identity["protocol"]["eval_step"] == 2 / 255 and identity["data"]["n_test"] == 16
    assert (
        identity["data"]["dir"] == os.path.realpath(folder)
        and saved["training"]["data"] == identity["data"]
    )
    assert saved["training"]["pretrain_s"] > 0 and saved["training"]["images_per_s"] > 0
    inv = saved["invocations"][-1]
    assert inv["wall_s"] > saved["training"]["pretrain_s"] and inv["env"]["torch"] == str(
        torch.__version__
    )
    assert inv["env"]["device_name"] and inv["command"].startswith(
        "python ainfonce.py --dataset folder"
    )
    assert saved["training"]["env"]["torch"]
    w, ck = weights(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1 and ck["step"] == 4 and ck["args"]["method"] == method
    assert all(v.device.type == "cpu" for v in w.values())
    A.load_strict(A.Net(8).encoder, ck["encoder"], "encoder")
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 1 and math.isfinite(log[0]["loss"]) and log[0] == ck["history"][0]


@pytest.mark.parametrize("amp", [True, False])
def test_amp_runs_the_step_in_bf16_and_the_loss_in_fp32(folder, tmp_path, monkeypatch, amp):
    real, seen = A.a_infonce, []

    def recording(z, *a, **kw):
        loss = real(z, *a, **kw)
        seen.append((z.dtype, loss.dtype))
        return loss

    monkeypatch.setattr(A, "a_infonce", recording)
    res = A.main(
        tiny(
            folder,
            tmp_path / "run",
            "--method",
            "both",
            "--eval",
            "none",
            "--knn-every",
            "0",
            *(["--amp"] if amp else ["--no-amp"]),
        )
    )
    projections = (
        torch.bfloat16 if amp else torch.float32
    )  # the projector's output, under autocast or not
    assert seen and set(seen) == {(projections, torch.float32)}
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert (
        math.isfinite(log[0]["loss"]) and res == {} and results_files(tmp_path / "run") == []
    )  # nothing measured


def test_methods_run_with_one_seed_start_alike_and_see_the_same_views(
    folder, tmp_path, monkeypatch
):
    """The pairing of reproduce.sh's differences: runs of one seed start from the same weights and
    draw the same augmentations at every step, whatever their attacks draw (simclr: none)."""
    real_augment, real_step = A.augment, A.rocl_step
    seen = {}
    for method in ("rocl", "hardneg", "simclr"):
        views, start = [], []

        def recording(xb, gen=None):
            views.append(real_augment(xb, gen))
            return views[-1]

        def stepping(net, xb, args, gen=None, lap=None):
            if not start:
                start.append({k: v.clone() for k, v in net.state_dict().items()})
            return real_step(net, xb, args, gen, lap)

        monkeypatch.setattr(A, "augment", recording)
        monkeypatch.setattr(A, "rocl_step", stepping)
        A.main(tiny(folder, tmp_path / method, "--method", method, "--eval", "none"))
        seen[method] = views, start[0]
    views, start = seen["rocl"]
    assert len(views) == 8  # 4 steps, two views each
    for method in ("hardneg", "simclr"):
        assert all(torch.equal(a, b) for a, b in zip(seen[method][0], views))
        assert all(torch.equal(start[k], seen[method][1][k]) for k in start)
    assert not torch.equal(views[0], views[2])  # each step its own draws


def test_the_start_line_and_the_knn_monitor_leave_training_bit_identical(folder, tmp_path, capsys):
    A.main(tiny(folder, tmp_path / "on", "--epochs", "2", "--knn-every", "1", "--eval", "none"))
    start = capsys.readouterr().out.splitlines()[0]
    assert start == (
        f"ainfonce: {tmp_path / 'on'} | {DEV.type} ({A.provenance(DEV)['device_name']}) | "
        f"folder {folder}: 32 training / 16 test images, 2 classes | hardneg on rocl | 2 epochs of 4 "
        f"steps | "
        f"new run"
    )
    A.main(tiny(folder, tmp_path / "off", "--epochs", "2", "--knn-every", "0", "--eval", "none"))
    logs = {
        r: [json.loads(line) for line in open(tmp_path / r / "log.jsonl")] for r in ("on", "off")
    }
    assert [0 <= rec["knn"] <= 1 for rec in logs["on"]] == [True, True] and all(
        "knn" not in r for r in logs["off"]
    )
    strip = lambda log: [
        {k: v for k, v in rec.items() if k not in ("knn", "images_per_s", "train_s")} for rec in log
    ]
    assert strip(logs["on"]) == strip(logs["off"])
    (w_on, ck_on), (w_off, ck_off) = weights(tmp_path / "on" / "last.pt"), weights(
        tmp_path / "off" / "last.pt"
    )
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_on)  # BN statistics included
    assert all(
        torch.equal(a, b)
        for a, b in zip(ck_on["rng"][0].values(), ck_off["rng"][0].values())
        if torch.is_tensor(a)
    )


def advcl_run(folder, out, method, *extra):
    return tiny(folder, out, "--base", "advcl", "--method", method, "--epochs", "2", *extra)


@pytest.fixture(scope="session")
def simclr_encoder(tmp_path_factory, folder):
    out = tmp_path_factory.mktemp("simclr") / "run"
    A.main(tiny(folder, out, "--method", "simclr", "--eval", "none"))
    return str(out)


@pytest.mark.parametrize(
    "method",
    [
        pytest.param("rocl"),
        pytest.param("infpos", marks=slow),
        pytest.param("hardneg", marks=slow),
        pytest.param("both"),
    ],
)
def test_every_advcl_method_trains_resumes_bit_exactly_and_evaluates(
    folder, tmp_path, monkeypatch, simclr_encoder, method
):
    labels = ["--pseudo-labels", simclr_encoder]
    full = A.main(advcl_run(folder, tmp_path / "full", method, *labels, "--eval", "slf", "alf"))
    real = A.advcl_lr_at

    def cut(step, *a):  # Ctrl-C at step 5 of 8
        if step == 5:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(A, "advcl_lr_at", cut)
    with pytest.raises(SystemExit):
        A.main(advcl_run(folder, tmp_path / "cut", method, *labels, "--ckpt-every", "1"))
    monkeypatch.setattr(A, "advcl_lr_at", real)
    done = A.main(["--resume", str(tmp_path / "cut"), "--eval", "slf", "alf"])
    w_full, ck = weights(tmp_path / "full" / "last.pt")
    w_done, _ = weights(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(w_full[k], w_done[k]) for k in w_full)  # every branch's BN included
    assert scheme_keys(done) == scheme_keys(full) and 0 <= full["slf_ra"] <= full["slf_sa"] <= 1
    assert ck["args"]["base"] == "advcl" and ck["pseudo_labels"]["kmeans_of"]
    assert (
        full["read"]["bn_branch"] == A.BN_ADV
        and full["identity"]["protocol"]["name"] == "asym-advcl"
    )
    encoder, _, _, net = A.load_checkpoint(str(tmp_path / "full"))  # evaluated: the pgd branch
    x = images(8, 6).cpu()
    with torch.no_grad(), A.eval_mode(net):
        with A.use_branch(net.encoder, A.BN_ADV):
            pgd_features = net.encoder(x)
        normal_features = net.encoder(x)
        assert torch.allclose(encoder.eval()(x), pgd_features, atol=1e-6)
        assert not torch.allclose(pgd_features, normal_features, atol=1e-4)
    robust = eval_only(
        tmp_path / "full", "--protocol", "robustssl", "--no-autoattack", "--eval", "slf"
    )
    assert robust["identity"]["protocol"]["pretraining"] == (
        "advcl" if method == "rocl" else "a-infonce"
    )


@pytest.mark.parametrize("method,normal", [("infpos", 11), ("hardneg", 9)])
def test_an_advcl_step_moves_each_branchs_statistics_as_the_official_step(
    folder, tmp_path, simclr_encoder, method, normal
):
    """Per step, in the official order, each PGD iteration moves pgd, pgd_ce and (x1, x2, hfc)
    normal once each; the update's forwards again; IP's distance adds two forwards through the
    normal branch: 2 steps x 3 + 3 (+ 2)."""
    A.main(
        advcl_run(
            folder,
            tmp_path / "run",
            method,
            "--pseudo-labels",
            simclr_encoder,
            "--epochs",
            "1",
            "--eval",
            "none",
        )
    )
    ck = weights(tmp_path / "run" / "last.pt")[1]
    steps = ck["step"]
    moved = {b: ck["encoder"][f"bn1.bn_list.{b}.num_batches_tracked"].item() for b in range(3)}
    assert moved == {A.BN_CLEAN: normal * steps, A.BN_ADV: 3 * steps, A.BN_CE: 3 * steps}


def test_the_advcl_optimiser_decays_the_weights(folder, tmp_path, simclr_encoder):
    """One step from the same start with and without weight decay: SGD's first step differs by
    exactly lr wd w0 (its momentum buffer starts at the gradient plus wd w)."""
    runs = {}
    for wd in ("0.5", "0"):  # a decay large enough to measure after one step at the warm-up's lr
        out = tmp_path / wd
        argv = advcl_run(
            folder,
            out,
            "rocl",
            "--pseudo-labels",
            simclr_encoder,
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--warmup-epochs",
            "1",
            "--wd",
            wd,
            "--eval",
            "none",
            "--knn-every",
            "0",
        )
        A.main(argv)
        w, ck = weights(out / "last.pt")
        runs[wd] = (w, ck["history"][0]["lr"])
    torch.manual_seed(0)
    w0 = A.AdvCLNet(8).encoder.state_dict()  # what the run starts from: seeded, then built
    (decayed, lr), (plain, _) = runs["0.5"], runs["0"]
    assert lr == 0.01  # the warm-up's start
    for k in ("conv1.weight", "layer3.0.conv2.weight", "bn1.bn_list.0.weight"):
        assert torch.allclose(decayed[k] - plain[k], -lr * 0.5 * w0[k], rtol=1e-3, atol=1e-8), k


def test_the_saved_pseudo_labels_reproduce_their_run(folder, tmp_path, simclr_encoder, capsys):
    first = advcl_run(folder, tmp_path / "a", "rocl", "--pseudo-labels", simclr_encoder)
    A.main(first + ["--eval", "none"])
    said = [line for line in capsys.readouterr().out.splitlines() if "k-means of" in line]
    assert said[1] == "pseudo-labels: k-means of 32 encoder features into 10 clusters"
    assert said[-1].endswith("into 32 clusters (K = 500: fewer images than that)")
    saved = str(tmp_path / "a" / "pseudo-labels.pkl")
    A.main(advcl_run(folder, tmp_path / "b", "rocl", "--pseudo-labels", saved, "--eval", "none"))
    (wa, cka), (wb, ckb) = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    assert cka["pseudo_labels"]["labels_digest"] == ckb["pseudo_labels"]["labels_digest"]
    assert [r["loss"] for r in cka["history"]] == [r["loss"] for r in ckb["history"]]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_knn_monitor_is_a_weighted_200_nearest_neighbour_vote(tmp_path):
    """InstDisc's and MoCo's monitor, from its definition: cosine similarities, the k = 200
    nearest bank images vote for their class with weight exp(similarity / 0.1)."""
    g = torch.Generator().manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8)).to(DEV)
    x = torch.randint(0, 256, (500, 3, 32, 32), generator=g, dtype=torch.uint8).to(DEV)
    with torch.no_grad():
        feats = F.normalize(encoder(x.float() / 255), dim=1)
    y = (feats[:, 0] + 0.6 * torch.randn(500, generator=g).to(DEV) > 0).long()  # noisy classes
    y += 2 * (feats[:, 1] > 0.3).long()
    bank, query = feats[:400], feats[400:]

    def reference(k, t=0.1):
        sim, idx = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(100, 4, device=DEV).scatter_add_(1, y[:400][idx], (sim / t).exp())
        return (votes.argmax(1) == y[400:]).float().mean().item()

    assert reference(20) != reference(200)  # the data tell k apart
    ours = A.knn_accuracy(encoder, x[:400], y[:400], x[400:], y[400:], 4)
    assert ours == pytest.approx(reference(200), abs=1e-6)


def test_a_run_logs_the_knn_monitor_of_its_encoder(tmp_path):
    data = make_folder(tmp_path / "data", classes=4, n_train=75, n_test=25, seed=3)
    argv = tiny(data, tmp_path / "run", "--width", "4", "--batch-size", "100", "--knn-every", "1")
    A.main(argv + ["--eval", "none"])
    logged = json.loads(open(tmp_path / "run" / "log.jsonl").readline())["knn"]
    d = A.load_data("folder", data)
    encoder = A.load_checkpoint(str(tmp_path / "run"))[0].to(DEV).eval()
    with torch.no_grad():
        bank, query = (
            F.normalize(encoder(x.to(DEV).float() / 255), dim=1) for x in (d.x_train, d.x_test)
        )
    accuracy = {}
    for k in (20, 200):  # 300 bank images, 100 queries: k tells
        sim, idx = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), 4, device=DEV)
        votes.scatter_add_(1, d.y_train.to(DEV)[idx], (sim / 0.1).exp())
        accuracy[k] = (votes.argmax(1).cpu() == d.y_test).float().mean().item()
    assert logged == pytest.approx(accuracy[200], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Evaluation: protocols, finetuning, robust accuracy, guards, AutoAttack
# --------------------------------------------------------------------------------------------------
def test_protocol_settings_are_the_official_and_robustssl_ones():
    asym = A.scheme_settings("asym-rocl", None, "cifar10", None, 1024)
    assert asym["slf"] == dict(
        epochs=150,
        milestones=[30, 50, 100],
        lr=0.1,
        wd=5e-4,
        momentum=0.9,
        batch_size=1024,
        augment=False,
        zero_head=False,
    )
    for s in ("alf", "aff"):
        assert {
            k: asym[s][k]
            for k in ("epochs", "milestones", "lr", "wd", "attack_steps", "attack_step", "eps")
        } == dict(
            epochs=25,
            milestones=[15, 20],
            lr=0.1,
            wd=2e-4,
            attack_steps=10,
            attack_step=2 / 255,
            eps=8 / 255,
        )
    assert asym["aff"]["trades_beta"] == 6.0 and A.scheme_settings(
        "asym-rocl", None, "cifar10", 10, 8
    )["alf"]["milestones"] == [6, 8]
    # RobustSSL's setup_hyperparameter, --mode ALL (GodXuxilie/RobustSSL_Benchmark)
    acl = A.scheme_settings("robustssl", "acl", "cifar100", None, 1024)
    assert {
        k: acl["slf"][k]
        for k in ("epochs", "milestones", "lr", "batch_size", "wd", "augment", "zero_head")
    } == dict(
        epochs=25,
        milestones=[10, 20],
        lr=0.05,
        batch_size=512,
        wd=2e-4,
        augment=True,
        zero_head=True,
    )
    assert {k: acl["aff"][k] for k in ("epochs", "milestones", "lr", "batch_size")} == dict(
        epochs=100, milestones=[40, 60], lr=0.1, batch_size=128
    )
    advcl = A.scheme_settings(
        "robustssl", "a-infonce", "folder", None, 1024
    )  # folder: CIFAR-10's settings
    assert (advcl["alf"]["lr"], advcl["alf"]["milestones"], advcl["aff"]["epochs"]) == (
        0.01,
        [15, 20],
        25,
    )
    air = A.scheme_settings(
        "robustssl", "dynacl-air", "cifar10", None, 1024
    )  # 5 SLF epochs carry over
    assert [air[s]["epochs"] for s in A.SCHEMES] == [5, 5, 5] and air["aff"]["batch_size"] == 128
    assert A.scheme_settings("robustssl", "dynacl-rcs", "cifar10", None, 1024)["slf"]["lr"] == 0.1
    short = A.scheme_settings("robustssl", "acl", "cifar10", 5, 1024)
    assert (short["slf"]["epochs"], short["slf"]["milestones"], short["aff"]["milestones"]) == (
        5,
        [2, 4],
        [2, 3],
    )


def test_train_head_follows_the_milestones_it_is_given():
    w = nn.Parameter(torch.zeros(2, device=DEV))
    s = dict(A.scheme_settings("asym-rocl", None, "cifar10", None, 4)["slf"])
    lrs = A.train_head([w], lambda i: (w**2).sum() + w.sum(), 8, s, DEV, label="SLF")
    assert lrs == pytest.approx([0.1] * 30 + [0.01] * 20 + [0.001] * 50 + [0.0001] * 50)
    s.update(epochs=25, milestones=[15, 20])
    assert A.train_head([w], lambda i: (w**2).sum(), 8, s, DEV, label="ALF") == pytest.approx(
        [0.1] * 15 + [0.01] * 5 + [0.001] * 5
    )


def small_encoder(width=4, seed=0):
    torch.manual_seed(seed)
    return A.ResNet18(width).to(DEV).eval()


def test_finetuning_shrinks_the_weights_by_its_decay():
    """With a loss whose gradient is zero, SGD's steps are its weight decay alone: w <- w - lr v, v
    <- m v + wd w."""
    for protocol in ("asym-rocl", "robustssl"):
        s = dict(
            A.scheme_settings(protocol, "a-infonce", "cifar10", 1, 4)["slf"],
            epochs=1,
            milestones=[5],
        )
        w = nn.Parameter(torch.ones(3, device=DEV, dtype=torch.float64))
        A.train_head(
            [w], lambda idx: (w * 0).sum(), 4 * s["batch_size"], s, DEV, label="SLF"
        )  # four steps
        expect, v = 1.0, 0.0
        for _ in range(4):
            v = s["momentum"] * v + s["wd"] * expect
            expect -= s["lr"] * v
        assert s["wd"] > 0 and torch.allclose(
            w.detach().cpu(), torch.full((3,), expect, dtype=torch.float64), rtol=1e-12, atol=0
        )


def test_alf_trains_on_pgd_examples_of_encoder_and_head(monkeypatch):
    heads, pairs = [], []
    real_head, real_pgd = A.linear_head, A.pgd
    monkeypatch.setattr(A, "linear_head", lambda *a: heads.append(real_head(*a)) or heads[-1])
    encoder = small_encoder()

    def recording(
        model, x, y, **kw
    ):  # the example made, and the one an attack on encoder + head makes
        start = torch.get_rng_state()
        x_adv = real_pgd(model, x, y, **kw)
        after = torch.get_rng_state()
        torch.set_rng_state(start)
        clf = nn.Sequential(encoder, heads[-1]).eval()
        reference = real_pgd(clf, x, y, **kw)
        torch.set_rng_state(after)
        with torch.no_grad():
            pairs.append(
                (
                    torch.equal(x_adv, reference),
                    F.cross_entropy(clf(x_adv), y) - F.cross_entropy(clf(x), y),
                )
            )
        return x_adv

    monkeypatch.setattr(A, "pgd", recording)
    x, y = (images(1, 16) * 255).to(torch.uint8), torch.arange(16, device=DEV) % 3
    s = dict(A.scheme_settings("asym-rocl", None, "cifar10", 1, 8)["alf"], epochs=2)
    A.finetune_alf(encoder, x, y, 3, s)
    assert len(pairs) == 4 and all(same for same, _ in pairs)
    assert all(rise > 0 for _, rise in pairs)  # the examples raise the classifier's loss


def test_aff_starts_from_the_pretrained_encoder(monkeypatch):
    encoder, first = small_encoder(seed=3), []
    real = A.trades_loss

    def recording(model, x, y, **kw):
        if not first:
            with A.eval_mode(model), torch.no_grad():
                first.append(torch.allclose(model[0](x), encoder(x)))
        return real(model, x, y, **kw)

    monkeypatch.setattr(A, "trades_loss", recording)
    x, y = (images(2, 8) * 255).to(torch.uint8), torch.arange(8, device=DEV) % 2
    s = dict(A.scheme_settings("asym-rocl", None, "cifar10", 1, 8)["aff"], attack_steps=1)
    A.finetune_aff(encoder, x, y, 2, s)
    assert first == [True]


def test_robustssl_heads_start_at_zero():
    encoder = small_encoder()
    x, y = (images(5, 8) * 255).to(torch.uint8), torch.arange(8, device=DEV) % 2
    for protocol, zero in (("robustssl", True), ("asym-rocl", False)):
        for scheme in ("slf", "aff"):
            s = dict(
                A.scheme_settings(protocol, "a-infonce", "cifar10", 1, 8)[scheme],
                lr=0.0,
                attack_steps=1,
            )
            head = A.FINETUNE[scheme](encoder, x, y, 2, s)[1]  # lr 0: the head as it started
            assert (head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0) == zero, (
                protocol,
                scheme,
            )


@pytest.mark.parametrize("scheme", ["slf", "alf", "aff"])
def test_robustssl_finetunes_on_random_crops_and_flips(scheme):
    """Every scheme's encoder sees crops and flips, not the images, and the images themselves
    without augmentation. ALF and AFF attack at eps 0, so their examples are the augmented images
    (TRADES starts its ascent 0.001 * N(0, 1) away from them)."""
    encoder, seen = small_encoder(), []
    encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    x, y = (images(4, 64) * 255).to(torch.uint8), torch.arange(64, device=DEV) % 2
    s = dict(A.scheme_settings("robustssl", "a-infonce", "cifar10", 1, 64)[scheme], batch_size=64)
    if scheme != "slf":
        s.update(eps=0.0, attack_steps=1)
    finetune = {"slf": A.finetune_slf, "alf": A.finetune_alf, "aff": A.finetune_aff}[scheme]

    tolerance = 0.01 if scheme == "aff" else 0.0  # TRADES' start is not the image itself

    def untouched():  # per input the encoder saw: is it one of the images, unchanged?
        inputs = torch.cat(seen)
        distance = (inputs[:, None] - (x.float() / 255)[None]).abs().flatten(2).amax(2)
        return (distance <= tolerance).any(1)

    torch.manual_seed(0)
    finetune(encoder, x, y, 2, s)
    assert untouched().float().mean() < 0.1  # 1 in 162 draws is the identity
    if scheme == "slf":
        assert len(seen) == 1 and len(seen[0]) == 64
    s["augment"] = False
    seen.clear()
    finetune(encoder, x, y, 2, s)
    assert untouched().all()


def test_robust_accuracy_per_norm_falls_with_eps_as_in_closed_form():
    model, x, y, margin = linear_data(400)
    sa = A.accuracy(model, x, y, 128)
    assert sa == (margin > 0).float().mean().item()
    d = x[0].numel()
    for norm, radii, drop in (
        ("linf", (2 / 255, 8 / 255, 16 / 255), 1.0),
        ("l2", (0.25, 1.0, 2.0), d**-0.5),
    ):
        ra = [A.accuracy(model, x, y, 128, A.threat_attack(norm, e, 2 / 255, 20)) for e in radii]
        assert sa >= ra[0] >= ra[1] >= ra[2], (norm, ra)
        for e, r in zip(radii, ra):
            assert abs(r - (margin > e * drop).float().mean().item()) <= 0.01, (norm, e, r)


def independent_pgd(model, x, y, eps, alpha, steps, seed):
    """PGD from the definition (Madry et al. 2018), written apart from ainfonce.pgd."""
    g = torch.Generator().manual_seed(seed)
    delta = ((torch.rand(x.shape, generator=g) * 2 - 1) * eps).to(x.device)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="sum")
        loss.backward()
        delta = (delta.detach() + alpha * delta.grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


def test_robust_accuracy_guards_and_parity_with_independent_pgd():
    model, x, y, margin = linear_data(400)
    sa = A.accuracy(model, x, y, 128)
    ra = {
        e: A.accuracy(
            model, x, y, 128, lambda m, xb, yb: A.pgd(m, xb, yb, eps=e / 255, step=2 / 255)
        )
        for e in (0, 2, 8, 16, 64)
    }
    assert ra[0] == sa and sa >= ra[2] >= ra[8] >= ra[16] >= ra[64]
    assert ra[64] == 0 and ra[16] <= 0.02
    assert abs(ra[8] - (margin > 8 / 255).float().mean().item()) <= 0.005
    more = A.accuracy(
        model, x, y, 128, lambda m, xb, yb: A.pgd(m, xb, yb, eps=8 / 255, step=2 / 255, steps=50)
    )
    assert more <= ra[8] + 0.01
    ind = (
        model(independent_pgd(model, x.float() / 255, y, 8 / 255, 2 / 255, 20, seed=1)).argmax(1)
        == y
    )
    assert abs(ind.float().mean().item() - ra[8]) <= 0.02
    g = A.guards(
        model, x, y, 128, 8 / 255, 20, [("linf", 8 / 255, ra[8]), ("linf", 16 / 255, ra[16])]
    )
    assert g["ok"] and g["threats_fall"] and g["failed"] == []
    rising = A.guards(
        model, x, y, 128, 8 / 255, 20, [("l2", 0.5, 0.20), ("l2", 1.0, 0.23)]
    )  # 3 points up
    assert not rising["ok"] and rising["failed"] == ["l2 RA 23.0% at 1 above 20.0% at 0.5"]
    noise = A.guards(
        model, x, y, 128, 8 / 255, 20, [("l2", 0.5, 0.20), ("l2", 1.0, 0.2075)]
    )  # a point and an image
    assert noise["ok"]


class Masked(Linear2):
    def forward(self, x):  # quantises its input to 8 bits: identity on clean images, zero gradient
        return super().forward((x * 255).round() / 255)


def test_guards_flag_masked_gradients():
    model, x, y, _ = linear_data(200)
    masked = Masked(model.p.view(3, 32, 32))
    masked_ra = A.accuracy(
        masked,
        x,
        y,
        128,
        lambda m, xb, yb: A.pgd(m, xb, yb, eps=64 / 255, step=2.5 * 64 / 255 / 20),
    )
    assert masked_ra > 0.05  # the attack is fooled ...
    assert not A.guards(masked, x, y, 128, 8 / 255, 20)["ok"]  # ... and the guards say so


def test_guards_flag_a_classifier_that_no_attack_moves():
    x = (images(3, 200) * 255).to(torch.uint8)
    y = (torch.arange(200, device=DEV) % 10 < 3).long()  # 30 % of class 1
    constant = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)).to(DEV)
    with torch.no_grad():
        constant[1].weight.zero_()
        constant[1].bias.copy_(
            torch.tensor([0.0, 1.0])
        )  # class 1 whatever the input: RA = SA at every eps
    g = A.guards(constant, x, y, 256, 8 / 255, 4)
    assert g["failed"] == ["RA at 64/255 30.0% (should be ~0)"]


def test_guards_use_images_of_every_class():
    x = torch.zeros(1000, 3, 32, 32, dtype=torch.uint8, device=DEV)
    y = torch.arange(10, device=DEV).repeat_interleave(
        100
    )  # sorted by class, as ImageFolder lists them
    always0 = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).to(DEV)
    with torch.no_grad():
        always0[1].weight.zero_()
        always0[1].bias.copy_(torch.eye(10)[0])  # predicts class 0 for every image
    assert (
        A.guards(always0, x, y, 256, 8 / 255, 2)["sa"] < 0.25
    )  # 200 images of class 0 would give 1.0


def test_evaluation_is_fp32_under_autocast():
    model = nn.Linear(4, 2).to(DEV)
    with torch.autocast(DEV.type, dtype=torch.bfloat16), A.strict_fp32(DEV):
        assert model(torch.randn(3, 4, device=DEV)).dtype == torch.float32
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_autoattack_names_its_implementation(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", types.SimpleNamespace(__version__="9.9"))
    assert A.autoattack_impl() == "pyautoattack 9.9"
    monkeypatch.setitem(
        sys.modules, "torchattacks", types.SimpleNamespace(__version__="1.2")
    )  # not the reference
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    with pytest.raises(A.UsageError, match="pip install pyautoattack"):
        A.autoattack_impl()


def stand_in_autoattack(monkeypatch):
    """A stand-in for pyautoattack that records how it is called (its AutoAttack's arguments, the
    targets of its targeted attacks, the model's mode) and leaves the images as they are. -> the
    list of calls."""
    calls = []

    class AutoAttack:
        def __init__(self, model, norm, eps, version, device, seed):
            self.model, self.kw = model, dict(norm=norm, eps=eps, version=version, seed=seed)
            self.apgd_targeted = types.SimpleNamespace(
                n_target_classes=9
            )  # as its set_version("standard")
            self.fab = types.SimpleNamespace(n_target_classes=9)

        def run_standard_evaluation(self, x, y, batch_size):
            calls.append(
                dict(
                    self.kw,
                    targets=(self.apgd_targeted.n_target_classes, self.fab.n_target_classes),
                    eval_mode=not self.model.training,
                    in_range=(0 <= x.min() and x.max() <= 1),
                )
            )
            return x, y

    monkeypatch.setitem(
        sys.modules,
        "pyautoattack",
        types.SimpleNamespace(__version__="stand-in", AutoAttack=AutoAttack),
    )
    return calls


@pytest.mark.parametrize("classes", [4, 11])
def test_autoattack_is_called_as_the_reference_runs(tmp_path, monkeypatch, classes):
    calls = stand_in_autoattack(monkeypatch)
    data = make_folder(tmp_path / "data", classes=classes, n_train=2, n_test=1)
    res = A.main(
        tiny(data, tmp_path / "run", "--autoattack", "--eval-threats", "linf:8/255", "l2:0.5")
    )
    others = min(
        9, classes - 1
    )  # the targeted attacks aim at every other class, up to the standard 9
    assert calls == [
        dict(
            norm="Linf",
            eps=8 / 255,
            version="standard",
            seed=0,
            targets=(others, others),
            eval_mode=True,
            in_range=True,
        ),
        dict(
            norm="L2",
            eps=0.5,
            version="standard",
            seed=0,
            targets=(others, others),
            eval_mode=True,
            in_range=True,
        ),
    ]
    assert (
        res["slf_aa"] == res["slf_sa"]
        and res["identity"]["protocol"]["autoattack"] == "pyautoattack stand-in"
    )


def test_resume_under_robustssl_takes_its_autoattack_preset(folder, tmp_path, monkeypatch, capsys):
    four = make_folder(tmp_path / "four", classes=4, n_train=4, n_test=2)
    A.main(tiny(four, tmp_path / "run", "--eval", "none"))  # trained without AutoAttack (asym-rocl)
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    fails(
        ["--resume", str(tmp_path / "run"), "--protocol", "robustssl", "--eval", "slf"],
        capsys,
        r"AutoAttack needs an optional package: pip install pyautoattack .*--protocol robustssl "
        r"runs it unless "
        r"--no-autoattack",
    )
    calls = stand_in_autoattack(monkeypatch)
    res = A.main(
        [
            "--resume",
            str(tmp_path / "run"),
            "--protocol",
            "robustssl",
            "--ft-epochs",
            "1",
            "--eval",
            "slf",
        ]
    )
    assert len(calls) == 1 and res["identity"]["protocol"]["autoattack"] == "pyautoattack stand-in"


def test_autoattack_runs_and_records_its_implementation(folder, tmp_path, capsys):
    if not importlib.util.find_spec("pyautoattack"):
        fails(
            tiny(folder, tmp_path / "none", "--autoattack"),
            capsys,
            r"needs an optional package: pip install pyauto",
            tmp_path / "none",
        )
        pytest.skip("optional: pip install pyautoattack")
    fails(
        tiny(folder, tmp_path / "two", "--autoattack"),
        capsys,
        r"AutoAttack needs >= 4 classes",
        tmp_path / "two",
    )
    four = make_folder(tmp_path / "four", classes=4, n_train=4, n_test=2)
    threats = [
        "linf:64/255",
        "l2:8",
    ]  # radii that break every image fast: AutoAttack's later attacks have no work
    res = A.main(tiny(four, tmp_path / "run", "--autoattack", "--eval-threats", *threats))
    assert (
        res["identity"]["protocol"]["autoattack"] == A.autoattack_impl()
        and list(res["slf_aa_robust"]) == threats
    )
    assert (
        0 <= res["slf_aa"] <= res["slf_sa"] and 0 <= res["slf_aa_robust"]["l2:8"] <= res["slf_sa"]
    )


def test_all_schemes_threats_and_eval_only(folder, tmp_path, capsys):
    threats = ["--eval-threats", "linf:8/255", "linf:16/255", "l2:0.5"]
    res = A.main(
        tiny(
            folder, tmp_path / "run", "--eval", "slf", "alf", "aff", "--eval-subset", "10", *threats
        )
    )
    console = capsys.readouterr().out  # every robust number is labelled with its threat
    for k in A.SCHEMES:
        r = res[f"{k}_robust"]
        assert (
            f"{k.upper()}: SA {100 * res[f'{k}_sa']:.2f}%  RA linf:8/255 "
            f"{100 * r['linf:8/255']:.2f}%  "
            f"RA linf:16/255 {100 * r['linf:16/255']:.2f}%  RA l2:0.5 {100 * r['l2:0.5']:.2f}%"
        ) in console
    for k in A.SCHEMES:
        assert (
            0 <= res[f"{k}_ra"] <= res[f"{k}_sa"] <= 1 and list(res[f"{k}_robust"]) == threats[1:]
        )
    assert res["identity"]["data"]["n_test"] == 10 and res["slf_guards"]["threats_fall"] is not None
    before = open(res["path"]).read()
    # the run's own protocol (eval-only inherits it): the finished schemes are kept, nothing is
    # recomputed
    same = eval_only(tmp_path / "run")
    assert scheme_keys(same) == scheme_keys(res) and open(res["path"]).read() == before
    assert "nothing to do" in capsys.readouterr().out
    # recomputing them (--overwrite) gives the same numbers: evaluation seeds its own RNG, per
    # scheme
    again = eval_only(tmp_path / "run", "--eval", "alf", "aff", "slf", "--overwrite")
    assert {k: v for k, v in scheme_keys(again).items() if k != "slf_guards"} == {
        k: v for k, v in scheme_keys(res).items() if k != "slf_guards"
    }
    assert again["path"] == res["path"] and results_files(tmp_path / "run") == [res["path"]]


def test_transfer_from_itself_equals_white_box_pgd(folder, tmp_path, monkeypatch):
    A.main(tiny(folder, tmp_path / "run", "--eval", "none"))
    real, made = A.attacked, []
    monkeypatch.setattr(A, "attacked", lambda *a, **kw: made.append(real(*a, **kw)) or made[-1])
    res = eval_only(
        tmp_path / "run",
        "--transfer-from",
        str(tmp_path / "run"),
        "--eval-steps",
        "5",
        "--eval-step",
        "4/255",
    )
    assert res["slf_ra_transfer"] == res["slf_ra"]
    assert res["identity"]["transfer"]["digest"] == res["identity"]["weights"]["digest"]
    transfer, white_box = made[
        :2
    ]  # crafted on the source's SLF classifier, then on the target's: the same draws
    assert torch.equal(transfer, white_box)


def test_eval_dataset_with_other_classes_end_to_end(folder, tmp_path):
    three = make_folder(tmp_path / "three", classes=3, n_train=12, n_test=4, seed=1)
    res = A.main(
        tiny(
            folder,
            tmp_path / "run",
            "--eval-dataset",
            "folder",
            "--eval-data-dir",
            three,
            "--subset",
            "24",
        )
    )
    data = res["identity"]["data"]
    assert (
        res["training"]["args"]["dataset"] == "folder" and res["training"]["args"]["n_classes"] == 2
    )
    assert (
        data["dataset"] == "folder"
        and data["n_classes"] == 3
        and data["dir"] == os.path.realpath(three)
    )
    # the run's scale: its --subset picks 24 of the other data set's 36 training images too
    assert res["training"]["args"]["subset"] == 24 and data["subset"] == 24
    assert data["n_train"] == 24 and data["n_test"] == 12 and 0 <= res["slf_sa"] <= 1
    # --eval-only sets the finetuning images of another data set: all of them (a --subset that
    # did not fit the other data set had no way out)
    res = eval_only(tmp_path / "run", "--subset", "0", "--eval", "slf")
    assert res["identity"]["data"]["subset"] == 0 and res["identity"]["data"]["n_train"] == 36


def test_robustssl_protocol_runs_and_never_mixes_with_the_default(folder, tmp_path, capsys):
    default = A.main(tiny(folder, tmp_path / "run", "--eval", "slf"))
    before = open(default["path"]).read()
    res = eval_only(
        tmp_path / "run", "--protocol", "robustssl", "--no-autoattack", "--ft-epochs", "2"
    )
    p = res["identity"]["protocol"]
    assert (
        p["name"] == "robustssl"
        and p["pretraining"] == "a-infonce"
        and p["schemes"]["slf"]["augment"]
    )
    assert p["schemes"]["slf"]["batch_size"] == 512 and p["schemes"]["aff"]["epochs"] == 2
    assert {"slf_sa", "alf_sa", "aff_sa"} <= set(res)  # robustssl runs all three, as its --mode ALL
    assert (
        open(default["path"]).read() == before
        and default["identity"]["protocol"]["name"] == "asym-rocl"
    )
    assert results_files(tmp_path / "run") == sorted([default["path"], res["path"]])
    acl = published_files(tmp_path)["acl"][0]
    robustssl = ["--eval-only", acl, "--dataset", "folder", "--data-dir", folder]
    robustssl += ["--protocol", "robustssl"]
    fails(
        robustssl,
        capsys,
        r"differ per pretraining method, and .*acl.pt does not say which: name it with "
        r"--pretraining",
    )
    fails(
        robustssl + ["--pretraining", "acl"],
        capsys,
        r"pip install pyautoattack|AutoAttack needs >= 4 classes",
    )


def test_the_finetuning_radius_is_the_protocols_not_the_first_threats(folder, tmp_path):
    A.main(tiny(folder, tmp_path / "run", "--eval", "none"))
    one = eval_only(
        tmp_path / "run", "--eval", "alf", "--eval-threats", "linf:16/255", "linf:8/255"
    )
    two = eval_only(
        tmp_path / "run", "--eval", "alf", "--eval-threats", "linf:8/255", "linf:16/255"
    )
    assert one["alf_robust"] == two["alf_robust"] and one["alf_sa"] == two["alf_sa"]
    assert one["identity"]["protocol"]["schemes"]["alf"]["eps"] == 8 / 255


def test_evaluation_gives_sigterm_back(folder, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    A.main(tiny(folder, tmp_path / "run"))
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_long_attack_and_the_guards_show_progress(monkeypatch, capsys):
    real = A.progress
    monkeypatch.setattr(A, "progress", lambda label, total, every=10.0: real(label, total, every=0))
    model, x, y, _ = linear_data(64)
    A.accuracy(
        model, x, y, 64, A.threat_attack("linf", 8 / 255, 2 / 255, 10), "SLF PGD-10 linf:8/255"
    )
    lines = (
        capsys.readouterr().out.splitlines()
    )  # one batch of 64: progress within it, step by step
    assert [re.match(r"  SLF PGD-10 linf:8/255: (\d+)/64", line).group(1) for line in lines] == [
        str(64 * k // 10) for k in range(1, 10)
    ]
    A.guards(model, x, y, 64, 8 / 255, 4)
    assert re.findall(r"guards: PGD attacks: (\d)/6", capsys.readouterr().out) == [
        "1",
        "2",
        "3",
        "4",
        "5",
    ]


def test_the_advcl_schedule_of_finetuning_is_asym_advcls():
    c10 = A.scheme_settings("asym-advcl", "both", "cifar10", None, 1024)
    assert [c10[s]["lr"] for s in A.SCHEMES] == [0.01, 0.01, 0.1]
    assert [
        A.scheme_settings("asym-advcl", "rocl", "cifar10", None, 8)[s]["lr"] for s in A.SCHEMES
    ] == [0.1] * 3
    assert c10["alf"]["attack_steps"] == 20 and c10["aff"]["attack_steps"] == 10
    assert all(
        c10[s]["epochs"] == 25
        and c10[s]["milestones"] == [15, 20]
        and c10[s]["batch_size"] == 512
        and c10[s]["augment"]
        for s in A.SCHEMES
    )


# --------------------------------------------------------------------------------------------------
# Command line: one parse, the recipes, bad input in one line on stderr (exit code 2, nothing written)
# --------------------------------------------------------------------------------------------------
def test_recipe_defaults_are_the_papers():
    args = A.configure([])[0]
    recipe = dict(
        eps=8 / 255,
        step=0.007,
        attack_steps=7,
        temperature=0.5,
        ip_alpha=0.2,
        adv_weight=1.0,
        hn_beta=1.0,
        reg_weight=1 / 256,
        width=64,
        epochs=1000,
        batch_size=512,
        warmup_epochs=10,
        wd=1e-6,
        lr=0.2,
        tau_plus=0.12,
        eval_step=2 / 255,
        eval_steps=20,
        eval_batch_size=1024,
        method="hardneg",
        hn_normalise="negatives",
        reg_forward="separate",
        protocol="asym-rocl",
        autoattack=False,
    )
    assert {k: getattr(args, k) for k in recipe} == recipe
    assert args.threats == [("linf:8/255", "linf", 8 / 255)] and args.eval == ["slf"]


@pytest.mark.parametrize(
    "dataset,method,lr,tau_plus",
    [
        ("cifar10", "hardneg", 0.2, 0.12),
        ("cifar10", "both", 0.3, 0.12),
        ("cifar10", "rocl", 0.1, 0.12),
        ("folder", "both", 0.3, 0.12),
        ("cifar100", "hardneg", 0.1, 0.1),
        ("cifar100", "both", 0.2, 0.1),
        ("cifar100", "infpos", 0.1, 0.1),
    ],
)
def test_defaults_per_data_set_follow_the_official_scripts(dataset, method, lr, tau_plus):
    args = A.configure(["--dataset", dataset, "--method", method])[0]
    assert args.lr == lr and args.tau_plus == tau_plus
    assert A.configure(["--dataset", dataset, "--method", method, "--lr", "0.05"])[0].lr == 0.05


def test_a_preset_sets_its_scale_and_given_flags_win(folder, tmp_path):
    args = A.configure(["--preset", "small", "--epochs", "2"])[0]
    assert (args.subset, args.width, args.epochs, args.eval_subset) == (5000, 8, 2, 1000)
    assert args.eval == ["slf", "alf", "aff"] and args.protocol == "asym-rocl"
    argv = ["--preset", "smoke", "--dataset", "folder", "--data-dir", folder, "--subset", "0"]
    argv += ["--eval-subset", "0"]
    A.main(argv + ["--eval", "none", "--out", str(tmp_path / "run")])
    ck = weights(tmp_path / "run" / "last.pt")[1]
    assert (ck["args"]["width"], ck["args"]["batch_size"], ck["args"]["subset"]) == (4, 32, 0)
    resumed = A.configure(["--resume", str(tmp_path / "run")])[0]  # the run's preset, inherited
    assert (resumed.width, resumed.eval_steps) == (4, 2)


def test_what_was_and_was_not_done_is_said_without_an_evaluation(folder, tmp_path, capsys):
    for argv in (
        tiny(folder, tmp_path / "run", "--eval", "none"),
        ["--resume", str(tmp_path / "run"), "--eval"],
        ["--eval-only", str(tmp_path / "run"), "--eval", "none"],
    ):
        capsys.readouterr()
        assert A.main(argv) == {}
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert "--eval none: nothing evaluated (evaluate with: python" in last, last
    assert not results_files(tmp_path / "run")


def test_a_flag_of_an_asymmetry_the_method_has_not_is_refused(folder, tmp_path, capsys):
    out = tmp_path / "run"
    for method, extra, names in (
        ("hardneg", ["--adv-weight", "2"], "--adv-weight"),
        ("rocl", ["--ip-alpha", "0.3", "--tau-plus", "0.1"], "--ip-alpha, --tau-plus"),
        ("infpos", ["--hn-beta", "2"], "--hn-beta"),
        ("simclr", ["--hn-normalise", "official"], "--hn-normalise"),
    ):
        fails(
            tiny(folder, out, "--method", method, *extra),
            capsys,
            rf"{names}: --method {method} does not use (it|them)",
            out,
        )
    labels = ["--pseudo-labels", "labels.pkl"]
    fails(
        advcl_run(folder, out, "rocl", *labels, "--adv-weight", "2"),
        capsys,
        r"--adv-weight: --method rocl does not use it on the advcl base",
        out,
    )


def test_eval_only_refuses_flags_of_pretraining(folder, tmp_path, capsys):
    A.main(tiny(folder, tmp_path / "run", "--eval", "none"))
    fails(
        [
            "--eval-only",
            str(tmp_path / "run"),
            "--method",
            "rocl",
            "--width",
            "4",
            "--epochs",
            "1000",
        ],
        capsys,
        r"--method, --width, --epochs: flags of pretraining do not apply to --eval-only; its "
        r"run's: --method "
        r"hardneg, --width 8, --epochs 1",
    )
    fails(
        ["--eval-only", str(tmp_path / "run"), "--dataset", "cifar10"],
        capsys,
        r"use --eval-dataset",
    )
    fails(
        ["--eval-only", str(tmp_path / "run"), "--resume", str(tmp_path / "run")],
        capsys,
        r"--resume continues a run and --eval-only evaluates one: pass one of them",
    )


@pytest.mark.parametrize(
    "extra,pattern",
    [
        (["--method", "bogus"], r"invalid choice: 'bogus'"),
        (["--dataset", "mnist"], r"invalid choice: 'mnist'"),
        (["--eps", "8"], r"outside \[0, 1\] \(pixels are in \[0, 1\]: did you mean 8/255\?\)"),
        (["--eps", "-0.1"], r"outside \[0, 1\]"),
        (["--eps", "eight"], r"not a number or fraction"),
        (["--eps", "8/0"], r"not a number or fraction"),
        (["--step", "1.5"], r"outside \(0, 1\]"),
        (["--eval-step", "nan"], r"not a number or fraction|outside"),
        (["--eval-step", "0"], r"--eval-step: 0 is outside \(0, 1\] \(a PGD step of 0 leaves"),
        (["--step", "0/255"], r"--step: 0/255 is outside \(0, 1\] \(a PGD step of 0"),
        (["--eval", "none", "slf"], r"--eval none slf: none and schemes; pass one of them"),
        (["--eval-threats", "l1:0.5"], r"--eval-threats l1:0.5: expected NORM:EPS"),
        (["--eval-threats", "linf:8"], r"--eval-threats linf:8: .*did you mean 8/255"),
        (["--eval-threats", "l2:"], r"not a number"),
        (["--epochs", "0"], r"must be at least 1"),
        (["--batch-size", "-8"], r"must be at least 2"),
        (["--batch-size", "1"], r"must be at least 2"),
        (["--hn-beta", "nan"], r"must be at least 0"),
        (["--adv-weight", "-1"], r"must be at least 0"),
        (["--device", "mps"], r"only cpu and cuda"),
        (["--batch-size", "1000"], r"larger than the 32 training images"),
        (["--subset", "100"], r"--subset 100 is larger than the 32 train images"),
        (["--eval-subset", "100"], r"--eval-subset 100 is larger than the 16 test images"),
        (["--epochs", "two"], r"not an integer"),
        (["--lr", "0"], r"must be above 0"),
        (["--tau-plus", "1"], r"tau-plus"),
    ],
)
def test_bad_arguments(folder, tmp_path, capsys, extra, pattern):
    fails(tiny(folder, tmp_path / "run", *extra), capsys, pattern, out=tmp_path / "run")


def test_eps_fraction_parses_exactly():
    assert A.configure(["--eps", "8/255"])[0].eps == 8 / 255 and A.configure([])[0].eps == 8 / 255
    assert A.configure(["--eps", "0.0314"])[0].eps == 0.0314


def test_autoattack_missing_is_a_clear_error(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    fails(
        tiny(folder, tmp_path / "run", "--autoattack"),
        capsys,
        r"pip install pyautoattack",
        tmp_path / "run",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu(folder, tmp_path, capsys):
    fails(
        tiny(folder, tmp_path / "run", "--device", "cuda"), capsys, r"no CUDA GPU", tmp_path / "run"
    )


@slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_the_cuda_test_switch_fails_at_once_without_a_gpu():
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", os.path.join(HERE, "test_ainfonce.py")],
        env={**os.environ, "AINFONCE_TEST_DEVICE": "cuda"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        p.returncode != 0
        and "sees no CUDA GPU" in p.stdout + p.stderr
        and " passed" not in p.stdout
    )


def test_progress_lines_and_help(capsys):
    tick = A.progress("decoding", 10, every=0)
    tick(5)
    tick(10)  # a finished phase prints nothing more
    assert re.fullmatch(
        r"  decoding: 5/10 \(\d+\.\d/s, ETA \d+:\d\d:\d\d\)\n", capsys.readouterr().out
    )
    shown = []
    tick = A.progress("epoch 1 step", 10, every=0)
    tick(3, lambda: shown.append(1) or "loss 2.5000")
    assert re.fullmatch(
        r"  epoch 1 step: 3/10 \(.*\), loss 2\.5000\n", capsys.readouterr().out
    ) and shown == [1]
    tick = A.progress("SLF finetuning, epoch", 25, every=0)
    time.sleep(1.1)
    tick(1)  # fewer than one per second (a head's epochs): seconds each, not "0.0/s"
    assert re.fullmatch(
        r"  SLF finetuning, epoch: 1/25 \(1\.\d s each, ETA \d+:\d\d:\d\d\)\n",
        capsys.readouterr().out,
    )
    tick = A.progress("epoch 1 step", 10)
    tick(4, lambda: shown.append(2) or "loss")  # not shown yet: the loss is not even computed
    assert shown == [1] and capsys.readouterr().out == ""
    with pytest.raises(SystemExit):
        A.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 8/255)" in out and "(default: 1/256)" in out and "None" not in out
    flat = " ".join(out.split())  # argparse wraps its lines where the terminal ends
    assert re.search(r"--seed SEED seed [^-]*\(default: 0\)", flat)
    assert re.search(
        r"--dataset \{cifar10,cifar100,stl10,folder\} .{0,100}?\(default: cifar10\)", flat
    )
    assert re.search(r"--method .*\n\s+rocl: symmetric", out)


def official_script(argv):
    """The pretraining flags of an official Asym-AdvCL shell script over pretraining_advCL.py's
    argparse defaults (its --tau reaches --tau_plus by argparse's prefix matching)."""
    p = argparse.ArgumentParser()
    for name, default in (
        ("learning_rate", 0.5),
        ("epoch", 1000),
        ("iter", 5),
        ("weight_decay", 1e-4),
        ("tau_plus", 0.1),
        ("beta", 1.0),
        ("adv_weight", 1.0),
        ("d_min", 0.4),
        ("stpg_degree", -1.0),
        ("stop_grad_adaptive", -1),
        ("dataset", "cifar10"),
    ):
        p.add_argument(f"--{name}", type=type(default), default=default)
    for name in ("cosine", "stop_grad", "attack_ori", "HN"):
        p.add_argument(f"--{name}", action="store_true")
    return p.parse_args(argv.split())


# Asym-AdvCL/shell/{cifar10,cifar100}/advcl*-{dataset}.sh (yqy2001/A-InfoNCE), transcribed
OFFICIAL_ADVCL_SCRIPTS = {
    "rocl": "--learning_rate 0.5 --dataset {d} --cosine --epoch 400",
    ("cifar10", "infpos"): "--dataset cifar10 --cosine --epoch 400 --stpg_degree 0.2 --stop_grad "
    "--adv_weight 1.2 --stop_grad_adaptive 30 --learning_rate 1.",
    ("cifar10", "hardneg"): "--learning_rate 1.2 --dataset cifar10 --cosine --epoch 400 "
    "--attack_ori --HN --beta 1.0 --tau_plus 0.12",
    ("cifar10", "both"): "--learning_rate 2. --dataset cifar10 --cosine --epoch 400 --stpg_degree "
    "0.2 --stop_grad --adv_weight 0.7 --stop_grad_adaptive 30 --attack_ori --HN",
    ("cifar100", "infpos"): "--learning_rate 2. --dataset cifar100 --cosine --epoch 400 "
    "--stpg_degree 0.3 --stop_grad --adv_weight 1.5 --stop_grad_adaptive 20 --d_min 0.5",
    ("cifar100", "hardneg"): "--learning_rate 2. --dataset cifar100 --cosine --epoch 400 "
    "--attack_ori --HN --beta 1. --tau_plus 0.01",
    (
        "cifar100",
        "both",
    ): "--learning_rate 2. --dataset cifar100 --cosine --epoch 400 --stpg_degree "
    "0.3 --stop_grad --adv_weight 1.5 --stop_grad_adaptive 20 --d_min 0.5 --attack_ori --HN "
    "--beta 1.0 --tau 0.01",
}


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("method", ["rocl", "infpos", "hardneg", "both"])
def test_the_advcl_recipes_are_the_official_scripts(dataset, method):
    script = OFFICIAL_ADVCL_SCRIPTS.get((dataset, method), OFFICIAL_ADVCL_SCRIPTS["rocl"])
    official = official_script(script.format(d=dataset))
    args = A.configure(["--base", "advcl", "--method", method, "--dataset", dataset])[0]
    assert (args.lr, args.epochs, args.attack_steps, args.wd) == (
        official.learning_rate,
        official.epoch,
        official.iter,
        official.weight_decay,
    )
    if method != "rocl":  # its loss writes Asym-AdvCL's blocks with adv_weight
        assert args.adv_weight == official.adv_weight
    if official.stop_grad:  # IP
        assert (args.ip_alpha, args.ip_adaptive_from, args.ip_d_min) == (
            official.stpg_degree,
            official.stop_grad_adaptive,
            official.d_min,
        )
    if official.HN:
        assert (args.tau_plus, args.hn_beta) == (official.tau_plus, official.beta)


def test_advcl_bad_input_is_one_line_and_writes_nothing(folder, tmp_path, capsys, simclr_encoder):
    out = tmp_path / "run"
    short = tmp_path / "short.pkl"
    write_pseudo_labels(short, 31, as_tensors=False)
    fails(
        advcl_run(folder, out, "both", "--pseudo-labels", str(short)),
        capsys,
        r"pseudo_train_2 has 31 labels, the data set 32 training images",
        out,
    )
    missing = tmp_path / "missing.pkl"
    write_pseudo_labels(missing, 32, as_tensors=True, ks=(2, 10, 50, 100))
    fails(
        advcl_run(folder, out, "both", "--pseudo-labels", str(missing)),
        capsys,
        r"has no pseudo_train_500 \(the AdvCL base needs K = 2, 10, 50, 100, 500\)",
        out,
    )
    fails(advcl_run(folder, out, "both"), capsys, r"--base advcl trains on pseudo-labels", out)
    fails(
        advcl_run(folder, out, "both", "--pseudo-labels", simclr_encoder, "--reg-weight", "0.1"),
        capsys,
        r"--reg-weight: RoCL's regulariser; the AdvCL base has none",
        out,
    )
    fails(
        advcl_run(folder, out, "simclr", "--pseudo-labels", simclr_encoder),
        capsys,
        r"--base advcl has no simclr",
        out,
    )
    fails(
        tiny(folder, out, "--pseudo-labels", simclr_encoder),
        capsys,
        r"--pseudo-labels: the AdvCL base's",
        out,
    )


# --------------------------------------------------------------------------------------------------
# Data and pseudo-label files
# --------------------------------------------------------------------------------------------------
def test_bad_data(tmp_path, capsys, folder):
    out = tmp_path / "run"
    fails(tiny(str(tmp_path / "nowhere"), out), capsys, r"does not exist", out)
    (tmp_path / "afile").write_text("x")
    fails(tiny(str(tmp_path / "afile"), out), capsys, r"afile is a file, not a directory", out)
    (tmp_path / "empty").mkdir()
    fails(tiny(str(tmp_path / "empty"), out), capsys, r"train is missing", out)
    shutil.copytree(folder, tmp_path / "notest")
    shutil.rmtree(tmp_path / "notest" / "test")
    fails(tiny(str(tmp_path / "notest"), out), capsys, r"test is missing", out)
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "test" / "a").mkdir(parents=True)
    fails(tiny(str(tmp_path / "noimg"), out), capsys, r"Found no valid file for the classes a", out)
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "train" / "class0" / "3.png").write_bytes(b"not an image")
    fails(tiny(str(bad), out), capsys, r"cannot read image .*class0/3\.png", out)
    from PIL import Image

    deep = tmp_path / "deep"  # 16-bit gray: converted to RGB, every pixel would be white
    shutil.copytree(folder, deep)
    Image.new("I;16", (32, 32), 300).save(deep / "train" / "class1" / "2.png")
    fails(tiny(str(deep), out), capsys, r"class1/2\.png: its pixels are 16-bit or float", out)
    shutil.copytree(folder, tmp_path / "extra")
    (tmp_path / "extra" / "test" / "class9").mkdir()
    shutil.copy(
        tmp_path / "extra" / "test" / "class0" / "0.png", tmp_path / "extra" / "test" / "class9"
    )
    fails(
        tiny(str(tmp_path / "extra"), out), capsys, r"test classes not in train/: \['class9'\]", out
    )


def test_stray_files_are_skipped_and_empty_classes_refused_as_imagefolder_does(
    folder, tmp_path, capsys
):
    d = tmp_path / "stray"
    shutil.copytree(folder, d)
    (d / "train" / "class0" / "notes.txt").write_text("not an image")
    (d / "test" / ".DS_Store").write_bytes(b"\0")
    res = A.main(tiny(str(d), tmp_path / "run"))
    assert "data: skipped 1 train files that are not images" in capsys.readouterr().out
    assert res["identity"]["data"]["n_classes"] == 2 and res["identity"]["data"]["n_train"] == 32
    (d / "train" / "class2").mkdir()
    fails(
        tiny(str(d), tmp_path / "run2"),
        capsys,
        r"Found no valid file for the classes class2",
        tmp_path / "run2",
    )


def test_images_of_another_size_are_resized(folder, tmp_path, capsys):
    from PIL import Image

    d = tmp_path / "mixed"
    shutil.copytree(folder, d)
    Image.new("RGB", (40, 28), (200, 10, 10)).save(d / "train" / "class1" / "big.png")
    A.main(tiny(str(d), tmp_path / "run", "--eval", "none"))
    assert "resized 1 train images" in capsys.readouterr().out


def test_imagefolders_quiet_choices_are_said_once(folder, tmp_path, capsys):
    from PIL import Image

    d = tmp_path / "odd"
    shutil.copytree(folder, d)
    Image.new("RGBA", (32, 32), (200, 10, 10, 7)).save(d / "train" / "class0" / "alpha.png")
    Image.new("L", (32, 32), 90).save(d / "train" / "class0" / "gray.png")
    (d / "train" / "class1" / "deeper" / "still").mkdir(parents=True)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(
        d / "train" / "class1" / "deeper" / "still" / "nested.png"
    )
    res = A.main(tiny(str(d), tmp_path / "run", "--eval", "none"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data:")]
    assert lines == [
        "data: dropped the alpha channel of 1 train images; repeated 1 grayscale train images to "
        "RGB; "
        "counted 1 train images of nested sub-folders in their class folder's class"
    ]
    assert res == {} and weights(tmp_path / "run" / "last.pt")[1]["args"]["n_classes"] == 2


@pytest.mark.parametrize("dataset,cls", [("cifar10", "CIFAR10"), ("stl10", "STL10")])
def test_offline_download(tmp_path, capsys, monkeypatch, dataset, cls):
    import urllib.error
    import torchvision

    def offline(self):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(getattr(torchvision.datasets, cls), "download", offline)
    fails(
        ["--dataset", dataset, "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "run")],
        capsys,
        rf"could not get {dataset} .* offline\? .*--dataset folder",
        tmp_path / "run",
    )


@pytest.mark.parametrize("dataset", ["cifar10", "stl10"])
def test_offline_leaves_nothing_behind(tmp_path, capsys, monkeypatch, dataset):
    import urllib.error
    import urllib.request

    def offline(*a, **kw):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    fails(
        ["--dataset", dataset, "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "run")],
        capsys,
        rf"could not get {dataset}",
        tmp_path / "run",
    )
    assert not os.path.exists(tmp_path / "d")  # torchvision made it to download into; nothing came
    (tmp_path / "mine").mkdir()
    fails(
        ["--dataset", dataset, "--data-dir", str(tmp_path / "mine")],
        capsys,
        rf"could not get {dataset}",
    )
    assert os.path.isdir(tmp_path / "mine")  # the user's own directory stays


def test_a_single_class_is_refused(tmp_path, capsys):
    one = make_folder(tmp_path / "one", classes=1)
    fails(
        tiny(one, tmp_path / "run"),
        capsys,
        r"has 1 class: classification needs at least 2",
        tmp_path / "run",
    )


def write_pseudo_labels(path, n, as_tensors, ks=A.PSEUDO_KS, seed=0):
    import pickle

    g = torch.Generator().manual_seed(seed)
    table = {f"pseudo_train_{k}": torch.randint(0, k, (n,), generator=g) for k in ks}
    if not as_tensors:  # AdvCL's file: int32 numpy arrays, and test labels too
        table = {k: v.numpy().astype("int32") for k, v in table.items()}
        table["pseudo_test_2"] = table["pseudo_train_2"][:5]
    with open(path, "wb") as f:
        pickle.dump(table, f)
    return torch.stack([torch.as_tensor(table[f"pseudo_train_{k}"]).long() for k in ks])


def test_both_official_pseudo_label_formats_are_read(tmp_path):
    import pickle

    for as_tensors in (False, True):
        path = tmp_path / f"labels-{as_tensors}.pkl"
        labels = write_pseudo_labels(path, 40, as_tensors)
        assert torch.equal(A.pseudo_label_file(str(path), 40), labels)
    table = {k: v.numpy() for k, v in zip([f"pseudo_train_{k}" for k in A.PSEUDO_KS], labels)}
    for protocol in (2, 5):  # numpy arrays as protocol 2 (_codecs) and 5 (_frombuffer) write them
        with open(tmp_path / f"p{protocol}.pkl", "wb") as f:
            pickle.dump(table, f, protocol=protocol)
        assert torch.equal(A.pseudo_label_file(str(tmp_path / f"p{protocol}.pkl"), 40), labels)
    torch.save({k: torch.as_tensor(v) for k, v in table.items()}, tmp_path / "saved.pkl")
    assert torch.equal(A.pseudo_label_file(str(tmp_path / "saved.pkl"), 40), labels)
    whole = {k: v.astype("float32") for k, v in table.items()}  # whole numbers as floats: fine
    with open(tmp_path / "whole.pkl", "wb") as f:
        pickle.dump(whole, f)
    assert torch.equal(A.pseudo_label_file(str(tmp_path / "whole.pkl"), 40), labels)


@pytest.mark.parametrize(
    "change,pattern",
    [
        (lambda t: {**t, "pseudo_train_2": types.SimpleNamespace(x=1)}, r"not a pickle of pseudo"),
        (lambda t: {**t, "pseudo_train_10": t["pseudo_train_10"] + 0.5}, r"not whole"),
        (lambda t: {**t, "pseudo_train_10": t["pseudo_train_10"] * 0 + 10}, r"outside \[-1, 10\)"),
        (lambda t: {**t, "pseudo_train_50": t["pseudo_train_50"] * 0 - 2}, r"outside \[-1, 50\)"),
        (lambda t: [1, 2], r"a dict of pseudo_train_K arrays expected"),
        (lambda t: {**t, "pseudo_train_2": "labels"}, r"pseudo_train_2 is not an array of numbers"),
        (lambda t: {**t, "pseudo_train_2": [[0, 1], [1]]}, r"not an array of numbers \(list\)"),
        (lambda t: {**t, "pseudo_train_2": t["pseudo_train_2"] > 0}, r"numbers \(bool\)"),
    ],
)
def test_a_pseudo_label_file_that_is_not_labels_is_refused_in_one_line(tmp_path, change, pattern):
    import pickle

    labels = write_pseudo_labels(tmp_path / "good.pkl", 40, as_tensors=False)
    table = {f"pseudo_train_{k}": row.numpy() for k, row in zip(A.PSEUDO_KS, labels)}
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(change(table), f)
    with pytest.raises(A.UsageError, match=pattern) as e:
        A.pseudo_label_file(str(tmp_path / "bad.pkl"), 40)
    assert "\n" not in str(e.value)


def test_a_torch_file_of_other_objects_named_pkl_is_one_line(tmp_path):
    torch.save({"pseudo_train_2": argparse.Namespace(x=1)}, tmp_path / "objects.pkl")
    with pytest.raises(A.UsageError, match=r"not a pickle of pseudo-labels") as e:
        A.pseudo_label_file(str(tmp_path / "objects.pkl"), 40)
    assert "\n" not in str(e.value)


def test_a_set_without_any_label_is_refused_at_load(folder, tmp_path, capsys):
    import pickle

    labels = write_pseudo_labels(tmp_path / "l.pkl", 32, as_tensors=False)
    table = {f"pseudo_train_{k}": row.numpy() for k, row in zip(A.PSEUDO_KS, labels)}
    table["pseudo_train_100"] = table["pseudo_train_100"] * 0 - 1
    with open(tmp_path / "none.pkl", "wb") as f:
        pickle.dump(table, f)
    out = tmp_path / "run"
    argv = advcl_run(folder, out, "both", "--pseudo-labels", str(tmp_path / "none.pkl"))
    fails(argv, capsys, r"pseudo_train_100 holds no label \(all -1\)", out)


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=g) * 10
    x = torch.cat([c + torch.randn(40, 16, generator=g) for c in centres])
    labels = A.kmeans(x, 6)
    assert all(len(labels[40 * i : 40 * (i + 1)].unique()) == 1 for i in range(6))
    assert len(labels.unique()) == 6 and torch.equal(labels, A.kmeans(x, 6))


def test_kmeans_clusters_directions_not_lengths():
    """Cosine k-means (features L2-normalised, as the labels' encoder is compared by cosine):
    two directions, each at lengths 1 and 20, give two clusters by direction, where k-means of
    the raw features would split by length."""
    g = torch.Generator().manual_seed(1)
    u, v = F.normalize(torch.randn(2, 8, generator=g), dim=1)
    points = [
        d * r + 0.01 * torch.randn(8, generator=g)
        for d in (u, v)
        for r in (1.0, 20.0)
        for _ in range(10)
    ]
    labels = A.kmeans(torch.stack(points), 2)
    assert torch.equal(labels[:20], labels[:1].expand(20)) and labels[20] != labels[0]
    assert torch.equal(labels[20:], labels[20:21].expand(20))


# --------------------------------------------------------------------------------------------------
# Checkpoints, the field's layouts, results: a number is filed under everything that made it
# --------------------------------------------------------------------------------------------------
def test_the_weights_digest_covers_parameters_and_buffers():
    net = A.ResNet18(4)
    base = A.weights_digest(net)
    with torch.no_grad():
        net.layer2[0].bn1.running_var.mul_(1.5)  # BN statistics alone
    stats = A.weights_digest(net)
    with torch.no_grad():
        net.layer2[0].conv1.weight[0, 0, 0, 0] += 1e-6
    assert len({base, stats, A.weights_digest(net)}) == 3


def field_state_dict(encoder_sd, dual=False, prefix="module."):
    """Our encoder's weights in the layouts published checkpoints use."""
    out = {}
    for k, v in encoder_sd.items():
        k = k.replace("shortcut.0.", "downsample.conv.").replace("shortcut.1.", "downsample.bn.")
        if dual and re.search(r"(bn\d?|downsample\.bn)\.", k):
            head, tail = re.match(r"(.*(?:bn\d?|downsample\.bn))\.(.*)", k).groups()
            out[f"{prefix}{head}.bn_list.1.{tail}"] = v
            out[f"{prefix}{head}.bn_list.0.{tail}"] = v * 0.5 if v.is_floating_point() else v
        else:
            out[prefix + k] = v
    out[prefix + "fc.weight"], out[prefix + "fc.bias"] = torch.randn(10, 64), torch.randn(10)
    return out


def test_field_layout_state_dicts_evaluate_exactly_as_our_checkpoint(folder, tmp_path, capsys):
    A.main(tiny(folder, tmp_path / "run", "--eval", "none"))
    strong = ["--eval-steps", "5", "--eval-step", "16/255", "--eval-threats", "linf:64/255"]
    ours = eval_only(tmp_path / "run", *strong, "--out", str(tmp_path / "ours"))
    assert ours["slf_ra"] < ours["slf_sa"]
    enc = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["encoder"]
    data = ["--dataset", "folder", "--data-dir", folder]
    torch.save({"state_dict": field_state_dict(enc)}, tmp_path / "plain.pt")
    dual = field_state_dict(enc, dual=True, prefix="encoder.")
    dual["encoder.normalize.mean"], dual["encoder.normalize.std"] = torch.zeros(3), torch.ones(
        3
    )  # ACL/DynACL's
    torch.save(dual, tmp_path / "dual.pt")
    x, reference = images(3, 8).cpu(), A.load_checkpoint(str(tmp_path / "run"))[0].eval()
    for name, ignored in (
        ("plain", 2),
        ("dual", 102),
    ):  # fc.*; and 20 BN layers x 5 tensors of the other branch
        encoder = A.load_checkpoint(str(tmp_path / f"{name}.pt"))[0].eval()
        assert f"ignored {ignored} keys" in capsys.readouterr().out
        assert torch.equal(encoder(x), reference(x))
        res = eval_only(tmp_path / f"{name}.pt", *data, *strong, "--out", str(tmp_path / name))
        assert res["weights"]["checkpoint"].endswith(f"{name}.pt")
        assert {k: res[k] for k in ("slf_sa", "slf_ra")} == {
            k: ours[k] for k in ("slf_sa", "slf_ra")
        }
    branch0 = A.load_checkpoint(str(tmp_path / "dual.pt"), {"bn_branch": 0})[0].eval()
    assert not torch.allclose(branch0(x), reference(x))
    fails(
        ["--eval-only", str(tmp_path / "plain.pt")],
        capsys,
        r"plain state dict: name its data set with --dataset",
    )
    bad = dict(field_state_dict(enc), **{"module.layer5.0.conv1.weight": torch.zeros(1)})
    torch.save(bad, tmp_path / "bad.pt")
    fails(
        ["--eval-only", str(tmp_path / "bad.pt"), *data],
        capsys,
        r"does not match the model .*unexpected layer5",
    )
    torch.save({"net": {"features.0.weight": torch.zeros(1)}}, tmp_path / "alien.pt")
    fails(
        ["--eval-only", str(tmp_path / "alien.pt"), *data],
        capsys,
        r"neither an ainfonce checkpoint nor .*layout",
    )


def resnet18_tensors(width, seed):
    """Random weights and BN statistics of a CIFAR ResNet-18 under canonical names (conv1, bn1,
    layerI.J.conv1/bn1/ conv2/bn2, layerI.0.down.conv/bn), written from the architecture, not from
    ainfonce's modules."""
    g, t = torch.Generator().manual_seed(seed), {}

    def conv(name, cout, cin, k):
        t[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5

    def bn(name, c):
        t.update(
            {
                f"{name}.weight": torch.rand(c, generator=g) + 0.5,
                f"{name}.bias": torch.randn(c, generator=g) * 0.1,
                f"{name}.running_mean": torch.randn(c, generator=g) * 0.1,
                f"{name}.running_var": torch.rand(c, generator=g) + 0.5,
                f"{name}.num_batches_tracked": torch.tensor(7),
            }
        )

    conv("conv1", width, 3, 3)
    bn("bn1", width)
    chans = [width, width, 2 * width, 4 * width, 8 * width]
    for i in range(1, 5):
        for j in range(2):
            p, cin, cout = f"layer{i}.{j}", chans[i - 1] if j == 0 else chans[i], chans[i]
            conv(f"{p}.conv1", cout, cin, 3), bn(f"{p}.bn1", cout)
            conv(f"{p}.conv2", cout, cout, 3), bn(f"{p}.bn2", cout)
            if j == 0 and i > 1:
                conv(f"{p}.down.conv", cout, cin, 1), bn(f"{p}.down.bn", cout)
    return t


def reference_features(t, x, padding=1, mean=None, std=None):
    """The ResNet-18 forward in eval mode, in plain functional ops on canonical names (not
    ainfonce's model)."""
    if mean is not None:
        x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    bn = lambda h, n: F.batch_norm(
        h,
        t[f"{n}.running_mean"],
        t[f"{n}.running_var"],
        t[f"{n}.weight"],
        t[f"{n}.bias"],
        False,
        0.0,
        1e-5,
    )
    h = F.relu(bn(F.conv2d(x, t["conv1.weight"], padding=padding), "bn1"))
    for i in range(1, 5):
        for j in range(2):
            p, stride = f"layer{i}.{j}", 2 if i > 1 and j == 0 else 1
            o = F.relu(
                bn(F.conv2d(h, t[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1")
            )
            o = bn(F.conv2d(o, t[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            h = F.relu(
                o
                + (
                    bn(F.conv2d(h, t[f"{p}.down.conv.weight"], stride=stride), f"{p}.down.bn")
                    if f"{p}.down.conv.weight" in t
                    else h
                )
            )
    return h.mean((2, 3))


def in_layout(branches, down, bn_list=True):
    """Canonical tensors -> a repository's names: BN branches [{canonical: tensor}] as bn_list.K (or
    one plain BN), the downsampling branch as `down` ("shortcut.0/1", "downsample.conv/bn",
    "downsample.0/1")."""
    out = {}
    for k, t in enumerate(branches):
        for name, v in t.items():
            name = name.replace("down.conv", down[0]).replace("down.bn", down[1])
            is_bn = re.search(r"(bn\d|downsample\.bn|downsample\.1|shortcut\.1)\.[a-z_]+$", name)
            if is_bn and bn_list:
                head, tail = name.rsplit(".", 1)
                out[f"{head}.bn_list.{k}.{tail}"] = v
            elif not is_bn or k == 0:
                out[name] = v
    return out


IMAGENET = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


CIFAR = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.247, 0.243, 0.261])


def published_files(tmp_path, width=8):
    """A file in each published layout (README, Published checkpoints), saved the way
    each repository's training script saves it -> {name: (path, tensors of the encoder to evaluate,
    stem padding, normalisation)}."""

    def branches(seed, n):  # one set of weights, n sets of BN statistics
        base, out = resnet18_tensors(width, seed), []
        for k in range(n):
            other = resnet18_tensors(width, seed * 10 + k + 1)
            out.append(
                {
                    n_: (other[n_] if re.search(r"bn\d?\.|down\.bn\.", n_) else v)
                    for n_, v in base.items()
                }
            )
        return out

    heads = lambda prefix, names: {f"{prefix}{n}.weight": torch.randn(3, 8 * width) for n in names}
    acl = branches(1, 2)
    files = {
        "rocl": (
            {
                "epoch": 1,
                "acc": 0.0,
                "optimizer_state": {},
                "rng_state": torch.get_rng_state(),
                "model": {
                    f"module.{k}": v
                    for k, v in in_layout(
                        branches(0, 1), ("shortcut.0", "shortcut.1"), bn_list=False
                    ).items()
                },
            },
            branches(0, 1)[0],
            1,
            None,
        ),
        "acl": (
            {
                "epoch": 1,
                "optim": {},
                "state_dict": {
                    **in_layout(acl, ("downsample.conv", "downsample.bn")),
                    "normalize.mean": IMAGENET[0],
                    "normalize.std": IMAGENET[1],
                    **heads("fc.", ["fc1", "fc2"]),
                },
            },
            acl[1],
            1,
            IMAGENET,
        ),
        "acl-single": (
            {
                "epoch": 1,
                "optim": {},
                "state_dict": {
                    **in_layout(acl[:1], ("downsample.conv", "downsample.bn")),
                    "normalize.mean": IMAGENET[0],
                    "normalize.std": IMAGENET[1],
                },
            },
            acl[0],
            1,
            IMAGENET,
        ),
    }
    advcl = branches(2, 3)
    files["advcl"] = (
        {
            "epoch": 1,
            "rng_state": torch.get_rng_state(),
            "model": {
                f"module.{k}": v
                for k, v in {
                    **in_layout(advcl, ("downsample.conv", "downsample.bn")),
                    **heads("", ["fc_002", "fc_500", "head_ce.0", "head_proj.3", "head_pred.0"]),
                }.items()
            },
        },
        advcl[1],
        1,
        None,
    )
    dyn_q, dyn_k = branches(3, 2), branches(4, 2)
    norm = {"normalize.mean": IMAGENET[0], "normalize.std": IMAGENET[1]}
    files["dynacl"] = (
        {
            "epoch": 1,
            "optim": {},
            "state_dict": {
                **{
                    f"encoder_q.{k}": v
                    for k, v in {
                        **in_layout(dyn_q, ("downsample.conv", "downsample.bn")),
                        **norm,
                    }.items()
                },
                **{
                    f"encoder_k.{k}": v
                    for k, v in {
                        **in_layout(dyn_k, ("downsample.conv", "downsample.bn")),
                        **norm,
                    }.items()
                },
            },
        },
        dyn_k[1],
        1,
        IMAGENET,
    )
    pp = branches(5, 1)
    files["dynacl++"] = (
        {
            "epoch": 1,
            "optim": {},
            "state_dict": {
                **in_layout(pp, ("downsample.0", "downsample.1"), bn_list=False),
                **norm,
                **heads("", ["fc"]),
            },
        },
        pp[0],
        1,
        IMAGENET,
    )
    student, teacher = branches(6, 1), branches(7, 1)
    solo = lambda prefix, t: {
        f"{prefix}{k}": v
        for k, v in {
            **in_layout(t, ("downsample.0", "downsample.1"), bn_list=False),
            "normalize.mean": CIFAR[0],
            "normalize.std": CIFAR[1],
        }.items()
    }
    files["deacl"] = (
        {
            "epoch": 99,
            "global_step": 1,
            "pytorch-lightning_version": "1.6.0",
            "state_dict": {
                **solo("backbone.", student),
                **solo("momentum_backbone.", teacher),
                **heads("", ["classifier", "classifier_adv"]),
            },
        },
        student[0],
        2,
        CIFAR,
    )
    files["deacl-backbone"] = ({"state_dict": solo("backbone.", student)}, student[0], 2, CIFAR)
    # RobustSSL's finetuned files (Vanilla_Finetuning/utils.py save_checkpoint): its
    # models/resnet.py always holds
    # ImageNet normalize buffers; its SLF/ALF models of AdvCL and A-InfoNCE are built with
    # do_normalize=0
    finetuned = branches(8, 1)
    files["robustssl-advcl-slf"] = (
        {
            "state_dict": {
                **in_layout(finetuned, ("downsample.0", "downsample.1"), bn_list=False),
                **norm,
                **heads("", ["fc"]),
            }
        },
        finetuned[0],
        1,
        None,
    )
    files["robustssl-acl-aff"] = (
        {
            "state_dict": {
                **in_layout(finetuned, ("downsample.0", "downsample.1"), bn_list=False),
                **norm,
                **heads("", ["fc"]),
            }
        },
        finetuned[0],
        1,
        IMAGENET,
    )
    dual = branches(
        9, 2
    )  # a file whose only state dict is state_dict_dual (RobustSSL looks there first)
    files["state-dict-dual"] = (
        {
            "epoch": 1,
            "state_dict_dual": {**in_layout(dual, ("downsample.conv", "downsample.bn")), **norm},
        },
        dual[1],
        1,
        IMAGENET,
    )
    wrapped = branches(10, 2)  # DynACL's model.pt saved from DataParallel(torch.compile(model))
    files["dynacl-wrapped"] = (
        {
            "epoch": 1,
            "state_dict": {
                f"module._orig_mod.{prefix}.{k}": v
                for prefix in ("encoder_q", "encoder_k")
                for k, v in {
                    **in_layout(wrapped, ("downsample.conv", "downsample.bn")),
                    **norm,
                }.items()
            },
        },
        wrapped[1],
        1,
        IMAGENET,
    )
    out = {}
    for name, (ck, t, padding, norm) in files.items():
        torch.save(ck, tmp_path / f"{name}.pt")
        out[name] = (str(tmp_path / f"{name}.pt"), t, padding, norm)
    return out


def test_every_published_layout_loads_to_its_own_encoder(tmp_path, capsys):
    x = images(4, 6).cpu()
    flags = {
        "dynacl++": dict(stem_padding=1, normalise="inside"),
        "deacl-backbone": dict(stem_padding=2),
        "robustssl-advcl-slf": dict(stem_padding=1, normalise="none"),
        "robustssl-acl-aff": dict(stem_padding=1, normalise="inside"),
    }
    expect = {
        "rocl": (1, None, []),
        "acl": (1, 1, ["bn_list.0", "fc"]),
        "acl-single": (1, 0, []),
        "advcl": (1, 1, ["bn_list.0", "bn_list.2", "fc_002", "head_ce"]),
        "dynacl": (1, 1, ["encoder_q", "bn_list.0"]),
        "dynacl++": (1, None, ["fc"]),
        "deacl": (2, None, ["momentum_backbone", "classifier", "classifier_adv"]),
        "deacl-backbone": (2, None, []),
        "robustssl-advcl-slf": (1, None, ["fc", "normalize"]),
        "robustssl-acl-aff": (1, None, ["fc"]),
        "state-dict-dual": (1, 1, ["bn_list.0"]),
        "dynacl-wrapped": (1, 1, ["encoder_q", "bn_list.0"]),
    }
    layouts = {"advcl": "advcl", "dynacl": "dynacl", "dynacl-wrapped": "dynacl", "deacl": "deacl"}
    for name, (path, t, padding, norm) in published_files(tmp_path).items():
        encoder, read, ck, _ = A.load_checkpoint(path, flags.get(name, {}))
        ref = reference_features(t, x, padding, *(norm or (None, None)))
        with torch.no_grad():
            ours = encoder.eval()(x)
        assert ck is None and ((ours - ref).abs().max() / ref.abs().max()) < 1e-4, name
        assert (read["stem_padding"], read["bn_branch"]) == expect[name][
            :2
        ] and encoder.conv1.padding == (padding,) * 2
        assert set(expect[name][2]) <= set(read["ignored"]), (name, read["ignored"])
        assert read["layout"] == layouts.get(name, "other") and read["normalise_inside"] == (
            norm is not None
        )
        assert read["encoder"] == {"dynacl": "encoder_k", "dynacl-wrapped": "encoder_k"}.get(
            name, read["encoder"]
        )
        assert f"stem padding {padding}" in capsys.readouterr().out
    for name in (
        "dynacl++",
        "deacl-backbone",
    ):  # torchvision-style names without a solo-learn Lightning container
        with pytest.raises(
            A.UsageError, match=r"torchvision-style keys .* pass --stem-padding 2 or 1"
        ):
            A.load_checkpoint(str(tmp_path / f"{name}.pt"))
    with pytest.raises(
        A.UsageError,
        match=r"RobustSSL's SLF/ALF files of AdvCL and A-InfoNCE hold them unused: "
        r"pass --normalise inside or none",
    ):
        A.load_checkpoint(str(tmp_path / "robustssl-advcl-slf.pt"), {"stem_padding": 1})


@pytest.mark.parametrize(
    "name,flags,pattern",
    [
        (
            "rocl",
            {"stem_padding": 2},
            r"--stem-padding 2: .*rocl.pt holds a stem its key names fix",
        ),
        ("advcl", {"stem_padding": 2}, r"--stem-padding 2: .* holds a stem its key names fix"),
        ("dynacl", {"stem_padding": 2}, r"--stem-padding 2: .* holds a stem its key names fix"),
        ("deacl", {"stem_padding": 1}, r"--stem-padding 1: .* holds a stem its key names fix"),
        ("rocl", {"bn_branch": 1}, r"--bn-branch 1: .* holds one set of BN statistics"),
        ("acl-single", {"bn_branch": 1}, r"--bn-branch 1: .* holds BN branches \[0\]: leave"),
        (
            "acl",
            {"normalise": "none"},
            r"--normalise none: .* holds normalize.mean/std that its layout applies",
        ),
        (
            "deacl-backbone",
            {"stem_padding": 2, "normalise": "none"},
            r"--normalise none: .* that its layout applies",
        ),
        ("advcl", {"normalise": "inside"}, r"--normalise inside: .* holds no normalize.mean/std"),
    ],
)
def test_a_reading_flag_that_contradicts_the_file_is_refused(tmp_path, name, flags, pattern):
    files = published_files(tmp_path)
    with pytest.raises(A.UsageError, match=pattern):
        A.load_checkpoint(files[name][0], flags)


@pytest.mark.parametrize(
    "name,flags",
    [
        ("rocl", dict(stem_padding=1)),
        ("acl", dict(stem_padding=1)),
        ("acl", dict(stem_padding=1, bn_branch=1, normalise="inside")),  # all of RobustSSL's flags
        ("acl-single", dict(bn_branch=0)),
        ("advcl", dict(stem_padding=1, normalise="none")),
        ("dynacl", dict(stem_padding=1, bn_branch=1)),
        ("deacl", dict(stem_padding=2)),
        ("deacl", dict(stem_padding=2, normalise="inside")),
        ("state-dict-dual", dict(stem_padding=1)),
        ("dynacl++", dict(stem_padding=1, normalise="inside")),
        ("robustssl-acl-aff", dict(stem_padding=1, normalise="inside")),
        ("robustssl-advcl-slf", dict(stem_padding=1, normalise="none")),
    ],
)
def test_a_reading_flag_that_agrees_with_the_file_is_accepted(tmp_path, name, flags):
    """A user who evaluates many published files with the same flags is not refused for telling
    the truth: the encoder read with them is the repository's own."""
    path, t, padding, norm = published_files(tmp_path)[name]
    x = images(4, 6).cpu()
    encoder = A.load_checkpoint(path, flags)[0].eval()
    ref = reference_features(t, x, padding, *(norm or (None, None)))
    with torch.no_grad():
        assert ((encoder(x) - ref).abs().max() / ref.abs().max()) < 1e-4


def test_a_reading_flag_on_our_own_checkpoint_is_accepted_where_it_agrees(folder, tmp_path):
    A.main(tiny(folder, tmp_path / "run", "--eval", "none"))
    run = str(tmp_path / "run")
    read = A.load_checkpoint(run, {"stem_padding": 1, "normalise": "none"})[1]
    assert read["layout"] == "ainfonce" and read["stem_padding"] == 1
    for flags in ({"stem_padding": 2}, {"normalise": "inside"}, {"bn_branch": 1}):
        with pytest.raises(A.UsageError, match=r"is an ainfonce checkpoint .*: leave --"):
            A.load_checkpoint(run, flags)


def test_unreadable_checkpoints_say_what_to_do(folder, tmp_path):
    A.main(tiny(folder, tmp_path / "run", "--eval", "none"))
    last = tmp_path / "run" / "last.pt"
    (tmp_path / "broken.pt").write_bytes(open(last, "rb").read()[:2000])
    with pytest.raises(
        A.UsageError,
        match=r"broken.pt is not a readable checkpoint: corrupt or truncated "
        r"\(RuntimeError\); restore a copy of it",
    ):
        A.load_checkpoint(str(tmp_path / "broken.pt"))
    ck = torch.load(last, weights_only=True)
    torch.save(
        {"state_dict": field_state_dict(ck["encoder"]), "args": argparse.Namespace(lr=0.1)},
        tmp_path / "objects.pt",
    )  # as RoCL-era scripts save their argparse arguments
    with pytest.raises(A.UsageError) as e:
        A.load_checkpoint(str(tmp_path / "objects.pt"))
    message = str(e.value)
    assert "argparse.Namespace" in message and "state_dict()" in message  # what, and what to do
    assert "weights_only=False" not in message and "pickle.load" not in message


class Payload:
    """A crafted checkpoint's object: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_a_crafted_file_runs_nothing_and_no_message_offers_to_unpickle_it(folder, tmp_path, capsys):
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Payload(str(marker))}, crafted)
    argv = ["--eval-only", str(crafted), "--dataset", "folder", "--data-dir", folder]
    fails(argv, capsys, r"crafted.pt holds (posix|os)\.system, which a weights-only")
    for flag in ("--pseudo-labels", "--transfer-from"):
        extra = ["--base", "advcl", "--method", "both"] if flag == "--pseudo-labels" else []
        with pytest.raises(SystemExit) as e:
            A.main(tiny(folder, tmp_path / "run", *extra, flag, str(crafted)))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "weights_only=False" not in err and "system" in err, err
    assert not marker.exists()


def test_a_projector_file_is_refused_naming_its_own_keys(tmp_path):
    """RoCL saves its projector apart, in the container of its model files (utils.py checkpoint
    with save_name_add='_projector'): the refusal names the projector's keys, not the
    container's."""
    projector = {
        "module.linear_1.weight": torch.zeros(2048, 512),
        "module.linear_1.bias": torch.zeros(2048),
    }
    ck = {
        "epoch": 1,
        "acc": 0.0,
        "model": projector,
        "optimizer_state": {},
        "rng_state": torch.get_rng_state(),
    }
    torch.save(ck, tmp_path / "ckpt.t7rocl_0_projector")
    with pytest.raises(A.UsageError, match=r"keys: module\.linear_1\.weight") as e:
        A.load_checkpoint(str(tmp_path / "ckpt.t7rocl_0_projector"))
    assert "rng_state" not in str(e.value)


def test_a_padding_2_file_is_never_evaluated_with_a_padding_1_stem(folder, tmp_path, capsys):
    files = published_files(tmp_path)
    path, t, _, norm = files["deacl"]
    x = images(5, 6).cpu()
    with torch.no_grad():
        assert not torch.allclose(
            reference_features(t, x, 1, *norm), reference_features(t, x, 2, *norm), rtol=1e-2
        )
    fails(
        ["--eval-only", files["deacl-backbone"][0], "--dataset", "folder", "--data-dir", folder],
        capsys,
        r"pass --stem-padding 2 or 1",
    )
    res = eval_only(
        path, "--dataset", "folder", "--data-dir", folder, "--out", str(tmp_path / "deacl")
    )
    read = res["read"]
    assert (
        read["stem_padding"] == 2
        and read["encoder"] == "backbone"
        and 0 <= res["slf_ra"] <= res["slf_sa"] <= 1
    )
    assert read["ignored"]["momentum_backbone"] == 122  # the teacher: 20 convs/BNs, 122 tensors
    saved = only_results(tmp_path / "deacl")
    assert (
        saved["identity"]["weights"]["stem_padding"] == 2 and saved["identity"] == res["identity"]
    )


def test_bn_branches_are_read_from_the_file_or_named(tmp_path):
    files = published_files(tmp_path)
    assert (
        A.load_checkpoint(files["acl-single"][0])[1]["bn_branch"] == 0
    )  # the only branch: no flag needed
    with pytest.raises(A.UsageError, match=r"holds BN branches \[0, 1\]: pass one of them"):
        A.load_checkpoint(files["acl"][0], {"bn_branch": 2})
    with pytest.raises(A.UsageError, match=r"one set of BN statistics .* leave --bn-branch out"):
        A.load_checkpoint(files["rocl"][0], {"bn_branch": 1})
    ck = torch.load(files["advcl"][0], weights_only=True)
    ck["model"] = {k: v for k, v in ck["model"].items() if ".bn_list.1." not in k}
    torch.save(ck, tmp_path / "no-pgd.pt")
    with pytest.raises(
        A.UsageError, match=r"holds BN branches \[0, 2\], none of them 1 .* --bn-branch"
    ):
        A.load_checkpoint(str(tmp_path / "no-pgd.pt"))


def test_corrupt_and_mismatched_checkpoints(folder, tmp_path, capsys):
    run = tmp_path / "run"
    A.main(tiny(folder, run, "--eval", "none"))
    ck = torch.load(run / "last.pt", weights_only=True)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(run / "last.pt", "rb").read()[:1000])
    fails(["--eval-only", str(truncated)], capsys, r"not a readable checkpoint")
    fails(["--resume", str(truncated)], capsys, r"not a readable checkpoint")
    torch.save(
        dict(ck, encoder={f"module.{k}": v for k, v in ck["encoder"].items()}),
        tmp_path / "prefixed.pt",
    )
    fails(
        ["--eval-only", str(tmp_path / "prefixed.pt")],
        capsys,
        r"encoder does not match .*missing conv1\.weight",
    )
    torch.save(dict(ck, args=dict(ck["args"], width=16)), tmp_path / "wider.pt")
    fails(
        ["--eval-only", str(tmp_path / "wider.pt")],
        capsys,
        r"conv1\.weight \(8, 3, 3, 3\) vs \(16, 3, 3, 3\)",
    )
    torch.save({k: v for k, v in ck.items() if k != "history"}, tmp_path / "old.pt")
    fails(
        ["--eval-only", str(tmp_path / "old.pt")],
        capsys,
        r"not a complete ainfonce checkpoint: it lacks \['history'\]",
    )
    fails(["--eval-only", str(tmp_path / "missing.pt")], capsys, r"no checkpoint at")
    torch.save({"state_dict": field_state_dict(ck["encoder"])}, tmp_path / "plain.pt")
    fails(
        ["--resume", str(tmp_path / "plain.pt")],
        capsys,
        r"plain state dict: --resume needs an ainfonce checkpoint",
    )


def test_eval_only_evaluates_under_the_runs_protocol_and_never_changes_its_numbers(
    folder, tmp_path, capsys
):
    run = A.main(
        tiny(
            folder,
            tmp_path / "run",
            "--eval-subset",
            "10",
            "--batch-size",
            "4",
            "--attack-steps",
            "1",
        )
    )
    before = open(run["path"]).read()
    capsys.readouterr()
    same = eval_only(tmp_path / "run")  # the run's own protocol: its 10 test images, its settings
    out = capsys.readouterr().out
    assert "nothing to do" in out and same == json.loads(json.dumps(run))
    # the numbers it holds are shown again, from their file
    assert f"SLF: SA {100 * run['slf_sa']:.2f}%" in out and f", from {run['path']}" in out
    other = eval_only(tmp_path / "run", "--eval-subset", "0")  # another protocol: another file
    assert open(run["path"]).read() == before and results_files(tmp_path / "run") == sorted(
        [run["path"], other["path"]]
    )
    assert (
        other["identity"]["data"]["n_test"] == 16
        and other["identity"]["weights"] == run["identity"]["weights"]
    )
    assert other["training"] == run["training"] and other["training"]["args"]["attack_steps"] == 1


def test_eval_only_finds_moved_data_and_checks_classes(folder, tmp_path, capsys, monkeypatch):
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    rel = os.path.relpath(moved)
    A.main(tiny(rel, tmp_path / "run", "--eval", "none"))
    shutil.move(str(moved), tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    fails(["--eval-only", str(tmp_path / "run")], capsys, r"data directory .*moved does not exist")
    fails(
        ["--eval-only", str(tmp_path / "run")],
        capsys,
        r"came from the checkpoint's --data-dir\): pass --data-dir",
    )
    res = eval_only(tmp_path / "run", "--data-dir", str(tmp_path / "elsewhere"))
    assert 0 <= res["slf_sa"] <= 1
    three = make_folder(tmp_path / "three", classes=3)
    fails(
        ["--eval-only", str(tmp_path / "run"), "--data-dir", three],
        capsys,
        r"has 3 classes, .* had 2: .*--eval-dataset",
    )


def test_evaluating_an_unfinished_run_never_changes_what_the_finished_run_reports(
    folder, tmp_path, monkeypatch, capsys
):
    full = A.main(tiny(folder, tmp_path / "full", "--epochs", "2"))
    real = A.lr_at

    def cut(step, *a):  # Ctrl-C in the middle of epoch 2 (step 5 of 8); --ckpt-every 1 saved step 5
        if step == 5:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(A, "lr_at", cut)
    with pytest.raises(SystemExit):
        A.main(tiny(folder, tmp_path / "run", "--epochs", "2", "--ckpt-every", "1"))
    monkeypatch.setattr(A, "lr_at", real)
    capsys.readouterr()
    early = eval_only(tmp_path / "run")  # the run's own protocol, on unfinished weights
    assert "holds epoch 1 of 2 (step 5): not the end of its run" in capsys.readouterr().out
    assert early["weights"]["final"] is False and early["weights"]["step"] == 5
    assert results_files(tmp_path / "run") == [early["path"]]
    done = A.main(["--resume", str(tmp_path / "run")])
    assert (
        "SLF: SA" in capsys.readouterr().out
    )  # evaluated again, on the final weights, into their own file
    assert done["weights"]["final"] and results_files(tmp_path / "run") == sorted(
        [early["path"], done["path"]]
    )
    assert done["identity"] == full["identity"] != early["identity"]
    assert scheme_keys(done) == scheme_keys(full) == scheme_keys(on_disk(done))
    # a file whose identity is not its name's (edited by hand) is refused, never used or rewritten
    poisoned = dict(on_disk(done), slf_sa=0.07)
    poisoned["identity"]["weights"]["digest"] = "0" * 16
    with open(done["path"], "w") as f:
        f.write(json.dumps(poisoned))
    fails(["--eval-only", str(tmp_path / "run")], capsys, r"holds numbers of another identity")
    assert json.load(open(done["path"])) == poisoned


def test_a_live_owner_is_refused_and_a_dead_ones_lock_is_taken_over(folder, tmp_path, capsys):
    out = tmp_path / "run"
    A.main(tiny(folder, out))
    assert open(out / ".lock").read() == ""  # a clean exit releases it
    before = {name: open(out / name, "rb").read() for name in os.listdir(out)}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
            "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 on elsewhere'); f.flush(); "
            "print('locked', flush=True); time.sleep(120)",
            str(out / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    fails(
        tiny(folder, out), capsys, r"run is in use by pid 4242 on elsewhere: wait for it to end"
    )  # not "holds a run"
    fails(
        tiny(folder, out, "--overwrite"),
        capsys,
        r"run is in use by pid 4242 on elsewhere: wait for it to end",
    )
    fails(
        ["--eval-only", str(out), "--eval-threats", "l2:0.5"],
        capsys,
        r"run is in use by pid 4242 on elsewhere",
    )
    fails(["--resume", str(out)], capsys, r"run is in use by pid 4242")
    after = {name: open(out / name, "rb").read() for name in os.listdir(out)}
    assert {k: v for k, v in after.items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }
    holder.kill()
    holder.wait()  # died holding the lock: its line stays in the file, the flock is gone
    res = eval_only(out, "--eval-threats", "l2:0.5")
    assert (
        "taking over the lock of pid 4242 on elsewhere" in capsys.readouterr().out
        and 0 <= res["slf_sa"] <= 1
    )
    assert open(out / ".lock").read() == ""
    # a directory copied while its owner ran: the copied line names a live process that holds no
    # lock here
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (out / ".lock").write_text(
        f"pid {sleeper.pid} on {socket.gethostname()} since 2026-01-01 00:00:00"
    )
    eval_only(out, "--eval-threats", "l2:0.25")
    sleeper.kill()
    sleeper.wait()
    assert (
        f"names pid {sleeper.pid} on {socket.gethostname()} since 2026-01-01 00:00:00, which is "
        f"running but does "
        f"not hold the lock (a copied directory?)" in capsys.readouterr().out
    )


@slow
@cpu_only
def test_two_runs_started_together_on_one_out_do_not_mix(folder, tmp_path):
    argv = lambda method, seed: tiny(
        folder, tmp_path / "run", "--method", method, "--seed", seed, "--epochs", "2"
    )
    procs = [launch(argv("hardneg", "0")), launch(argv("rocl", "1"))]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    # the loser meets the winner's lock (its line is written right after the lock is taken) or its
    # checkpoint
    assert re.search(r"in use by pid \d+ on|already holds a run", outs[loser][1]), outs[loser][1]
    method = ("hardneg", "rocl")[winner]
    res = only_results(tmp_path / "run")
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert (
        res["training"]["args"]["method"]
        == ck["args"]["method"]
        == config["args"]["method"]
        == method
    )


def test_an_unwritable_output_fails_before_training(folder, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    fails(
        tiny(folder, tmp_path / "file" / "run"), capsys, r"cannot write to .*(?i:not a directory)"
    )


def test_other_images_under_the_same_name_get_their_own_numbers(folder, tmp_path, capsys):
    run = A.main(tiny(folder, tmp_path / "run", "--eval", "slf"))
    other = make_folder(
        tmp_path / "other", classes=2, seed=5
    )  # same class names and count, other images
    res = eval_only(tmp_path / "run", "--eval-dataset", "folder", "--eval-data-dir", other)
    assert "nothing to do" not in capsys.readouterr().out and res["path"] != run["path"]
    for split in ("train", "test"):
        assert res["identity"]["data"][split] != run["identity"]["data"][split]
    assert res["identity"]["data"]["dir"] == os.path.realpath(other)
    alf = eval_only(
        tmp_path / "run", "--eval-dataset", "folder", "--eval-data-dir", other, "--eval", "alf"
    )
    assert alf["path"] == res["path"] and "alf_sa" not in on_disk(
        run
    )  # a new scheme joins its own data's file
    assert on_disk(run) == json.loads(json.dumps({k: v for k, v in run.items() if k != "path"}))


def test_two_encoders_evaluated_into_one_folder_keep_both_numbers(folder, tmp_path):
    (tmp_path / "ckpts").mkdir()
    for method in ("rocl", "hardneg"):
        A.main(tiny(folder, tmp_path / method, "--method", method, "--eval", "none"))
        encoder = torch.load(tmp_path / method / "last.pt", weights_only=True)["encoder"]
        torch.save({"state_dict": field_state_dict(encoder)}, tmp_path / "ckpts" / f"{method}.pt")
    data = ["--dataset", "folder", "--data-dir", folder]
    first = eval_only(tmp_path / "ckpts" / "rocl.pt", *data)
    second = eval_only(tmp_path / "ckpts" / "hardneg.pt", *data)
    assert results_files(tmp_path / "ckpts") == sorted([first["path"], second["path"]])
    assert (
        on_disk(first)["slf_sa"] == first["slf_sa"]
        and on_disk(second)["slf_sa"] == second["slf_sa"]
    )


def test_weights_that_differ_only_in_bn_statistics_or_stem_get_their_own_numbers(tmp_path, folder):
    files = published_files(tmp_path)
    data = ["--dataset", "folder", "--data-dir", folder, "--out", str(tmp_path / "out")]
    two = eval_only(files["deacl-backbone"][0], "--stem-padding", "2", *data)
    one = eval_only(
        files["deacl-backbone"][0], "--stem-padding", "1", "--normalise", "inside", *data
    )  # another
    # network from the same tensors
    assert one["path"] != two["path"] and one["identity"]["weights"]["stem_padding"] == 1
    ck = torch.load(files["rocl"][0], weights_only=True)
    before = eval_only(files["rocl"][0], *data)
    ck["model"]["module.bn1.running_var"] = (
        ck["model"]["module.bn1.running_var"] * 2
    )  # BN statistics alone
    torch.save(ck, files["rocl"][0])
    after = eval_only(files["rocl"][0], *data)
    assert after["identity"]["weights"]["digest"] != before["identity"]["weights"]["digest"]
    assert len(results_files(tmp_path / "out")) == 4


def test_a_transfer_source_is_known_by_its_weights_not_its_path(folder, tmp_path, capsys):
    A.main(tiny(folder, tmp_path / "run", "--eval", "none"))
    A.main(tiny(folder, tmp_path / "a", "--eval", "none", "--method", "rocl"))
    A.main(tiny(folder, tmp_path / "b", "--eval", "none", "--method", "infpos"))
    shutil.copytree(tmp_path / "a", tmp_path / "src")
    first = eval_only(tmp_path / "run", "--transfer-from", str(tmp_path / "src"))
    shutil.rmtree(tmp_path / "src")
    shutil.copytree(tmp_path / "b", tmp_path / "src")  # the same path, other weights
    capsys.readouterr()
    second = eval_only(tmp_path / "run", "--transfer-from", str(tmp_path / "src"))
    assert "nothing to do" not in capsys.readouterr().out and second["path"] != first["path"]
    assert second["identity"]["transfer"]["digest"] != first["identity"]["transfer"]["digest"]
    fails(
        ["--eval-only", str(tmp_path / "run"), "--transfer-from", str(tmp_path / "nowhere")],
        capsys,
        r"--transfer-from: no checkpoint at .*nowhere",
    )


def test_the_reading_flags_read_the_transfer_source_where_no_other_file_is_named(
    folder, tmp_path, capsys
):
    A.main(tiny(folder, tmp_path / "a", "--eval", "none", "--method", "rocl"))
    encoder = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["encoder"]
    # torchvision-style keys (downsample.0/1): only --stem-padding says how its stem was written
    tv = {k.replace("shortcut.", "downsample."): v for k, v in encoder.items()}
    torch.save({"state_dict": tv}, tmp_path / "tv.pt")
    source = ["--transfer-from", str(tmp_path / "tv.pt")]
    fails(tiny(folder, tmp_path / "run", *source), capsys, r"pass --stem-padding 2 or 1")
    res = A.main(tiny(folder, tmp_path / "run", *source, "--stem-padding", "1", "--eval", "slf"))
    assert res["identity"]["transfer"]["stem_padding"] == 1 and 0 <= res["slf_ra_transfer"] <= 1
    # the run's evaluation again, and another scheme: the source read with the run's flag
    again = eval_only(tmp_path / "run", "--eval", "slf", "alf")
    assert again["path"] == res["path"] and "alf_sa" in again
    # an encoder of k-means pseudo-labels is read with them too
    labels = ["--pseudo-labels", str(tmp_path / "tv.pt"), "--stem-padding", "1", "--eval", "none"]
    A.main(advcl_run(folder, tmp_path / "advcl", "both", *labels))
    made = torch.load(tmp_path / "advcl" / "last.pt", weights_only=True)["pseudo_labels"]
    assert made["encoder"] == str(tmp_path / "tv.pt")
    # a reading flag where no file is read changes nothing: refused
    fails(
        tiny(folder, tmp_path / "other", "--stem-padding", "2"),
        capsys,
        r"--stem-padding: how a checkpoint file is read, and this run reads none",
        out=tmp_path / "other",
    )


def test_an_evaluation_on_other_images_than_the_runs_says_so_first(
    folder, tmp_path, monkeypatch, capsys
):
    here, there = tmp_path / "here", tmp_path / "there"
    shutil.copytree(folder, here / "data")
    make_folder(there / "data", classes=2, seed=9)  # the same relative path, other images
    monkeypatch.chdir(here)
    A.main(tiny("data", "run", "--eval", "none"))
    monkeypatch.chdir(there)
    capsys.readouterr()
    res = eval_only(here / "run")
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(
        "note: evaluating on other images than the run trained on: data is "
        f"{os.path.realpath(there / 'data')}"
    )
    assert res["identity"]["data"]["dir"] == os.path.realpath(there / "data")
    assert res["training"]["data"]["dir"] == os.path.realpath(here / "data")


@pytest.mark.parametrize("text", ["", '{"identity": {"weights"', "[1, 2]", "\x00\xff"])
def test_a_results_file_that_does_not_read_is_named_in_one_line(folder, tmp_path, capsys, text):
    res = A.main(tiny(folder, tmp_path / "run"))
    with open(res["path"], "w", encoding="latin-1") as f:
        f.write(text)
    run = str(tmp_path / "run")
    for argv in (["--eval-only", run], ["--resume", run], ["--eval-only", run, "--overwrite"]):
        fails(argv, capsys, rf"{re.escape(res['path'])} is not a readable results file .*: move it")
    assert open(res["path"], encoding="latin-1").read() == text


def test_a_truncated_log_or_config_is_rebuilt_from_the_checkpoint(folder, tmp_path, capsys):
    A.main(tiny(folder, tmp_path / "run", "--epochs", "2", "--eval", "none"))
    log, config = tmp_path / "run" / "log.jsonl", tmp_path / "run" / "config.json"
    good = {p: open(p).read() for p in (log, config)}
    log.write_text(good[log][:30])
    config.unlink()
    capsys.readouterr()
    A.main(["--resume", str(tmp_path / "run"), "--eval", "none"])
    out = capsys.readouterr().out
    assert f"{log} did not hold what" in out and f"{config} did not hold what" in out
    assert {p: open(p).read() for p in (log, config)} == good
    log.write_text("")
    eval_only(tmp_path / "run")
    assert open(log).read() == good[log]
    # another checkpoint than the run's last.pt says nothing of the run's files, nor writes any
    first = tmp_path / "first"
    A.main(tiny(folder, first, "--eval", "none"))  # one epoch: its log has one line
    shutil.copy(first / "last.pt", tmp_path / "run" / "epoch1.pt")
    os.makedirs(tmp_path / "pub")
    shutil.copy(first / "last.pt", tmp_path / "pub" / "model.pt")
    capsys.readouterr()
    A.main(["--eval-only", str(tmp_path / "run" / "epoch1.pt"), "--eval", "none"])
    assert open(log).read() == good[log] and open(config).read() == good[config]
    assert "did not hold" not in capsys.readouterr().out
    A.main(["--eval-only", str(tmp_path / "pub" / "model.pt"), "--eval", "none"])
    assert sorted(os.listdir(tmp_path / "pub")) == [".lock", "model.pt"]
    hint = capsys.readouterr().out.strip().splitlines()[-1]
    assert hint.endswith(f"--eval-only {tmp_path / 'pub' / 'model.pt'})"), hint


def test_the_console_says_which_protocol_ran_and_where_its_numbers_are(folder, tmp_path, capsys):
    res = A.main(tiny(folder, tmp_path / "run", "--eval", "slf", "alf"))
    out = capsys.readouterr().out
    assert (
        f"evaluation: asym-rocl protocol on folder {os.path.realpath(folder)} (32 training / 16 "
        f"test images): "
        f"SLF 150 epochs (lr 0.1, batch 64); ALF 1 epoch (lr 0.1, batch 64, PGD at 8/255); RA: "
        f"PGD-2 (step "
        f"2/255) at linf:8/255 -> {res['path']}" in out
    )
    assert out.rstrip().endswith(f"results: {res['path']}")


# --------------------------------------------------------------------------------------------------
# Interruption and resume
# --------------------------------------------------------------------------------------------------
def test_refuses_to_clobber_and_checks_resume(folder, tmp_path, capsys):
    run = tmp_path / "run"
    A.main(tiny(folder, run, "--eval", "none"))
    before = open(run / "last.pt", "rb").read()
    fails(
        tiny(folder, run, "--eval", "none"),
        capsys,
        r"already holds a run: continue it with --resume",
    )
    fails(
        ["--resume", str(run), "--method", "rocl"],
        capsys,
        r"cannot resume .*--method hardneg \(checkpoint\) vs rocl",
    )
    fails(
        ["--resume", str(run), "--width", "16", "--dataset", "cifar10"],
        capsys,
        r"cannot resume .*--dataset folder \(checkpoint\) vs cifar10, --width 8 \(checkpoint\) "
        r"vs 16",
    )
    # a run continues in its own directory, from its last.pt: never onto another run's files
    other = tmp_path / "other"
    A.main(tiny(folder, other, "--eval", "none", "--seed", "1"))
    theirs = open(other / "last.pt", "rb").read()
    fails(
        ["--resume", str(run), "--out", str(other)], capsys, r"--out .*other is another directory"
    )
    fails(["--resume", str(run), "--out", str(tmp_path / "new")], capsys, r"another directory")
    assert open(other / "last.pt", "rb").read() == theirs and not (tmp_path / "new").exists()
    shutil.copy(run / "last.pt", run / "epoch1.pt")
    fails(["--resume", str(run / "epoch1.pt")], capsys, r"continues from its directory's last\.pt")
    assert open(run / "last.pt", "rb").read() == before
    assert (
        A.main(["--resume", str(run), "--eval", "none", "--out", str(run)]) == {}
    )  # finished, nothing asked: nothing to do (--out its own directory is no other)
    assert open(run / "last.pt", "rb").read() == before
    A.main(tiny(folder, run, "--eval", "none", "--overwrite"))


def test_a_resume_against_other_images_is_refused_by_name(folder, tmp_path, monkeypatch, capsys):
    here, there = tmp_path / "here", tmp_path / "there"
    shutil.copytree(folder, here / "data")
    make_folder(there / "data", classes=2, seed=9)  # the same relative path, other images
    monkeypatch.chdir(here)
    real = A.lr_at

    def cut(step, *a):  # Ctrl-C at step 2 of 4
        if step == 2:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(A, "lr_at", cut)
    with pytest.raises(SystemExit):
        A.main(tiny("data", "run", "--ckpt-every", "1", "--eval", "none"))
    monkeypatch.setattr(A, "lr_at", real)
    shutil.copytree(here / "run", there / "run")
    monkeypatch.chdir(there)
    capsys.readouterr()
    fails(
        ["--resume", "run"],
        capsys,
        r"the run trained on the images in .*here/data \(fingerprint \w+\); data is "
        r".*there/data, whose training images differ \(fingerprint \w+\): pass --data-dir with the run's "
        r"images",
    )
    A.main(["--resume", "run", "--data-dir", str(here / "data"), "--eval", "none"])
    ck = weights(there / "run" / "last.pt")[1]
    assert ck["step"] == 4 and ck["data"]["dir"] == os.path.realpath(here / "data")


def test_a_resume_must_train_on_the_runs_images_finished_or_not(folder, tmp_path, capsys):
    """--resume continues one run: on other training images it is refused, also when the run is
    finished and only its evaluation is left (which would measure it on other images)."""
    A.main(tiny(folder, tmp_path / "run", "--eval", "none"))
    other = make_folder(tmp_path / "other", classes=2, seed=5)  # same classes, other images
    before = {f: open(tmp_path / "run" / f, "rb").read() for f in os.listdir(tmp_path / "run")}
    fails(
        ["--resume", str(tmp_path / "run"), "--data-dir", other, "--eval", "slf"],
        capsys,
        r"the run trained on the images in .* whose training images differ",
    )
    after = {f: open(tmp_path / "run" / f, "rb").read() for f in os.listdir(tmp_path / "run")}
    assert after == before


def test_a_resume_is_not_refused_for_other_test_images(folder, tmp_path, monkeypatch):
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    real = A.lr_at

    def cut(step, *a):  # Ctrl-C at step 2 of 4
        if step == 2:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(A, "lr_at", cut)
    with pytest.raises(SystemExit):
        A.main(tiny(str(data), tmp_path / "run", "--ckpt-every", "1", "--eval", "none"))
    monkeypatch.setattr(A, "lr_at", real)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(data / "test" / "class0" / "0.png")  # one test image
    A.main(["--resume", str(tmp_path / "run"), "--eval", "none"])
    assert weights(tmp_path / "run" / "last.pt")[1]["step"] == 4


def test_a_resume_refuses_a_change_of_precision(folder, tmp_path, capsys, monkeypatch):
    real = A.lr_at

    def cut(step, *a):
        if step == 2:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(A, "lr_at", cut)
    with pytest.raises(SystemExit):
        A.main(tiny(folder, tmp_path / "run", "--ckpt-every", "1", "--eval", "none"))
    monkeypatch.setattr(A, "lr_at", real)
    capsys.readouterr()
    amp = "--no-amp" if CUDA else "--amp"
    fails(["--resume", str(tmp_path / "run"), amp], capsys, r"cannot resume .*--amp")


@slow
@pytest.mark.parametrize("how", ["sigkill_after_epoch", "sigterm_mid_epoch"])
def test_killed_run_resumes_from_the_printed_hint_bit_exactly(folder, tmp_path, how):
    argv = lambda out: tiny(
        folder, out, "--epochs", "3", "--eval", "none", "--ckpt-every", "1", "--batch-size", "4"
    )
    assert launch(argv(tmp_path / "full")).wait() == 0
    proc = launch(argv(tmp_path / "cut"))
    if how == "sigkill_after_epoch":
        wait_for_checkpoint(proc, tmp_path / "cut" / "last.pt", lambda ck: ck["epoch"] >= 1)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        hint = ["--resume", str(tmp_path / "cut")]
    else:
        wait_for_checkpoint(proc, tmp_path / "cut" / "last.pt", lambda ck: ck["step"] >= 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait() == 130
        hint = (
            re.search(r"continue with: python ainfonce.py (.*)", proc.communicate()[1])
            .group(1)
            .split()
        )
    cut, ck = weights(tmp_path / "cut" / "last.pt")
    assert ck["step"] < 24  # the run really was cut short
    resumed = launch(hint)  # exactly what was printed: the checkpoint holds the arguments
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert how == "sigkill_after_epoch" or re.search(
        r"resuming .* at epoch (\d), step (\d+)/8", out
    ).groups() == (str(ck["step"] // 8 + 1), str(ck["step"] % 8))
    full, _ = weights(tmp_path / "full" / "last.pt")
    done, ck = weights(tmp_path / "cut" / "last.pt")
    assert ck["epoch"] == 3 and ck["step"] == 24
    assert full.keys() == done.keys() and all(torch.equal(full[k], done[k]) for k in full)
    logs = [
        [json.loads(line) for line in open(tmp_path / r / "log.jsonl")] for r in ("full", "cut")
    ]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]  # every epoch, the interrupted one too
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_a_stop_asked_during_the_last_step_stops_before_the_evaluation(
    folder, tmp_path, monkeypatch, capsys
):
    real = A.run_files

    def late(*a):  # SIGTERM once the last step has passed its stop check, as the epoch is saved
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)

    monkeypatch.setattr(A, "run_files", late)
    with pytest.raises(SystemExit) as e:
        A.main(tiny(folder, tmp_path / "run"))
    assert e.value.code == 130 and "continue with" in capsys.readouterr().err
    assert weights(tmp_path / "run" / "last.pt")[1]["step"] == 4 and not results_files(
        tmp_path / "run"
    )
    monkeypatch.setattr(A, "run_files", real)
    assert "slf_sa" in A.main(["--resume", str(tmp_path / "run")])  # the hint's command evaluates


def test_interrupt_during_evaluation_keeps_the_finished_schemes(
    folder, tmp_path, monkeypatch, capsys
):
    argv = tiny(folder, tmp_path / "run", "--eval", "slf", "alf", "aff")
    full = A.main(tiny(folder, tmp_path / "full", "--eval", "slf", "alf", "aff"))
    real = interrupt_as_alf_starts(monkeypatch)
    with pytest.raises(SystemExit) as e:
        A.main(argv)
    err = capsys.readouterr().err
    assert (
        e.value.code == 130
        and f"finish with: python ainfonce.py --resume {tmp_path / 'run'}" in err
    )
    kept = only_results(tmp_path / "run")
    assert "slf_sa" in kept and "alf_sa" not in kept
    monkeypatch.setattr(A, "train_head", real)
    done = A.main(["--resume", str(tmp_path / "run")])
    assert done["slf_s"] == kept["slf_s"] and {"alf_sa", "aff_sa"} <= set(done)
    assert {k: v for k, v in scheme_keys(done).items() if "guards" not in k} == {
        k: v for k, v in scheme_keys(full).items() if "guards" not in k
    }


def test_the_hint_after_an_interrupted_resume_finishes_what_it_asked(
    folder, tmp_path, monkeypatch, capsys
):
    A.main(tiny(folder, tmp_path / "run", "--eval", "slf"))  # trained and evaluated: SLF only
    real = interrupt_as_alf_starts(monkeypatch)
    with pytest.raises(SystemExit):
        A.main(["--resume", str(tmp_path / "run"), "--eval", "slf", "alf"])
    hint = re.search(r"finish with: (.*)", capsys.readouterr().err).group(1)
    assert shlex.split(hint)[2:] == ["--resume", str(tmp_path / "run"), "--eval", "slf", "alf"]
    monkeypatch.setattr(A, "train_head", real)
    done = A.main(shlex.split(hint)[2:])
    out = capsys.readouterr().out
    assert {"slf_sa", "alf_sa"} <= set(done) and "nothing to do" not in out
    # SLF, finished before the interrupt, is shown beside the ALF it finishes now
    assert f"SLF: SA {100 * done['slf_sa']:.2f}%" in out and "ALF: SA" in out


def test_a_full_disk_keeps_the_last_checkpoint_and_the_run_resumes(
    folder, tmp_path, monkeypatch, capsys
):
    real_save, calls = torch.save, []

    def full_disk(obj, f):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint meets a full disk half-way
            f.write(b"partial")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                "file "
                "data/0: file write failed"
            )
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", full_disk)
    fails(
        tiny(folder, tmp_path / "run", "--epochs", "2", "--eval", "none"),
        capsys,
        r"could not write .*last\.pt: .*file write failed; .*last\.pt still holds step 4; free "
        r"space, then: python "
        r"ainfonce\.py --resume",
        code=4,
    )
    _, ck = weights(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1 and not glob.glob(
        str(tmp_path / "run" / "*.tmp")
    )  # kept; nothing left to fill the disk
    monkeypatch.setattr(torch, "save", real_save)
    A.main(["--resume", str(tmp_path / "run"), "--eval", "none"])  # space freed
    assert weights(tmp_path / "run" / "last.pt")[1]["epoch"] == 2
    # during evaluation: the finished scheme stays, no .tmp is left, and the printed command
    # finishes the rest
    real_write, writes = A.atomic_write, []

    def fails_third(path, write):
        writes.append(path)
        if (
            len(writes) == 3
        ):  # the file is written at the start and after each scheme: SLF is in, ALF is not
            raise A.WriteFailed(f"could not write {path}: No space left on device")
        real_write(path, write)

    monkeypatch.setattr(A, "atomic_write", fails_third)
    fails(
        ["--resume", str(tmp_path / "run"), "--eval", "slf", "alf"],
        capsys,
        r"No space left on device; the finished schemes stay in .*results-\w+\.json; free space, "
        r"then: python "
        r"ainfonce\.py --resume",
        code=4,
    )
    kept = only_results(tmp_path / "run")
    assert (
        "slf_sa" in kept and "alf_sa" not in kept and not glob.glob(str(tmp_path / "run" / "*.tmp"))
    )
    monkeypatch.setattr(A, "atomic_write", real_write)
    done = A.main(["--resume", str(tmp_path / "run"), "--eval", "slf", "alf"])
    assert done["slf_s"] == kept["slf_s"] and "alf_sa" in done


def test_a_stale_tmp_is_removed(folder, tmp_path, capsys):
    A.main(tiny(folder, tmp_path / "run", "--epochs", "2", "--eval", "none", "--ckpt-every", "1"))
    (tmp_path / "run" / "last.pt.tmp").write_bytes(b"\0" * 2**20)  # a writer that died mid-save
    (tmp_path / "run" / "notes.tmp").write_text("the user's")  # not a file this program writes
    A.main(["--resume", str(tmp_path / "run"), "--epochs", "2", "--eval", "slf"])
    out = capsys.readouterr().out
    assert "removed last.pt.tmp (1.0 MiB), left by a writer that died" in out
    assert not os.path.exists(tmp_path / "run" / "last.pt.tmp") and "notes.tmp" not in out
    assert (tmp_path / "run" / "notes.tmp").read_text() == "the user's"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    folder, tmp_path, monkeypatch, capsys
):
    real, calls = A.rocl_loss, []

    def poisoned(*a, **kw):
        loss, terms = real(*a, **kw)
        calls.append(1)
        return (loss * math.nan, terms) if len(calls) == 6 else (loss, terms)

    monkeypatch.setattr(A, "rocl_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        A.main(tiny(folder, tmp_path / "run", "--epochs", "3", "--eval", "none"))
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 2, step 5" in err and "infonce" in err and "--resume" in err
    w, ck = weights(tmp_path / "run" / "last.pt")
    assert ck["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in w.values() if v.is_floating_point()
    )
    monkeypatch.setattr(A, "rocl_loss", real)
    res = A.main(["--resume", str(tmp_path / "run"), "--lr", "0.01", "--eval", "slf"])
    assert weights(tmp_path / "run" / "last.pt")[1]["epoch"] == 3
    # the first command and its lr stay; the resume is its own record, from the step it took effect
    first, resumed = res["training"]["invocations"]
    assert res["training"]["args"]["lr"] == 0.2 and first["step"] == 0 and first["changes"] == {}
    assert first["command"].endswith(f"--out {tmp_path / 'run'}")
    assert resumed["step"] == 4 and resumed["changes"] == {"lr": [0.2, 0.01], "eval": [[], ["slf"]]}
    assert "--lr 0.01" in resumed["command"]
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["args"]["lr"] == 0.2 and config["invocations"] == res["training"]["invocations"]


def test_the_recorded_command_and_the_interrupt_hint_paste_back_into_a_shell(
    folder, tmp_path, monkeypatch, capsys
):
    spaced = tmp_path / "my data"
    shutil.copytree(folder, spaced)
    argv = tiny(str(spaced), tmp_path / "a run", "--eval", "none")
    A.main(argv)
    command = shlex.split(weights(tmp_path / "a run" / "last.pt")[1]["invocations"][-1]["command"])
    assert (
        command[0] == "python" and os.path.samefile(command[1], A.__file__) and command[2:] == argv
    )
    real = interrupt_as_alf_starts(monkeypatch)
    argv = [
        "--eval-only",
        str(tmp_path / "a run"),
        "--eval",
        "slf",
        "alf",
        "--eval-steps",
        "2",
        "--ft-epochs",
        "1",
        "--eval-batch-size",
        "64",
        *GPU_FLAGS[:2],
    ]
    with pytest.raises(SystemExit) as e:
        A.main(argv)
    hint = re.search(r"finish with: (.*)", capsys.readouterr().err).group(1)
    assert (
        e.value.code == 130 and shlex.split(hint)[0] == "python" and shlex.split(hint)[2:] == argv
    )
    monkeypatch.setattr(A, "train_head", real)
    done = A.main(shlex.split(hint)[2:])  # the hint finishes the evaluation: SLF kept, ALF added
    assert "slf_sa" in done and "alf_sa" in done


def test_hints_paste_back_from_any_directory(folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    real = interrupt_as_alf_starts(monkeypatch)
    with pytest.raises(SystemExit):
        A.main(tiny(folder, tmp_path / "run", "--eval", "slf", "alf"))
    hint = shlex.split(re.search(r"finish with: (.*)", capsys.readouterr().err).group(1))
    assert (
        hint[0] == "python"
        and os.path.samefile(hint[1], A.__file__)
        and hint[2:] == ["--resume", str(tmp_path / "run")]
    )
    monkeypatch.setattr(A, "train_head", real)


def test_a_refused_resume_leaves_the_runs_pseudo_labels_and_the_run_continues(
    folder, tmp_path, monkeypatch, capsys
):
    encoder = tmp_path / "simclr"
    A.main(tiny(folder, encoder, "--method", "simclr", "--eval", "none"))
    labels = ["--pseudo-labels", str(encoder)]
    A.main(advcl_run(folder, tmp_path / "full", "both", *labels, "--eval", "none"))
    real = A.advcl_lr_at

    def cut(step, *a):  # Ctrl-C at step 5 of 8
        if step == 5:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(A, "advcl_lr_at", cut)
    with pytest.raises(SystemExit):
        A.main(advcl_run(folder, tmp_path / "cut", "both", *labels, "--ckpt-every", "1"))
    monkeypatch.setattr(A, "advcl_lr_at", real)
    before = {f: open(tmp_path / "cut" / f, "rb").read() for f in os.listdir(tmp_path / "cut")}
    assert "pseudo-labels.pkl" in before
    # the encoder of the labels is trained again, other weights in the same place
    A.main(
        tiny(folder, encoder, "--method", "simclr", "--seed", "1", "--overwrite", "--eval", "none")
    )
    capsys.readouterr()
    fails(
        ["--resume", str(tmp_path / "cut"), *labels],
        capsys,
        r"other labels \(digest \w+\) than the run trained on",
    )
    after = {f: open(tmp_path / "cut" / f, "rb").read() for f in os.listdir(tmp_path / "cut")}
    assert {f: v for f, v in after.items() if f != ".lock"} == {
        f: v for f, v in before.items() if f != ".lock"
    }
    # a run moved elsewhere keeps its labels file in its own directory
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "cut", moved)
    os.remove(moved / "pseudo-labels.pkl")
    A.main(["--resume", str(moved), "--eval", "none"])  # its own labels, from last.pt
    assert (moved / "pseudo-labels.pkl").exists() and not (tmp_path / "cut").exists()
    w_full, w_cut = (
        weights(tmp_path / "full" / "last.pt")[0],
        weights(moved / "last.pt")[0],
    )
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)


# --------------------------------------------------------------------------------------------------
# Processes: 2 ranks x B == 1 rank x 2B (gloo, CPU), torchrun
# --------------------------------------------------------------------------------------------------
def _ddp_worker(rank, world, port, out, method):
    import functools
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    A.instance_pgd = functools.partial(
        A.instance_pgd, random_start=False
    )  # the only other randomness
    args = A.configure(["--method", method, "--attack-steps", "3", "--width", "4"])[0]
    torch.manual_seed(0)
    net = A.Net(4)
    x1, x2 = images(0, 8).cpu(), images(1, 8).cpu()
    b = 8 // world
    x1, x2 = x1[rank * b : (rank + 1) * b], x2[rank * b : (rank + 1) * b]
    # in 2 processes, the loss and the attack gather the global batch
    x_adv = None
    if method != "simclr":
        x_adv = A.instance_pgd(net, x1, x2, eps=args.eps, step=args.step, steps=3)
    loss, _ = A.rocl_loss(net, x1, x2, x_adv, args)
    loss.backward()
    params = list(net.parameters())
    if world > 1:
        A.allreduce_grads(params, world)
    if rank == 0:
        torch.save(
            {
                "loss": loss.detach(),
                "grads": [p.grad for p in params],
                "stats": {k: v for k, v in net.state_dict().items() if "running" in k},
            },
            out,
        )
    group = weakref.ref(dist.distributed_c10d._get_default_group())
    dist.destroy_process_group()
    # nothing keeps the group (and gloo's threads) alive past teardown, into interpreter
    # finalization
    assert group() is None, "the process group outlives destroy_process_group"


@slow
@cpu_only
@pytest.mark.parametrize("method", ["both", "simclr"])
def test_two_ranks_equal_one_rank_with_the_global_batch(tmp_path, method):
    import torch.multiprocessing as mp

    for world in (1, 2):
        mp.spawn(
            _ddp_worker,
            args=(world, free_port(), str(tmp_path / f"w{world}.pt"), method),
            nprocs=world,
        )
    one, two = (torch.load(tmp_path / f"w{w}.pt", weights_only=True) for w in (1, 2))
    assert torch.allclose(one["loss"], two["loss"], atol=1e-5)
    # every BN layer's running statistics: nn.BatchNorm2d keeps the unbiased variance of its batch,
    # the synced one that of the global batch (layer4: 4x4 maps, so n is small and the n / (n - 1)
    # shows)
    for k, v in one["stats"].items():
        assert torch.allclose(v, two["stats"][k], rtol=1e-5, atol=1e-6), k
    for g1, g2 in zip(one["grads"], two["grads"]):
        assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-3), (g1 - g2).abs().max()


@slow
@cpu_only
def test_torchrun_style_launch_trains_and_evaluates(folder, tmp_path):
    port, procs = free_port(), []
    for rank in range(2):
        procs.append(
            launch(
                tiny(folder, tmp_path / "run", "--epochs", "2"),
                WORLD_SIZE="2",
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    epoch_lines = re.findall(
        r"^epoch +\d+/2 \|", outs[0][0], re.M
    )  # not the progress lines of a slow machine
    assert len(epoch_lines) == 2 and outs[1][0] == ""  # one process logs
    res = only_results(tmp_path / "run")
    assert 0 <= res["slf_ra"] <= res["slf_sa"] <= 1
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 8


@cpu_only
def test_a_bad_argument_under_torchrun_is_reported_once(tmp_path):
    procs = [
        launch(["--method", "bogus"], WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r))
        for r in range(2)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert (
        [p.returncode for p in procs] == [2, 2]
        and "invalid choice: 'bogus'" in errs[0]
        and errs[1] == ""
    )


# --------------------------------------------------------------------------------------------------
# Benchmark and reproduce.sh
# --------------------------------------------------------------------------------------------------
def student_t_cdf(x, df, n=4000):
    """P(T <= x) of Student's t with df degrees of freedom, by Simpson's rule on its density."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda t: math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))
    h = x / n
    inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
    return 0.5 + h / 3 * (density(0) + inner + density(x))


def reproduce_sh_interval():
    """reproduce.sh's interval() and its T975, read from the Python part of the script."""
    text = open(os.path.join(HERE, "reproduce.sh")).read()
    code = re.search(r"^# Student's t.*?(?=^cells = )", text, re.M | re.S).group(0)
    namespace = {"math": math}
    exec(code, namespace)
    return namespace["interval"], namespace["T975"]


def test_reproduce_sh_interval_is_students_t_over_the_values():
    interval, t975 = reproduce_sh_interval()
    # the quantiles are those of Student's t: P(T <= t_0.975) = 0.975 for 1 to 30 degrees of freedom
    for df, t in enumerate(t975, start=1):
        assert abs(student_t_cdf(t, df) - 0.975) < 2e-4, df
    mean, half = interval([1.0, 2.0, 3.0, 4.0, 5.0])  # sd sqrt(2.5), n 5, t(4) = 2.776
    assert mean == 3.0 and half == pytest.approx(1.96293, abs=1e-5)
    assert interval([2.0, 4.0]) == (3.0, pytest.approx(12.706))  # sd sqrt(2), t(1) = 12.706
    assert interval([0.5] * 40)[1] == 0 and interval([7.0]) == (7.0, None)
    values = [float(v % 7) for v in range(40)]  # beyond 30 degrees of freedom: the normal's 1.96
    mean = sum(values) / 40
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 39)
    assert interval(values) == (mean, pytest.approx(1.96 * sd / math.sqrt(40)))


def test_benchmark_prints_json_last(capsys):
    res = A.main(
        [
            "--benchmark",
            "--width",
            "4",
            "--batch-size",
            "4",
            "--attack-steps",
            "1",
            "--benchmark-steps",
            "1",
            "--method",
            "rocl",
            *GPU_FLAGS[:2],
        ]
    )
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == json.loads(json.dumps(res))
    assert (
        last["images_per_s"] > 0
        and last["attack_s"] > 0
        and last["fwd_bwd_s"] > 0
        and last["data_s"] > 0
    )
    assert last["ratio_vs_official"] > 0 and ("peak_mem_gib" in last) == CUDA


@slow
@cpu_only
def test_reproduce_sh_never_mixes_scales_reads_what_it_asked_and_says_how_to_continue(tmp_path):
    data = make_folder(
        tmp_path / "data", classes=4, n_train=32, n_test=16
    )  # smoke: 128 training, 64 test images
    env = {
        **os.environ,
        "SCALE": "smoke",
        "DATASET": "folder",
        "DATA_DIR": "data",
        "OUT": "out",
        "METHODS": "rocl",
        "PYTHON": sys.executable,
    }
    script = os.path.join(HERE, "reproduce.sh")
    run = lambda **kw: subprocess.run(
        ["bash", script],
        env={**env, **kw},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )  # relative DATA_DIR and OUT: from where it runs
    p = run()
    assert p.returncode == 0, p.stderr
    table = open(tmp_path / "out" / "table.md").read()
    assert table.startswith(
        "A-InfoNCE on RoCL: folder, 128 training images, ResNet-18 width 4, 1 epoch, batch 32, "
        "1-step training "
        "attack; asym-rocl finetuning; RA = PGD-2 at linf:8/255"
    )  # read from the runs it shows
    assert (
        os.path.realpath(data)
        == json.load(open(tmp_path / "out" / "table.json"))["runs"]["rocl"][0]["identity"]["data"][
            "dir"
        ]
    )
    # another threat on the same OUT: its numbers are computed and the table shows them, read from
    # their own file
    p = run(EVAL_THREATS="linf:8/255 l2:0.5")
    assert p.returncode == 0, p.stderr
    assert "SLF RA l2:0.5" in open(tmp_path / "out" / "table.md").read()
    assert len(results_files(tmp_path / "out" / "rocl-s0")) == 2
    # the same OUT on other images: refused, never a table of encoders measured on other images
    shutil.copytree(data, tmp_path / "inverted")
    for path in glob.glob(str(tmp_path / "inverted" / "*" / "*" / "*.png")):
        from PIL import Image, ImageOps

        ImageOps.invert(Image.open(path).convert("RGB")).save(path)
    table = open(tmp_path / "out" / "table.md").read()
    p = run(DATA_DIR="inverted")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "whose training images differ" in p.stderr
    assert open(tmp_path / "out" / "table.md").read() == table
    assert open(tmp_path / "out" / "cells.tsv").read() == ""  # no cell of a table that failed
    p = run(SCALE="small")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert re.search(
        r"cannot resume .*rocl-s0 with other arguments: --subset 128 \(checkpoint\) vs 5000",
        p.stderr,
    )
    proc = subprocess.Popen(
        ["bash", script],
        env={**env, "OUT": "out2"},
        stdout=subprocess.PIPE,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    while "steps | new run" not in proc.stdout.readline():  # the first cell is training
        assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and err.count("continue the whole table with:") == 1, err
    hint = re.search(r"continue the whole table with: (.*)", err).group(1)
    assert (
        hint.startswith("SCALE=smoke BASE=rocl DATASET=folder DATA_DIR=data") and "OUT=out2" in hint
    )
    assert hint.endswith(f"METHODS=rocl PYTHON={sys.executable} bash {script}")


@slow
@cpu_only
def test_reproduce_sh_shows_intervals_and_paired_differences(tmp_path):
    make_folder(tmp_path / "data", classes=4, n_train=32, n_test=16)
    env = {
        **os.environ,
        "SCALE": "smoke",
        "DATASET": "folder",
        "DATA_DIR": "data",
        "OUT": "out",
        "METHODS": "rocl hardneg",
        "SEEDS": "2",
        "PYTHON": sys.executable,
    }
    script = os.path.join(HERE, "reproduce.sh")
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    table = open(tmp_path / "out" / "table.md").read()
    assert (
        "mean ± half-width of its 95 % confidence interval (Student's t over n = 2 seeds)" in table
    )
    assert "Each method minus rocl, paired by seed" in table
    saved = json.load(open(tmp_path / "out" / "table.json"))
    runs, paired = saved["runs"], saved["paired"]["hardneg"]["slf_sa"]
    diffs = [100 * (h["slf_sa"] - r["slf_sa"]) for h, r in zip(runs["hardneg"], runs["rocl"])]
    mean, half = reproduce_sh_interval()[0](diffs)
    assert paired == {"mean": mean, "half_width": half, "n": 2, "excludes_0": abs(mean) > half}
    row = [line for line in table.splitlines() if line.startswith("| hardneg")][-1]
    assert row.split(" | ")[1].startswith(f"{mean:.2f} ± {half:.2f}")
    p = subprocess.run(
        ["bash", script],
        env={**env, "SEEDS": "1", "OUT": "one"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    table = open(tmp_path / "one" / "table.md").read()
    assert p.returncode == 0 and "one seed: no interval" in table and "One seed: no paired" in table


# --------------------------------------------------------------------------------------------------
# The file: the path a reader walks from main to the first optimizer step
# --------------------------------------------------------------------------------------------------
def entered_before_the_first_step(argv):
    """The distinct functions of ainfonce.py that main(argv) enters in this thread before the first
    call of a torch.optim optimizer's step (comprehensions aside: Python 3.12 inlines them)."""
    source = os.path.abspath(A.__file__)
    entered, stepped = [], []

    def profile(frame, event, arg):
        code = frame.f_code
        if stepped or event != "call":
            return
        if code.co_name == "step" and os.sep + "optim" + os.sep in code.co_filename:
            stepped.append(code)
        comprehension = code.co_name in ("<listcomp>", "<genexpr>", "<setcomp>", "<dictcomp>")
        if code.co_filename == source and code not in entered and not comprehension:
            entered.append(code)

    sys.setprofile(profile)
    try:
        A.main(argv)
    finally:
        sys.setprofile(None)
    assert stepped
    return [getattr(c, "co_qualname", c.co_name) for c in entered]


def test_a_tiny_run_enters_few_of_the_files_definitions_before_its_first_step(folder, tmp_path):
    """README, The file: at most 45 on the RoCL base, 55 on the AdvCL base (a labels file)."""
    tiny_run = ["--width", "4", "--epochs", "1", "--eval", "none"]
    rocl = entered_before_the_first_step(
        tiny(folder, tmp_path / "rocl", "--method", "hardneg", *tiny_run)
    )
    labels = tmp_path / "labels.pkl"
    write_pseudo_labels(labels, 32, as_tensors=False)
    advcl = entered_before_the_first_step(
        advcl_run(folder, tmp_path / "advcl", "both", "--pseudo-labels", labels, *tiny_run)
    )
    assert len(rocl) <= 45 and len(advcl) <= 55, (len(rocl), rocl, len(advcl), advcl)
    assert {"a_infonce", "instance_pgd", "rocl_step", "augment"} <= set(rocl)
    assert {"a_infonce", "advcl_attack", "advcl_step", "advcl_views"} <= set(advcl)
