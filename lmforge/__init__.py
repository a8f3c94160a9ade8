"""lmforge: the command line (``lmforge``) and the end-to-end demo that ties data_prep, pretrain and launch together."""
