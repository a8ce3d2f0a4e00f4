"""Datasets: the embedded RotatedDigits builder, dataset protocols and manifests, image loading."""
