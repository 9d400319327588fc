"""Fixed-initialisation distillation (the product default): a synthetic set made for the one θ0 a pack ships.

The device builds θ0 and runs ``train_schedule`` (plain full-batch SGD with a learned step size for a
chosen number of epochs). Everything here is optimised for exactly that:

1. **Experts from θ0** (``experts.py``, cached on disk by data hash + θ0 hash): ``experts`` full-data runs
   that all start at θ0 and differ only in data order and SpecAugment draws (Adam lr 1e-3, per epoch).
2. **Synthetic set**: ``ipc`` real clips per class (``cfg.init="real"``; chosen by herding in the experts'
   embedding space with ``init_select="herding"``, the default, or at random with ``"random"``) or noise.
   Labels are the class (hard), or with ``teacher_labels`` the experts' ensemble soft labels at
   ``temperature`` (off by default: it lost to hard labels in our small-scale test), learnable when
   ``cfg.soft_labels``.
3. **Trajectory matching from θ0**: each iteration picks an expert and a start epoch ``t`` (``t = 0``, θ0
   itself, with probability ``p_theta0``, else ``t <= max_start_epoch``); the student takes ``syn_steps``
   full-batch SGD steps with the learnable step size from θ_t, exactly the device's update rule, and the
   loss is MTT's normalised distance ``||θ_student - θ_{t+M}||² / ||θ_t - θ_{t+M}||²``. The gradient for
   the clips (and labels) is first order: the Jacobian of the unroll is taken as identity between steps,
   and each step's mixed second derivative is a central finite difference of input gradients
   (as in DARTS), so one iteration costs ``3 * syn_steps`` forward/backward passes and no second-order
   graph (BatchNorm double-backward on 64x298 inputs is what makes exact MTT slow on a CPU). The step size
   gets the same first-order gradient. Clips, labels and log step size are updated with Adam.
4. **Schedule**: the step size (times ``lr_factors``) and the epoch count (``epoch_grid``; a device must
   train in about a minute) are chosen by validation UAR of θ0 trained with ``train_schedule``; the best
   synthetic set seen on validation (every ``eval_every`` iterations) is kept.

Params (``cfg.param(key, default)``): init_select "herding", experts 2, expert_epochs 20, expert_lr 1e-3,
teacher_labels False,
temperature 2.0, max_start_epoch 10, p_theta0 0.5, expert_epochs_ahead 1, syn_steps 2, lr_init 0.02,
lr_img 0.01, lr_lr 0.01, lr_label 0.05, fd_eps 0.01, eval_epochs 20, eval_every 20, lr_factors (1, 3, 10),
epoch_grid (5, 10, 20, 30, 40), val_speakers 2 (held out of ``train`` when ``val`` is None).
Default iterations: 100.

>>> syn = distill_fixed_init(train, DistillConfig(ipc=10), model_cfg, theta0, val=val)  # doctest: +SKIP
>>> syn.schedule.lr, syn.schedule.epochs  # doctest: +SKIP
"""
from __future__ import annotations

import json
import time
from typing import Dict, List, Mapping, Optional

import numpy as np

from ..config import ModelConfig
from ..data import FeatureSet
from ..schedule import Schedule
from .base import DistillConfig, SyntheticSet
from .mtt import (init_synthetic, load_checkpoint, make_bar, peak_rss_mb, save_checkpoint,
                  select_schedule, setup_threads, split_validation, val_uar, workdir_for)


def teacher_soft_labels(X: np.ndarray, model_cfg: ModelConfig, states, temperature: float) -> np.ndarray:
    """Mean expert logits on ``X`` (eval mode), softened at ``temperature`` -> (N, C) float32 rows."""
    from ..models import build_model, load_state_arrays
    from ..train import predict_logits

    logits = np.mean([predict_logits(load_state_arrays(build_model(model_cfg, 0), s), X) for s in states], axis=0)
    z = logits / float(temperature)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def herding_init(train: FeatureSet, ipc: int, model_cfg: ModelConfig, states) -> np.ndarray:
    """Indices of ``ipc`` clips per class chosen by herding in the experts' (mean) embedding space:
    greedily, the clip that keeps the running mean of the chosen ones closest to the class mean."""
    import torch

    from ..models import build_model, load_state_arrays

    feats = []
    with torch.no_grad():
        for s in states:
            model = load_state_arrays(build_model(model_cfg, 0), s).eval()
            feats.append(np.concatenate([model.embed(torch.as_tensor(train.X[i: i + 64])).numpy()
                                         for i in range(0, len(train.X), 64)]))
    F = np.mean(feats, axis=0)
    chosen = []
    for c in range(train.num_classes):
        idx = np.flatnonzero(train.y == c)
        f = F[idx]
        mu, total, picked = f.mean(0), np.zeros_like(f[0]), []
        for i in range(min(ipc, len(idx))):
            dist = np.linalg.norm(mu[None] - (total[None] + f) / (i + 1), axis=1)
            dist[picked] = np.inf
            j = int(np.argmin(dist))
            picked.append(j)
            total += f[j]
        picked += [picked[k % len(picked)] for k in range(ipc - len(picked))]
        chosen += idx[picked].tolist()
    return np.asarray(chosen)


def distill_fixed_init(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig,
                       theta0: Mapping[str, np.ndarray], val: Optional[FeatureSet] = None, progress: bool = False,
                       workdir=None) -> SyntheticSet:
    """Distil ``train`` into ``cfg.ipc`` clips per class for the fixed initialisation ``theta0``."""
    import torch
    from torch.func import functional_call

    from ..models import build_model
    from ..train import loss_fn
    from .experts import ExpertConfig, expert_buffer, load_trajectory

    t_start = time.perf_counter()
    setup_threads(cfg)
    P = lambda key, default: cfg.param(key, default)  # noqa: E731
    iterations = cfg.iterations if cfg.iterations is not None else 100
    train, val = split_validation(train, val, int(P("val_speakers", 2)))
    wd = workdir_for(cfg, model_cfg, train, theta0, workdir)
    C = model_cfg.num_classes

    # 1. experts that all start at θ0
    expert_cfg = ExpertConfig(epochs=int(P("expert_epochs", 20)), lr=float(P("expert_lr", 1e-3)))
    paths = expert_buffer(train, model_cfg, expert_cfg, theta0=theta0, count=int(P("experts", 2)),
                          threads=cfg.threads or 2, progress=progress)
    experts = [load_trajectory(p) for p in paths]
    ahead = int(P("expert_epochs_ahead", 1))
    max_start = max(0, min(int(P("max_start_epoch", 10)), expert_cfg.epochs - ahead))
    syn_steps = int(P("syn_steps", 2))
    eps = float(P("fd_eps", 0.01))

    # 2. synthetic set from real clips, labelled by the experts
    X0, y_hard = init_synthetic(train, cfg.ipc, cfg.init, cfg.seed)
    if cfg.init == "real" and P("init_select", "herding") == "herding":
        X0 = train.X[herding_init(train, cfg.ipc, model_cfg, [t.state(t.epochs) for t in experts])]
    if P("teacher_labels", False):
        y0 = teacher_soft_labels(X0, model_cfg, [t.state(t.epochs) for t in experts], float(P("temperature", 2.0)))
    else:
        y0 = np.eye(C, dtype=np.float32)[y_hard]
    learn_labels = bool(cfg.soft_labels)
    net = build_model(model_cfg, 0)
    names = [k for k, _ in net.named_parameters()]
    buffer_names = [k for k, _ in net.named_buffers()]
    x_syn = torch.tensor(X0, requires_grad=True)
    label_logits = torch.tensor(np.log(np.clip(y0, 1e-6, 1.0)), requires_grad=True)
    log_lr = torch.tensor(float(np.log(float(P("lr_init", 0.02)))), requires_grad=True)
    opt = torch.optim.Adam([{"params": [x_syn], "lr": float(P("lr_img", 0.01))},
                            {"params": [log_lr], "lr": float(P("lr_lr", 0.01))},
                            {"params": [label_logits], "lr": float(P("lr_label", 0.05)) if learn_labels else 0.0}])
    rng = np.random.default_rng(cfg.seed)
    history: List[Dict] = []
    start_it, best = 0, {"val_uar": -1.0}
    eval_schedule = Schedule(lr=float(P("lr_init", 0.02)), epochs=int(P("eval_epochs", 20)), seed=cfg.seed)

    ckpt = wd / "fixed_init_checkpoint.npz"
    loaded = load_checkpoint(ckpt, cfg)
    if loaded is not None:
        arrays, meta = loaded
        with torch.no_grad():
            x_syn.copy_(torch.as_tensor(arrays["x"]))
            label_logits.copy_(torch.as_tensor(arrays["labels"]))
            log_lr.fill_(float(arrays["log_lr"]))
        opt.load_state_dict(_opt_state_from_arrays(opt, arrays, meta["opt"]))
        rng.bit_generator.state = meta["rng"]
        start_it, history, best = meta["iteration"], meta["history"], meta["best"]
        best.update(x=arrays["best_x"], y=arrays["best_y"])

    def labels_now():
        return torch.softmax(label_logits, dim=1)

    def flat(params):
        return torch.cat([params[k].reshape(-1) for k in names])

    def syn_loss(params, buffers, x, labels):
        return loss_fn(functional_call(net, {**params, **buffers}, (x,)), labels)

    bar = make_bar(progress, iterations, "fixed-init", start_it)
    eval_every = max(1, int(P("eval_every", 20)))
    for it in range(start_it, iterations + 1):
        if (it % eval_every == 0 or it == iterations) and not (loaded is not None and it == start_it):
            lr_now = float(torch.exp(log_lr.detach()))
            y_np = labels_now().detach().numpy()
            uar = val_uar(x_syn.detach().numpy(), y_np, eval_schedule.replace(lr=lr_now), model_cfg, theta0, val)
            history.append({"iteration": it, "val_uar": uar, "lr": lr_now, "seconds": time.perf_counter() - t_start})
            if uar > best["val_uar"]:
                best = {"val_uar": uar, "iteration": it, "lr": lr_now, "x": x_syn.detach().numpy().copy(),
                        "y": y_np.copy()}
            opt_arrays, opt_meta = _opt_state_to_arrays(opt)
            save_checkpoint(ckpt, {"x": x_syn.detach().numpy(), "labels": label_logits.detach().numpy(),
                                   "log_lr": log_lr.detach().numpy(), "best_x": best["x"], "best_y": best["y"],
                                   **opt_arrays},
                            {"cfg": json.loads(cfg.to_json()), "iteration": it, "history": history,
                             "best": {k: v for k, v in best.items() if k not in ("x", "y")},
                             "rng": rng.bit_generator.state, "opt": opt_meta})
            if bar is not None:
                bar.set_postfix(val_uar=f"{uar:.3f}", lr=f"{lr_now:.3g}")
        if it == iterations:
            break

        # 3a. an expert segment θ_t -> θ_{t+M}; θ0 itself with probability p_theta0
        traj = experts[int(rng.integers(len(experts)))]
        start = 0 if rng.random() < float(P("p_theta0", 0.5)) else int(rng.integers(0, max_start + 1))
        theta = {k: torch.as_tensor(traj.states[k][start]) for k in names}
        target = flat({k: torch.as_tensor(traj.states[k][start + ahead]) for k in names})
        buffers = {k: torch.as_tensor(traj.states[k][start]).clone() for k in buffer_names}
        lr = torch.exp(log_lr.detach())
        x = x_syn.detach()
        labels = labels_now().detach()

        # 3b. the student: syn_steps full-batch SGD steps, the device's exact update
        points, grads = [], []
        for _ in range(syn_steps):
            params = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            g = torch.autograd.grad(syn_loss(params, buffers, x, labels), list(params.values()))
            points.append(theta)
            grads.append(g)
            theta = {k: v.detach() - lr * gi for (k, v), gi in zip(theta.items(), g)}
        start_vec = flat(points[0])
        denom = (start_vec - target).pow(2).sum()
        resid = flat(theta) - target
        loss = float(resid.pow(2).sum() / denom)

        # 3c. first-order gradients: d loss / d θ_end = 2 resid / denom; θ_end ≈ θ_t - lr Σ g_n
        w = 2.0 * resid / denom
        gsum = torch.stack([torch.cat([gi.reshape(-1) for gi in g]) for g in grads]).sum(0)
        d_log_lr = float(-(w * gsum).sum() * lr)            # d loss / d log lr
        v = -lr * w                                         # d loss / d g_n for every step n
        v_norm = float(v.norm())
        dx = torch.zeros_like(x)
        dlab = torch.zeros_like(labels)
        if v_norm > 0:
            v_unit = v / v_norm
            for point in points:                            # (∂g/∂x)^T v by central differences
                sides = []
                for sign in (1.0, -1.0):
                    offset, shifted = 0, {}
                    for k, p in point.items():
                        shifted[k] = p + sign * eps * v_unit[offset: offset + p.numel()].view_as(p)
                        offset += p.numel()
                    xg = x.clone().requires_grad_(True)
                    lg = labels.clone().requires_grad_(learn_labels)
                    loss_s = syn_loss(shifted, {k: b.clone() for k, b in buffers.items()}, xg, lg)
                    sides.append(torch.autograd.grad(loss_s, [xg, lg] if learn_labels else [xg]))
                dx += (sides[0][0] - sides[1][0]) * (v_norm / (2 * eps))
                if learn_labels:
                    dlab += (sides[0][1] - sides[1][1]) * (v_norm / (2 * eps))

        # 3d. Adam on clips, log step size and (optionally) label logits
        opt.zero_grad(set_to_none=False)
        x_syn.grad = dx
        log_lr.grad = torch.tensor(d_log_lr)
        if learn_labels:  # chain rule through the softmax
            p_lab = labels
            label_logits.grad = p_lab * (dlab - (dlab * p_lab).sum(1, keepdim=True))
        else:
            label_logits.grad = torch.zeros_like(label_logits)
        opt.step()
        with torch.no_grad():
            log_lr.clamp_(min=float(np.log(1e-4)), max=float(np.log(1.0)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val_uar=f"{history[-1]['val_uar']:.3f}",
                            lr=f"{float(torch.exp(log_lr.detach())):.3g}")
    if bar is not None:
        bar.close()

    # 4. the device's schedule: step size and epochs chosen on validation speakers
    schedule, sel_uar, table = select_schedule(
        best["x"], best["y"], Schedule(lr=best["lr"], epochs=1, seed=cfg.seed), model_cfg, theta0, val,
        lr_factors=tuple(P("lr_factors", (1.0, 3.0, 10.0))), epoch_grid=tuple(P("epoch_grid", (5, 10, 20, 30, 40))))
    stats = {"seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(), "iterations": iterations,
             "history": history, "best_iteration": best.get("iteration"), "val_uar": sel_uar,
             "schedule_selection": table, "experts": [str(p) for p in paths], "workdir": str(wd),
             "val_speakers": val.speaker_ids(), "init_labels": y_hard.tolist()}
    y_out = np.asarray(best["y"], np.float32)
    if not (P("teacher_labels", False) or learn_labels):
        y_out = y_hard  # plain class labels: the synthetic set carries int labels
    return SyntheticSet(X=np.asarray(best["x"], np.float32), y=y_out,
                        classes=train.classes, schedule=schedule, method="fixed-init", ipc=cfg.ipc, stats=stats)


def _opt_state_to_arrays(opt):
    """Adam state as flat arrays + JSON meta (so checkpoints need no pickle)."""
    sd = opt.state_dict()
    arrays, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for key, val in st.items():
            name = f"opt_{pid}_{key}"
            arrays[name] = val.detach().numpy().copy() if hasattr(val, "numpy") else np.asarray(val)
            meta["state"][str(pid)][key] = name
    return arrays, meta


def _opt_state_from_arrays(opt, arrays, meta):
    import torch

    state = {int(pid): {key: torch.as_tensor(arrays[name]) for key, name in st.items()}
             for pid, st in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}
