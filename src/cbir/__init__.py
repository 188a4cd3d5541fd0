"""cbir: deep-learning instance image retrieval.

Pipeline: images -> backbones -> pooling -> (whitening) -> Descriptors -> index -> rerank -> evaluation.
"""

__version__ = "0.1.0"
