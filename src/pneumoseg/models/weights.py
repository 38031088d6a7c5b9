"""Reading weight files: ``torch.load(weights_only=True)`` and safetensors, with errors that name
the file (:func:`load_torch`, :func:`read_weights_file`)."""

from __future__ import annotations

import pickle  # nosec B403 - only for the exception type; loading is torch.load(weights_only=True)
from pathlib import Path

import torch

from pneumoseg.errors import MissingFileError, ModelFileError


def load_torch(path: str | Path, map_location="cpu", what: str = "checkpoint"):
    """``torch.load(weights_only=True)`` whose failures name the file and say what is wrong.

    Only tensors and plain containers load: a file carrying code (pickled objects) is refused.
    """
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{what} {path} is a folder, not a .pt file")
    if not path.is_file():
        raise ModelFileError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelFileError(
            f"{what} {path} is empty (0 bytes): it was never written completely; "
            "retrain it or copy it again"
        )
    with open(path, "rb") as fh:
        magic = fh.read(4)
    # torch.save writes a zip archive (PK..); files from torch < 1.6 are a bare pickle (0x80).
    if not (magic.startswith(b"PK") or magic[:1] == b"\x80"):
        raise ModelFileError(
            f"{what} {path} is not a PyTorch file ({size} bytes, starts with {magic!r}); "
            "point at a .pt file written by torch.save"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        # The magic bytes say it is a torch/pickle file: a weights-only refusal then means it
        # holds objects other than tensors (classes, functions: possibly code).
        if "Weights only load failed" in text:
            raise ModelFileError(
                f"{what} {path} holds Python objects besides tensors (possibly code), so it is "
                "refused: pneumoseg only loads plain weights (torch.load weights_only=True). "
                "If you made it yourself and trust it, re-save its state_dict"
            ) from None
        raise ModelFileError(f"{what} {path} is not a PyTorch file ({size} bytes)") from None
    except (EOFError, RuntimeError, OSError, ValueError, UnicodeDecodeError) as e:
        kind = "truncated or corrupt" if "zip" in str(e).lower() else "not a PyTorch file"
        raise ModelFileError(
            f"{what} {path} is {kind} ({size} bytes; {type(e).__name__}); "
            "retrain it or copy it again"
        ) from None


def read_weights_file(path: str | Path, what: str = "model.encoder_weights_path"):
    """What a ``.safetensors`` or ``torch.save`` file holds (``weights_only=True``); typed errors
    name the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what}: no such file {path}")
    if path.suffix != ".safetensors":
        return load_torch(path, what=what)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ModelFileError(
            f"{what} {path}: not a readable safetensors file ({type(e).__name__})"
        ) from None
