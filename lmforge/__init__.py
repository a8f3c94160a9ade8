"""lmforge: the command line (``lmforge``) and the end-to-end demo that ties data_prep, pretrain and launch together.

The only package that may import all of ``data_prep``, ``pretrain`` and ``launch``; nothing outside it
imports it.
"""
