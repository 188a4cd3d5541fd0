"""cbir: deep-learning instance image retrieval.

Pipeline: images -> backbones -> pooling -> (whitening) -> Descriptors -> index -> rerank -> evaluation
(``cbir.pipeline`` runs the chain; docs/architecture.md maps the stages).
"""



def __getattr__(name: str) -> str:
    """``cbir.__version__``, read from the installed package's metadata on first use (the lookup
    scans every installed distribution: ~0.1-0.2 s that `cbir search` does not pay)."""
    if name != "__version__":
        raise AttributeError(f"module 'cbir' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("cbir")  # the installed package's metadata (pyproject.toml)
    except PackageNotFoundError:  # run from a source tree that was never installed
        value = "0+unknown"
    globals()["__version__"] = value
    return value
