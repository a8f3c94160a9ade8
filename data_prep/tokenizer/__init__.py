"""data_prep.tokenizer: train, save, load and evaluate tokenizers (a room of data_prep).

Owns the tokenizer folder and its fingerprint (:mod:`~data_prep.tokenizer.folder`), the families
built from ``tokenizers`` components (:mod:`~data_prep.tokenizer.families`), training
(:mod:`~data_prep.tokenizer.train`), the deterministic corpus sampler that feeds it
(:mod:`~data_prep.tokenizer.corpus`), Unigram rescoring for reproducible scores
(:mod:`~data_prep.tokenizer.unigram`), evaluation (:mod:`~data_prep.tokenizer.evaluation`) and the
special-token ids read with `tokenizers` alone (:mod:`~data_prep.tokenizer.ids`, prep's light path).

May import: ``data_prep`` (errors, reader), ``lmforge_common``, ``tokenizers``, ``transformers``.
Never ``pretrain``, ``launch`` or ``lmforge``. ``folder`` imports nothing else of this room, so
prep and the trainer can read a tokenizer without loading the training code.
"""
