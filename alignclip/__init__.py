"""AlignCLIP: fine-tune CLIP's image encoder with attention alignment, semantic label smoothing and BMA.

The library is plain PyTorch; orchestration (KFP components, pipelines) lives outside the package and calls
the `alignclip` CLI, so that DVC, KFP and a shell all run the same code path.
"""

__version__ = "0.1.0"
