"""Optional dependencies: a missing one says which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Imports ``module``, or raises ModuleNotFoundError with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != module.split(".")[0]:
            raise  # something inside the module is missing, not the module itself
        raise ModuleNotFoundError(
            f'{feature} needs {module.split(".")[0]}: pip install "fastfed[{extra}]"', name=error.name
        ) from None


def import_tensorflow_quietly(feature: str) -> ModuleType:
    """Imports TensorFlow and Keras and initialises their devices with file descriptor 2 silenced.

    TensorFlow's C++ start-up notices (oneDNN, missing CUDA drivers) are written before its logging
    can be configured, so a command-line tool would otherwise start with a screenful of them on every
    machine without a GPU. Errors still surface: they are raised as Python exceptions.
    """
    import os
    import sys

    sys.stderr.flush()
    saved, silent = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(silent, 2)
    try:
        tensorflow = require("tensorflow", "tensorflow", feature)
        require("keras", "tensorflow", feature)
        tensorflow.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(silent)
        os.close(saved)
    return tensorflow
