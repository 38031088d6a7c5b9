"""Data: image readers and manifests, RLE, the preprocessing cache, folds, samplers, transforms, the synthetic generator."""
