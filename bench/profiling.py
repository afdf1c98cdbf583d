"""Where the time goes: TensorFlow's profiler around a callable, summarised by op type and layer.

:func:`profile_ops` runs a callable under ``tf.profiler`` (host tracer level
3: one event per executed op), reads the trace back (``xplane.pb``) and sums
the time of every op event. It returns the shares of the total op time

* by op type (``_MklMatMul``, ``Mul``, ``UnsortedSegmentSum``, ...), and
* by model part: the op's name scope (``qnn``, ``asta``, ``item_embedding``,
  ``context_embedding``, Adam, the rest), forward and backward
  (``gradient_tape/...``) together.

The input pipeline's events (``Iterator::*``) are the consumer's ``GetNext``
calls, mostly waiting for tf.data's own threads; they are left out of the
shares and summed as ``input_wait_s`` (the reader's cost is measured by
``bench/bench_reader.py``).

An op's time is its self time (nested events, such as a tf.data iterator
calling its input's, are subtracted). With inter-op parallelism, ops run
concurrently and share the intra-op thread pool, so an op's duration also
counts time its work waited behind another op's: profile with
``--inter_op_threads=1`` (one op at a time, each with all the cores; the
training step is as fast that way) for shares that are each op's own cost.
The wall time of the profiled call is reported beside them. XLA-compiled clusters show up as one
op (``_XlaRun``/``XlaLaunch``).
"""

from __future__ import annotations

import collections
import glob
import os
import shutil
import tempfile
import time

#: Layer scopes reported as model parts, in the order they are tried.
PARTS = ("qnn", "asta", "item_embedding", "context_embedding", "din_attention", "dnn", "transformer",
         "cross_network", "dcn_dnn", "dcn_mlp")


def _part(op_name: str, op_type: str = "") -> str:
    if op_type.startswith("Iterator") or op_name.startswith(("Iterator", "ParseExample", "MultiDeviceIterator")):
        return "input pipeline"
    scopes = op_name.split(":")[0].split("/")
    for scope in scopes:
        base = scope.rsplit("_", 1)[0] if scope.rsplit("_", 1)[-1].isdigit() else scope
        if base in PARTS:
            return base
    if "adam" in scopes:
        return "optimizer"
    return "other (loss, L2, clipping, AUC, glue)"


def profile_ops(fn, *, top: int = 12) -> dict:
    """Runs ``fn()`` under the profiler; returns wall time and op-time shares.

    Returns:
        ``{"wall_s", "op_time_s", "by_type": [[type, share], ...],
        "by_part": [[part, share], ...], "by_op": [[op name, share], ...]}``
        with shares of the summed op time, largest first (``by_type`` and
        ``by_op`` limited to ``top`` entries, the rest summed as
        ``"(other types)"``).
    """
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp(prefix="qin_profile_")
    try:
        tf.profiler.experimental.start(logdir, options=tf.profiler.experimental.ProfilerOptions(
            host_tracer_level=3, python_tracer_level=0, device_tracer_level=0))
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            wall = time.perf_counter() - t0
            tf.profiler.experimental.stop()
        paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"the profiler wrote no trace under {logdir}")
        space = xplane_pb2.XSpace()
        with open(max(paths, key=os.path.getmtime), "rb") as f:
            space.ParseFromString(f.read())
    finally:
        shutil.rmtree(logdir, ignore_errors=True)

    by_type, by_part, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    waits = 0.0
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            # Op events are "name:Type" with the type as display name. Some nest
            # on one thread (a tf.data iterator's GetNext calls its input's):
            # count each event's self time, its duration minus its children's.
            ops = []
            for event in line.events:
                meta = plane.event_metadata[event.metadata_id]
                if meta.display_name and ":" in meta.name:
                    ops.append((event.offset_ps, event.duration_ps, meta.name, meta.display_name))
            ops.sort(key=lambda e: (e[0], -e[1]))
            self_ps = [d for _, d, _, _ in ops]
            stack = []  # indices of open events
            for i, (start, duration, _, _) in enumerate(ops):
                while stack and ops[stack[-1]][0] + ops[stack[-1]][1] <= start:
                    stack.pop()
                if stack:
                    self_ps[stack[-1]] -= duration
                stack.append(i)
            for (_, _, name, op_type), ps in zip(ops, self_ps):
                seconds = max(ps, 0) * 1e-12
                if _part(name, op_type) == "input pipeline":
                    waits += seconds  # consumer-side GetNext: mostly waiting for the producer threads
                    continue
                by_type[op_type] += seconds
                by_part[_part(name, op_type)] += seconds
                by_op[name.split(":")[0]] += seconds
    total = sum(by_type.values())
    if total <= 0:
        return {"wall_s": round(wall, 3), "op_time_s": 0.0, "input_wait_s": round(waits, 3), "by_type": [],
                "by_part": [], "by_op": []}

    def shares(counter, limit=None):
        items = counter.most_common()
        out = [[k, round(v / total, 4)] for k, v in items[:limit]]
        if limit is not None and len(items) > limit:
            out.append(["(other types)", round(sum(v for _, v in items[limit:]) / total, 4)])
        return out

    return {"wall_s": round(wall, 3), "op_time_s": round(total, 3), "input_wait_s": round(waits, 3),
            "by_type": shares(by_type, top), "by_part": shares(by_part), "by_op": shares(by_op, top)}
