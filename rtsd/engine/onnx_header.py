"""The input and output declarations of an ONNX file, read from its protobuf without the onnx package and without
reading the weights: length-delimited fields we do not need (nodes, initializers, raw tensor data) are skipped by
seeking, so a multi-GB UNet costs a few thousand small reads.

Only the fields on the path ModelProto.graph -> GraphProto.input/output -> ValueInfoProto -> TypeProto.tensor_type
-> elem_type / TensorShapeProto.dim -> dim_value | dim_param are decoded (onnx.proto3 field numbers below). Anything
that does not parse as protobuf raises ``OnnxHeaderError``: a truncated, zeroed or random-byte file.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

# onnx.proto3 field numbers
_MODEL_GRAPH = 7
_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_ELEM_TYPE, _TENSOR_SHAPE = 1, 2
_SHAPE_DIM = 1
_DIM_VALUE, _DIM_PARAM = 1, 2
# TensorProto.DataType -> the spec's dtype names
ELEM_TYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 11: "float64", 9: "bool", 2: "uint8", 3: "int8"}
_MAX_NAME = 4096  # names and dim params are short; a longer one means a corrupt file
_MAX_DECLARATIONS = 10_000


class OnnxHeaderError(ValueError):
    """The file is not a readable ONNX model (truncated, overwritten, or not ONNX at all)."""


@dataclass(frozen=True)
class Declared:
    name: str
    dtype: str  # "float32", ... or "elem_type N" for types rtsd never uses
    shape: tuple[int | str, ...]  # ints are fixed dims, strings symbolic (dim_param), "?" unknown


def read_io(path: str | Path) -> tuple[list[Declared], list[Declared]]:
    """(graph inputs, graph outputs) declared in the ONNX file at ``path``."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise OnnxHeaderError("the file is empty")
        # A read-only map: only the pages the parser touches are read, never the skipped weights.
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            reader = _Reader(data, size)
            graph = None
            for field, wire, length in reader.fields(size):
                if field == _MODEL_GRAPH and wire == 2:
                    graph = (reader.pos, reader.pos + length)
                reader.skip(wire, length)
            if graph is None:
                raise OnnxHeaderError("no graph in the model")
            reader.pos = graph[0]
            inputs, outputs = [], []
            for field, wire, length in reader.fields(graph[1]):
                if field in (_GRAPH_INPUT, _GRAPH_OUTPUT) and wire == 2:
                    (inputs if field == _GRAPH_INPUT else outputs).append(_value_info(reader, reader.pos + length))
                    if len(inputs) + len(outputs) > _MAX_DECLARATIONS:
                        raise OnnxHeaderError("implausibly many graph inputs/outputs")
                else:
                    reader.skip(wire, length)
    return inputs, outputs


def _value_info(reader: "_Reader", end: int) -> Declared:
    name, dtype, shape = "", "unknown", ()
    for field, wire, length in reader.fields(end):
        if field == _VALUE_NAME and wire == 2:
            name = reader.text(length)
        elif field == _VALUE_TYPE and wire == 2:
            dtype, shape = _type(reader, reader.tell() + length)
        else:
            reader.skip(wire, length)
    return Declared(name, dtype, shape)


def _type(reader: "_Reader", end: int) -> tuple[str, tuple]:
    dtype, shape = "unknown", ()
    for field, wire, length in reader.fields(end):
        if field == _TYPE_TENSOR and wire == 2:
            tensor_end = reader.tell() + length
            for f2, w2, l2 in reader.fields(tensor_end):
                if f2 == _TENSOR_ELEM_TYPE and w2 == 0:
                    dtype = ELEM_TYPES.get(l2, f"elem_type {l2}")
                elif f2 == _TENSOR_SHAPE and w2 == 2:
                    shape = _shape(reader, reader.tell() + l2)
                else:
                    reader.skip(w2, l2)
        else:
            reader.skip(wire, length)
    return dtype, shape


def _shape(reader: "_Reader", end: int) -> tuple:
    dims: list[int | str] = []
    for field, wire, length in reader.fields(end):
        if field == _SHAPE_DIM and wire == 2:
            dim: int | str = "?"
            for f2, w2, l2 in reader.fields(reader.tell() + length):
                if f2 == _DIM_VALUE and w2 == 0:
                    dim = l2
                elif f2 == _DIM_PARAM and w2 == 2:
                    dim = reader.text(l2)
                else:
                    reader.skip(w2, l2)
            dims.append(dim)
        else:
            reader.skip(wire, length)
    return tuple(dims)


class _Reader:
    """Protobuf wire-format fields of a byte range; every length is checked against its enclosing range."""

    def __init__(self, data, size: int):
        self.data, self.size, self.pos = data, size, 0

    def tell(self) -> int:
        return self.pos

    def fields(self, end: int):
        """Yield (field number, wire type, length-or-value) until ``end``; the caller consumes or skips each."""
        if end > self.size:
            raise OnnxHeaderError("a field runs past the end of the file (truncated?)")
        while self.pos < end:
            key = self._varint(end)
            field, wire = key >> 3, key & 7
            if field == 0:
                raise OnnxHeaderError("field number 0")
            if wire == 0:
                value = self._varint(end)
            elif wire == 2:
                value = self._varint(end)
                if self.pos + value > end:
                    raise OnnxHeaderError("a field runs past its enclosing message (truncated or overwritten)")
            elif wire in (1, 5):
                value = 8 if wire == 1 else 4
                if self.pos + value > end:
                    raise OnnxHeaderError("a field runs past its enclosing message (truncated or overwritten)")
            else:
                raise OnnxHeaderError(f"unknown protobuf wire type {wire}")
            yield field, wire, value
            if self.pos > end:
                raise OnnxHeaderError("a field runs past its enclosing message")

    def skip(self, wire: int, length: int) -> None:
        if wire in (1, 2, 5):
            self.pos += length

    def text(self, length: int) -> str:
        if length > _MAX_NAME:
            raise OnnxHeaderError("an implausibly long name")
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise OnnxHeaderError("a name that is not UTF-8") from None

    def _varint(self, end: int) -> int:
        result = shift = 0
        data, pos = self.data, self.pos
        while True:
            if pos >= end:
                raise OnnxHeaderError("unexpected end of a message (truncated or overwritten)")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                return result
            shift += 7
            if shift > 63:
                raise OnnxHeaderError("a varint longer than 10 bytes")
