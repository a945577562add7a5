"""Launch metadata of the Triton backend: device tables, their caches, scratch, streams.

Imports only torch (no Triton): ``awpfast.ops.triton`` builds on it and supplies, through the
call context, the kernel that builds a table inside a CUDA-graph capture.

Launch metadata (pointer tables, chunk tables, per-tensor float tables) is built with one
pinned host-to-device copy the first time a list of tensors is seen and cached: pointer
tables are keyed on the tensors' ``data_ptr``s, layouts on their sizes. The steady state
only looks the tables up.

CUDA graphs. Inside a capture, a table that is not cached yet (the gradients that
``torch.autograd.grad`` returns inside the capture live at new addresses of the graph's
memory pool) is built by a small kernel that takes the values as arguments
(``fill_i64_kernel``): no host-to-device copy, the values become part of the graph, the
memory comes from the graph's pool, and nothing is cached. Cached tables read by a capture
are never evicted or changed. So a whole AWP step (ascent gradients included) can be
captured after one eager warm-up step, as ``torch.cuda.graph`` and
``torch.compile(mode="reduce-overhead")`` require anyway.

Streams. A cached table is built on one stream; another stream that reads it first waits
for the build (an event) and records itself on the table (``record_stream``), so an LRU
eviction cannot recycle the memory under a running kernel. Scratch for the partial sums is
one buffer per (layout, stream), and a fresh one from the graph's pool inside a capture.

The call context ``ctx`` (``awpfast.ops.triton._Ctx``) carries ``device``, ``cuda``, ``stream``
(raw handle), ``capturing`` and ``device_table(values, ctx)``, the capture-time builder.
"""
import collections
import contextlib
import struct
import threading

import torch


class _LRU:
    def __init__(self, cap):
        self.cap, self.d = cap, collections.OrderedDict()

    def get(self, key):
        v = self.d.get(key)
        if v is not None:
            self.d.move_to_end(key)
        return v

    def put(self, key, v):
        self.d[key] = v
        while len(self.d) > self.cap:
            self.d.popitem(last=False)


_lock = threading.Lock()
_layouts = _LRU(64)
_ptr_tables = _LRU(1024)
_float_tables = _LRU(256)
_captured = {}  # id -> cached table read by a captured CUDA graph: kept alive (and unchanged) forever


def clear_cache():
    """Drop every cached table not referenced by a captured CUDA graph."""
    with _lock:
        _layouts.d.clear()
        _ptr_tables.d.clear()
        _float_tables.d.clear()


class _Table:
    """A cached read-only int64 table on the device, safe to read from any stream.

    Built on one stream (a pinned host-to-device copy). The first time another stream reads
    it, that stream waits for the build (an event) and the table is recorded as used by it
    (``record_stream``), so an LRU eviction cannot hand the memory to a new allocation while
    that stream's kernels still read it. Tables read inside a CUDA-graph capture are kept
    alive forever (``_captured``); ``torch.cuda.graph`` synchronizes the device before it
    starts capturing, so the build has finished by then."""

    __slots__ = ("t", "event", "streams")

    def __init__(self, values, ctx):
        if ctx.cuda:
            _warm_fill(ctx)
            host = torch.tensor(values, dtype=torch.int64).pin_memory()
            self.t = host.to(ctx.device, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(ctx.device))
        else:
            self.t = torch.tensor(values, dtype=torch.int64, device=ctx.device)
            self.event = None
        self.streams = {ctx.stream}

    def ready(self, ctx):
        if ctx.stream not in self.streams and ctx.cuda and not ctx.capturing:
            cur = torch.cuda.current_stream(ctx.device)
            cur.wait_event(self.event)
            self.t.record_stream(cur)
            self.streams.add(ctx.stream)
        return self.t


_fill_ready: set = set()


def _warm_fill(ctx):
    """Compile and load ``fill_i64_kernel`` on this device outside any capture (its first
    use is usually inside one, where loading a module is not allowed): one tiny launch,
    once per process and device."""
    if ctx.device in _fill_ready:
        return
    _fill_ready.add(ctx.device)
    ctx.device_table([0], ctx)


def _lookup(cache, key, values, ctx):
    """The device table of ``values`` (a callable) cached under ``key``, ready to be read on
    the current stream. During a capture a missing table is built for this call only."""
    with _lock:
        e = cache.get(key)
        if e is not None:
            if ctx.capturing:
                _captured[id(e)] = e
            return e.ready(ctx)
    if ctx.capturing:
        return ctx.device_table(values(), ctx)
    e = _Table(values(), ctx)
    with _lock:
        cache.put(key, e)
    return e.t


class _Layout:
    """Chunk layout of one list of tensor sizes (host side; the device table is cached
    separately) and its scratch buffers for the per-chunk partial sums, one per stream.
    ``B``, ``CH``, ``MK``: the backend's BLOCK, CHUNK and MAXK."""

    __slots__ = ("T", "C", "values", "key", "scratch")

    def __init__(self, key, sizes, B, CH, MK):
        tinfo, ctab = [], []
        for t, n in enumerate(sizes):
            clen = max(CH, -(-(-(-n // MK)) // B) * B)  # ceil(ceil(n / MAXK) / BLOCK) * BLOCK
            k = max(1, -(-n // clen))
            tinfo += [n, clen, len(ctab) // 2, k]
            for j in range(k):
                ctab += [t, j * clen]
        self.T, self.C = len(sizes), len(ctab) // 2
        self.values = tinfo + ctab
        self.key = key
        self.scratch = {}

    def part(self, ctx):
        """float64 scratch for 4 partial sums per chunk. One buffer per stream (two streams
        never share one); inside a capture a fresh buffer from the graph's pool per call."""
        if ctx.capturing:
            return torch.empty(4 * self.C, dtype=torch.float64, device=ctx.device)
        buf = self.scratch.get(ctx.stream)
        if buf is None:
            buf = torch.empty(4 * self.C, dtype=torch.float64, device=ctx.device)
            self.scratch[ctx.stream] = buf
        return buf


def _ptrs(tensors, ctx):
    """(int64 device table of data pointers, all 16-byte aligned?)."""
    ptrs = tuple(map(torch.Tensor.data_ptr, tensors))
    aligned = not any(map((15).__and__, ptrs)) or all(  # (the first test: one pass at C speed)
        p % 16 == 0 or t.numel() == 0 for p, t in zip(ptrs, tensors))
    return _lookup(_ptr_tables, (ctx.device, ptrs), lambda: list(ptrs), ctx), aligned


def _f64_bits(vals):
    return [struct.unpack("<q", struct.pack("<d", v))[0] for v in vals]


def _floats_table(vals, ctx):
    """Per-tensor floats as a float64 table (cached by value)."""
    vals = tuple(float(v) for v in vals)
    t = _lookup(_float_tables, (ctx.device, vals), lambda: _f64_bits(vals), ctx)
    return t.view(torch.float64)


def _floats(vals, ctx):
    """(scalar, table or None): a uniform value goes as a kernel scalar, else a table."""
    vals = tuple(float(v) for v in vals)
    if all(v == vals[0] for v in vals):
        return vals[0], None
    return 0.0, _floats_table(vals, ctx)


def _device_ctx(device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _tables(ctx, *lists):
    """Pointer tables of the given lists (None for an absent/empty list) and whether every
    base pointer is 16-byte aligned (the kernels then add divisibility hints)."""
    tabs, aligned = [], True
    for ts in lists:
        if ts:
            tab, al = _ptrs(ts, ctx)
            tabs.append(tab)
            aligned = aligned and al
        else:
            tabs.append(None)
    return tabs, aligned
