"""Matching Training Trajectories (Cazenavette et al., CVPR 2022), as used by Chang et al. (Interspeech 2025).

Readable top to bottom like the reference code:

1. **Experts** (``experts.py``): ``experts`` full-data runs from *random* initialisations, weights saved
   after every epoch (paper: Adam lr 1e-3; ``expert_optimizer="sgd"`` gives the original MTT recipe).
2. **Synthetic set**: ``ipc`` random real clips per class (``cfg.init="real"``) or noise, raw log-Mel.
3. **Each iteration**: pick an expert and a start epoch ``t <= max_start_epoch``; the student starts at
   θ_t and takes ``syn_steps`` SGD steps with the learnable step size on minibatches of ``batch_syn``
   synthetic clips (``torch.func.functional_call``, BatchNorm in train mode); the loss is the normalised
   parameter distance ``||θ_student - θ_{t+M}||² / ||θ_t - θ_{t+M}||²`` with ``M = expert_epochs_ahead``.
   Backpropagate through the whole unroll to the clips (SGD, momentum 0.5, ``lr_img``) and the step
   size (SGD, momentum 0.5, ``lr_lr``).
4. The device schedule is ``train_schedule``: plain SGD with the learned step size, minibatch
   ``batch_syn`` (0 = full batch), ``train_epochs`` epochs (or the number chosen on validation speakers
   when ``select_epochs`` is on), from the pack's θ0.

The settings, their defaults and how they differ from the paper's: :class:`~.settings.MTTSettings`.

>>> syn = distill_mtt(train, DistillConfig(method="mtt", ipc=10), model_cfg, theta0, val=val)  # doctest: +SKIP
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
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, workdir_for
from .common import init_synthetic, make_bar, peak_rss_mb, setup_threads, split_validation
from .selection import select_schedule, val_uar

# -------------------------------------------------------------------------------------------------- MTT

def distill_mtt(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig, theta0: Mapping[str, np.ndarray],
                val: Optional[FeatureSet] = None, progress: bool = False, workdir=None) -> SyntheticSet:
    """Distil ``train`` with MTT; returns the synthetic set and the SGD schedule with the learned step size."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from ..models import build_model
    from ..schedule import loss_fn
    from .experts import ExpertConfig, expert_buffer, load_trajectory

    t_start = time.perf_counter()
    setup_threads(cfg.threads)
    s = cfg.settings
    iterations = cfg.iterations_or_default
    train, val = split_validation(train, val, s.val_speakers)
    wd = workdir_for(cfg, model_cfg, train, theta0, workdir)

    # 1. experts from random initialisations, every epoch on disk
    expert_cfg = ExpertConfig(epochs=s.expert_epochs, optimizer=s.expert_optimizer, lr=s.expert_lr)
    paths = expert_buffer(train, model_cfg, expert_cfg, theta0=None, count=s.experts,
                          threads=cfg.threads or 2, progress=progress)
    experts = [load_trajectory(p) for p in paths]
    ahead = s.expert_epochs_ahead
    max_start = min(s.max_start_epoch, expert_cfg.epochs - ahead)
    syn_steps, batch_syn = s.syn_steps, s.batch_syn
    lr_img, lr_lr = s.lr_img, s.lr_lr

    # 2. synthetic set from real clips
    X0, y = init_synthetic(train, cfg.ipc, cfg.init, cfg.seed)
    n = len(X0)
    batch_syn = n if batch_syn <= 0 else min(batch_syn, n)
    net = build_model(model_cfg, 0)
    names = [k for k, _ in net.named_parameters()]
    buffer_names = [k for k, _ in net.named_buffers()]
    x_syn = torch.tensor(X0, requires_grad=True)
    syn_lr = torch.tensor(s.lr_init, requires_grad=True)
    y_syn = torch.as_tensor(y)
    if cfg.soft_labels:  # learnable label logits (initialised at a confident one-hot)
        label_logits = torch.tensor(np.eye(model_cfg.num_classes, dtype=np.float32)[y] * 3.0, requires_grad=True)
    mom = {"x": torch.zeros_like(x_syn), "lr": torch.zeros(()),
           "lab": torch.zeros(y_syn.shape + (model_cfg.num_classes,))}
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    history: List[Dict] = []
    start_it, best = 0, {"val_uar": -1.0}

    ckpt = wd / "mtt_checkpoint.npz"
    loaded = load_checkpoint(ckpt, cfg)
    if loaded is not None:
        arrays, meta = loaded
        with torch.no_grad():
            x_syn.copy_(torch.as_tensor(arrays["x"]))
            syn_lr.fill_(float(arrays["lr"]))
            mom["x"], mom["lr"] = torch.as_tensor(arrays["mom_x"]), torch.as_tensor(arrays["mom_lr"])
            if cfg.soft_labels:
                label_logits.copy_(torch.as_tensor(arrays["labels"]))
                mom["lab"] = torch.as_tensor(arrays["mom_lab"])
        gen.set_state(torch.as_tensor(arrays["gen"]))
        rng.bit_generator.state = meta["rng"]
        start_it, history, best = meta["iteration"], meta["history"], meta["best"]
        if "best_x" in arrays:
            best["x"] = arrays["best_x"]
            best["y"] = arrays["best_y"]

    def current_labels():
        return torch.softmax(label_logits, 1) if cfg.soft_labels else y_syn

    def schedule_now():
        return Schedule(lr=float(syn_lr.detach()), epochs=s.train_epochs,
                        batch_size=0 if batch_syn >= n else batch_syn, seed=cfg.seed)

    bar = make_bar(progress, iterations, "mtt", start_it)
    eval_every = max(1, s.eval_every)
    for it in range(start_it, iterations + 1):
        # evaluate (and checkpoint) before the update, and once more at the end
        if (it % eval_every == 0 or it == iterations) and not (loaded is not None and it == start_it):
            labels_np = current_labels().detach().numpy()
            uar = val_uar(x_syn.detach().numpy(), labels_np, schedule_now(), model_cfg, theta0, val)
            history.append({"iteration": it, "val_uar": uar, "lr": float(syn_lr.detach()),
                            "seconds": time.perf_counter() - t_start})
            if uar > best["val_uar"]:
                best = {"val_uar": uar, "iteration": it, "lr": float(syn_lr.detach()),
                        "x": x_syn.detach().numpy().copy(), "y": labels_np.copy()}
            arrays = {"x": x_syn.detach().numpy(), "lr": np.float32(syn_lr.detach()), "mom_x": mom["x"].numpy(),
                      "mom_lr": mom["lr"].numpy(), "gen": rng_state(gen), "best_x": best["x"], "best_y": best["y"]}
            if cfg.soft_labels:
                arrays.update(labels=label_logits.detach().numpy(), mom_lab=mom["lab"].numpy())
            meta = {"cfg": json.loads(cfg.to_json()), "iteration": it, "history": history,
                    "best": {k: v for k, v in best.items() if k not in ("x", "y")},
                    "rng": rng.bit_generator.state}
            save_checkpoint(ckpt, arrays, meta)
            if bar is not None:
                bar.set_postfix(val_uar=f"{uar:.3f}", lr=f"{float(syn_lr):.2g}")
        if it == iterations:
            break

        # 3a. a random expert and start epoch; target M epochs ahead
        traj = experts[int(rng.integers(len(experts)))]
        start = int(rng.integers(0, max_start + 1))
        start_params = {k: torch.as_tensor(traj.states[k][start]) for k in names}
        target_params = {k: torch.as_tensor(traj.states[k][start + ahead]) for k in names}
        buffers = {k: torch.as_tensor(traj.states[k][start]).clone() for k in buffer_names}

        # 3b. the student: syn_steps SGD steps with the learnable step size (BatchNorm in train mode)
        student = [{k: v.clone().requires_grad_(True) for k, v in start_params.items()}]
        labels = current_labels()
        for _ in range(syn_steps):
            idx = torch.randperm(n, generator=gen)[:batch_syn]
            params = student[-1]
            out = functional_call(net, {**params, **buffers}, (x_syn[idx],))
            ce = loss_fn(out, labels[idx])
            grads = torch.autograd.grad(ce, list(params.values()), create_graph=True)
            student.append({k: p - syn_lr * g for (k, p), g in zip(params.items(), grads)})

        # 3c. normalised parameter distance
        flat = lambda d: torch.cat([d[k].reshape(-1) for k in names])  # noqa: E731
        end, start_v, target = flat(student[-1]), flat(start_params), flat(target_params)
        loss = F.mse_loss(end, target, reduction="sum") / F.mse_loss(start_v, target, reduction="sum")

        # 3d. update clips, step size (and labels): SGD with momentum 0.5 as in the reference code
        wrt = [x_syn, syn_lr] + ([label_logits] if cfg.soft_labels else [])
        grads = torch.autograd.grad(loss, wrt)
        with torch.no_grad():
            mom["x"] = 0.5 * mom["x"] + grads[0]
            x_syn -= lr_img * mom["x"]
            mom["lr"] = 0.5 * mom["lr"] + grads[1]
            syn_lr -= lr_lr * mom["lr"]
            syn_lr.clamp_(min=1e-6)
            if cfg.soft_labels:
                mom["lab"] = 0.5 * mom["lab"] + grads[2]
                label_logits -= s.lr_label * mom["lab"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val_uar=f"{history[-1]['val_uar']:.3f}",
                            lr=f"{float(syn_lr):.2g}")
        del student, grads, loss
    if bar is not None:
        bar.close()

    # 4. the schedule a device replays: the learned step size; epochs chosen on validation if asked
    X_best, y_best = best["x"], best["y"]
    schedule = Schedule(lr=best["lr"], epochs=s.train_epochs,
                        batch_size=0 if batch_syn >= n else batch_syn, seed=cfg.seed)
    selection = []
    if s.select_epochs:
        schedule, _, selection = select_schedule(X_best, y_best, schedule, model_cfg, theta0, val,
                                                 epoch_grid=s.epoch_grid, progress=progress)
    stats = {"seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(), "iterations": iterations,
             "history": history, "best_iteration": best.get("iteration"), "val_uar": best["val_uar"],
             "schedule_selection": selection, "experts": [str(p) for p in paths], "workdir": str(wd),
             "val_speakers": val.speaker_ids(), "init_labels": y.tolist()}
    return SyntheticSet(X=np.asarray(X_best, np.float32), y=np.asarray(y_best), classes=train.classes,
                        schedule=schedule, method="mtt", ipc=cfg.ipc, stats=stats)
