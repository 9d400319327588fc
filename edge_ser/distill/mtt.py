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

Params (``cfg.param(key, default)``): experts 2, expert_epochs 20, expert_optimizer "adam", expert_lr 1e-3,
max_start_epoch 10 (paper 30), expert_epochs_ahead 2 (paper 3), syn_steps 10 (paper 20), batch_syn 16,
lr_init 1e-2 (paper 1e-3; SGD must cover an Adam epoch, so ours starts higher), lr_lr 1e-5 (paper 1e-3 on
their scale), lr_img 100 (paper 1000 on normalised log-Mels; ours are raw log-Mels in dB-like units),
train_epochs 100, select_epochs True (epoch_grid (50, 100)), eval_every 10, val_speakers 2 (held out when
``val`` is None).
Default iterations: 60 (as in the paper).

>>> syn = distill_mtt(train, DistillConfig(method="mtt", ipc=10), model_cfg, theta0, val=val)  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..config import ModelConfig
from ..data import FeatureSet
from ..schedule import Schedule
from .base import DistillConfig, SyntheticSet


# ----------------------------------------------------------------------------------------------- helpers
# (shared with fixed_init.py)

def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def setup_threads(cfg: DistillConfig) -> None:
    """``cfg.threads`` torch threads; None keeps what the caller set (torch's default: all cores)."""
    import torch

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))


def split_validation(train: FeatureSet, val: Optional[FeatureSet], n_speakers: int) -> Tuple[FeatureSet, FeatureSet]:
    """(train, val): ``val`` if given, else the last ``n_speakers`` training speakers held out."""
    if val is not None and len(val):
        return train, val
    speakers = train.speaker_ids()
    if len(speakers) <= n_speakers + 1:
        return train, train  # too few speakers to hold any out: validate on training speakers (optimistic)
    return train.split_speakers(speakers[-n_speakers:])


def init_synthetic(train: FeatureSet, ipc: int, init: str, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``ipc`` random real clips per class (or per-band Gaussian noise at the data's statistics)."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for c in range(train.num_classes):
        idx = np.flatnonzero(train.y == c)
        pick = rng.choice(idx, size=ipc, replace=len(idx) < ipc)
        X.append(train.X[pick])
        y += [c] * ipc
    X = np.concatenate(X).astype(np.float32)
    if init == "noise":
        mean, std = train.X.mean(axis=(0, 2)), train.X.std(axis=(0, 2))
        X = (mean[None, :, None] + std[None, :, None] * rng.standard_normal(X.shape)).astype(np.float32)
    return X, np.asarray(y, dtype=np.int64)


#: part of every checkpoint key: bump it when a method's defaults change what its checkpoints mean, so a run does
#: not resume from one written under other defaults (2: fixed-init compares sets trained to convergence; 3: with
#: the device's augmented mini-batch recipe; 4: and augments the unrolled steps)
CHECKPOINT_VERSION = 4


def workdir_for(cfg: DistillConfig, model_cfg: ModelConfig, train: FeatureSet, theta0, workdir) -> Path:
    """``workdir`` or ``cache_dir()/distill/<hash of config, model, data and θ0>``."""
    if workdir is not None:
        path = Path(workdir)
    else:
        from ..corpora.extract import cache_dir
        from ..models import state_sha256
        from .experts import data_sha256

        # threads and iterations stay out of the key: a run may resume with other threads or run longer
        settings = {k: v for k, v in cfg.to_dict().items() if k not in ("threads", "iterations")}
        key = json.dumps({"version": CHECKPOINT_VERSION, "cfg": settings, "model": model_cfg.to_dict(),
                          "data": data_sha256(train), "theta0": state_sha256(theta0)}, sort_keys=True, default=str)
        path = cache_dir() / "distill" / hashlib.sha256(key.encode()).hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_checkpoint(path: Path, arrays: Dict[str, np.ndarray], meta: Dict) -> None:
    """Atomic checkpoint: arrays + a JSON meta record (write-temp, rename)."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, __meta__=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: DistillConfig):
    """(arrays, meta) if a checkpoint of this exact config exists, else None."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
    same = lambda c: {k: v for k, v in c.items() if k not in ("iterations", "threads")}  # noqa: E731
    # a longer run may continue a shorter one with the same settings
    return (arrays, meta) if same(meta.get("cfg", {})) == same(json.loads(cfg.to_json())) else None


def rng_state(gen) -> np.ndarray:
    return gen.get_state().numpy().copy()


def score(model, val, num_classes: int) -> float:
    """UAR of ``model`` on ``val``: one FeatureSet, or a tuple of them (the mean of their UARs)."""
    from ..train import evaluate_arrays

    sets = val if isinstance(val, (tuple, list)) else (val,)
    return float(np.mean([evaluate_arrays(model, fs.X, fs.y, num_classes)["uar"] for fs in sets]))


def val_uar(X, y, schedule: Schedule, model_cfg: ModelConfig, theta0, val) -> float:
    """Validation UAR (see :func:`score`) of θ0 trained on (X, y) with exactly ``train_schedule``."""
    from ..models import build_model, load_state_arrays
    from ..schedule import train_schedule

    model = load_state_arrays(build_model(model_cfg, 0), theta0)
    train_schedule(model, X, y, schedule)
    return score(model, val, model_cfg.num_classes)


def select_schedule(X, y, schedule: Schedule, model_cfg: ModelConfig, theta0, val,
                    lr_factors=(1.0,), epoch_grid=(10, 20, 30, 40), extra_lrs=()) -> Tuple[Schedule, float, List[Dict]]:
    """Pick the (lr, epochs) with the best validation UAR, training θ0 exactly as ``train_schedule`` does.
    The step sizes tried: ``schedule.lr`` times each of ``lr_factors``, and each of ``extra_lrs``.

    With a constant step size the first ``e`` epochs of a longer run are exactly an ``e``-epoch run (same
    batches, same augmentation draws): one run per lr, scored as it passes each epoch in ``epoch_grid``. A
    decaying step size depends on the run's length, so there every (lr, epochs) is its own run.
    """
    from ..models import build_model, load_state_arrays
    from ..schedule import train_schedule

    n = len(X)
    per_epoch = schedule.steps(n) // schedule.epochs
    grid = sorted({int(e) for e in epoch_grid})
    table, best = [], (-1.0, schedule)
    lrs = [schedule.lr * f for f in lr_factors] + [float(v) for v in extra_lrs]
    # (lr, the epoch counts one run scores on its way)
    runs = [(lr, grid) for lr in dict.fromkeys(lrs)] if schedule.decay == "none" else \
        [(lr, [e]) for lr in dict.fromkeys(lrs) for e in grid]
    for lr, wanted in runs:
        model = load_state_arrays(build_model(model_cfg, 0), theta0)
        steps = [0]

        def on_step(lr=lr, model=model, steps=steps, wanted=wanted):
            nonlocal best
            steps[0] += 1
            epoch, done = divmod(steps[0], per_epoch)
            if done == 0 and epoch in wanted:
                uar = score(model, val, model_cfg.num_classes)
                model.train()
                table.append({"lr": lr, "epochs": epoch, "val_uar": uar})
                if uar > best[0] + 1e-9:
                    best = (uar, schedule.replace(lr=lr, epochs=epoch))

        train_schedule(model, X, y, schedule.replace(lr=lr, epochs=wanted[-1]), on_step=on_step)
    return best[1], best[0], table


def make_bar(progress: bool, total: int, desc: str, initial: int = 0):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="it")


# -------------------------------------------------------------------------------------------------- MTT

def distill_mtt(train: FeatureSet, cfg: DistillConfig, model_cfg: ModelConfig, theta0: Mapping[str, np.ndarray],
                val: Optional[FeatureSet] = None, progress: bool = False, workdir=None) -> SyntheticSet:
    """Distil ``train`` with MTT; returns the synthetic set and the SGD schedule with the learned step size."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from ..models import build_model
    from ..train import loss_fn
    from .experts import ExpertConfig, expert_buffer, load_trajectory

    t_start = time.perf_counter()
    setup_threads(cfg)
    P = lambda key, default: cfg.param(key, default)  # noqa: E731
    iterations = cfg.iterations if cfg.iterations is not None else 60
    train, val = split_validation(train, val, int(P("val_speakers", 2)))
    wd = workdir_for(cfg, model_cfg, train, theta0, workdir)

    # 1. experts from random initialisations, every epoch on disk
    expert_cfg = ExpertConfig(epochs=int(P("expert_epochs", 20)), optimizer=P("expert_optimizer", "adam"),
                              lr=float(P("expert_lr", 1e-3)))
    paths = expert_buffer(train, model_cfg, expert_cfg, theta0=None, count=int(P("experts", 2)),
                          threads=cfg.threads or 2, progress=progress)
    experts = [load_trajectory(p) for p in paths]
    max_start = min(int(P("max_start_epoch", 10)), expert_cfg.epochs - int(P("expert_epochs_ahead", 2)))
    ahead = int(P("expert_epochs_ahead", 2))
    syn_steps, batch_syn = int(P("syn_steps", 10)), int(P("batch_syn", 16))
    lr_img, lr_lr = float(P("lr_img", 100.0)), float(P("lr_lr", 1e-5))

    # 2. synthetic set from real clips
    X0, y = init_synthetic(train, cfg.ipc, cfg.init, cfg.seed)
    n = len(X0)
    batch_syn = n if batch_syn <= 0 else min(batch_syn, n)
    net = build_model(model_cfg, 0)
    names = [k for k, _ in net.named_parameters()]
    buffer_names = [k for k, _ in net.named_buffers()]
    x_syn = torch.tensor(X0, requires_grad=True)
    syn_lr = torch.tensor(float(P("lr_init", 1e-2)), requires_grad=True)
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
        return Schedule(lr=float(syn_lr.detach()), epochs=int(P("train_epochs", 100)),
                        batch_size=0 if batch_syn >= n else batch_syn, seed=cfg.seed)

    bar = make_bar(progress, iterations, "mtt", start_it)
    eval_every = max(1, int(P("eval_every", 10)))
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
        for step in range(syn_steps):
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
                label_logits -= float(P("lr_label", 10.0)) * mom["lab"]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val_uar=f"{history[-1]['val_uar']:.3f}",
                            lr=f"{float(syn_lr):.2g}")
        del student, grads, loss
    if bar is not None:
        bar.close()

    # 4. the schedule a device replays: the learned step size; epochs chosen on validation if asked
    X_best, y_best = best["x"], best["y"]
    schedule = Schedule(lr=best["lr"], epochs=int(P("train_epochs", 100)),
                        batch_size=0 if batch_syn >= n else batch_syn, seed=cfg.seed)
    selection = []
    if P("select_epochs", True):
        schedule, _, selection = select_schedule(X_best, y_best, schedule, model_cfg, theta0, val,
                                                 epoch_grid=tuple(P("epoch_grid", (50, 100))))
    stats = {"seconds": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(), "iterations": iterations,
             "history": history, "best_iteration": best.get("iteration"), "val_uar": best["val_uar"],
             "schedule_selection": selection, "experts": [str(p) for p in paths], "workdir": str(wd),
             "val_speakers": val.speaker_ids(), "init_labels": y.tolist()}
    return SyntheticSet(X=np.asarray(X_best, np.float32), y=np.asarray(y_best), classes=train.classes,
                        schedule=schedule, method="mtt", ipc=cfg.ipc, stats=stats)
