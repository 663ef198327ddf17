"""Residual vector quantizer with EMA codebooks (EnCodec / SoundStream recipe).

Key names follow the original release: ``vq.layers.N._codebook.inited|cluster_size|embed|
embed_avg``.

Data-parallel training: when a ``torch.distributed`` process group with several processes is
initialised, a codebook in training mode learns from the latents of every process, as one
process given the whole batch would: the per-step code counts and sums of the EMA update are
all-reduced, and the k-means initialisation and dead-code replacement run on process 0 over
the latents gathered from all processes and are broadcast. So every process holds the same
codebooks (DDP's buffer broadcast, which would make them follow process 0's batches only,
has nothing left to correct). Every process must then run the same training forwards, as
DDP requires anyway. Inference (``encode``/``decode``, eval mode) never communicates.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .kernels import cached


def _group_size() -> int:
    """Processes of the default ``torch.distributed`` group (1 when none is initialised)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N_r, D)`` rows of every process, concatenated in process order -> ``(sum N_r, D)``.

    Processes may hold different numbers of rows (padded for the collective, then trimmed)."""
    dist = torch.distributed
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    sizes = [int(c.item()) for c in counts]
    padded = x.new_zeros(max(sizes), x.shape[1])
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _from_all_latents(x: torch.Tensor, compute: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                      empty: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``compute`` over the latents ``(N, D)`` of every process, run once by process 0 and
    broadcast into ``empty`` (buffers of the results' shapes) on the others; ``compute(x)``
    when there is no process group."""
    if _group_size() == 1:
        return compute(x)
    rows = _gather_rows(x)
    out = compute(rows) if torch.distributed.get_rank() == 0 else empty
    for tensor in out:
        torch.distributed.broadcast(tensor, src=0)
    return out


def _sample_vectors(samples: torch.Tensor, num: int, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    n = samples.shape[0]
    if n >= num:
        idx = torch.randperm(n, device=samples.device, generator=generator)[:num]
    else:
        idx = torch.randint(0, n, (num,), device=samples.device, generator=generator)
    return samples[idx]


def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain k-means on ``(N, D)`` samples; returns centroids ``(K, D)`` and bin counts ``(K,)``.

    Empty clusters keep their previous centroid.
    """
    means = _sample_vectors(samples, num_clusters, generator)
    bins = torch.zeros(num_clusters, dtype=torch.long, device=samples.device)
    for _ in range(num_iters):
        buckets = torch.cdist(samples, means).argmin(dim=-1)
        bins = torch.bincount(buckets, minlength=num_clusters)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        new_means = sums / bins.clamp(min=1).unsqueeze(1).to(samples.dtype)
        means = torch.where((bins == 0).unsqueeze(1), means, new_means)
    return means, bins


class EuclideanCodebook(nn.Module):
    """One codebook of ``codebook_size`` vectors of size ``dim``, learnt by EMA, not by gradient."""

    def __init__(self, dim: int, codebook_size: int, *, kmeans_init: bool = True,
                 kmeans_iters: int = 50, decay: float = 0.99, epsilon: float = 1e-5,
                 threshold_ema_dead_code: float = 2.0) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.kmeans_iters = kmeans_iters
        self.decay = decay
        self.epsilon = epsilon
        self.threshold_ema_dead_code = threshold_ema_dead_code
        if kmeans_init:
            embed = torch.zeros(codebook_size, dim)
        else:
            embed = nn.init.kaiming_uniform_(torch.empty(codebook_size, dim))
        self.register_buffer("inited", torch.tensor([float(not kmeans_init)]))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code of each row of ``x`` ``(N, D)`` -> ``(N,)``.

        The distance is the references' ``-(|x|^2 - (2x) @ E^T + |E|^2)`` with the same
        operands and the same rounding, so ties and near-ties give the same codes; only the
        elementwise steps run in place and ``|E|^2`` is computed once per codebook version.
        """
        with torch.no_grad():  # codes carry no gradient; the straight-through path does
            embed = self.embed.t()
            scores = (2 * x) @ embed
            # a - s == a + (-s) exactly in IEEE arithmetic: neg_ then add_ rounds like a - s.
            dist = scores.neg_().add_(x.pow(2).sum(1, keepdim=True)).add_(self._embed_norms())
            return dist.neg_().max(dim=-1).indices

    def _embed_norms(self) -> torch.Tensor:
        """``|E|^2`` as ``(1, codebook_size)``, the references' expression, cached per version."""
        return cached(self, "_embed_norms_cache", self.embed,
                      lambda embed: embed.t().pow(2).sum(0, keepdim=True))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., D) -> (...)`` code indices."""
        return self.quantize(x.reshape(-1, self.dim)).view(x.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(...) -> (..., D)``."""
        return F.embedding(codes, self.embed)

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        embed, bins = _from_all_latents(
            x, lambda rows: kmeans(rows, self.codebook_size, self.kmeans_iters),
            (x.new_empty(self.codebook_size, self.dim),
             torch.empty(self.codebook_size, dtype=torch.long, device=x.device)))
        self.embed.copy_(embed)
        self.embed_avg.copy_(embed)
        self.cluster_size.copy_(bins.to(self.cluster_size.dtype))
        self.inited.fill_(1.0)

    @torch.no_grad()
    def _expire_dead_codes(self, x: torch.Tensor) -> None:
        if self.threshold_ema_dead_code <= 0:
            return
        # cluster_size is the same on every process (all-reduced EMA), so all agree on `dead`.
        dead = self.cluster_size < self.threshold_ema_dead_code
        if dead.any():
            (replacement,) = _from_all_latents(
                x, lambda rows: (_sample_vectors(rows, self.codebook_size),),
                (x.new_empty(self.codebook_size, self.dim),))
            mask = dead.unsqueeze(1)
            self.embed.copy_(torch.where(mask, replacement, self.embed))
            # The references only overwrite `embed`, which the EMA step right after recomputes
            # from `embed_avg / cluster_size`, silently undoing the replacement. Restarting the
            # statistics as if the code had been used `threshold` times makes it stick.
            threshold = float(self.threshold_ema_dead_code)
            self.embed_avg.copy_(torch.where(mask, replacement * threshold, self.embed_avg))
            self.cluster_size.masked_fill_(dead, threshold)

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.codebook_size).to(x.dtype)
        counts, sums = onehot.sum(0), onehot.t() @ x
        if _group_size() > 1:  # this step's statistics over every process's latents
            stats = torch.cat([counts[:, None], sums], dim=1)
            torch.distributed.all_reduce(stats)
            counts, sums = stats[:, 0], stats[:, 1:]
        self.cluster_size.lerp_(counts, 1 - self.decay)
        self.embed_avg.lerp_(sums, 1 - self.decay)
        n = self.cluster_size.sum()
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        smoothed = (self.cluster_size + self.epsilon) / (n + self.codebook_size * self.epsilon) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., D) -> (quantized (..., D), codes (...))``; updates the codebook in training."""
        flat = x.reshape(-1, self.dim)
        if self.training and not bool(self.inited.item()):
            self._init_from(flat.detach().float())
        codes = self.quantize(flat)
        quantized = self.decode(codes)
        if self.training:
            self._expire_dead_codes(flat.detach())
            self._ema_update(flat.detach(), codes)
        return quantized.view(x.shape), codes.view(x.shape[:-1])


class VectorQuantization(nn.Module):
    """One stage: ``(B, D, T)`` in, straight-through quantized ``(B, D, T)`` and codes out."""

    def __init__(self, dim: int, codebook_size: int, **codebook_kwargs) -> None:
        super().__init__()
        self._codebook = EuclideanCodebook(dim, codebook_size, **codebook_kwargs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, T) -> (B, T)``."""
        return self._codebook.encode(x.transpose(1, 2))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, T) -> (B, D, T)``."""
        return self._codebook.decode(codes).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xt = x.transpose(1, 2)
        quantized, codes = self._codebook(xt)
        commit_loss = x.new_zeros(())
        if self.training:
            commit_loss = F.mse_loss(quantized.detach(), xt)
            quantized = xt + (quantized - xt).detach()  # straight-through estimator
        return quantized.transpose(1, 2), codes, commit_loss


class ResidualVectorQuantization(nn.Module):
    def __init__(self, *, num_quantizers: int, dim: int, codebook_size: int,
                 **codebook_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(dim, codebook_size, **codebook_kwargs)
                                     for _ in range(num_quantizers)])


@dataclass
class QuantizedResult:
    quantized: torch.Tensor  # (B, D, T)
    codes: torch.Tensor  # (B, K, T)
    num_codebooks: int
    penalty: torch.Tensor  # mean commitment loss over stages
    metrics: dict = field(default_factory=dict)


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ: each stage quantizes what the previous ones left over.

    Any number of stages from 1 to ``num_codebooks`` can be used per call; in training with
    ``quantizer_dropout`` the number is drawn per batch so one model serves every bitrate.
    """

    def __init__(self, *, dimension: int = 128, num_codebooks: int = 32, codebook_size: int = 1024,
                 decay: float = 0.99, kmeans_init: bool = True, kmeans_iters: int = 50,
                 threshold_ema_dead_code: float = 2.0, quantizer_dropout: bool = False) -> None:
        super().__init__()
        self.dimension = dimension
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.quantizer_dropout = quantizer_dropout
        self.vq = ResidualVectorQuantization(
            num_quantizers=num_codebooks, dim=dimension, codebook_size=codebook_size,
            decay=decay, kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code)

    def _check(self, num_codebooks: int | None) -> int:
        n = self.num_codebooks if num_codebooks is None else int(num_codebooks)
        if not 1 <= n <= self.num_codebooks:
            raise ValueError(f"num_codebooks must be between 1 and {self.num_codebooks}, got {n}")
        return n

    def encode(self, x: torch.Tensor, num_codebooks: int | None = None) -> torch.Tensor:
        """``(B, D, T) -> (B, K, T)`` codes."""
        residual = x
        codes = []
        for layer in self.vq.layers[: self._check(num_codebooks)]:
            idx = layer.encode(residual)
            residual = residual - layer.decode(idx)
            codes.append(idx)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, K, T) -> (B, D, T)``; K may be anything from 1 to the maximum."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be shaped (B, K, T), got {tuple(codes.shape)}")
        self._check(codes.shape[1])
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), found values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        out = self.vq.layers[0].decode(codes[:, 0])
        for k in range(1, codes.shape[1]):
            out = out.add_(self.vq.layers[k].decode(codes[:, k]))  # out is a fresh lookup
        return out

    def forward(self, x: torch.Tensor, num_codebooks: int | None = None) -> QuantizedResult:
        """Training/eval pass with straight-through gradients and commitment losses."""
        n = self._check(num_codebooks)
        if self.training and self.quantizer_dropout and num_codebooks is None:
            n = int(torch.randint(1, self.num_codebooks + 1, (1,)).item())
        residual = x
        quantized_out = torch.zeros_like(x)
        codes, losses = [], []
        for layer in self.vq.layers[:n]:
            quantized, idx, loss = layer(residual)
            residual = residual - quantized.detach() if self.training else residual - quantized
            quantized_out = quantized_out + quantized
            codes.append(idx)
            losses.append(loss)
        return QuantizedResult(quantized_out, torch.stack(codes, dim=1), n,
                               torch.stack(losses).mean())
