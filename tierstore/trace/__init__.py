"""Access traces: formats (read, write, convert), statistics and synthetic generators.

See :mod:`tierstore.trace.formats` for the formats (one module each, reader and writer
together; :mod:`tierstore.trace.binary` has the binary layout byte by byte),
:mod:`tierstore.trace.analyze` for the statistics and :mod:`tierstore.trace.generate` for the
generators; :mod:`tierstore.trace.cli` is the ``tierstore trace`` command.
"""

from __future__ import annotations

from .analyze import TableStats, format_stats, shared_stats, table_stats, trace_stats
from .formats import (
    FORMATS,
    RequestChunk,
    Trace,
    TraceChunk,
    TraceFormatError,
    TraceReader,
    detect_format,
    load_trace,
    read_trace,
)
from .generate import GENERATORS, drift_trace, generate_trace, scan_mix_trace, zipf_trace
from .writers import write_trace

__all__ = [
    "FORMATS",
    "GENERATORS",
    "RequestChunk",
    "TableStats",
    "Trace",
    "TraceChunk",
    "TraceFormatError",
    "TraceReader",
    "detect_format",
    "drift_trace",
    "format_stats",
    "generate_trace",
    "load_trace",
    "read_trace",
    "scan_mix_trace",
    "shared_stats",
    "table_stats",
    "trace_stats",
    "write_trace",
    "zipf_trace",
]
