"""The four tokenizer families, each built explicitly from ``tokenizers`` components.

=========== ============== ===================== ============== ======================= =================
family      normalizer     pre-tokenizer         model          post-processor          round trip
=========== ============== ===================== ============== ======================= =================
byte-bpe    none           ByteLevel (GPT-2 re)  BPE, no unk    ByteLevel (offsets)     exact, any text
bpe         NFC            Metaspace             BPE + unk      ``<s> $A </s>``         NFC text, no unk
wordpiece   BertNormalizer BertPreTokenizer      WordPiece ##   ``[CLS] $A [SEP]``      none (lossy)
unigram     NFKC           Metaspace             Unigram + unk  ``$A </s>`` (T5)        NFKC text, no unk
=========== ============== ===================== ============== ======================= =================

Decoders mirror the pre-tokenizers (ByteLevel, Metaspace, WordPiece ``##``). Special tokens are
roles (bos / eos / pad / unk / mask / cls / sep) with per-family defaults; they take the first ids,
in the family's order, then any extra special tokens. Roles may share one token only where the
sharing is conventional: bos/eos (GPT-2's ``<|endoftext|>``), bos/cls and eos/sep (BERT packs
documents as ``[CLS] doc [SEP]``). A pad token shared with eos is refused: the causal-LM collator
masks pad positions out of the labels, so the model would never learn to stop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from data_prep.errors import UserError

ROLES = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")
SHAREABLE = {frozenset(("bos", "eos")), frozenset(("bos", "cls")), frozenset(("eos", "sep"))}
BYTE_ALPHABET_SIZE = 256
ROUND_TRIP_EXACT, ROUND_TRIP_NORMALIZED, ROUND_TRIP_NONE = "exact", "normalized", "none"
UNIGRAM_ALPHABET_ERROR = "not large enough to contain all chars"
WORDPIECE_PREFIX = "##"


@dataclass(frozen=True)
class FamilySpec:
    """What one family is made of and what it promises."""

    name: str
    defaults: Mapping[str, str | None]
    """Default token per role; ``None``: the role is unset."""
    id_order: tuple[str, ...]
    """Roles in the order their tokens take the first ids."""
    needs_unk: bool
    """True: the model maps unseen symbols to unk (required); False: no unk exists (byte-level)."""
    round_trip: str
    """``exact``: decode(encode(x)) == x for any text; ``normalized``: == normalizer(x) when no unk
    occurs; ``none``: the design loses information (lowercasing, whitespace)."""
    single: tuple[str, ...] = ()
    """Post-processor template for one sequence; ``{role}`` items are dropped when the role is unset."""
    pair: tuple[str, ...] = ()
    model_input_names: tuple[str, ...] = ("input_ids", "attention_mask")


FAMILIES: dict[str, FamilySpec] = {
    "byte-bpe": FamilySpec(
        name="byte-bpe",
        defaults={"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>"},
        id_order=("eos", "pad", "bos", "mask", "cls", "sep"),
        needs_unk=False,
        round_trip=ROUND_TRIP_EXACT,
    ),
    "bpe": FamilySpec(
        name="bpe",
        defaults={"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"},
        id_order=("bos", "pad", "eos", "unk", "mask", "cls", "sep"),
        needs_unk=True,
        round_trip=ROUND_TRIP_NORMALIZED,
        single=("{bos}", "$A", "{eos}"),
        pair=("{bos}", "$A", "{eos}", "$B:1", "{eos}:1"),
    ),
    "wordpiece": FamilySpec(
        name="wordpiece",
        defaults={"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]",
                  "bos": "[CLS]", "eos": "[SEP]"},
        id_order=("pad", "unk", "cls", "sep", "mask", "bos", "eos"),
        needs_unk=True,
        round_trip=ROUND_TRIP_NONE,
        single=("{cls}", "$A", "{sep}"),
        pair=("{cls}", "$A", "{sep}", "$B:1", "{sep}:1"),
        model_input_names=("input_ids", "token_type_ids", "attention_mask"),
    ),
    "unigram": FamilySpec(
        name="unigram",
        defaults={"pad": "<pad>", "eos": "</s>", "unk": "<unk>"},
        id_order=("pad", "eos", "unk", "bos", "mask", "cls", "sep"),
        needs_unk=True,
        round_trip=ROUND_TRIP_NORMALIZED,
        single=("$A", "{eos}"),
        pair=("$A", "{eos}", "$B:1", "{eos}:1"),
    ),
}


@dataclass(frozen=True)
class SpecialTokens:
    """The resolved special tokens of one tokenizer."""

    roles: dict[str, str] = field(default_factory=dict)
    """role -> token, unset roles absent."""
    extra: tuple[str, ...] = ()
    """Extra special tokens (never split, no role)."""
    ordered: tuple[str, ...] = ()
    """Every distinct special token in id order (ids 0 .. len-1)."""


def family_spec(name: str) -> FamilySpec:
    """The spec of family ``name``.

    Raises:
        UserError: unknown family.
    """
    if name not in FAMILIES:
        raise UserError(f"unknown tokenizer family '{name}' (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def special_token_problems(spec: FamilySpec, overrides: Mapping[str, str | None],
                           extra: Sequence[str]) -> tuple[SpecialTokens | None, list[str]]:
    """Merge ``overrides`` (role -> token; ``None`` or ``""`` unsets) into the family defaults and check them.

    Returns the resolved tokens (``None`` when there are problems) and every problem found.
    """
    problems: list[str] = []
    for role in overrides:
        if role not in ROLES:
            problems.append(f"special token role '{role}' is not one of {', '.join(ROLES)}")
    roles = {r: t for r in ROLES if (t := overrides.get(r, spec.defaults.get(r))) not in (None, "")}
    if spec.needs_unk and "unk" not in roles:
        problems.append(f"family {spec.name} needs an unk token (its model maps unseen symbols to it)")
    if not spec.needs_unk and "unk" in roles:
        problems.append(f"family {spec.name} has no unk token by design (every byte is in its alphabet); drop unk '{roles['unk']}'")
    users: dict[str, list[str]] = {}
    for role, token in roles.items():
        users.setdefault(token, []).append(role)
    for token, rs in users.items():
        bad = [f"{a}/{b}" for i, a in enumerate(rs) for b in rs[i + 1:] if frozenset((a, b)) not in SHAREABLE]
        if bad:
            problems.append(f"duplicate special token '{token}': used as {' and '.join(rs)} "
                            f"(only bos/eos, bos/cls, eos/sep may share a token)")
    seen_extra: set[str] = set()
    for token in extra:
        if not token:
            problems.append("empty extra special token")
        elif token in users:
            problems.append(f"duplicate special token '{token}': extra special token is also the {'/'.join(users[token])} token")
        elif token in seen_extra:
            problems.append(f"duplicate special token '{token}': listed twice in the extra special tokens")
        seen_extra.add(token)
    if problems:
        return None, problems
    ordered = list(dict.fromkeys([roles[r] for r in spec.id_order if r in roles] + list(extra)))
    return SpecialTokens(roles=roles, extra=tuple(extra), ordered=tuple(ordered)), []


def minimum_vocab_size(spec: FamilySpec, specials: SpecialTokens) -> int:
    """Smallest vocabulary (tokens) that can work before the corpus is read: the special tokens plus
    the 256-byte alphabet (byte-bpe) or at least one symbol (other families; their alphabet is the
    corpus' and is checked after reading it)."""
    return len(specials.ordered) + (BYTE_ALPHABET_SIZE if spec.round_trip == ROUND_TRIP_EXACT else 1)


def build(spec: FamilySpec, specials: SpecialTokens, vocab_size: int, min_frequency: int,
          lowercase: bool = True, strip_accents: bool | None = None, show_progress: bool = False,
          seed_symbols: Sequence[str] = ()):
    """An untrained ``tokenizers.Tokenizer`` of family ``spec`` and its trainer.

    Args:
        vocab_size: target vocabulary in tokens, special tokens included.
        min_frequency: a BPE merge / WordPiece pair needs this many occurrences (Unigram ignores it).
        lowercase, strip_accents: WordPiece only (BertNormalizer; ``strip_accents=None`` follows
            ``lowercase``, as in BERT).
        seed_symbols: symbols placed right after the special tokens, in this order, before training
            (see :func:`decorated_symbols`); remove them from the added tokens with :func:`release_seeds`.

    Returns:
        ``(tokenizer, trainer)``; after training call :func:`finish`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    unk = specials.roles.get("unk")
    common: dict[str, Any] = dict(vocab_size=vocab_size, special_tokens=list(specials.ordered) + list(seed_symbols),
                                  show_progress=show_progress)
    trainer: Any
    if spec.name == "byte-bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(min_frequency=min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common)
    elif spec.name == "bpe":
        tok = Tokenizer(models.BPE(unk_token=unk, fuse_unk=True))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(min_frequency=min_frequency, **common)
    elif spec.name == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix=WORDPIECE_PREFIX))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=strip_accents, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
        trainer = trainers.WordPieceTrainer(min_frequency=min_frequency, continuing_subword_prefix=WORDPIECE_PREFIX, **common)
    elif spec.name == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(unk_token=unk, **common)
    else:  # family_spec() guards the names; a new entry in FAMILIES needs a branch here
        raise AssertionError(f"no builder for family {spec.name}")
    return tok, trainer


def decorated_symbols(probe_vocab: Mapping[str, int]) -> list[str]:
    """The decorated one-character symbols (``##c``, ``c</w>``) of a probe vocabulary, sorted.

    ``probe_vocab`` comes from a BPE trainer with the same prefix / suffix and vocab_size 0 (no
    merges), so it holds the alphabet (one character each) and the decorated symbols (longer).
    tokenizers' BPE trainer (WordPiece trains through it) gives decorated symbols ids in the
    hash-map order of the training words, and merges of equal count are ranked by id, so the same
    corpus can give another vocabulary (tokenizers#1794). Handing the trainer these symbols first,
    sorted, as special tokens fixes their ids; :func:`release_seeds` turns them back into plain
    vocabulary. (As special tokens they are cut out of the training text where it spells them
    literally, e.g. ``##a`` in a Markdown heading: a few occurrences, the same in every run.)
    """
    return sorted(t for t in probe_vocab if len(t) > 1)


def release_seeds(tok, seeds: Sequence[str]):
    """A copy of trained ``tok`` in which the seed symbols are plain vocabulary again, not added special tokens."""
    import json

    from tokenizers import Tokenizer

    if not seeds:
        return tok
    data = json.loads(tok.to_str())
    drop = set(seeds)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in drop]
    return Tokenizer.from_str(json.dumps(data))


def alphabet_problem(spec: FamilySpec, specials: SpecialTokens, vocab_size: int, trained_size: int) -> str | None:
    """The one-line problem when training had to exceed ``vocab_size`` to hold the corpus alphabet.

    BPE and WordPiece trainers always keep every symbol they saw, so a trained vocabulary larger than
    requested means the alphabet (symbols after normalization) did not fit.
    """
    if trained_size <= vocab_size:
        return None
    n_special = len(specials.ordered)
    alphabet = trained_size - n_special
    return (f"vocab_size {vocab_size} is smaller than the corpus alphabet ({alphabet} symbols after "
            f"{spec.name} normalization) plus {n_special} special tokens = {trained_size}")


def _template(items: Sequence[str], roles: Mapping[str, str]) -> tuple[str, list[str]]:
    """A TemplateProcessing string from ``items`` (``{role}`` items of unset roles dropped) and the tokens it uses."""
    out, used = [], []
    for item in items:
        m = re.fullmatch(r"\{(\w+)\}(:\d+)?", item)
        if m is None:
            out.append(item)
        elif m.group(1) in roles:
            out.append(roles[m.group(1)] + (m.group(2) or ""))
            used.append(roles[m.group(1)])
    return " ".join(out), used


def finish(tok, spec: FamilySpec, specials: SpecialTokens) -> None:
    """Complete a trained tokenizer in place: the post-processor (Unigram: call
    :func:`data_prep.tokenizer.unigram.make_reproducible` first, it changes the ids)."""
    from tokenizers import processors

    if spec.name == "byte-bpe":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return
    single, used_single = _template(spec.single, specials.roles)
    pair, used_pair = _template(spec.pair, specials.roles)
    used = list(dict.fromkeys(used_single + used_pair))
    if used:
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in used])
