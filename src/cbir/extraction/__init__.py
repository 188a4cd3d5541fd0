"""Descriptor extraction, split by job (the public names are re-exported by :mod:`cbir.extract`).

- :mod:`.images`   decoding, EXIF orientation, crop boxes, image extensions, the minimum side rule
- :mod:`cbir.device` device and precision choice (shared with search and training)
- :mod:`.batching` size-bucketed batches decoded by DataLoader workers, per-device defaults
- :mod:`.loop`     the extraction loop: scales, minimum sides, scale combination, head
- :mod:`.bow`      BoW codebooks: fitting and files
- :mod:`.job`      the resumable folder job writing a sharded descriptor store
- :mod:`.ray_engine` the same job on a Ray cluster (``import ray`` only there)
- :mod:`.backends` optional faster CPU inference backends

This package's ``__init__`` imports nothing, so ``cbir.extraction.images`` stays light (no torch).
"""
