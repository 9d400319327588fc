"""Compact SER networks for log-Mel input, deterministic from a seed, hashable as tensors.

``ConvNet`` is the dataset-distillation ConvNet (conv3x3 -> norm -> ReLU -> 2x2 pool per block) adapted
to spectrograms: an average-pool stem (``ModelConfig.stem_pool``), the blocks, then a mean over time that
keeps the frequency axis, then one linear layer. ``CNN6`` is the paper's 4.44M-parameter model, for the like-for-like reproduction row.

Both take raw log-Mels ``(batch, n_mels, frames)`` and normalise them inside with per-band statistics
held as buffers (set once from training data with :meth:`set_input_stats`), so exported models need
nothing but the shared front-end.

>>> from edge_ser.config import ModelConfig
>>> model = build_model(ModelConfig(num_classes=8), seed=0)
>>> sum(p.numel() for p in model.parameters()) < 100_000
True
"""
from __future__ import annotations

from typing import Dict, Mapping

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .packfile import state_sha256  # noqa: F401  (one digest: the pack reader's, which needs no torch)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    return nn.Identity()


class InputNorm(nn.Module):
    """(x - mean) / std per Mel band; buffers, not parameters (they are never trained)."""

    def __init__(self, n_mels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_mels))
        self.register_buffer("std", torch.ones(n_mels))

    def forward(self, x):
        return (x - self.mean[:, None]) / self.std[:, None]


class ConvNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_norm = InputNorm(cfg.n_mels)
        stem = tuple(cfg.stem_pool)
        self.stem = nn.AvgPool2d(stem) if stem != (1, 1) else nn.Identity()
        blocks, c_in = [], 1
        for c_out in cfg.channels:
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=cfg.norm == "none"), _norm(cfg.norm, c_out),
                       nn.ReLU(inplace=False),
                       nn.AvgPool2d(2) if cfg.pool == "avg" else nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        freq = cfg.n_mels // stem[0]
        for _ in cfg.channels:
            freq //= 2
        if freq < 1:
            raise ValueError(f"{len(cfg.channels)} pooling blocks leave no frequency bins from {cfg.n_mels} Mels")
        self.embedding_dim = c_in * freq
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(self.embedding_dim, cfg.num_classes)

    def embed(self, x):
        """(batch, n_mels, frames) -> (batch, embedding_dim): the penultimate features."""
        h = self.features(self.stem(self.input_norm(x).unsqueeze(1)))  # (B, C, F', T')
        return h.mean(dim=3).flatten(1)

    def forward(self, x):
        return self.classifier(self.dropout(self.embed(x)))

    def forward_chunked(self, x, max_chunk_floats: int = 3 << 20):
        """``forward`` for training in a fraction of the memory, with the same schedule and numbers.

        Each conv-norm-ReLU-pool block runs in groups of output channels of at most ``max_chunk_floats``
        floats of activations, each group recomputed in backward (activation checkpointing): autograd keeps
        only the pooled block outputs, and one group's full-resolution tensors exist at a time. BatchNorm
        statistics are per channel, so every group still normalises over the whole batch. Results equal
        ``forward``'s up to float summation order (tested for the default model); with oneDNN they were bit
        for bit identical on one x86-64 CPU (RAVDESS pack: golden deviation 0.0), a ulp apart on an AVX2 EPYC. The
        recomputation updates BatchNorm's running statistics a second time: callers snapshot them after the
        forward and restore them after backward (``schedule.train_schedule`` does).
        """
        if not trains_chunked(self.cfg):
            return self(x)
        h = self.stem(self.input_norm(x).unsqueeze(1))
        mods = list(self.features)
        for i in range(0, len(mods), 4):
            conv, norm, _relu, pool = mods[i: i + 4]
            per_channel = h.shape[0] * h.shape[2] * h.shape[3]
            step = max(1, int(max_chunk_floats) // per_channel)
            params = [t for t in (conv.weight, conv.bias, getattr(norm, "weight", None), getattr(norm, "bias", None))
                      if t is not None]
            outs = []
            for c0 in range(0, conv.out_channels, step):
                c1 = min(conv.out_channels, c0 + step)
                if torch.is_grad_enabled():
                    outs.append(_RecomputedGroup.apply(h, (conv, norm, pool, c0, c1, self.training), *params))
                else:
                    outs.append(_block_group(h, conv, norm, pool, c0, c1, self.training))
            h = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
            if self.training and isinstance(norm, nn.BatchNorm2d):
                norm.num_batches_tracked += 1
        return self.classifier(self.dropout(h.mean(dim=3).flatten(1)))


def trains_chunked(cfg: ModelConfig) -> bool:
    """Whether ``forward_chunked`` splits this model into channel groups (a ConvNet with batch or no norm:
    per-channel statistics) rather than falling back to ``forward``."""
    return cfg.arch == "convnet" and cfg.norm in ("batch", "none")


def _block_group(h, conv, norm, pool, c0: int, c1: int, training: bool):
    """Output channels [c0, c1) of one conv -> norm -> ReLU -> pool block (BatchNorm: batch statistics
    of those channels over the whole batch in training, running statistics in eval)."""
    from torch.nn import functional as F

    bias = None if conv.bias is None else conv.bias[c0:c1]
    out = F.conv2d(h, conv.weight[c0:c1], bias, conv.stride, conv.padding)
    if isinstance(norm, nn.BatchNorm2d):
        momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked + 1)
        out = F.batch_norm(out, norm.running_mean[c0:c1], norm.running_var[c0:c1], norm.weight[c0:c1],
                           norm.bias[c0:c1], training, momentum, norm.eps)
    return pool(F.relu(out))


class _RecomputedGroup(torch.autograd.Function):
    """One channel group of a block, its activations dropped after the forward and recomputed in backward
    (the classic checkpoint, written out: no torch.utils.checkpoint machinery, no torch._dynamo import)."""

    @staticmethod
    def forward(ctx, h, spec, *params):
        ctx.spec = spec
        ctx.save_for_backward(h, *params)
        with torch.no_grad():
            return _block_group(h, *spec[:3], *spec[3:])

    @staticmethod
    def backward(ctx, grad_out):
        h, *params = ctx.saved_tensors
        conv, norm, pool, c0, c1, training = ctx.spec
        with torch.enable_grad():
            hd = h.detach().requires_grad_(ctx.needs_input_grad[0])
            out = _block_group(hd, conv, norm, pool, c0, c1, training)
        inputs = ([hd] if ctx.needs_input_grad[0] else []) + list(params)
        grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
        grad_h = grads.pop(0) if ctx.needs_input_grad[0] else None
        return (grad_h, None, *grads)


class CNN6(nn.Module):
    """CNN-6 as in the paper (PANNs-style): 4 conv blocks 64/128/256/512 (5x5 conv, BN, ReLU, 2x2 avg-pool),
    global pooling (mean over frequency, max + mean over time), FC 512 -> FC classes. ~4.4M parameters."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_norm = InputNorm(cfg.n_mels)
        blocks, c_in = [], 1
        for c_out in (64, 128, 256, 512):
            blocks += [nn.Conv2d(c_in, c_out, 5, padding=2, bias=False), _norm(cfg.norm, c_out), nn.ReLU(),
                       nn.AvgPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.embedding_dim = 512
        self.fc1 = nn.Linear(512, 512)
        self.classifier = nn.Linear(512, cfg.num_classes)

    def embed(self, x):
        h = self.features(self.input_norm(x).unsqueeze(1)).mean(dim=2)  # (B, C, T')
        h = h.amax(dim=2) + h.mean(dim=2)
        return torch.relu(self.fc1(h))

    def forward(self, x):
        return self.classifier(self.embed(x))


ARCHS = {"convnet": ConvNet, "cnn6": CNN6}


def build_model(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Build ``cfg.arch`` with every parameter drawn from ``torch.Generator().manual_seed(seed)``.

    The draw is deterministic for one torch build; across builds and platforms it may not be, which
    is why packs ship the initial weights as tensors (see :func:`state_sha256`).
    """
    model = ARCHS[cfg.arch](cfg)
    init_weights(model, seed)
    return model


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Kaiming-uniform convs/linears, unit norms, zero biases, all from one explicit generator."""
    gen = torch.Generator().manual_seed(int(seed))
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            bound = (6.0 / fan_in) ** 0.5 if not name.endswith("classifier") else (1.0 / fan_in) ** 0.5
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 2 * bound - bound)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            if module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()


@torch.no_grad()
def set_input_stats(model: nn.Module, mean, std) -> None:
    """Store per-band training statistics of the raw log-Mels in the model's input normaliser."""
    mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
    std = torch.as_tensor(np.asarray(std), dtype=torch.float32).clamp_min(1e-3)
    model.input_norm.mean.copy_(mean)
    model.input_norm.std.copy_(std)


def input_stats(X: np.ndarray):
    """Per-Mel-band mean and std of raw log-Mels ``(N, n_mels, frames)``."""
    X = np.asarray(X, dtype=np.float64)
    return X.mean(axis=(0, 2)).astype(np.float32), X.std(axis=(0, 2)).astype(np.float32)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_arrays(model_or_state) -> Dict[str, np.ndarray]:
    """A model's (or state dict's) tensors as numpy arrays, float32/int64, in a stable key order."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: v.detach().cpu().numpy().copy() for k, v in sorted(state.items())}




def load_state_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> nn.Module:
    """Load numpy tensors into ``model`` strictly (every key, every shape)."""
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    model.load_state_dict(state, strict=True)
    return model
