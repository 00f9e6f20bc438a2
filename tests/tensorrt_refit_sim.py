"""A stand-in for TensorRT 10's refit surface (``trt.Refitter``, ``trt.Weights``, ``ICudaEngine.refittable``), added to
the stand-in of tests/tensorrt_sim.py so rtsd's refit path runs end to end where TensorRT cannot.

What it models (TensorRT 10 semantics, from its Python API documentation):
- an engine built with REFIT_INDIVIDUAL has a set of refittable weights (name -> shape, dtype), here the ones the
  builder marked: ``set_named_weights`` on another name, or with another element count, returns False;
- ``get_missing_weights`` lists the weights that must be supplied with the ones set (weights TensorRT fused into one
  kernel; ``linked`` pairs here);
- ``refit_cuda_engine`` fails while any are missing, else copies the values into the engine (``engine.weights``) and
  counts the refit. Values are read when it runs, as TensorRT reads host memory then.
It never stands in for TensorRT's numerics.
"""

from __future__ import annotations

import numpy as np


class SimWeights:
    """trt.Weights(numpy array): a view of host memory (no copy), as TensorRT's is."""

    def __init__(self, array):
        self.array = array
        self.size = array.size


class SimRefitter:
    def __init__(self, engine, logger):
        assert engine.refittable, "TensorRT refuses a Refitter on a plan built without REFIT"
        self.engine, self.pending = engine, {}
        engine.refitters += 1

    def set_named_weights(self, name, weights):
        shape_dtype = self.engine.refittable_weights.get(name)
        if shape_dtype is None or int(np.prod(shape_dtype[0])) != weights.size:
            return False
        self.pending[name] = weights
        return True

    def get_missing_weights(self):
        return [b for a, b in self.engine.linked if a in self.pending and b not in self.pending] + \
               [a for a, b in self.engine.linked if b in self.pending and a not in self.pending]

    def refit_cuda_engine(self):
        if self.get_missing_weights():
            return False
        for name, weights in self.pending.items():
            shape, dtype = self.engine.refittable_weights[name]
            self.engine.weights[name] = np.array(weights.array, dtype=dtype).reshape(shape)
        self.engine.refits.append(sorted(self.pending))
        return True


def add_refit(sim_trt, refittable: dict[str, dict[str, tuple]], linked=()):
    """Give a SimTensorRT instance the refit API; engines deserialized afterwards are refittable with
    ``refittable[component]`` (name -> (shape, dtype)), or not refittable when their component is absent."""
    sim_trt.Refitter = SimRefitter
    sim_trt.Weights = SimWeights
    deserialize = sim_trt.Runtime.deserialize_cuda_engine

    def deserialize_cuda_engine(self, data):
        engine = deserialize(self, data)
        if engine is not None:
            engine.refittable = engine.name in refittable
            engine.refittable_weights = refittable.get(engine.name, {})
            engine.linked, engine.weights, engine.refits, engine.refitters = list(linked), {}, [], 0
        return engine
    sim_trt.Runtime.deserialize_cuda_engine = deserialize_cuda_engine
    return sim_trt
