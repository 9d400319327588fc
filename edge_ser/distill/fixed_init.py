"""Fixed-initialisation distillation (the product default): a synthetic set made for the one θ0 a pack ships.

A device builds θ0 from the pack's tensors and runs ``train_schedule`` on the synthetic set with the schedule
chosen here. The set is matched to SGD steps taken from θ0 and chosen by what that device recipe makes of it.
Every knob is a field of :class:`~.settings.FixedInitSettings` (defaults and a one-line reason each); the
measured effect of each choice is in ``benchmarks/RESULTS.md`` and its history in ``CHANGELOG.md``.

1. **Experts from θ0** (``experts.py``, cached by data hash + θ0 hash): full-data runs that all start at θ0,
   weights saved after every epoch, trained with plain SGD (cosine-annealed, SpecAugment): the optimiser the
   student and the device use, so the student can follow the expert (Adam's per-parameter steps point elsewhere).
2. **Starting set**: ``ipc`` real clips per class chosen by herding in the experts' embedding space (or at random,
   or noise with ``DistillConfig.init="noise"``), optimised in the model's normalised input space
   ``z = (x - mean) / std`` (θ0's per-band statistics) so one image learning rate fits any corpus and front-end.
   Labels are the classes; ``teacher_labels`` uses the experts' softened predictions, ``soft_labels`` learns them.
3. **Trajectory matching anchored at θ0**: each iteration picks an expert and a start epoch ``t`` (θ0 itself with
   probability ``p_theta0``). The student takes ``syn_steps`` full-batch SGD steps from θ_t on the set with the
   learnable step size, with the device's time shift and SpecAugment masks when ``augment`` (differentiable: a
   gather and masked copies), and the loss is MTT's normalised distance
   ``||θ_student - θ_{t+M}||² / ||θ_t - θ_{t+M}||²``, back-propagated exactly through the unroll to the clips,
   the log step size (and learnable labels), all updated with Adam. Every expert starts at θ0, so the segments
   learned are the ones a device walks. ``anchor="student"`` starts a segment on the device's own path from θ0
   instead, so the set also learns to correct the device's drift.
4. **Selection and the device's recipe**: every ``eval_every`` iterations θ0 is trained on the current set as a
   device will train it (mini-batches of ``batch``, cosine-annealed step size, every clip shifted by up to
   ``shift`` of its length and masked afresh each epoch) and scored; the best set is kept, the starting set
   included. Sets are compared trained to the end because short of convergence 80 clips' UAR swings by many
   points between neighbouring step counts. The score (``select_on="val_train"``) is the mean UAR of the
   validation speakers and of the training speakers: two validation speakers alone rank sets noisily. Finally
   the device's step size and epochs are chosen the same way among the learned step size (x ``lr_factors``) and
   ``lr_grid``, for each of ``epoch_grid``; with ``robust_schedule`` the real-subset recipe competes too. The
   schedule travels in the pack (its shift and decay need pack format 1.2).

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
from .checkpoint import load_checkpoint, opt_state_from_arrays, opt_state_to_arrays, save_checkpoint, workdir_for
from .common import init_synthetic, make_bar, peak_rss_mb, setup_threads, split_validation
from .selection import select_schedule, val_uar

#: the experts' learning rate when ``expert_lr`` is not given, per ``expert_optimizer``
EXPERT_LR = {"sgd": 0.3, "adam": 1e-3}


def expert_soft_labels(X: np.ndarray, model_cfg: ModelConfig, states, temperature: float) -> np.ndarray:
    """Mean expert logits on ``X`` (eval mode), softened at ``temperature`` -> (N, C) float32 rows."""
    from ..models import build_model, load_state_arrays
    from ..train import predict_logits

    logits = np.mean([predict_logits(load_state_arrays(build_model(model_cfg, 0), s), X) for s in states], axis=0)
    z = logits / float(temperature)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def expert_embedding(train: FeatureSet, model_cfg: ModelConfig, states) -> np.ndarray:
    """Every training clip's embedding, averaged over the experts' final states."""
    import torch

    from ..models import build_model, load_state_arrays

    feats = []
    with torch.no_grad():
        for s in states:
            model = load_state_arrays(build_model(model_cfg, 0), s).eval()
            feats.append(np.concatenate([model.embed(torch.as_tensor(train.X[i: i + 64])).numpy()
                                         for i in range(0, len(train.X), 64)]))
    return np.mean(feats, axis=0)


def _herd(F: np.ndarray, y: np.ndarray, classes: int, ipc: int) -> np.ndarray:
    chosen = []
    for c in range(classes):
        idx = np.flatnonzero(y == c)
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


def herding_init(train: FeatureSet, ipc: int, model_cfg: ModelConfig, states) -> np.ndarray:
    """Indices of ``ipc`` clips per class chosen by herding in the experts' (mean) embedding space:
    greedily, the clip that keeps the running mean of the chosen ones closest to the class mean."""
    return _herd(expert_embedding(train, model_cfg, states), train.y, train.num_classes, ipc)


def mixture_init(train: FeatureSet, ipc: int, model_cfg: ModelConfig, states, clips: int) -> np.ndarray:
    """``ipc`` samples per class that are no real clip: each the mean log-Mel of ``clips`` same-class clips, the
    herding choice and its nearest neighbours in the experts' embedding, at most one clip per speaker (so no
    speaker dominates a sample). Equal weights leave no clip closer to the sample than the others."""
    F = expert_embedding(train, model_cfg, states)
    out = []
    for j in _herd(F, train.y, train.num_classes, ipc):
        idx = np.flatnonzero(train.y == train.y[j])
        order = idx[np.argsort(np.linalg.norm(F[idx] - F[j], axis=1))]
        picked, seen = [], set()
        for i in order:
            if train.speakers[i] not in seen:
                picked.append(i)
                seen.add(train.speakers[i])
            if len(picked) == clips:
                break
        out.append(train.X[picked].mean(axis=0))
    return np.stack(out).astype(np.float32)


def gaussian_init(train: FeatureSet, ipc: int, rank: int, seed: int) -> np.ndarray:
    """``ipc`` samples per class drawn from a class-conditional Gaussian in log-Mel space: the class mean plus
    ``rank`` principal directions of the class's clips with their own variances. No sample is a clip: each is
    the class average moved along directions that many clips share (a direction that one clip dominated would
    need ``rank`` near the number of clips; the audit measures what is left)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(train.num_classes):
        Xc = train.X[train.y == c].reshape(int((train.y == c).sum()), -1).astype(np.float64)
        mu = Xc.mean(0)
        D = Xc - mu
        k = int(min(rank, len(Xc) - 1))
        if k > 0:
            # the top-k eigenvectors of the clip-by-clip Gram matrix give the principal directions cheaply
            w, U = np.linalg.eigh(D @ D.T)
            w, U = np.clip(w[::-1][:k], 0, None), U[:, ::-1][:, :k]
            V = (U.T @ D) / np.sqrt(np.maximum(w, 1e-12))[:, None]          # (k, features), unit rows
            coef = rng.standard_normal((ipc, k)) * np.sqrt(w / max(1, len(Xc) - 1))[None]
            out.append(mu[None] + coef @ V)
        else:
            out.append(np.repeat(mu[None], ipc, axis=0))
    return np.concatenate(out).reshape(-1, *train.X.shape[1:]).astype(np.float32)


def distill_fixed_init(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig,
                       theta0: Mapping[str, np.ndarray], val: Optional[FeatureSet] = None, progress: bool = False,
                       workdir=None) -> SyntheticSet:
    """Distil ``train`` into ``cfg.ipc`` clips per class for the fixed initialisation ``theta0``."""
    import torch
    from torch.func import functional_call

    from ..models import build_model
    from ..schedule import loss_fn, spec_augment, time_shift
    from .experts import ExpertConfig, expert_buffer, load_trajectory

    t_start = time.perf_counter()
    setup_threads(cfg.threads)
    s = cfg.settings
    iterations = cfg.iterations_or_default
    train, val = split_validation(train, val, s.val_speakers)
    wd = workdir_for(cfg, model_cfg, train, theta0, workdir)
    # what the iteration and the schedule are chosen on: the mean of the validation speakers' UAR and the training
    # speakers' UAR ("val_train": 8x the utterances, a less noisy ranking), or the validation speakers alone ("val")
    scored = train
    if len(train) > s.select_train_max:   # a large corpus: score a fixed random share of its clips
        scored = train.subset(np.sort(np.random.default_rng(0).choice(len(train), s.select_train_max, replace=False)))
    select_on = val if s.select_on == "val" else (val, scored)
    C = model_cfg.num_classes

    # 1. experts that all start at θ0
    expert_cfg = ExpertConfig(epochs=s.expert_epochs, optimizer=s.expert_optimizer,
                              lr=s.expert_lr if s.expert_lr is not None else EXPERT_LR[s.expert_optimizer])
    paths = expert_buffer(train, model_cfg, expert_cfg, theta0=theta0, count=s.experts,
                          threads=cfg.threads or 2, progress=progress)
    experts = [load_trajectory(p) for p in paths]
    ahead = s.expert_epochs_ahead
    max_start = max(0, min(s.max_start_epoch, expert_cfg.epochs - ahead))
    syn_steps = s.syn_steps

    # 2. synthetic set from real clips, in the model's normalised input space
    X0, y_hard = init_synthetic(train, cfg.ipc, cfg.init, cfg.seed)
    if cfg.init == "real" and s.init_select == "herding":
        X0 = train.X[herding_init(train, cfg.ipc, model_cfg, [t.state(t.epochs) for t in experts])]
    elif cfg.init == "real" and s.init_select == "mixture":
        X0 = mixture_init(train, cfg.ipc, model_cfg, [t.state(t.epochs) for t in experts], s.mix_clips)
    elif cfg.init == "real" and s.init_select == "gaussian":
        X0 = gaussian_init(train, cfg.ipc, s.gauss_rank, cfg.seed)
    if s.teacher_labels:
        y0 = expert_soft_labels(X0, model_cfg, [t.state(t.epochs) for t in experts], s.temperature)
    else:
        y0 = np.eye(C, dtype=np.float32)[y_hard]
    learn_labels = bool(cfg.soft_labels)
    mean = torch.as_tensor(np.asarray(theta0["input_norm.mean"], np.float32))[None, :, None]
    std = torch.as_tensor(np.asarray(theta0["input_norm.std"], np.float32))[None, :, None]
    net = build_model(model_cfg, 0)
    names = [k for k, _ in net.named_parameters()]
    buffer_names = [k for k, _ in net.named_buffers()]
    z_syn = ((torch.as_tensor(X0) - mean) / std).detach().requires_grad_(True)
    label_logits = torch.tensor(np.log(np.clip(y0, 1e-6, 1.0)), requires_grad=True)
    log_lr = torch.tensor(float(np.log(s.lr_init)), requires_grad=True)
    groups = [{"params": [z_syn], "lr": s.lr_img}, {"params": [log_lr], "lr": s.lr_lr}]
    if learn_labels:
        groups.append({"params": [label_logits], "lr": s.lr_label})
    opt = torch.optim.Adam(groups)
    rng = np.random.default_rng(cfg.seed)
    history: List[Dict] = []
    start_it, best = 0, {"val_uar": -1.0}
    augment = s.augment                     # the device's augmentation inside the unrolled student steps too
    fill = torch.as_tensor(np.asarray(theta0["input_norm.mean"], np.float32))
    # the device's recipe, which every evaluation and the final schedule use: SGD on mini-batches of `batch`
    # clips, the step size cosine-annealed, every clip rolled in time by up to `shift` of its length and
    # SpecAugment-masked (device_augment); sets are compared trained this way to the end (see 4. above)
    device_augment = augment or s.device_augment
    device = Schedule(lr=s.lr_init, epochs=1, batch_size=s.batch, seed=cfg.seed, augment=device_augment,
                      decay=s.decay, shift=int(round(s.shift * train.X.shape[2])) if device_augment else 0)
    eval_lr = s.eval_lr                     # "learned": the current learned step size
    eval_schedule = device.replace(epochs=s.eval_epochs)

    def x_now() -> np.ndarray:
        return (z_syn.detach() * std + mean).numpy()

    def labels_now():
        return torch.softmax(label_logits, dim=1)

    ckpt = wd / "fixed_init_checkpoint.npz"
    loaded = load_checkpoint(ckpt, cfg)
    if loaded is not None:
        arrays, meta = loaded
        with torch.no_grad():
            z_syn.copy_(torch.as_tensor(arrays["z"]))
            label_logits.copy_(torch.as_tensor(arrays["labels"]))
            log_lr.fill_(float(arrays["log_lr"]))
        opt.load_state_dict(opt_state_from_arrays(arrays, meta["opt"]))
        rng.bit_generator.state = meta["rng"]
        start_it, history, best = meta["iteration"], meta["history"], meta["best"]
        best.update(x=arrays["best_x"], y=arrays["best_y"])

    anchor = s.anchor
    path_every, path = max(1, s.path_every), None

    def device_path(X: np.ndarray, labels, lr: float):
        """[(params, buffers)] at the start of each segment of the device's own run from θ0: segment j
        starts after j * syn_steps full-batch SGD steps (no graph; refreshed every ``path_every`` iterations)."""
        p = {k: torch.as_tensor(np.asarray(theta0[k])).clone() for k in names}
        b = {k: torch.as_tensor(np.asarray(theta0[k])).clone() for k in buffer_names}
        xt, out = torch.as_tensor(X), []
        for _ in range(max(1, min(max_start + 1, expert_cfg.epochs // ahead))):
            out.append(({k: v.detach().clone() for k, v in p.items()}, {k: v.clone() for k, v in b.items()}))
            for _ in range(syn_steps):
                p = {k: v.detach().requires_grad_(True) for k, v in p.items()}
                g = torch.autograd.grad(loss_fn(functional_call(net, {**p, **b}, (xt,)), labels), list(p.values()))
                p = {k: v.detach() - lr * gi for (k, v), gi in zip(p.items(), g)}
        return out

    bar = make_bar(progress, iterations, "fixed-init", start_it)
    eval_every = max(1, s.eval_every)
    for it in range(start_it, iterations + 1):
        # evaluate the device's procedure on validation speakers (and checkpoint) before the update
        if (it % eval_every == 0 or it == iterations) and not (loaded is not None and it == start_it):
            lr_now = float(torch.exp(log_lr.detach()))
            y_np = labels_now().detach().numpy()
            lr_eval = lr_now if eval_lr == "learned" else float(eval_lr)
            uar = val_uar(x_now(), y_np, eval_schedule.replace(lr=lr_eval), model_cfg, theta0, select_on)
            history.append({"iteration": it, "val_uar": uar, "lr": lr_now, "eval_lr": lr_eval,
                            "seconds": time.perf_counter() - t_start})
            if uar > best["val_uar"]:
                best = {"val_uar": uar, "iteration": it, "lr": lr_now, "x": x_now().copy(), "y": y_np.copy()}
            opt_arrays, opt_meta = opt_state_to_arrays(opt)
            save_checkpoint(ckpt, {"z": z_syn.detach().numpy(), "labels": label_logits.detach().numpy(),
                                   "log_lr": log_lr.detach().numpy(), "best_x": best["x"], "best_y": best["y"],
                                   **opt_arrays},
                            {"cfg": json.loads(cfg.to_json()), "iteration": it, "history": history,
                             "best": {k: v for k, v in best.items() if k not in ("x", "y")},
                             "rng": rng.bit_generator.state, "opt": opt_meta})
            if bar is not None:
                bar.set_postfix(val_uar=f"{uar:.3f}", lr=f"{lr_now:.3g}")
        if it == iterations:
            break

        # 3a. a segment to reproduce, ending at expert epoch t+M. anchor="expert": start at the expert's θ_t
        #     (θ0 itself with probability p_theta0), as MTT does. anchor="student": start where the device
        #     itself stands after t/M segments of its own training from θ0 on the current set.
        traj = experts[int(rng.integers(len(experts)))]
        if anchor == "student":
            if path is None or it % path_every == 0:
                path = device_path(x_now(), labels_now().detach(), float(torch.exp(log_lr.detach())))
            seg = int(rng.integers(0, len(path)))
            params, buffers, start = path[seg][0], {k: v.clone() for k, v in path[seg][1].items()}, seg * ahead
        else:
            start = 0 if rng.random() < s.p_theta0 else int(rng.integers(0, max_start + 1))
            params = {k: torch.as_tensor(traj.states[k][start]) for k in names}
            buffers = {k: torch.as_tensor(traj.states[k][start]).clone() for k in buffer_names}
        start_vec = torch.cat([params[k].reshape(-1) for k in names])
        target = torch.cat([torch.as_tensor(traj.states[k][start + ahead]).reshape(-1) for k in names])

        # 3b. the student: syn_steps full-batch SGD steps from θ_t, the device's exact update, in one graph
        x = z_syn * std + mean
        labels = labels_now()
        lr = torch.exp(log_lr)
        params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        gen = torch.Generator().manual_seed(int(rng.integers(2 ** 31))) if augment else None
        for _ in range(syn_steps):
            # the device's augmentation, differentiable: a gather, and masks that are copies of fill
            xs = spec_augment(time_shift(x, device.shift, gen), fill, gen) if augment else x
            out = functional_call(net, {**params, **buffers}, (xs,))
            grads = torch.autograd.grad(loss_fn(out, labels), list(params.values()), create_graph=True)
            params = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}

        # 3c. normalised parameter distance, back-propagated exactly through the unroll
        end = torch.cat([params[k].reshape(-1) for k in names])
        loss = (end - target).pow(2).sum() / (start_vec - target).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            log_lr.clamp_(min=float(np.log(1e-4)), max=float(np.log(1.0)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val_uar=f"{history[-1]['val_uar']:.3f}",
                            lr=f"{float(torch.exp(log_lr.detach())):.3g}")
        del params, grads, loss, end
    if bar is not None:
        bar.close()

    # 4. the device's schedule: step size and number of steps chosen on the same score
    schedule, sel_uar, table = select_schedule(
        best["x"], best["y"], device.replace(lr=best["lr"]), model_cfg, theta0, select_on,
        lr_factors=s.lr_factors, extra_lrs=s.lr_grid, epoch_grid=s.epoch_grid, progress=progress)
    if s.robust_schedule:
        # the recipe real subsets get (Adam, SpecAugment, ~300 steps) competes on the same validation
        # speakers: the set was matched to plain SGD, but a device may generalise better with this one
        from .coreset import real_subset_schedule

        robust = real_subset_schedule(len(best["x"]), cfg.seed, steps=s.robust_steps, lr=s.robust_lr,
                                      batch_size=s.robust_batch, augment=s.augment)
        uar = val_uar(best["x"], best["y"], robust, model_cfg, theta0, select_on)
        table.append({"optimizer": robust.optimizer, "lr": robust.lr, "epochs": robust.epochs,
                      "augment": robust.augment, "val_uar": uar})
        if uar > sel_uar + 1e-9:
            schedule, sel_uar = robust, uar
    stats = {"seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(), "iterations": iterations,
             "history": history, "best_iteration": best.get("iteration"), "val_uar": sel_uar, "select_on": s.select_on,
             "selection_clips": len(val) + (len(scored) if s.select_on == "val_train" else 0),
             "schedule_selection": table, "experts": [str(p) for p in paths], "workdir": str(wd),
             "val_speakers": val.speaker_ids(), "init_labels": y_hard.tolist(),
             "init": s.init_select if cfg.init == "real" else cfg.init,
             "mix_clips": s.mix_clips if cfg.init == "real" and s.init_select == "mixture" else None}
    y_out = np.asarray(best["y"], np.float32)
    if not (s.teacher_labels or learn_labels):
        y_out = y_hard  # plain class labels: the synthetic set carries int labels
    return SyntheticSet(X=np.asarray(best["x"], np.float32), y=y_out,
                        classes=train.classes, schedule=schedule, method="fixed-init", ipc=cfg.ipc, stats=stats)

