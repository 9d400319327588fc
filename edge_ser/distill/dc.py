"""Dataset Condensation by gradient matching (DC, Zhao, Mopuri & Bilen, ICLR 2021): make the gradients a
network gets from the synthetic set match those from real data, along networks trained on the synthetic set.

Read top to bottom like the reference code (DatasetCondensation/main.py): per outer iteration a fresh
network; ``outer_loop`` times: fix BatchNorm statistics on a real batch, match per-class gradients
(layer-wise cosine distance, biases and norm parameters ignored as in ``distance_wb``), update the
synthetic set, then train the network ``inner_loop`` steps on the synthetic set. Synthetic features are
optimised in θ0's normalised input space (paper lr_img 0.1, SGD momentum 0.5) and stored in raw log-Mel
space. With ``cfg.soft_labels`` the label logits are learned too (the synthetic loss uses their softmax).

The settings (learning rates, loops, the schedule a pack ships, default iterations):
:class:`~.settings.DCSettings`; ``outer_loop`` / ``inner_loop`` default to the paper's by ipc (1 -> 1/1,
10 -> 10/50, 20 -> 20/25, 50 -> 50/10), the outer loop capped by ``max_outer`` for a CPU budget.

>>> syn = distill_dc(train, DistillConfig(method="dc", ipc=1, iterations=50), model_cfg, theta0)  # doctest: +SKIP
"""
from __future__ import annotations

import time
from typing import Mapping, Optional

import numpy as np

from ..config import ModelConfig
from ..data import FeatureSet
from .base import DistillConfig, SyntheticSet
from .common import peak_rss_mb, setup_threads
from .coreset import class_indices
from .dm import init_synthetic, paper_schedule, random_net, validation_uar


def loops_for_ipc(ipc: int):
    """(outer_loop, inner_loop) as in the reference ``get_loops``."""
    if ipc == 1:
        return 1, 1
    if ipc <= 10:
        return 10, 50
    if ipc <= 20:
        return 20, 25
    return 50, 10


def distance_wb(gw_real, gw_syn):
    """Layer-wise gradient distance of the reference: sum over output units of (1 - cosine); 0 for 1-d."""
    import torch

    shape = gw_real.shape
    if len(shape) == 1:
        return torch.zeros(())
    gw_real = gw_real.reshape(shape[0], -1)
    gw_syn = gw_syn.reshape(shape[0], -1)
    cos = (gw_real * gw_syn).sum(dim=-1) / (gw_real.norm(dim=-1) * gw_syn.norm(dim=-1) + 1e-6)
    return (1 - cos).sum()


def match_loss(gw_syn, gw_real):
    return sum(distance_wb(r, s) for r, s in zip(gw_real, gw_syn))


def distill_dc(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig, theta0: Mapping[str, np.ndarray],
               val: Optional[FeatureSet] = None, progress: bool = False, workdir=None) -> SyntheticSet:
    """Gradient-matching condensation for ``model_cfg`` networks; see the module docstring for the params."""
    import torch
    import torch.nn.functional as F

    from ..schedule import loss_fn

    setup_threads(cfg.threads)
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    s = cfg.settings
    iterations = cfg.iterations_or_default
    lr_img, lr_net, batch_real = s.lr_img, s.lr_net, s.batch_real
    outer_loop, inner_loop = loops_for_ipc(cfg.ipc)
    outer_loop = s.outer_loop if s.outer_loop is not None else min(outer_loop, s.max_outer)
    inner_loop = s.inner_loop if s.inner_loop is not None else inner_loop
    theta0_prob, eval_every = s.theta0_prob, s.eval_every
    C, ipc = train.num_classes, cfg.ipc
    by_class = class_indices(train)

    # 1. synthetic data (normalised space) and optionally learnable label logits
    mean = torch.as_tensor(np.asarray(theta0["input_norm.mean"]))[None, :, None]
    std = torch.as_tensor(np.asarray(theta0["input_norm.std"])).clamp_min(1e-3)[None, :, None]
    X0, y_syn, init_idx = init_synthetic(train, cfg, rng)
    z_syn = ((torch.as_tensor(X0) - mean) / std).requires_grad_(True)
    params_img = [z_syn]
    label_logits = None
    if cfg.soft_labels:
        label_logits = (F.one_hot(torch.as_tensor(y_syn), C).float() * 3.0).requires_grad_(True)
        params_img.append(label_logits)
    optimizer_img = torch.optim.SGD([{"params": [z_syn], "lr": lr_img},
                                     *([{"params": [label_logits], "lr": s.lr_label}]
                                       if label_logits is not None else [])], momentum=0.5)
    schedule = paper_schedule(len(y_syn), cfg)
    history = []

    def current_X():
        return (z_syn.detach() * std + mean).numpy().astype(np.float32)

    def current_y():
        if label_logits is None:
            return y_syn
        return torch.softmax(label_logits.detach(), dim=1).numpy().astype(np.float32)

    def syn_targets(c):
        if label_logits is None:
            return torch.full((ipc,), c, dtype=torch.long)
        return torch.softmax(label_logits[c * ipc:(c + 1) * ipc], dim=1)

    bar = range(iterations)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="dc", unit="it")
    for it in bar:
        # 2. a fresh network (or θ0) and its optimiser for the inner loop
        net = random_net(model_cfg, theta0, int(rng.integers(1 << 30)) + 1000, rng.random() < theta0_prob)
        net_params = list(net.parameters())
        optimizer_net = torch.optim.SGD(net_params, lr=lr_net, momentum=0.5)
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        loss_avg = 0.0
        for ol in range(outer_loop):
            # 3. freeze BatchNorm statistics on a real batch of every class
            net.train()
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            with torch.no_grad():
                bn_idx = np.concatenate([rng.choice(ix, size=min(16, len(ix)), replace=False) for ix in by_class])
                net(torch.as_tensor(train.X[bn_idx]))
            for m in bns:
                m.eval()

            # 4. per-class gradient matching, then one step on the synthetic data
            loss = torch.zeros(())
            for c in range(C):
                idx = rng.choice(by_class[c], size=min(batch_real, len(by_class[c])), replace=False)
                out_real = net(torch.as_tensor(train.X[idx]))
                loss_real = F.cross_entropy(out_real, torch.as_tensor(train.y[idx]))
                gw_real = [g.detach() for g in torch.autograd.grad(loss_real, net_params)]
                x_syn = z_syn[c * ipc:(c + 1) * ipc] * std + mean
                loss_syn = loss_fn(net(x_syn), syn_targets(c))
                gw_syn = torch.autograd.grad(loss_syn, net_params, create_graph=True)
                loss = loss + match_loss(gw_syn, gw_real)
            optimizer_img.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_img.step()
            loss_avg += float(loss.detach())
            if ol == outer_loop - 1:
                break

            # 5. train the network on the (current) synthetic data
            net.train()
            X_now = z_syn.detach() * std + mean
            y_now = torch.as_tensor(current_y())
            for _ in range(inner_loop):
                optimizer_net.zero_grad(set_to_none=True)
                loss_fn(net(X_now), y_now).backward()
                optimizer_net.step()

        record = {"iteration": it + 1, "loss": loss_avg / (outer_loop * C)}
        if val is not None and (it + 1 == iterations or (eval_every and (it + 1) % eval_every == 0)):
            record["val_uar"] = validation_uar(current_X(), current_y(), schedule, model_cfg, theta0, val)
        history.append(record)
        if progress:
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "val_uar")})

    stats = {"seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(), "iterations": iterations,
             "outer_loop": outer_loop, "inner_loop": inner_loop, "init_indices": init_idx.tolist(),
             "history": history}
    return SyntheticSet(X=current_X(), y=current_y(), classes=train.classes, schedule=schedule, method=cfg.method,
                        ipc=cfg.ipc, stats=stats)
