"""Next-token choice: classifier-free guidance, temperature, top-k / top-p sampling, greedy.

The sampling rules are MusicGen's (audiocraft): probabilities are softmax(logits / T);
top-p (when > 0) wins over top-k (when > 0); kept probabilities are renormalized and one
token is drawn as ``torch.multinomial`` draws one sample (:func:`draw`), minus its host-side
check, so a decoding step never waits for the host. Greedy decoding takes the argmax.

:func:`check_sampling` is the one place the sampling and guidance arguments are checked; the
generation entry points (:meth:`lm.LMModel.generate`, ``inference.MusicGen.generate``, the CLI
before it loads a model) call it first, so a bad value fails at once, not after a model load
or in the middle of a generation. While sampling, ``temperature <= 0`` is refused with a hint to
greedy decoding rather than silently turned into it.

:class:`SamplingConfig` holds every option of one generation's sampling and guidance (as
whisper's ``DecodingOptions``): its field defaults are the only place those defaults are
written, and a config that exists has passed :func:`check_sampling`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from numbers import Integral, Real

import torch

GREEDY_HINT = "for greedy (argmax) decoding turn sampling off (--greedy; use_sampling=False in Python)"


class GenerationArgumentError(ValueError):
    """A generation argument no generation can use.

    ``argument`` is its Python name (``top_k``), ``problem`` the rest of the message, so the
    CLI can name its own option (``--top-k``) in a one-line error.
    """

    def __init__(self, argument: str, problem: str) -> None:
        super().__init__(f"{argument} {problem}")
        self.argument = argument
        self.problem = problem


def check_real(name: str, value: object) -> float:
    """``value`` as a float when it is a finite real number (not a bool); else the error."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise GenerationArgumentError(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise GenerationArgumentError(name, f"must be a finite number, got {value}")
    return float(value)


def check_sampling(*, use_sampling: bool = True, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, cfg_coef: float | None = None) -> None:
    """Refuse sampling/guidance arguments that cannot mean anything, with a one-line reason.

    Only the arguments given are checked (None: not given). temperature: finite; > 0 while
    sampling (greedy decoding is ``use_sampling=False``). top_k: an int >= 0 (0: no top-k).
    top_p: in [0, 1] (0: no top-p). cfg_coef: finite.
    """
    if temperature is not None:
        temperature = check_real("temperature", temperature)
        if use_sampling and temperature <= 0:
            raise GenerationArgumentError("temperature", f"must be > 0 for sampling, got {temperature:g}; "
                                                         f"{GREEDY_HINT}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, Integral):
            raise GenerationArgumentError("top_k", f"must be a whole number, got {top_k!r}")
        if top_k < 0:
            raise GenerationArgumentError("top_k", f"must be >= 0 (0 turns top-k off), got {top_k}")
    if top_p is not None and not 0 <= check_real("top_p", top_p) <= 1:
        raise GenerationArgumentError("top_p", f"must be in [0, 1] (0 turns top-p off), got {top_p:g}")
    if cfg_coef is not None:
        check_real("cfg_coef", cfg_coef)


@dataclass(frozen=True)
class SamplingConfig:
    """How one generation picks its tokens; checked by :func:`check_sampling` when made.

    use_sampling: draw tokens (False: greedy argmax). temperature: > 0 while sampling.
    top_k: keep the k most likely tokens (0: off). top_p: nucleus mass, wins over top_k when > 0.
    cfg_coef: classifier-free guidance coefficient (1: no guidance, half the work).
    two_step_cfg: run the conditional and unconditional rows as two passes.
    """

    use_sampling: bool = True
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    cfg_coef: float = 3.0
    two_step_cfg: bool = False

    def __post_init__(self) -> None:
        check_sampling(use_sampling=self.use_sampling, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p, cfg_coef=self.cfg_coef)

    @classmethod
    def from_options(cls, sampling: SamplingConfig | None = None, **options) -> SamplingConfig:
        """``sampling`` (default: the defaults) with ``options`` (field names) replaced; an
        unknown option raises a TypeError naming it and the known ones."""
        unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; the sampling options are "
                            f"{list(SAMPLING_OPTIONS)}")
        base = cls() if sampling is None else sampling
        return replace(base, **options) if options else base

    @property
    def guided(self) -> bool:
        """Whether the generation uses classifier-free guidance: the one place it is decided."""
        return self.cfg_coef != 1.0

    def as_kwargs(self) -> dict[str, bool | float | int]:
        """The fields as keyword arguments (what :meth:`lm.LMModel.generate` takes)."""
        return asdict(self)


SAMPLING_OPTIONS = tuple(f.name for f in fields(SamplingConfig))


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, coef: float) -> torch.Tensor:
    """``uncond + (cond - uncond) * coef``: coef 1 gives the conditional logits, larger pushes
    further from the unconditional ones."""
    if cond.shape != uncond.shape:
        raise ValueError(f"conditional and unconditional logits differ in shape: "
                         f"{tuple(cond.shape)} vs {tuple(uncond.shape)}")
    return uncond + (cond - uncond) * coef


def guide_batched(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """Guidance on one batch holding rows ``[conditional; unconditional]``: ``(2B, ...)`` -> ``(B, ...)``."""
    if logits.shape[0] % 2:
        raise ValueError(f"guided logits need an even number of rows, got {logits.shape[0]}")
    cond, uncond = logits.chunk(2, dim=0)
    return classifier_free_guidance(cond, uncond, coef)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs (..., card)`` -> indices ``(...)``; no host synchronization.

    ``argmax(p / q)`` with ``q ~ Exp(1)`` picks index i with probability ``p_i / sum(p)``
    (the exponential race); it is how ``torch.multinomial`` draws one sample, from the same
    generator stream, minus the ``.item()`` check of its input.
    """
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def sample_top_k(probs: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep the ``k`` most likely tokens (ties with the k-th included), renormalize, draw."""
    kth = torch.topk(probs, min(k, probs.shape[-1]), dim=-1).values[..., -1:]
    kept = probs * (probs >= kth)
    return draw(kept / kept.sum(dim=-1, keepdim=True), generator)


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nucleus sampling: keep the smallest most-likely set whose mass reaches ``p``, draw."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    kept = sorted_probs * (mass_before <= p)
    choice = draw(kept / kept.sum(dim=-1, keepdim=True), generator)
    return torch.gather(order, -1, choice.unsqueeze(-1)).squeeze(-1)


def sampling_probs(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float
                   ) -> torch.Tensor:
    """Checks the sampling arguments; the tempered distribution ``(..., card)`` in float32."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample_next_token(logits: torch.Tensor, *, use_sampling: bool = True, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits (..., card)``; returns ``(...)`` int64.

    Greedy when ``use_sampling`` is false or ``temperature <= 0``; otherwise top-p if
    ``top_p > 0``, else top-k if ``top_k > 0``, else the full distribution. (This per-step
    primitive keeps audiocraft's reading of ``temperature <= 0``; the generation entry points
    refuse it through :func:`check_sampling` before any step runs.)
    """
    if not use_sampling or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if top_p > 0:
        return sample_top_p(probs, top_p, generator)
    if top_k > 0:
        return sample_top_k(probs, top_k, generator)
    return draw(probs, generator)


def batch_size(prompt: torch.Tensor | None, num_samples: int | None) -> int:
    """Rows B of a generation: the prompt's, else ``num_samples`` (default 1)."""
    if prompt is not None:
        if num_samples is not None and num_samples != prompt.shape[0]:
            raise ValueError(f"num_samples={num_samples} but the prompt has {prompt.shape[0]} rows")
        return prompt.shape[0]
    return 1 if num_samples is None else num_samples


def guidance_rows(B: int, guided: bool | None, *rows_of: torch.Tensor | None) -> bool:
    """Whether the condition rows (condition, prefix, frame input) are ``[conditional;
    unconditional]`` (2B rows): ``guided`` when given (the rows must agree), else read from the row
    count; no rows: no guidance."""
    rows = [x.shape[0] for x in rows_of if x is not None]
    if not rows:
        if guided:
            raise ValueError("guided generation needs condition or prefix rows "
                             "[conditional; unconditional]; got neither")
        return False
    expected = (2 * B,) if guided else (B,) if guided is not None else (B, 2 * B)
    if len(set(rows)) > 1 or rows[0] not in expected:
        wanted = " or ".join(f"{n} rows" + (" ([conditional; unconditional])" if n == 2 * B else
                                            " (no guidance)") for n in expected)
        raise ValueError(f"condition, prefix and frame_input must have {wanted}; got {rows}")
    return rows[0] == 2 * B
