"""Trace formats: the binary layout byte by byte, round trips, detection and clear errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierstore.errors import InvalidInputError
from tierstore.trace.cli import main as trace_main
from tierstore.trace.formats import (
    BinaryReader,
    Trace,
    TraceFormatError,
    ZstdBinaryReader,
    detect_format,
    load_trace,
    parse_hex,
    read_trace,
)
from tierstore.trace.writers import write_trace

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden_v1.tst"
GOLDEN_TABLES = [np.array([1, -2, 3]), np.array([7, 2**31 - 1])]


def _same(a: Trace, b: Trace) -> None:
    assert a.names == b.names
    assert len(a.tables) == len(b.tables)
    for x, y in zip(a.tables, b.tables):
        assert x.dtype == np.int64
        np.testing.assert_array_equal(x, y)


def test_golden_binary_layout_is_what_the_writer_produces(tmp_path):
    # tests/data/golden_v1.tst was written byte by byte from the spec, not by the writer
    out = tmp_path / "g.tst"
    write_trace(out, Trace(GOLDEN_TABLES, ["a", "bb"]))
    assert out.read_bytes() == GOLDEN.read_bytes()


def test_golden_binary_reads_back_and_memmaps_at_the_documented_offset():
    t = load_trace(GOLDEN)
    _same(t, Trace(GOLDEN_TABLES, ["a", "bb"]))
    raw = GOLDEN.read_bytes()
    magic, version, code, _, ntab, offset = struct.unpack_from("<8sHBBIQ", raw)
    assert (magic, version, code, ntab, offset) == (b"TSTRACE\x00", 1, 1, 2, 64)
    counts = struct.unpack_from("<2Q", raw, 24)
    mm = np.memmap(GOLDEN, dtype="<i4", mode="r", offset=offset + 4 * counts[0], shape=(2,))
    np.testing.assert_array_equal(mm, [7, 2**31 - 1])
    assert BinaryReader(GOLDEN).header.counts == [3, 2]


@pytest.mark.parametrize("ext", ["tst", "tst.zst", "csv", "tsv"])
def test_multi_table_round_trip(tmp_path, ext):
    rng = np.random.default_rng(0)
    tr = Trace(
        [rng.integers(0, 1000, 5000), rng.integers(-5, 2**40, 333), np.array([], int)],
        ["x", "y", "empty"],
    )
    path = tmp_path / f"t.{ext}"
    write_trace(path, tr)
    opts = {"table_col": "table"} if ext in ("csv", "tsv") else {}
    got = read_trace(path, chunk_size=700, **opts).load()
    if ext in ("csv", "tsv"):  # a table without rows leaves no trace in a row format
        tr = Trace(tr.tables[:2], tr.names[:2])
    _same(got, tr)


@pytest.mark.parametrize("ext", ["npy", "txt"])
def test_single_table_round_trip(tmp_path, ext):
    ids = np.random.default_rng(1).integers(-(2**62), 2**62, 10_000)
    path = tmp_path / f"a.{ext}"
    write_trace(path, ids)
    got = load_trace(path)
    np.testing.assert_array_equal(got.tables[0], ids)


def test_uint64_ids_keep_their_bits(tmp_path):
    u = np.array([2**64 - 1, 5, 2**63], dtype=np.uint64)
    for ext in ("tst", "tst.zst"):
        write_trace(tmp_path / f"u.{ext}", u, dtype="uint64")
        got = load_trace(tmp_path / f"u.{ext}").tables[0]
        np.testing.assert_array_equal(got, u.view(np.int64))
    assert BinaryReader(tmp_path / "u.tst").header.dtype == "uint64"


def test_auto_dtype_and_int32_overflow(tmp_path):
    write_trace(tmp_path / "small.tst", np.array([0, 2**31 - 1]))
    write_trace(tmp_path / "big.tst", np.array([0, 2**31]))
    assert BinaryReader(tmp_path / "small.tst").header.dtype == "int32"
    assert BinaryReader(tmp_path / "big.tst").header.dtype == "int64"
    with pytest.raises(InvalidInputError, match="int32"):
        write_trace(tmp_path / "x.tst", np.array([2**31]), dtype="int32")


def test_zstd_is_streamed_in_chunks(tmp_path):
    ids = np.arange(200_000, dtype=np.int64) * 7
    path = tmp_path / "z.tst.zst"
    write_trace(path, ids, level=1)
    reader = read_trace(path, chunk_size=4096)
    assert isinstance(reader, ZstdBinaryReader)
    sizes = [c.ids.size for c in reader]
    assert max(sizes) == 4096 and sum(sizes) == ids.size
    np.testing.assert_array_equal(reader.load().tables[0], ids)


def test_streaming_convert_keeps_table_order(tmp_path):
    # an interleaved chunk stream (csv with a table column) becomes table-major .tst
    path = tmp_path / "i.csv"
    rows = ["table,id"] + [f"{'ab'[k % 2]},{k}" for k in range(101)]
    path.write_text("\n".join(rows) + "\n")
    write_trace(tmp_path / "i.tst", read_trace(path, table_col="table", chunk_size=7))
    got = load_trace(tmp_path / "i.tst")
    assert got.names == ["a", "b"]
    np.testing.assert_array_equal(got.tables[0], np.arange(0, 101, 2))
    np.testing.assert_array_equal(got.tables[1], np.arange(1, 101, 2))


def test_detect_format(tmp_path):
    ids = np.arange(10)
    for ext, fmt in [
        ("tst", "tst"),
        ("tst.zst", "tst.zst"),
        ("npy", "npy"),
        ("txt", "text"),
        ("csv", "csv"),
    ]:
        write_trace(tmp_path / f"a.{ext}", ids)
        assert detect_format(tmp_path / f"a.{ext}") == fmt
    # magic wins over the extension
    (tmp_path / "a.tst").rename(tmp_path / "renamed.dat")
    assert detect_format(tmp_path / "renamed.dat") == "tst"
    assert detect_format(DATA / "criteo_sample.txt") == "criteo"
    assert detect_format(DATA / "golden_trace.txt") == "text"


# --- errors name the file and the place --------------------------------------------------


def test_bad_magic(tmp_path):
    bad = tmp_path / "bad.tst"
    bad.write_bytes(b"NOTATRACE" + bytes(100))
    with pytest.raises(TraceFormatError, match=r"bad\.tst: byte 0: bad magic"):
        load_trace(bad)
    with pytest.raises(TraceFormatError, match="bad magic"):
        BinaryReader(bad)


def test_truncated_binary(tmp_path):
    path = tmp_path / "t.tst"
    path.write_bytes(GOLDEN.read_bytes()[:-3])
    with pytest.raises(TraceFormatError, match=r"t\.tst: byte 81: truncated"):
        load_trace(path)
    path.write_bytes(GOLDEN.read_bytes()[:30])
    with pytest.raises(TraceFormatError, match=r"byte 30: file ends inside the table counts"):
        load_trace(path)


def test_bad_version_and_dtype(tmp_path):
    raw = bytearray(GOLDEN.read_bytes())
    raw[8] = 9
    (tmp_path / "v.tst").write_bytes(raw)
    with pytest.raises(TraceFormatError, match="byte 8: format version 9"):
        load_trace(tmp_path / "v.tst")
    raw = bytearray(GOLDEN.read_bytes())
    raw[10] = 7
    (tmp_path / "d.tst").write_bytes(raw)
    with pytest.raises(TraceFormatError, match="byte 10: unknown dtype code 7"):
        load_trace(tmp_path / "d.tst")


def test_truncated_zstd(tmp_path):
    path = tmp_path / "z.tst.zst"
    write_trace(path, np.random.default_rng(0).integers(0, 2**40, 50_000))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TraceFormatError, match=r"z\.tst\.zst: byte \d+: "):
        load_trace(path)


def test_text_errors_name_the_line(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1\n2\n\n3\nfour\n5\n")
    with pytest.raises(TraceFormatError, match=r"ids\.txt: line 5: not an int64 id: 'four'"):
        load_trace(path)
    path.write_text("1\n\n  2\n3\n")  # blank lines skipped, spaces allowed
    np.testing.assert_array_equal(load_trace(path).tables[0], [1, 2, 3])
    path.write_text("1\n99999999999999999999\n")
    with pytest.raises(TraceFormatError, match="line 2"):
        load_trace(path)


def test_csv_column_map_and_sort():
    # items ordered by timestamp (stable), one table per value of the table column
    t = load_trace(DATA / "requests.csv", id_col="item", table_col="table", sort_col="ts")
    assert t.names == ["items", "cats"]
    np.testing.assert_array_equal(t.tables[0], [100, 101, 102, 105])
    np.testing.assert_array_equal(t.tables[1], [7, 3])
    # no table column: one table, in file order; column by index
    t = load_trace(DATA / "requests.csv", id_col=2)
    np.testing.assert_array_equal(t.tables[0], [105, 101, 7, 102, 3, 100])


def test_csv_header_guess_and_default_id_column(tmp_path):
    p = tmp_path / "plain.csv"
    p.write_text("5,x\n6,y\n")
    np.testing.assert_array_equal(load_trace(p).tables[0], [5, 6])
    p.write_text("name,id\nx,5\ny,6\n")
    np.testing.assert_array_equal(load_trace(p).tables[0], [5, 6])
    p = tmp_path / "t.tsv"
    p.write_text("1\t2\n3\t4\n")
    np.testing.assert_array_equal(load_trace(p, id_col=1).tables[0], [2, 4])


def test_csv_errors(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("ts,item\n1,10\n2\n")
    with pytest.raises(TraceFormatError, match=r"r\.csv: line 3: row has 1 fields; missing id"):
        load_trace(p, id_col="item")
    p.write_text("ts,item\n1,10\n2,abc\n")
    with pytest.raises(TraceFormatError, match=r"line 3: id 'abc' is not an int64"):
        load_trace(p, id_col="item")
    with pytest.raises(TraceFormatError, match=r"line 1: no id column 'nope'"):
        load_trace(p, id_col="nope")
    p.write_text("ts,item\n1,10\nlate,11\n")
    with pytest.raises(TraceFormatError, match=r"line 3: sort key 'late' is not a number"):
        load_trace(p, id_col="item", sort_col="ts")


def test_criteo_tables_hex_and_missing():
    t = load_trace(DATA / "criteo_sample.txt")
    assert t.names == [f"C{k}" for k in range(1, 27)]
    rows = [line.split("\t") for line in (DATA / "criteo_sample.txt").read_text().splitlines()]
    for c in range(26):
        want = [int(r[14 + c], 16) for r in rows if r[14 + c]]
        np.testing.assert_array_equal(t.tables[c], want)
    assert sum(tb.size for tb in t.tables) < 26 * len(rows)  # missing values skipped


def test_criteo_errors(tmp_path):
    good = (DATA / "criteo_sample.txt").read_text().splitlines()
    p = tmp_path / "c.txt"
    p.write_text("\n".join(good[:2] + ["1\t2\t3"] + good[2:]) + "\n")
    with pytest.raises(TraceFormatError, match=r"c\.txt: line 3: 3 tab-separated fields"):
        load_trace(p, "criteo")
    fields = good[1].split("\t")
    fields[20] = "zz12"
    p.write_text("\n".join([good[0], "\t".join(fields)]) + "\n")
    with pytest.raises(TraceFormatError, match=r"line 2: column C7: b'zz12' is not a hex id"):
        load_trace(p, "criteo")


def test_parse_hex():
    ids, present, bad = parse_hex([b"ff", b"", b"FFFFFFFFFFFFFFFF", b"0", b"7fffffffffffffff"])
    assert bad == -1
    assert present.tolist() == [True, False, True, True, True]
    assert ids.tolist() == [255, -1, 0, 2**63 - 1]
    assert parse_hex([b"12", b"1g"])[2] == 1
    assert parse_hex([b"1" * 17])[2] == 0


def test_npy_two_dimensional_is_a_table_per_column(tmp_path):
    a = np.arange(12, dtype=np.int32).reshape(6, 2)
    np.save(tmp_path / "m.npy", a)
    t = load_trace(tmp_path / "m.npy")
    np.testing.assert_array_equal(t.tables[0], a[:, 0])
    np.testing.assert_array_equal(t.tables[1], a[:, 1])
    np.save(tmp_path / "f.npy", np.ones(3))
    with pytest.raises(TraceFormatError, match="integer array"):
        load_trace(tmp_path / "f.npy")


def test_single_table_formats_refuse_several_tables(tmp_path):
    tr = Trace([np.arange(3), np.arange(4)])
    for ext in ("txt", "npy"):
        with pytest.raises(InvalidInputError, match="holds one table"):
            write_trace(tmp_path / f"x.{ext}", tr)
    with pytest.raises(InvalidInputError, match="output format"):
        write_trace(tmp_path / "x.bin", tr)


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(TraceFormatError, match="no such file"):
        read_trace(tmp_path / "nope.tst")
    with pytest.raises(InvalidInputError, match="takes no options"):
        read_trace(GOLDEN, id_col="x")


def test_cli_convert_chain(tmp_path, capsys):
    src = DATA / "requests.csv"
    assert (
        trace_main(
            [
                "convert",
                str(src),
                str(tmp_path / "r.tst.zst"),
                "--id-col",
                "item",
                "--table-col",
                "table",
                "--sort-col",
                "ts",
            ]
        )
        == 0
    )
    assert trace_main(["convert", str(tmp_path / "r.tst.zst"), str(tmp_path / "r.tst")]) == 0
    got = load_trace(tmp_path / "r.tst")
    np.testing.assert_array_equal(got.tables[0], [100, 101, 102, 105])
    assert trace_main(["convert", str(tmp_path / "r.tst"), str(tmp_path / "r.txt")]) == 2
    assert "holds one table" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Requests in order across tables (what a cache shared by the tables replays)


def test_criteo_requests_come_row_by_row():
    path = DATA / "criteo_sample.txt"
    want_tables, want_ids = [], []
    for line in path.read_text().splitlines():
        for t, field in enumerate(line.split("\t")[14:]):
            if field:
                want_tables.append(t)
                want_ids.append(int(field, 16))
    for chunk in (1, 4, 100):
        reader = read_trace(path, chunk_size=chunk)
        got = list(reader.requests())
        assert np.concatenate([c.tables for c in got]).tolist() == want_tables
        assert np.concatenate([c.ids for c in got]).tolist() == want_ids
    trace = load_trace(path)
    tables, ids = trace.interleaved()
    assert (tables.tolist(), ids.tolist()) == (want_tables, want_ids)
    assert [t.size for t in trace.tables] == np.bincount(want_tables, minlength=26).tolist()


def test_npy_and_csv_requests_keep_the_file_order(tmp_path):
    a = np.arange(12).reshape(4, 3) * 10
    np.save(tmp_path / "a.npy", a)
    tables, ids = load_trace(tmp_path / "a.npy", chunk_size=3).interleaved()
    assert ids.tolist() == a.reshape(-1).tolist() and tables.tolist() == [0, 1, 2] * 4
    (tmp_path / "r.csv").write_text("t,id,ts\nb,1,5\na,2,1\nb,3,2\na,4,9\nc,5,3\n")
    trace = load_trace(tmp_path / "r.csv", table_col="t", chunk_size=2)
    assert trace.names == ["b", "a", "c"]
    tables, ids = trace.interleaved()
    assert (tables.tolist(), ids.tolist()) == ([0, 1, 0, 1, 2], [1, 2, 3, 4, 5])
    tables, ids = load_trace(tmp_path / "r.csv", table_col="t", sort_col="ts").interleaved()
    assert (tables.tolist(), ids.tolist()) == ([1, 0, 2, 0, 1], [2, 3, 5, 1, 4])


def test_tst_merges_tables_in_proportion(tmp_path):
    """.tst keeps no order between tables: equal tables interleave row by row, others by
    their position in their own table."""
    write_trace(tmp_path / "t.tst", [np.array([1, 2, 3]), np.array([7, 8, 9])])
    trace = load_trace(tmp_path / "t.tst")
    assert trace.order is None
    tables, ids = trace.interleaved()
    assert (tables.tolist(), ids.tolist()) == ([0, 1, 0, 1, 0, 1], [1, 7, 2, 8, 3, 9])
    tables, ids = Trace([np.array([1, 2, 3, 4]), np.array([9])]).interleaved()
    assert (tables.tolist(), ids.tolist()) == ([0, 0, 1, 0, 0], [1, 2, 9, 3, 4])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-5, 5)), max_size=60))
def test_requests_round_trip_and_select(pairs):
    tables = np.array([t for t, _ in pairs], dtype=np.int64)
    ids = np.array([i for _, i in pairs], dtype=np.int64)
    trace = Trace.from_requests(tables, ids, ["a", "b", "c", "d"])
    for t in range(4):
        assert trace.tables[t].tolist() == ids[tables == t].tolist()
    got = trace.interleaved()
    assert (got.tables.tolist(), got.ids.tolist()) == (tables.tolist(), ids.tolist())
    sub = trace.select([2, 0])
    keep = (tables == 2) | (tables == 0)
    got = sub.interleaved()
    assert got.ids.tolist() == ids[keep].tolist()
    assert got.tables.tolist() == [0 if t == 2 else 1 for t in tables[keep]]


def test_an_order_that_does_not_match_the_tables_is_refused():
    with pytest.raises(InvalidInputError, match="order"):
        Trace([np.array([1, 2]), np.array([3])], order=np.array([0, 1, 1]))
    with pytest.raises(InvalidInputError, match="order"):
        Trace([np.array([1])], order=np.array([2]))
