"""Training of retrieval descriptors: losses, tuple mining, training data, trainer (DDP-ready).

Submodules: :mod:`.losses` (contrastive, triplet, listwise AP), :mod:`.mining` (diverse hard
negatives, hard positives, class cleaning), :mod:`.data` (retrieval-SfM-120k, class folders and
CSVs, tuple datasets), :mod:`.trainer` (the training loop, checkpoints, validation).
"""
