"""Train a tokenizer from a corpus: one of the four families, or an existing tokenizer's algorithm retrained.

The text streams from the corpus reader in batches into ``Tokenizer.train_from_iterator`` and is
never held whole in memory; ``max_bytes`` samples it (see :mod:`data_prep.tokenizer.corpus`).
What the trainer itself holds grows with the distinct pre-tokenized words, not with the corpus;
every family splits words before training, which avoids the blow-up of tokenizers#1345 (a 2 GB
corpus using 150 GB of RAM with a pre-tokenizer that does not split).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from data_prep.errors import InputError, UserError
from data_prep.fim import FIM_TOKENS
from data_prep.tokenizer.corpus import DEFAULT_BATCH_BYTES, CorpusStats, CorpusText, prefetched
from data_prep.tokenizer.families import (
    FAMILIES,
    UNIGRAM_ALPHABET_ERROR,
    WORDPIECE_PREFIX,
    FamilySpec,
    SpecialTokens,
    alphabet_problem,
    build,
    decorated_symbols,
    finish,
    minimum_vocab_size,
    release_seeds,
    special_token_problems,
)
from data_prep.tokenizer.folder import (
    TOKENIZER_FILE,
    TokenizerInfo,
    is_replaceable_output,
    load_tokenizer,
    read_metadata,
    save_tokenizer_folder,
)
from data_prep.tokenizer.unigram import make_reproducible

log = logging.getLogger(__name__)

DEFAULT_FAMILY = "byte-bpe"
DEFAULT_MODEL_MAX_LENGTH = 2048
PADDING_SIDES = ("right", "left")


@dataclass
class TokenizerTrainConfig:
    """One tokenizer training run. Sizes in tokens, budgets in UTF-8 bytes."""

    inputs: list[str]
    """Corpus paths, globs, directories or ``stdlib`` (anything ``lmforge prep`` reads)."""
    output: str
    """Tokenizer folder to write (replaced when it already holds a tokenizer)."""
    family: str | None = None
    """``byte-bpe`` (default), ``bpe``, ``wordpiece`` or ``unigram``; ``None`` with ``from_pretrained``."""
    vocab_size: int = 8192
    """Target vocabulary in tokens, special tokens included (Unigram may stop below it on a small corpus)."""
    min_frequency: int = 2
    """Occurrences a BPE merge / WordPiece pair needs (count); Unigram ignores it."""
    max_bytes: int | None = None
    """Budget of training text in UTF-8 bytes (deterministic uniform sample); ``None`` reads everything."""
    seed: int = 0
    """Sampling seed (only matters with ``max_bytes``)."""
    text_column: str = "text"
    """Field holding the text in jsonl and parquet records."""
    model_max_length: int | None = None
    """Longest sequence in tokens the saved tokenizer advertises; default 2048 (or the source's)."""
    padding_side: str | None = None
    """``right`` (default, or the source's) or ``left``."""
    special_tokens: dict[str, str | None] = field(default_factory=dict)
    """Overrides of the family's special tokens, role (bos/eos/pad/unk/mask/cls/sep) -> token; ``None`` or ``""`` unsets."""
    extra_special_tokens: list[str] = field(default_factory=list)
    """More special tokens (never split), after the role tokens in id order."""
    fim: bool = False
    """Add the fill-in-the-middle sentinels ``<fim_prefix> <fim_middle> <fim_suffix> <fim_pad>`` as special
    tokens, after ``extra_special_tokens`` (data_prep.fim; StarCoder's names)."""
    lowercase: bool = True
    """WordPiece: lowercase in the BertNormalizer."""
    strip_accents: bool | None = None
    """WordPiece: strip accents; ``None`` follows ``lowercase`` (BERT's rule)."""
    from_pretrained: str | None = None
    """Local tokenizer folder whose pipeline and special tokens are retrained on this corpus."""
    batch_bytes: int = DEFAULT_BATCH_BYTES
    """Text bytes per batch streamed into the trainer (memory per batch)."""
    show_progress: bool = False

    def problems(self) -> tuple[list[str], FamilySpec | None, SpecialTokens | None]:
        """Every problem of this config, plus the resolved family and special tokens when they are valid."""
        problems: list[str] = []
        spec = specials = None
        if not self.inputs:
            problems.append("no corpus input given")
        if self.from_pretrained is not None:
            if self.family is not None:
                problems.append(f"give a family or from_pretrained, not both (family {self.family}, from_pretrained {self.from_pretrained})")
            if self.special_tokens or self.extra_special_tokens or self.fim:
                problems.append("from_pretrained keeps the source's special tokens; drop the special-token overrides")
            if not (Path(self.from_pretrained) / TOKENIZER_FILE).is_file():
                problems.append(f"{self.from_pretrained}: from_pretrained folder holds no {TOKENIZER_FILE}")
        else:
            name = self.family or DEFAULT_FAMILY
            if name not in FAMILIES:
                problems.append(f"unknown tokenizer family '{name}' (known: {', '.join(FAMILIES)})")
            else:
                spec = FAMILIES[name]
                specials, special_problems = special_token_problems(spec, self.special_tokens, self.all_extra_special_tokens)
                problems += special_problems
        if self.vocab_size < 1:
            problems.append(f"vocab_size {self.vocab_size} must be positive")
        elif spec is not None and specials is not None and self.vocab_size < (need := minimum_vocab_size(spec, specials)):
            alphabet = need - len(specials.ordered)
            what = "the byte alphabet (256)" if alphabet > 1 else "one symbol"
            problems.append(f"vocab_size {self.vocab_size} is smaller than {what} plus {len(specials.ordered)} special tokens = {need}")
        if self.min_frequency < 1:
            problems.append(f"min_frequency {self.min_frequency} must be >= 1")
        if self.max_bytes is not None and self.max_bytes < 1:
            problems.append(f"max_bytes {self.max_bytes} must be positive (or unset to read everything)")
        if self.model_max_length is not None and self.model_max_length < 1:
            problems.append(f"model_max_length {self.model_max_length} must be positive")
        if self.padding_side is not None and self.padding_side not in PADDING_SIDES:
            problems.append(f"padding_side '{self.padding_side}' is not one of {', '.join(PADDING_SIDES)}")
        if self.batch_bytes < 1:
            problems.append(f"batch_bytes {self.batch_bytes} must be positive")
        if not is_replaceable_output(self.output):
            problems.append(f"{self.output}: output exists and is not a tokenizer folder; refusing to replace it")
        return problems, spec, specials

    @property
    def all_extra_special_tokens(self) -> list[str]:
        """``extra_special_tokens`` plus the FIM sentinels when ``fim`` is set (each once)."""
        extra = list(self.extra_special_tokens)
        return extra + [tok for tok in FIM_TOKENS if tok not in extra] if self.fim else extra

    def validate(self) -> tuple[FamilySpec | None, SpecialTokens | None]:
        """Raise one :class:`UserError` listing every problem; return the family and special tokens."""
        problems, spec, specials = self.problems()
        if problems:
            raise UserError("; ".join(problems))
        return spec, specials


def _train_stream(text: CorpusText, train: Callable):
    """Run ``train(batches)`` over the text; returns ``(stats, what train returned)``.

    Raises:
        InputError: no document was kept (empty corpus).
    """
    stats = CorpusStats()
    result = train(prefetched(text.batches(stats)))
    if stats.documents == 0:
        raise InputError(f"{text.describe()}: empty corpus, no usable document ({stats.rejects.total} rejected)")
    return stats, result


def _probe_vocab(pipeline, text: CorpusText, prefix: str | None = None, suffix: str | None = None) -> dict:
    """The symbols ``pipeline``'s normalizer and pre-tokenizer produce on the text (an extra read, no merges).

    ``pipeline`` is a ``tokenizers.Tokenizer`` (not modified). With ``prefix`` (``suffix``),
    non-initial (final) characters appear as ``prefix + c`` (``c + suffix``) too, as WordPiece
    (BPE with those options) training sees them.
    """
    from tokenizers import Tokenizer, models, trainers

    probe = Tokenizer.from_str(pipeline.to_str())
    probe.model = models.BPE()
    options: dict[str, Any] = {k: v for k, v in (("continuing_subword_prefix", prefix), ("end_of_word_suffix", suffix)) if v}
    probe.train_from_iterator(text.batches(), trainers.BpeTrainer(vocab_size=0, show_progress=False, **options))
    return probe.get_vocab(with_added_tokens=False)


def _alphabet_error(pipeline, text: CorpusText, vocab_size: int, n_special: int, what: str) -> UserError:
    """The one-line error for tokenizers' Unigram "vocabulary is not large enough" failure, with the numbers."""
    alphabet = len(_probe_vocab(pipeline, text))
    return UserError(f"vocab_size {vocab_size} is smaller than the corpus alphabet ({alphabet} symbols after {what} "
                     f"normalization) plus {n_special} special tokens = {alphabet + n_special}")


def _train_family(cfg: TokenizerTrainConfig, spec: FamilySpec, specials: SpecialTokens, text: CorpusText):
    from transformers import PreTrainedTokenizerFast

    tok, trainer = build(spec, specials, cfg.vocab_size, cfg.min_frequency, cfg.lowercase, cfg.strip_accents)
    seeds = decorated_symbols(_probe_vocab(tok, text, WORDPIECE_PREFIX)) if spec.name == "wordpiece" else []
    if seeds:
        tok, trainer = build(spec, specials, cfg.vocab_size, cfg.min_frequency, cfg.lowercase, cfg.strip_accents,
                             seed_symbols=seeds)
    try:
        stats, _ = _train_stream(text, lambda batches: tok.train_from_iterator(batches, trainer=trainer))
    except Exception as exc:
        if UNIGRAM_ALPHABET_ERROR not in str(exc):
            raise
        raise _alphabet_error(tok, text, cfg.vocab_size, len(specials.ordered), spec.name) from None
    problem = alphabet_problem(spec, specials, cfg.vocab_size, tok.get_vocab_size())
    if problem:
        raise UserError(problem)
    tok = release_seeds(tok, seeds)
    make_reproducible(tok, text.batches())
    finish(tok, spec, specials)
    role_kwargs: dict[str, Any] = {f"{role}_token": token for role, token in specials.roles.items()}
    if specials.extra:
        role_kwargs["extra_special_tokens"] = list(specials.extra)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=cfg.model_max_length or DEFAULT_MODEL_MAX_LENGTH,
        padding_side=cfg.padding_side or "right",
        model_input_names=list(spec.model_input_names),
        clean_up_tokenization_spaces=False,
        **role_kwargs,
    )
    options = {"lowercase": cfg.lowercase, "strip_accents": cfg.strip_accents} if spec.name == "wordpiece" else {}
    return fast, stats, {"family": spec.name, "round_trip": spec.round_trip, "special_tokens": specials.roles,
                         "extra_special_tokens": list(specials.extra), **options}


def _decorations(model: dict) -> tuple[str | None, str | None]:
    """``(continuing_subword_prefix, end_of_word_suffix)`` a source model's trainer decorates symbols with."""
    if model["type"] == "WordPiece":
        return model.get("continuing_subword_prefix") or WORDPIECE_PREFIX, None
    if model["type"] == "BPE":
        return model.get("continuing_subword_prefix"), model.get("end_of_word_suffix")
    return None, None


def _without_seeds(fast, seeds: list[str]):
    """``fast`` (from ``train_new_from_iterator``) rebuilt with the seed symbols as plain vocabulary.

    transformers registered the seeds (passed as ``new_special_tokens``) as extra special tokens of
    the wrapper and of the backend; the rebuilt wrapper is the same class with the same arguments,
    minus the seeds.
    """
    if not seeds:
        return fast
    drop = set(seeds)
    kwargs = dict(fast.init_kwargs)
    extra = [t for t in kwargs.pop("extra_special_tokens", None) or [] if str(t) not in drop]
    if extra:
        kwargs["extra_special_tokens"] = extra
    kwargs["tokenizer_object"] = release_seeds(fast.backend_tokenizer, seeds)
    return type(fast)(**kwargs)


def _train_from_pretrained(cfg: TokenizerTrainConfig, text: CorpusText):
    """Retrain a local tokenizer's algorithm and pipeline with transformers' ``train_new_from_iterator``.

    Made reproducible as the families are: decorated symbols (WordPiece ``##c``, BPE prefix /
    suffix forms) are seeded sorted (see :func:`decorated_symbols`), Unigram ids and scores are
    made canonical (see :mod:`data_prep.tokenizer.unigram`).
    """
    import json

    assert cfg.from_pretrained is not None  # the caller's branch
    source = load_tokenizer(cfg.from_pretrained)
    model = json.loads(source.backend_tokenizer.to_str())["model"]
    model_type = model["type"]
    kwargs: dict[str, Any] = {"min_frequency": cfg.min_frequency} if model_type in ("BPE", "WordPiece") else {}
    kwargs["show_progress"] = False  # the corpus bar shows progress
    prefix, suffix = _decorations(model)
    if model_type == "WordPiece":
        kwargs["continuing_subword_prefix"] = prefix  # transformers passes it for BPE only
    seeds = decorated_symbols(_probe_vocab(source.backend_tokenizer, text, prefix, suffix)) if prefix or suffix else []
    try:
        stats, fast = _train_stream(text, lambda batches: source.train_new_from_iterator(
            batches, vocab_size=cfg.vocab_size, new_special_tokens=seeds or None, **kwargs))
    except Exception as exc:
        if UNIGRAM_ALPHABET_ERROR not in str(exc):
            raise
        raise _alphabet_error(source.backend_tokenizer, text, cfg.vocab_size, len(source.all_special_tokens),
                              f"{cfg.from_pretrained}'s") from None
    fast = _without_seeds(fast, seeds)
    make_reproducible(fast.backend_tokenizer, text.batches())
    if len(fast) > cfg.vocab_size and model_type in ("BPE", "WordPiece"):
        raise UserError(f"vocab_size {cfg.vocab_size} is smaller than the corpus alphabet plus the special tokens of "
                        f"{cfg.from_pretrained} = {len(fast)}")
    if cfg.model_max_length is not None:
        fast.model_max_length = cfg.model_max_length
    if cfg.padding_side is not None:
        fast.padding_side = cfg.padding_side
    source_meta = read_metadata(cfg.from_pretrained)
    family = source_meta.get("family", f"pretrained-{model_type.lower()}")
    return fast, stats, {"family": family, "round_trip": source_meta.get("round_trip", "unknown"),
                         "from_pretrained": str(cfg.from_pretrained), "source_model_type": model_type}


def train_tokenizer(cfg: TokenizerTrainConfig) -> TokenizerInfo:
    """Train a tokenizer per ``cfg`` and save it to ``cfg.output``; returns what prep and training need.

    Raises:
        UserError: an invalid config (every problem at once), or a vocabulary smaller than the
            corpus alphabet plus the special tokens.
        InputError: missing inputs, or no usable document in them (nothing is written then).
    """
    spec, specials = cfg.validate()
    text = CorpusText(cfg.inputs, cfg.text_column, cfg.max_bytes, cfg.seed, cfg.batch_bytes, cfg.show_progress)
    start = time.perf_counter()
    if cfg.from_pretrained is not None:
        fast, stats, meta = _train_from_pretrained(cfg, text)
    else:
        assert spec is not None and specials is not None  # validate() returns both without from_pretrained
        fast, stats, meta = _train_family(cfg, spec, specials, text)
    seconds = time.perf_counter() - start
    meta.update({
        "vocab_size": cfg.vocab_size, "trained_vocab_size": len(fast), "min_frequency": cfg.min_frequency,
        "documents": stats.documents, "text_bytes": stats.text_bytes, "rejects": stats.rejects.total,
        "max_bytes": cfg.max_bytes, "seed": cfg.seed, "sample_fraction": text.keep_fraction,
        "corpus_text_bytes": text.corpus_text_bytes, "inputs": list(cfg.inputs), "files": len(text.files),
        "fim": cfg.fim,
        "train_seconds": round(seconds, 3),
    })
    info = save_tokenizer_folder(fast, cfg.output, meta)
    log.info("tokenizer %s: %d tokens from %d documents (%.1f MB) in %.1f s -> %s (fingerprint %s)", meta["family"],
             info.vocab_size, stats.documents, stats.text_bytes / 1e6, seconds, cfg.output, info.fingerprint[:12])
    return info


def train_byte_bpe(
    inputs: Sequence[str],
    output_dir: str | Path,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    max_bytes: int | None = None,
    text_column: str = "text",
    model_max_length: int = 2048,
) -> TokenizerInfo:
    """Train a GPT-2 style byte-level BPE on ``inputs`` and save it to ``output_dir``.

    A shortcut for :func:`data_prep.tokenizer.train.train_tokenizer` with family ``byte-bpe``:
    ``<|endoftext|>`` is bos and eos, ``<|pad|>`` pads.

    Args:
        vocab_size: target vocabulary size in tokens, special tokens included (GPT-2: 50257).
        min_frequency: a merge needs at least this many occurrences.
        max_bytes: budget of training text in UTF-8 bytes (deterministic uniform sample); ``None`` reads all.
        model_max_length: longest sequence in tokens the saved tokenizer advertises.

    Raises:
        UserError: ``vocab_size`` is smaller than the 256-byte alphabet plus the special tokens.
        InputError: missing inputs, or no usable document in them.
    """
    return train_tokenizer(TokenizerTrainConfig(
        inputs=list(inputs), output=str(output_dir), family="byte-bpe", vocab_size=vocab_size,
        min_frequency=min_frequency, max_bytes=max_bytes, text_column=text_column, model_max_length=model_max_length))
