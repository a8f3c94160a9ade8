"""``lmforge tokenizer train`` and ``lmforge tokenizer eval``."""
from __future__ import annotations

import argparse

ROLES = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")


def _add_corpus_args(p) -> None:
    p.add_argument("--input", nargs="+", required=True, help="corpus paths, globs, directories or 'stdlib' (what prep reads)")
    p.add_argument("--text-column", default="text", help="text field of jsonl / parquet records")
    p.add_argument("--max-bytes", type=int, default=None,
                   help="budget of text in UTF-8 bytes: a deterministic uniform sample across sources (default: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --max-bytes)")


def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or evaluate tokenizers").add_subparsers(dest="tokenizer_command", required=True)
    t = p.add_parser("train", help="train a tokenizer (byte-bpe, bpe, wordpiece, unigram) on a corpus",
                     description="Train a tokenizer and write a folder that AutoTokenizer.from_pretrained loads.")
    _add_corpus_args(t)
    t.add_argument("--output", required=True, help="tokenizer folder to write")
    t.add_argument("--family", default=None, help="byte-bpe (default), bpe, wordpiece or unigram")
    t.add_argument("--from-pretrained", default=None, metavar="DIR",
                   help="retrain this local tokenizer folder's pipeline and special tokens on the corpus")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary in tokens, special tokens included")
    t.add_argument("--min-frequency", type=int, default=2, help="occurrences a merge / pair needs (not unigram)")
    t.add_argument("--model-max-length", type=int, default=None, help="longest sequence in tokens (default 2048)")
    t.add_argument("--padding-side", default=None, help="right (default) or left")
    for role in ROLES:
        t.add_argument(f"--{role}-token", default=None, metavar="TOKEN",
                       help=f"{role} token (default: the family's; '' for none)")
    t.add_argument("--extra-special-tokens", nargs="+", default=[], metavar="TOKEN", help="more special tokens")
    t.add_argument("--fim", action="store_true",
                   help="add the fill-in-the-middle sentinels <fim_prefix> <fim_middle> <fim_suffix> <fim_pad> as special tokens")
    t.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True, help="wordpiece: lowercase")
    t.add_argument("--strip-accents", action=argparse.BooleanOptionalAction, default=None,
                   help="wordpiece: strip accents (default: follows --lowercase)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(handler=_train)

    e = p.add_parser("eval", help="compare tokenizers on held-out text",
                     description="bytes/token, tokens/word, unk rate, round trip, vocab utilisation and speed, as a table and JSON.")
    e.add_argument("--tokenizer", action="append", required=True, metavar="DIR",
                   help="tokenizer folder; repeat to compare side by side")
    _add_corpus_args(e)
    e.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    e.set_defaults(handler=_eval)


def _train(args) -> int:
    from data_prep.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    overrides = {role: getattr(args, f"{role}_token") for role in ROLES if getattr(args, f"{role}_token") is not None}
    info = train_tokenizer(TokenizerTrainConfig(
        inputs=args.input, output=args.output, family=args.family, vocab_size=args.vocab_size,
        min_frequency=args.min_frequency, max_bytes=args.max_bytes, seed=args.seed, text_column=args.text_column,
        model_max_length=args.model_max_length, padding_side=args.padding_side, special_tokens=overrides,
        extra_special_tokens=args.extra_special_tokens, fim=args.fim, lowercase=args.lowercase, strip_accents=args.strip_accents,
        from_pretrained=args.from_pretrained, show_progress=not args.no_progress))
    print(f"{info.path}: {info.vocab_size} tokens, eos {info.eos_token_id}, bos {info.bos_token_id}, "
          f"pad {info.pad_token_id}, fingerprint {info.fingerprint}")
    return 0


def _eval(args) -> int:
    from data_prep.tokenizer.evaluation import evaluate_tokenizers, format_table, write_report

    report = evaluate_tokenizers(args.tokenizer, args.input, args.text_column, args.max_bytes, args.seed)
    print(format_table(report))
    if args.json:
        write_report(report, args.json)
    return 0
