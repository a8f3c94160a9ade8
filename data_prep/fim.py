"""Fill-in-the-middle (FIM) at character level, before tokenization.

Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle": with probability
``rate`` a document is cut at two uniformly drawn character positions into prefix, middle and suffix
and rearranged so that the middle comes last, behind sentinel tokens; a causal LM trained on such
documents learns to infill. The layouts are those of SantaCoder / StarCoder (and Megatron-LM's
``permute``):

- PSM: ``<fim_prefix>`` prefix ``<fim_suffix>`` suffix ``<fim_middle>`` middle
- SPM (with probability ``spm_rate`` of the FIM documents): ``<fim_prefix><fim_suffix>`` suffix
  ``<fim_middle>`` prefix middle — the paper's "SPM variant" of appendix D, which keeps the prefix and
  middle contiguous, so one model serves both orders.

The choice is deterministic per document: it is drawn from a keyed BLAKE2b hash of the document's
UTF-8 bytes and ``seed``, so the same corpus gives the same output whatever the number of prep
workers or Slurm array tasks. Cuts fall between Unicode code points, never inside a UTF-8 sequence.
At inference, a prompt ``<fim_prefix>`` prefix ``<fim_suffix>`` suffix ``<fim_middle>`` makes the
model write the middle (and then EOS).

The sentinels are special tokens of the tokenizer (``lmforge tokenizer train --fim``), so the
tokenizer maps each to one id whatever surrounds it. ``<fim_pad>`` is added for parity with
StarCoder's vocabulary (padding FIM examples to a fixed length); lmforge packs and does not pad.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

FIM_PREFIX = "<fim_prefix>"
FIM_MIDDLE = "<fim_middle>"
FIM_SUFFIX = "<fim_suffix>"
FIM_PAD = "<fim_pad>"
FIM_TOKENS = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD)
"""The sentinel special tokens, in the order ``tokenizer train --fim`` adds them (StarCoder's names)."""
FIM_REQUIRED = (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX)
"""The sentinels a tokenizer must hold for ``prep --fim-rate`` (``<fim_pad>`` is optional)."""


@dataclass(frozen=True)
class FimSpec:
    """How prep applies FIM; recorded in the manifest."""

    rate: float = 0.0
    """Fraction of documents transformed, in [0, 1] (Bavarian et al.: 0.5 loses no left-to-right quality)."""
    spm_rate: float = 0.0
    """Of the transformed documents, the fraction in SPM order, in [0, 1] (the rest PSM; StarCoder: 0.5)."""
    seed: int = 0
    """Key of the per-document hash; another seed draws other documents and cut points."""

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def problems(self) -> list[str]:
        return [f"--fim-{name.replace('_', '-')} {value} is outside [0, 1]"
                for name, value in (("rate", self.rate), ("spm_rate", self.spm_rate)) if not 0 <= value <= 1]


def _draws(text: str, spec: FimSpec) -> random.Random:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16,
                             key=spec.seed.to_bytes(8, "little", signed=True)).digest()
    return random.Random(int.from_bytes(digest, "little"))


def fim_draw(text: str, spec: FimSpec) -> tuple[str, int, int] | None:
    """``(mode, lo, hi)`` drawn for ``text``: mode ``psm`` or ``spm``, and the cut points in code points
    (``prefix = text[:lo]``, ``middle = text[lo:hi]``, ``suffix = text[hi:]``); None = left as it is."""
    if not spec.enabled or not text:
        return None
    draw = _draws(text, spec)
    if draw.random() >= spec.rate:
        return None
    mode = "spm" if draw.random() < spec.spm_rate else "psm"
    lo, hi = sorted((draw.randint(0, len(text)), draw.randint(0, len(text))))
    return mode, lo, hi


def apply_fim(text: str, spec: FimSpec) -> str:
    """``text`` rearranged for FIM (or unchanged, for ``1 - rate`` of documents), deterministically.

    Returns:
        PSM or SPM text with the sentinel strings of :data:`FIM_TOKENS` (see the module docstring),
        or ``text`` itself.
    """
    drawn = fim_draw(text, spec)
    if drawn is None:
        return text
    mode, lo, hi = drawn
    prefix, middle, suffix = text[:lo], text[lo:hi], text[hi:]
    if mode == "spm":
        return f"{FIM_PREFIX}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}{prefix}{middle}"
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}{middle}"


def undo_fim(text: str) -> str:
    """The original document of an :func:`apply_fim` output (identity on untransformed text).

    Raises:
        ValueError: the text starts with ``<fim_prefix>`` but is not a well-formed PSM / SPM layout.
    """
    if not text.startswith(FIM_PREFIX):
        return text
    body = text[len(FIM_PREFIX):]
    if body.startswith(FIM_SUFFIX):  # SPM: suffix <fim_middle> prefix+middle
        suffix, sep, prefix_middle = body[len(FIM_SUFFIX):].partition(FIM_MIDDLE)
        if not sep:
            raise ValueError("SPM text without <fim_middle>")
        return prefix_middle + suffix
    prefix, sep, rest = body.partition(FIM_SUFFIX)
    suffix, sep2, middle = rest.partition(FIM_MIDDLE)
    if not (sep and sep2):
        raise ValueError("PSM text without <fim_suffix> or <fim_middle>")
    return prefix + middle + suffix
