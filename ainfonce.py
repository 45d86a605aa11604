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
    pip install -r requirements.txt
    python ainfonce.py --method hardneg --dataset cifar10                   # paper recipe, one GPU
    python ainfonce.py --method hardneg --dataset folder --data-dir data/cifar10-jpeg --subset 5000 \\
        --width 8 --epochs 6 --batch-size 128 --attack-steps 3 --warmup-epochs 1 --eval-subset 1000   # CPU
    torchrun --nproc_per_node 8 ainfonce.py --method both                  # data parallel
    python ainfonce.py --eval-only runs/hardneg-cifar10-s0 --eval slf alf aff --autoattack
    python ainfonce.py --benchmark --width 64 --batch-size 32               # speed vs the official step
    python -m pytest -q                                                     # tests
"""
import argparse
import contextlib
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# Config / CLI
# ---------------------------------------------------------------------------------------------------
METHODS = ("simclr", "rocl", "infpos", "hardneg", "both")
BASE_LR = {"simclr": 0.1, "rocl": 0.1, "infpos": 0.1, "hardneg": 0.2, "both": 0.3}  # CIFAR-10 scripts
# A resumed run must agree with its checkpoint on everything that defines its math (not --lr).
RESUME_KEYS = ("method", "dataset", "data_dir", "subset", "width", "eps", "step", "attack_steps",
               "temperature", "ip_alpha", "adv_weight", "hn_beta", "tau_plus", "reg_weight", "reg_forward",
               "epochs", "batch_size", "warmup_epochs", "wd", "seed")


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit code 2, before anything is written."""


class NonFiniteLoss(Exception):
    """A NaN/inf loss or gradient: the run stops (exit code 3) and keeps its last good checkpoint."""


def fraction(s):
    """A number in [0, 1] pixels, written as a decimal or a fraction: 8/255 == 0.031372..."""
    try:
        v = float(Fraction(s))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a number or fraction like 8/255")
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{s} is outside [0, 1]")
    return v


def int_at_least(lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer")
        if v < lo:
            raise argparse.ArgumentTypeError(f"{s} must be at least {lo}")
        return v
    return parse


def float_above(lo, inclusive):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number")
        if not (math.isfinite(v) and (v >= lo if inclusive else v > lo)):
            raise argparse.ArgumentTypeError(f"{s} must be a finite number {'>=' if inclusive else '>'} {lo}")
        return v
    return parse


positive, non_negative = float_above(0, False), float_above(0, True)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse would also print the usage block)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser():
    p = Parser(prog="ainfonce.py", description="Adversarial contrastive pretraining with A-InfoNCE.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("cifar10", "cifar100", "folder"), default="cifar10",
                   help="torchvision CIFAR (downloaded when missing) or DATA_DIR/{train,test}/<class>/*")
    g.add_argument("--data-dir", default="./data", help="download root, or the folder data set")
    g.add_argument("--subset", type=int_at_least(0), default=0,
                   help="images: pretrain and finetune on the first N of a fixed shuffle (0: all)")
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int_at_least(1), default=64,
                   help="ResNet-18 base width: 64 is the paper's, 16 or 32 for CPU runs")
    g = p.add_argument_group("attack (pretraining)")
    g.add_argument("--eps", type=fraction, default=8 / 255,
                   help="L_inf radius in [0,1] pixel units, fractions parse (paper 8/255; RoCL code 0.0314)")
    g.add_argument("--step", type=fraction, default=0.007, help="PGD step, pixel units (paper 0.007)")
    g.add_argument("--attack-steps", type=int_at_least(0), default=7, help="PGD steps (paper 7)")
    g = p.add_argument_group("loss")
    g.add_argument("--method", choices=METHODS, default="hardneg")
    g.add_argument("--temperature", type=positive, default=0.5, help="tau (paper 0.5)")
    g.add_argument("--ip-alpha", type=fraction, default=0.2, help="IP weight of clean->adv terms (paper 0.2)")
    g.add_argument("--adv-weight", type=non_negative, default=1.0, help="IP scale of clean<->adv terms (paper 1)")
    g.add_argument("--hn-beta", type=non_negative, default=1.0, help="HN concentration beta (paper 1.0)")
    g.add_argument("--tau-plus", type=non_negative, default=None,
                   help="HN class prior in [0,1): default 0.1 for cifar100, else 0.12 (paper, CIFAR-10)")
    g.add_argument("--reg-weight", type=non_negative, default=1 / 256, help="RoCL regulariser weight (1/256)")
    g.add_argument("--reg-forward", choices=("separate", "shared"), default="separate",
                   help="regulariser embeddings from its own forward (RoCL: own batch-norm statistics) "
                        "or from the main forward (saves a 2N forward and backward)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int_at_least(1), default=1000, help="pretraining epochs (paper 1000)")
    g.add_argument("--batch-size", type=int_at_least(2), default=512,
                   help="images per step, all ranks together (paper 512 = 2 GPUs x 256)")
    g.add_argument("--lr", type=positive, default=None,
                   help="base lr, warmed up to 15x: default 0.1, hardneg 0.2, both 0.3")
    g.add_argument("--warmup-epochs", type=int_at_least(0), default=10, help="linear warm-up (paper 10)")
    g.add_argument("--wd", type=non_negative, default=1e-6, help="weight decay inside LARS (paper 1e-6)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", nargs="*", choices=("none", "slf", "alf", "aff"), default=["slf"],
                   help="finetuning schemes run after pretraining (SLF: 150 epochs on cached features)")
    g.add_argument("--eval-only", metavar="CKPT", help="evaluate a checkpoint (file or run directory)")
    g.add_argument("--eval-eps", type=fraction, default=8 / 255, help="L_inf radius of the RA attack")
    g.add_argument("--eval-step", type=fraction, default=2 / 255,
                   help="PGD step of RA (AdvCL 2/255; RoCL's code 0.00314)")
    g.add_argument("--eval-steps", type=int_at_least(1), default=20, help="PGD steps of RA (PGD-20)")
    g.add_argument("--eval-subset", type=int_at_least(0), default=0,
                   help="evaluate on the first N test images of a fixed shuffle (0: all)")
    g.add_argument("--ft-epochs", type=int_at_least(1), default=25,
                   help="ALF/AFF epochs, lr 0.1 /10 at 60%% and 80%% (paper 25: 15, 20)")
    g.add_argument("--eval-batch-size", type=int_at_least(1), default=1024,
                   help="images per finetuning step and per attack batch (official scripts 1024)")
    g.add_argument("--autoattack", action="store_true",
                   help="also run standard AutoAttack (needs: pip install torchattacks)")
    g = p.add_argument_group("system")
    g.add_argument("--out", default=None, help="run directory (default runs/METHOD-DATASET-sSEED)")
    g.add_argument("--resume", metavar="CKPT", help="continue the run in this checkpoint or directory")
    g.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    g.add_argument("--ckpt-every", type=int_at_least(0), default=0, help="also checkpoint every N steps (0: off)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of weights, augmentations and attacks")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for pretraining and its attack (evaluation is always fp32)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC layout; default on for CUDA, off on CPU (oneDNN's AVX2 1x1-conv backward "
                        "can hang with it at tiny widths)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the net")
    g.add_argument("--benchmark", action="store_true", help="time pretraining steps on random data")
    g.add_argument("--benchmark-steps", type=int_at_least(1), default=5, help="timed steps, after 2 warm-up steps")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    # --- derived values, in one place ---
    args.lr = args.lr or BASE_LR[args.method]
    if args.tau_plus is None:
        args.tau_plus = 0.1 if args.dataset == "cifar100" else 0.12
    if not 0 <= args.tau_plus < 1:
        raise UsageError(f"--tau-plus {args.tau_plus} must be in [0, 1)")
    args.eval = [e for e in args.eval if e != "none"]
    if args.out is None and not args.resume and not args.eval_only:
        args.out = f"runs/{args.method}-{args.dataset}-s{args.seed}"
    return args


# ---------------------------------------------------------------------------------------------------
# Seeding, device, processes
# ---------------------------------------------------------------------------------------------------
def setup(args):
    """Device, process group (torchrun sets WORLD_SIZE/RANK) and seed. Returns (device, rank, world)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed = args.seed + rank  # ranks draw different augmentations
    random.seed(seed)
    torch.manual_seed(seed)
    return device, rank, world


def gather_cat(t, dim):
    """Concatenate t over all ranks along dim, differentiably (its backward sums the ranks' gradients)."""
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(t.contiguous()), dim)


def allreduce_grads(params, world):
    """Average gradients over ranks: what DDP's hooks do, done once after the step's only backward."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, f in zip(grads, flat.div_(world).split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------------
# Data: whole data sets as uint8 tensors [N, 3, 32, 32]; augmentation as batched tensor ops
# ---------------------------------------------------------------------------------------------------
def fixed_shuffle(n_items, n):
    """Indices of the first n items of a fixed permutation (the same for every run, seed and method)."""
    if not 0 < n < n_items:
        return torch.arange(n_items)
    return torch.randperm(n_items, generator=torch.Generator().manual_seed(0))[:n]


def load_folder(root):
    from PIL import Image
    if not os.path.isdir(root):
        raise UsageError(f"data directory {root} does not exist")
    splits, resized = [], 0
    for split in ("train", "test"):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise UsageError(f"{d} is missing: --dataset folder reads DATA_DIR/train/<class>/* "
                             f"and DATA_DIR/test/<class>/*")
        classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
        files = [(os.path.join(d, c, f), c) for c in classes
                 for f in sorted(os.listdir(os.path.join(d, c))) if not f.startswith(".")]
        if not files:
            raise UsageError(f"{d} holds no images (expected {d}/<class>/<image>)")
        splits.append((classes, files))
    names = splits[0][0]
    out = []
    for classes, files in splits:
        if set(classes) - set(names):
            raise UsageError(f"test classes not in train/: {sorted(set(classes) - set(names))}")
        x = torch.empty(len(files), 32, 32, 3, dtype=torch.uint8)
        for i, (path, _) in enumerate(files):
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if im.size != (32, 32):  # documented: other sizes are resized, never refused
                        im, resized = im.resize((32, 32), Image.BILINEAR), resized + 1
                    x[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(32, 32, 3)
            except Exception as e:
                raise UsageError(f"cannot read image {path}: {e}")
        out += [x.permute(0, 3, 1, 2).contiguous(), torch.tensor([names.index(c) for _, c in files])]
    if resized:
        print(f"data: resized {resized} images of another size to 32x32")
    return (*out, len(names))


def load_data(dataset, data_dir):
    """-> (x_train, y_train, x_test, y_test, n_classes), uint8 images [N, 3, 32, 32] on the CPU."""
    if dataset == "folder":
        return load_folder(data_dir)
    import torchvision
    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        sets = [cls(data_dir, train=t, download=True) for t in (True, False)]
    except Exception as e:  # offline (URLError) or a corrupt archive (RuntimeError)
        raise UsageError(f"could not get {dataset} into {data_dir} ({type(e).__name__}: {e}); offline? "
                         f"copy the torchvision archive (e.g. cifar-10-python.tar.gz) there, "
                         f"or use --dataset folder")
    out = []
    for s in sets:
        out += [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)]
    return (*out, len(sets[0].classes))


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
    if op == 0:
        other = 0.0
    else:
        other = _gray(x).mean((1, 2, 3), keepdim=True) if op == 1 else _gray(x)
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


def augment(xb):
    """SPEC 4 on a uint8 batch [B,3,32,32] -> float in [0,1], each image with its own random draws:
    ColorJitter(0.4,0.4,0.4,0.1) p=0.8 (ops in a random order per image), RandomGrayscale p=0.2,
    horizontal flip p=0.5, RandomResizedCrop(32, scale=(0.08,1)); bilinear, as one grid_sample."""
    x = xb.float() / 255
    b, dev = x.size(0), x.device
    on = torch.rand(b, device=dev) < 0.8
    f = torch.cat([torch.empty(b, 3, device=dev).uniform_(0.6, 1.4),
                   torch.empty(b, 1, device=dev).uniform_(-0.1, 0.1)], 1)
    order = torch.rand(b, 4, device=dev).argsort(1)
    for k in range(4):
        for op in range(4):
            x = torch.where((on & (order[:, k] == op)).view(-1, 1, 1, 1), adjust(x, op, f[:, op]), x)
    x = torch.where((torch.rand(b, device=dev) < 0.2).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
    w, h, x0, y0 = crop_params(b, dev)
    flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)  # output [-1,1] -> crop box in input coordinates
    theta[:, 0, 0], theta[:, 0, 2] = flip * w / 32, (w + 2 * x0) / 32 - 1
    theta[:, 1, 1], theta[:, 1, 2] = h / 32, (h + 2 * y0) / 32 - 1
    grid = F.affine_grid(theta, [b, 3, 32, 32], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------------
# Model: CIFAR ResNet-18 encoder f and MLP projector g. Inputs in [0,1], no normalisation (RoCL).
# ---------------------------------------------------------------------------------------------------
class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics span all ranks on any torch.distributed backend
    (nn.SyncBatchNorm runs on GPUs only; CUDA runs convert to it). One process: plain BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        xf = x.float()
        n = xf.numel() // xf.size(1) * dist.get_world_size()
        mean, sq = (all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3))])) / n).chunk(2)
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
    """CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, BasicBlocks [2,2,2,2]; 8*width features."""

    def __init__(self, width=64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), BatchNorm2d(width), nn.ReLU())
        chans, blocks = [width, width, 2 * width, 4 * width, 8 * width], []
        for i in range(4):
            blocks += [Block(chans[i], chans[i + 1], 1 if i == 0 else 2), Block(chans[i + 1], chans[i + 1], 1)]
        self.layers, self.dim = nn.Sequential(*blocks), 8 * width

    def forward(self, x):  # [B,3,32,32] -> [B, 8*width]
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


class Net(nn.Module):
    """z = g(f(x)): encoder f, projector g = Linear(8w -> 2048) -> ReLU -> Linear(-> 128), no BN."""

    def __init__(self, width=64):
        super().__init__()
        self.encoder = ResNet18(width)
        self.projector = nn.Sequential(nn.Linear(self.encoder.dim, 2048), nn.ReLU(), nn.Linear(2048, 128))

    def forward(self, x):
        return self.projector(self.encoder(x))


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
def a_infonce(z, adv_views=(), *, temperature=0.5, ip_alpha=None, adv_weight=1.0, hn_beta=None, tau_plus=0.0):
    """Generic (asymmetric) InfoNCE of V >= 2 views of N >= 2 instances.

    z: [V, N, D] raw projections (normalised here, in fp32). adv_views: indices of adversarial views.
    Returns 1/(V N) sum over instances and ordered view pairs u != v of weight(u,v) * l(u->v), where
    every directed term moves only its anchor (keys are detached). ip_alpha=None: all weights 1;
    a float: clean->adv adv_weight*ip_alpha, adv->clean adv_weight*(1-ip_alpha), other pairs 1.
    hn_beta=None: plain denominator; a float: the per-row HCL hard-negative estimator with tau_plus.
    With V=2 and nothing else set this is SimCLR's NT-Xent."""
    V, N, _ = z.shape
    if V < 2 or N < 2:
        raise ValueError(f"a_infonce needs >= 2 views of >= 2 instances, got z of shape {tuple(z.shape)}")
    with torch.autocast(z.device.type, enabled=False):  # the loss runs in fp32, also under --amp
        return _a_infonce(z.float(), set(range(V)[i] for i in adv_views), temperature, ip_alpha, adv_weight,
                          hn_beta, tau_plus)


def _a_infonce(z, adv, temperature, ip_alpha, adv_weight, hn_beta, tau_plus):
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
        w = M * torch.softmax((hn_beta * S).masked_fill(same, -math.inf), 1)  # A-InfoNCE: w_ij, mean 1
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


# ---------------------------------------------------------------------------------------------------
# Attacks
# ---------------------------------------------------------------------------------------------------
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


def _ascend(loss_fn, x, x_adv, eps, step, steps):
    """steps of x_adv += step * sign(grad loss_fn), projected to the L_inf ball around x and to [0,1]."""
    with torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            grad, = torch.autograd.grad(loss_fn(x_adv), x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def _random_start(x, eps):
    return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)


def instance_pgd(embed, x, x_pos, *, eps=8 / 255, step=0.007, steps=7, temperature=0.5,
                 random_start=True, gather=None):
    """RoCL's instance-wise attack: perturb x to maximise the NT-Xent of [x_adv; x_pos].
    embed (encoder + projector) runs in eval mode, so x_pos's embedding is fixed: computed once.
    gather(t, dim) concatenates over ranks, so that the attack sees the global batch's negatives."""
    gather = gather or (lambda t, dim: t)
    with eval_mode(embed):
        with torch.no_grad():
            z_pos = embed(x_pos)  # [N, D]
        loss = lambda xa: a_infonce(gather(torch.stack([embed(xa), z_pos]), 1), temperature=temperature)
        return _ascend(loss, x, _random_start(x, eps) if random_start else x, eps, step, steps)


def pgd(classifier, x, y, *, eps=8 / 255, step=2 / 255, steps=20):
    """Supervised L_inf PGD with random start on cross-entropy (Madry et al.), classifier in eval mode."""
    with eval_mode(classifier):
        return _ascend(lambda xa: F.cross_entropy(classifier(xa), y), x, _random_start(x, eps), eps, step, steps)


def trades_loss(model, x, y, *, beta=6.0, eps=8 / 255, step=2 / 255, steps=10):
    """TRADES (Zhang et al. 2019): CE(f(x), y) + beta KL(f(x) || f(x_adv)), x_adv maximising the KL."""
    with eval_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x), 1)
        kl = lambda xa: F.kl_div(F.log_softmax(model(xa), 1), p_nat, reduction="sum")
        x_adv = _ascend(kl, x, x + 0.001 * torch.randn_like(x), eps, step, steps)
    logits = model(x)
    return F.cross_entropy(logits, y) + beta * F.kl_div(
        F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")


# ---------------------------------------------------------------------------------------------------
# Evaluation: SLF, ALF, AFF (SPEC 5); SA = clean accuracy, RA = accuracy under PGD, always in fp32
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def strict_fp32(device):
    """No autocast and no TF32 (cuDNN allows TF32 convolutions by default) for evaluation attacks."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def batches(n, bs, shuffle=False, device="cpu"):
    idx = torch.randperm(n, device=device) if shuffle else torch.arange(n, device=device)
    return idx.split(bs)


def accuracy(classifier, x, y, bs, attack=None):
    """Top-1 accuracy of classifier on uint8 images x, after attack(classifier, x, y) if given."""
    correct = 0
    with eval_mode(classifier):
        for idx in batches(len(x), bs, device=x.device):
            xb, yb = x[idx].float() / 255, y[idx]
            if attack:
                xb = attack(classifier, xb, yb)
            with torch.no_grad():
                correct += (classifier(xb).argmax(1) == yb).sum().item()
    return correct / len(x)


def train_head(head, params, loss_fn, n, epochs, milestones, bs, lr, wd, log=None):
    """SGD(momentum 0.9) with lr/10 at each milestone epoch; loss_fn(idx) -> loss of that batch."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1)
    for epoch in range(epochs):
        for idx in batches(n, bs, shuffle=True, device=head.weight.device):
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if log:
            log(f"  epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    return head


def guards(classifier, x, y, bs, eps, steps):
    """Cheap checks that catch masked or broken gradients, on <= 200 test images: RA <= SA, RA falls
    as eps grows and is ~0 at eps 64/255, and 2.5x more PGD steps do not raise RA."""
    x, y = x[:200], y[:200]
    tol = 0.01 + 1 / len(x)
    at = lambda e, k: accuracy(classifier, x, y, bs, lambda m, xb, yb: pgd(m, xb, yb, eps=e, step=2.5 * e / k, steps=k))
    g = {"sa": accuracy(classifier, x, y, bs), "ra_eps": {f"{e}/255": at(e / 255, steps) for e in (2, 8, 16, 64)}}
    g[f"ra_{steps}_steps"], g[f"ra_{5 * steps // 2}_steps"] = at(eps, steps), at(eps, 5 * steps // 2)
    chain = [g["sa"], *g["ra_eps"].values()]
    g["ok"] = (all(a + tol >= b for a, b in zip(chain, chain[1:])) and chain[-1] <= 0.05
               and g[f"ra_{5 * steps // 2}_steps"] <= g[f"ra_{steps}_steps"] + tol)
    return g


def autoattack(classifier, x, y, bs, eps, n_classes):
    import torchattacks  # optional; checked before training starts
    aa = torchattacks.AutoAttack(classifier, norm="Linf", eps=eps, version="standard", n_classes=n_classes, seed=0)
    return accuracy(classifier, x, y, bs, lambda m, xb, yb: aa(xb, yb))


def evaluate(args, encoder, data, device, log=print):
    """SLF / ALF / AFF heads on the frozen (or, AFF, finetuned) encoder; SA and RA on the test set."""
    x_tr, y_tr, x_te, y_te, n_classes = data
    bs, res = args.eval_batch_size, {}
    ra_attack = lambda m, xb, yb: pgd(m, xb, yb, eps=args.eval_eps, step=args.eval_step, steps=args.eval_steps)
    ft_milestones = [max(1, int(0.6 * args.ft_epochs)), max(1, int(0.8 * args.ft_epochs))]  # 15, 20 of 25
    encoder = copy.deepcopy(encoder).float().to(memory_format=torch.contiguous_format).requires_grad_(False)
    torch.manual_seed(args.seed)  # heads and attacks draw the same numbers after training and in --eval-only

    def score(name, clf):
        res[f"{name}_sa"] = accuracy(clf, x_te, y_te, bs)
        res[f"{name}_ra"] = accuracy(clf, x_te, y_te, bs, ra_attack)
        if args.autoattack:
            res[f"{name}_aa"] = autoattack(clf, x_te, y_te, bs, args.eval_eps, n_classes)
        log(f"{name.upper()}: SA {res[f'{name}_sa']:.4f}  RA {res[f'{name}_ra']:.4f}"
            + (f"  AA {res[f'{name}_aa']:.4f}" if args.autoattack else ""))

    with strict_fp32(device):
        if "slf" in args.eval:  # frozen encoder: features computed once, 150 epochs cost seconds
            with eval_mode(encoder), torch.no_grad():
                feats = torch.cat([encoder(x_tr[i].float() / 255) for i in batches(len(x_tr), bs, device=device)])
            head = nn.Linear(encoder.dim, n_classes).to(device)
            train_head(head, head.parameters(), lambda i: F.cross_entropy(head(feats[i]), y_tr[i]),
                       len(feats), 150, [30, 50, 100], bs, lr=0.1, wd=5e-4)
            clf = nn.Sequential(encoder, head)
            score("slf", clf)
            res["guards"] = guards(clf, x_te, y_te, bs, args.eval_eps, args.eval_steps)
            log(f"guards ({'ok' if res['guards']['ok'] else 'FAILED'}): {json.dumps(res['guards'])}")
        if "alf" in args.eval:  # head trained on PGD-10 examples made through the frozen encoder + head
            head = nn.Linear(encoder.dim, n_classes).to(device)
            clf = nn.Sequential(encoder, head)

            def alf_loss(i):
                xa = pgd(clf, x_tr[i].float() / 255, y_tr[i], eps=args.eval_eps, step=2 / 255, steps=10)
                with eval_mode(encoder), torch.no_grad():
                    f = encoder(xa)
                return F.cross_entropy(head(f), y_tr[i])
            log("ALF:")
            train_head(head, head.parameters(), alf_loss, len(x_tr), args.ft_epochs, ft_milestones, bs, 0.1, 2e-4, log)
            score("alf", clf)
        if "aff" in args.eval:  # TRADES on the whole network, from the pretrained encoder
            enc = copy.deepcopy(encoder).requires_grad_(True)
            head = nn.Linear(encoder.dim, n_classes).to(device)
            clf = nn.Sequential(enc, head).train()
            log("AFF:")
            train_head(head, clf.parameters(), lambda i: trades_loss(clf, x_tr[i].float() / 255, y_tr[i], eps=args.eval_eps),
                       len(x_tr), args.ft_epochs, ft_milestones, bs, 0.1, 2e-4, log)
            score("aff", clf)
    return res


# ---------------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------------
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
    return instance_pgd(net, x1, x2, eps=args.eps, step=args.step, steps=args.attack_steps,
                        temperature=args.temperature, gather=gather)


def pretrain_loss(net, x1, x2, x_adv, args, gather=None):
    """The step's loss on views x1, x2 and (adversarial methods) x_adv; -> (loss, {term: value})."""
    gather, n = gather or (lambda t, dim: t), len(x1)
    if args.method == "simclr":
        loss = a_infonce(gather(net(torch.cat([x1, x2])).view(2, n, -1), 1), temperature=args.temperature)
        return loss, {"infonce": loss.detach()}
    z = net(torch.cat([x1, x2, x_adv])).view(3, n, -1)  # [V=3, N, D]: one train-mode forward
    infonce = a_infonce(gather(z, 1), adv_views=(2,), temperature=args.temperature,
                        ip_alpha=args.ip_alpha if args.method in ("infpos", "both") else None,
                        adv_weight=args.adv_weight, tau_plus=args.tau_plus,
                        hn_beta=args.hn_beta if args.method in ("hardneg", "both") else None)
    if args.reg_forward == "shared":  # x_adv and x2 rows of the main forward: its 3N-batch BN statistics
        z_reg = torch.stack([z[2], z[1]])
    else:  # RoCL's regulariser in its own train-mode forward, as the official code: 2N-batch statistics
        z_reg = net(torch.cat([x_adv, x2])).view(2, n, -1)
    reg = a_infonce(gather(z_reg, 1), temperature=args.temperature)
    return infonce + args.reg_weight * reg, {"infonce": infonce.detach(), "reg": reg.detach()}


def save_checkpoint(path, net, opt, args, epoch, step, train_s, rng):
    """Atomic: written to path.tmp, synced, renamed; a kill at any moment leaves the old file intact."""
    state = {"encoder": net.encoder.state_dict(), "projector": net.projector.state_dict(),
             "optimizer": opt.state_dict(), "epoch": epoch, "step": step, "train_s": train_s,
             "args": vars(args), "rng": rng}
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a readable checkpoint (corrupt or truncated?): {type(e).__name__}")
    missing = {"encoder", "projector", "optimizer", "epoch", "step", "args", "rng"} - set(ck if isinstance(ck, dict) else ())
    if missing:
        raise UsageError(f"{path} is not an ainfonce checkpoint: it lacks {sorted(missing)}")
    return path, ck


def load_strict(module, state, what):
    """load_state_dict(strict=True), with a one-line error that names the keys that do not match."""
    own = module.state_dict()
    bad = ([f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
           + [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape])
    if bad:
        raise UsageError(f"checkpoint {what} does not match the model ({len(bad)} keys): " + "; ".join(bad[:4]))
    module.load_state_dict(state, strict=True)


def prepare_out(args, net):
    """Refuse to clobber another run; fail now, not after training, if the output cannot be written."""
    ckpt = os.path.join(args.out, "last.pt")
    if os.path.exists(ckpt) and not args.resume and not args.overwrite:
        raise UsageError(f"{args.out} already holds a run: pass --resume {args.out} to continue it "
                         f"or --overwrite to start over")
    parent = os.path.abspath(args.out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write to {args.out}: {parent} is not a directory")
    need = 3 * 4 * sum(p.numel() for p in net.parameters())  # params + momentum, twice during a save
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UsageError(f"only {free / 2**20:.0f} MiB free for {args.out}; checkpoints need {need / 2**20:.0f} MiB")
    try:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, ".write-test"), "wb") as f:
            f.write(b"0" * 4096)
        os.remove(os.path.join(args.out, ".write-test"))
    except OSError as e:
        raise UsageError(f"cannot write to {args.out}: {e.strerror or e}")
    if args.overwrite and not args.resume:
        for name in ("last.pt", "log.jsonl", "results.json"):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def pretrain(args, net, x_train, device, rank, world, ck=None):
    """Pretraining loop; checkpoints every epoch (and --ckpt-every steps). -> (seconds, images/s)."""
    x_train, b = x_train.to(device), args.batch_size // world  # b: instances per rank
    steps_per_epoch = len(x_train) // args.batch_size
    total, warmup = steps_per_epoch * args.epochs, steps_per_epoch * args.warmup_epochs
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9)  # weight decay lives inside LARS
    ckpt, step, train_s, saved = os.path.join(args.out, "last.pt"), 0, 0.0, None
    if ck:
        opt.load_state_dict(ck["optimizer"])
        step, train_s, saved = ck["step"], ck["train_s"], ck["epoch"]
        if len(ck["rng"]) == world:
            set_rng_state(ck["rng"][rank])
        else:  # another number of processes: fresh streams, so not bit-exact
            torch.manual_seed(args.seed + rank + 7919 * step)
    model = torch.compile(net) if args.compile else net
    gather = gather_cat if world > 1 else None
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    stop = torch.zeros(1, dtype=torch.int32)  # set by SIGTERM / SIGINT: finish the step, save, exit
    handlers = {s: signal.signal(s, lambda *_: stop.fill_(1)) for s in (signal.SIGTERM, signal.SIGINT)}

    def save(epoch, seconds):
        nonlocal saved
        states = [rng_state()] * world
        if world > 1:
            dist.all_gather_object(states, rng_state())
        if rank == 0:
            save_checkpoint(ckpt, net, opt, args, epoch, step, seconds, states)
        saved = epoch

    try:
        for epoch in range(step // steps_per_epoch, args.epochs):
            g = torch.Generator().manual_seed(args.seed * 100003 + epoch)  # same order on every rank
            perm = torch.randperm(len(x_train), generator=g).to(device)
            t0, first, sums = time.time(), step, {}
            for s in range(step - epoch * steps_per_epoch, steps_per_epoch):
                idx = perm[s * args.batch_size + rank * b:s * args.batch_size + (rank + 1) * b]
                x1, x2 = (augment(x_train[idx]).contiguous(memory_format=layout) for _ in range(2))
                lr = lr_at(step, total, warmup, args.lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                with amp:
                    x_adv = None if args.method == "simclr" else attack_views(model, x1, x2, args, gather)
                    loss, terms = pretrain_loss(model, x1, x2, x_adv, args, gather)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if world > 1:
                    allreduce_grads(params, world)
                grad_norm = lars_(params, args.wd)
                if not torch.isfinite(loss + grad_norm):  # before the update: the weights stay good
                    values = ", ".join(f"{k} {v.item():.4g}" for k, v in terms.items())
                    raise NonFiniteLoss(
                        f"non-finite loss at epoch {epoch + 1}, step {step} (loss {loss.item():.4g}: {values}; "
                        f"grad norm {grad_norm.item():.4g}); last good checkpoint: "
                        + (f"{ckpt} (epoch {saved}); resume it with --resume {args.out} and a smaller --lr"
                           if saved is not None else "none yet; restart with a smaller --lr"))
                opt.step()
                step += 1
                for k, v in {"loss": loss.detach(), **terms}.items():
                    sums[k] = sums.get(k, 0) + v
                if world > 1:
                    dist.all_reduce(stop, dist.ReduceOp.MAX)  # every rank stops at the same step
                if stop.item() or (args.ckpt_every and step % args.ckpt_every == 0):
                    save(epoch, train_s + time.time() - t0)
                    if stop.item():
                        raise KeyboardInterrupt
            dt = time.time() - t0
            train_s += dt
            save(epoch + 1, train_s)
            n = max(1, step - first)
            rec = {"epoch": epoch + 1, "step": step, **{k: v.item() / n for k, v in sums.items()},
                   "lr": lr, "images_per_s": n * args.batch_size / dt, "train_s": train_s}
            if rank == 0:
                eta = (total - step) * dt / n
                print(f"epoch {epoch + 1:4d}/{args.epochs} | loss {rec['loss']:.4f} | lr {lr:.4f} | "
                      f"{rec['images_per_s']:7.1f} img/s | ETA {eta // 3600:.0f}:{eta % 3600 // 60:02.0f}:"
                      f"{eta % 60:02.0f}", flush=True)
                with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted: {ckpt} holds step {step}; continue with --resume {args.out}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return train_s, step * args.batch_size / max(train_s, 1e-9)


# ---------------------------------------------------------------------------------------------------
# Benchmark: our step against a straightforward version of the official step, on random data
# ---------------------------------------------------------------------------------------------------
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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randint(0, 256, (4 * args.batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    net = Net(args.width).to(device).to(memory_format=layout)
    ref = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for m in (net, ref))
    model = torch.compile(net) if args.compile else net
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    warmup, n = 2, args.benchmark_steps
    times = {"data_s": 0.0, "attack_s": 0.0, "fwd_bwd_s": 0.0, "official_step_s": 0.0}

    def timed(key, i, fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        if i >= warmup:
            times[key] += (time.perf_counter() - t) / n
        return out

    for i in range(warmup + n):
        xb = x[torch.randint(0, len(x), (args.batch_size,), device=device)]
        x1, x2 = timed("data_s", i, lambda: [augment(xb).contiguous(memory_format=layout) for _ in range(2)])
        with amp:
            x_adv = timed("attack_s", i, lambda: None if args.method == "simclr" else attack_views(model, x1, x2, args))

            def fwd_bwd():
                loss, _ = pretrain_loss(model, x1, x2, x_adv, args)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lars_(list(net.parameters()), args.wd)
                opt.step()
            timed("fwd_bwd_s", i, fwd_bwd)
        if args.method != "simclr":
            x1c, x2c = x1.contiguous(), x2.contiguous()
            timed("official_step_s", i, lambda: official_step(ref, ref_opt, x1c, x2c, args))
    step_s = times["data_s"] + times["attack_s"] + times["fwd_bwd_s"]
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
           "method": args.method, "width": args.width, "batch_size": args.batch_size,
           "attack_steps": args.attack_steps, "amp": args.amp, "channels_last": args.channels_last,
           "compile": args.compile, "steps": n, "step_s": step_s, "images_per_s": args.batch_size / step_s,
           **times, "ratio_vs_official": step_s / times["official_step_s"] if times["official_step_s"] else None}
    print(f"ours {step_s:.3f} s/step ({res['images_per_s']:.1f} img/s): data {times['data_s']:.3f}, "
          f"attack {times['attack_s']:.3f}, fwd+bwd {times['fwd_bwd_s']:.3f}; official {times['official_step_s']:.3f}")
    print(json.dumps(res))
    return res


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------
def run(args):
    t_start = time.time()
    device, rank, world = setup(args)
    if args.benchmark:
        return benchmark(args, device)
    if args.autoattack:
        try:
            import torchattacks  # noqa: F401
        except ImportError:
            raise UsageError("--autoattack needs the optional torchattacks package: pip install torchattacks")
    ck = None
    if args.eval_only or args.resume:
        path, ck = load_checkpoint(args.eval_only or args.resume)
        args.out = args.out or os.path.dirname(path)
    if args.eval_only:  # data and model as the checkpoint was trained; evaluation options from the CLI
        for k in ("dataset", "data_dir", "subset", "width", "method", "epochs", "seed"):
            setattr(args, k, ck["args"][k])
    elif ck:
        diff = [f"--{k.replace('_', '-')} {ck['args'].get(k)} (checkpoint) vs {getattr(args, k)}"
                for k in RESUME_KEYS if ck["args"].get(k) != getattr(args, k)]
        if diff:
            raise UsageError(f"cannot resume {path} with other arguments: " + ", ".join(diff))
    if world > 1 and args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    net = Net(args.width)
    if ck:
        load_strict(net.encoder, ck["encoder"], "encoder")
        load_strict(net.projector, ck["projector"], "projector")
    x_tr, y_tr, x_te, y_te, n_classes = load_data(args.dataset, args.data_dir)
    keep = fixed_shuffle(len(x_tr), args.subset)
    x_tr, y_tr = x_tr[keep], y_tr[keep]
    if args.batch_size > len(x_tr) and not args.eval_only:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {len(x_tr)} training images")
    if not args.eval_only and rank == 0:  # every check above has passed: only now is anything written
        prepare_out(args, net)
    net = net.to(device).to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if world > 1 and device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    results = {"method": args.method, "dataset": args.dataset, "epochs": args.epochs, "seed": args.seed,
               "width": args.width, "n_train": len(x_tr), "batch_size": args.batch_size,
               "attack_steps": args.attack_steps, "device": str(device)}
    if not args.eval_only:
        if rank == 0:
            write_json(os.path.join(args.out, "config.json"), vars(args))
        if ck and ck["step"]:
            print(f"resuming {path} at epoch {ck['epoch']}, step {ck['step']}")
        t, ips = pretrain(args, net, x_tr, device, rank, world, ck)
        results.update(pretrain_s=t, images_per_s=ips)
    if world > 1:  # evaluation runs on rank 0 alone, with batch norm back to per-process statistics
        dist.barrier()  # all ranks reach teardown together (a gloo rank can still abort at exit, rarely)
        dist.destroy_process_group()
    if rank != 0:
        return results
    if args.eval:
        keep = fixed_shuffle(len(x_te), args.eval_subset)
        data = (x_tr.to(device), y_tr.to(device), x_te[keep].to(device), y_te[keep].to(device), n_classes)
        results.update(eval_eps=args.eval_eps, eval_step=args.eval_step, eval_steps=args.eval_steps,
                       n_test=len(keep), eval_subset=args.eval_subset,
                       **evaluate(args, net.encoder, data, device))
    results["wall_s"] = time.time() - t_start  # the whole invocation: data, pretraining, evaluation
    os.makedirs(args.out, exist_ok=True)
    old_path = os.path.join(args.out, "results.json")
    old = json.load(open(old_path)) if args.eval_only and os.path.exists(old_path) else {}
    write_json(old_path, {**old, **results})
    return results


def main(argv=None):
    """CLI entry point; returns the results dict (for tests). Bad input: one line on stderr, exit 2."""
    try:
        return run(parse_args(argv))
    except UsageError as e:
        print(f"ainfonce.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except NonFiniteLoss as e:
        print(f"ainfonce.py: {e}", file=sys.stderr)
        raise SystemExit(3)


if __name__ == "__main__":
    main()
