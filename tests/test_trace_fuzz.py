"""Mutated trace files: a clean read or a tierstore error that names the file, never a crash.

Small valid traces of every readable format have bytes flipped, overwritten with extreme
values, cut off or extended (seeded, so a failure names its case); the ``.tst`` header's
fields are also set to the values that once made the reader allocate what they claimed. Each
mutated file must load into a :class:`Trace` or raise a :class:`TierstoreError` whose message
names the file (and, for the binary formats, the byte at fault), never a ``MemoryError``,
``OverflowError`` or any other exception.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest

from tierstore.errors import TierstoreError
from tierstore.trace.formats import TraceFormatError, load_trace
from tierstore.trace.writers import write_trace

DATA = Path(__file__).parent / "data"
MUTATIONS = 120  # per format


def valid_files(tmp_path: Path) -> dict[str, Path]:
    """One small valid trace per format (two tables where the format has tables)."""
    rng = np.random.default_rng(7)
    tables = [rng.integers(-(2**40), 2**40, 40), rng.integers(0, 1000, 25)]
    out = {}
    for fmt, name in (("tst", "t.tst"), ("tst.zst", "t.tst.zst"), ("npy", "t.npy")):
        path = tmp_path / name
        source = tables if fmt != "npy" else [tables[1]]
        write_trace(path, source, names=["user", "ads"][: len(source)])
        out[fmt] = path
    out["tst-int32"] = tmp_path / "small.tst"
    write_trace(out["tst-int32"], [tables[1], tables[1][:3]], dtype="int32")
    out["text"] = tmp_path / "ids.txt"
    out["text"].write_bytes((DATA / "golden_trace.txt").read_bytes())
    out["csv"] = tmp_path / "r.csv"
    out["csv"].write_bytes((DATA / "requests.csv").read_bytes())
    out["criteo"] = tmp_path / "c.txt"
    out["criteo"].write_bytes((DATA / "criteo_sample.txt").read_bytes())
    return out


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One random damage: flips, extreme bytes, a cut, an extension, or a spliced run."""
    b = bytearray(raw)
    kind = rng.choice(["flip", "flip", "extreme", "truncate", "extend", "splice"])
    if kind == "flip" and b:
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "extreme" and b:
        at = rng.randrange(len(b))
        b[at : at + 8] = rng.choice([b"\xff", b"\x00", b"\x7f"]) * 8
    elif kind == "truncate":
        del b[rng.randrange(len(b) + 1) :]
    elif kind == "extend":
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 100)))
    elif b:
        at, size = rng.randrange(len(b)), rng.randint(1, 16)
        b[at : at + size] = bytes(rng.randrange(256) for _ in range(size))
    return bytes(b)


def header_attacks(raw: bytes) -> list[bytes]:
    """A ``.tst`` file with each header field set to extreme values."""
    out = []
    ntab = struct.unpack_from("<I", raw, 12)[0]
    fields = [(12, "<I", v) for v in (0xFFFFFFFF, 0x10000000, ntab + 1)]
    fields += [(16, "<Q", v) for v in (2**64 - 1, 2**63, 2**40, 8, 64 * 1024)]
    fields += [(24, "<Q", v) for v in (2**64 - 1, 2**61, 2**40 + 3)]  # table 0's count
    fields += [(24 + 8 * ntab, "<H", 0xFFFF)]  # table 0's name length
    for at, fmt, value in fields:
        b = bytearray(raw)
        struct.pack_into(fmt, b, at, value)
        out.append(bytes(b))
    return out


def check_read(path: Path, fmt: str, case: str) -> None:
    try:
        trace = load_trace(path)
    except TierstoreError as e:
        assert str(path) in str(e), f"{case}: the error does not name the file: {e}"
        if isinstance(e, TraceFormatError) and fmt.startswith("tst"):
            assert e.offset is not None or e.line is not None, f"{case}: no offset: {e}"
        return
    except Exception as e:  # noqa: BLE001 - the failure this test exists for
        pytest.fail(f"{case}: {type(e).__name__}: {e}")
    for ids in trace.tables:
        assert ids.dtype == np.int64


@pytest.mark.parametrize("fmt", ["tst", "tst-int32", "tst.zst", "npy", "text", "csv", "criteo"])
def test_mutated_traces_are_read_or_refused(fmt, tmp_path):
    files = valid_files(tmp_path)
    original = files[fmt]
    raw = original.read_bytes()
    check_read(original, fmt, "the unmutated file")
    rng = random.Random(f"trace-fuzz-{fmt}")
    damaged = original.with_name("damaged" + "".join(original.suffixes))
    variants = [mutate(raw, rng) for _ in range(MUTATIONS)]
    if fmt.startswith("tst") and fmt != "tst.zst":
        variants += header_attacks(raw)
    for k, data in enumerate(variants):
        damaged.write_bytes(data)
        check_read(damaged, fmt, f"{fmt} mutation {k}")


def test_compressed_header_attacks_are_refused(tmp_path):
    """The header attacks inside a valid zstd stream: no allocation of what they claim."""
    import zstandard

    files = valid_files(tmp_path)
    raw = files["tst"].read_bytes()
    path = tmp_path / "attack.tst.zst"
    for k, data in enumerate(header_attacks(raw)):
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
        check_read(path, "tst.zst", f"compressed header attack {k}")
    # a small file that decompresses to a header claiming 2**32 - 1 tables of zero counts
    bomb = bytearray(raw[:24]) + bytes(1 << 22)
    struct.pack_into("<I", bomb, 12, 0xFFFFFFFF)
    struct.pack_into("<Q", bomb, 16, 2**40)
    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(bomb)))
    with pytest.raises(TraceFormatError, match="attack"):
        load_trace(path)
