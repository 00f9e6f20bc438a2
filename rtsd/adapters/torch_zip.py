"""Read the tensors of a ``torch.save`` file (zip format, torch >= 1.6) into NumPy, without torch and without
running arbitrary pickled code.

The pickle inside names only a few torch functions (tensor and parameter rebuilders, storage types) and plain
containers; everything else is refused, like ``torch.load(weights_only=True)``. Tensors come back as NumPy arrays
(bfloat16 widened to float32); the rest of the structure (dicts, lists, strings, numbers) as Python objects.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a torch.save zip archive this reader can open safely."""


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    if not size:
        return storage[offset].reshape(())
    itemsize = storage.itemsize
    return np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride)).copy()


def _rebuild_parameter(data, *_ignored):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Tensor"): object, ("torch.nn.parameter", "Parameter"): object,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
}


def load(path: str | Path):
    """The object ``torch.save`` wrote to ``path``, tensors as NumPy arrays."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise TorchFileError(f"{path} is not a zip-format torch file (saved by torch < 1.6, or not torch at all); "
                             f"re-save it with a current torch or convert it to .safetensors") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise TorchFileError(f"{path} has no single data.pkl: not a torch.save archive")
        root = pickles[0][: -len("data.pkl")]

        def storage(pid):
            kind, storage_type, key, _location, numel = pid
            if kind != "storage" or not isinstance(storage_type, _StorageType):
                raise TorchFileError(f"{path}: unsupported storage record {pid[:2]!r}")
            raw = archive.read(f"{root}data/{key}")
            if storage_type.dtype == "bfloat16":
                widened = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                return widened.view(np.float32)[:numel]
            return np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"))[:numel]

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _StorageType(name)  # only named in storage records, never called
                if (module, name) in _ALLOWED:
                    return _ALLOWED[(module, name)]
                raise TorchFileError(f"{path} holds Python objects ({module}.{name}), not only tensors; refusing to "
                                     f"unpickle it (convert it to .safetensors)")

            def persistent_load(self, pid):
                return storage(pid)

        try:
            return Restricted(archive.open(pickles[0])).load()
        except TorchFileError:
            raise
        except Exception as exc:  # a damaged archive or pickle: one line, no traceback from pickle internals
            raise TorchFileError(f"{path} could not be read as a torch file ({type(exc).__name__}: {exc})") from None
