"""`mlet bench int4-gather`: both graphs gather the same rows, and the figures are there."""

import numpy as np

from bench.inprocess.int4_gather import (
    Int4GatherConfig,
    run_int4_gather_bench,
    session,
    table,
    unpacking_model,
)
from mlet.files import read_json


def test_both_graphs_gather_the_same_rows(tmp_path):
    config = Int4GatherConfig(rows=5000, batch=64, calls=3, rounds=2)
    report = run_int4_gather_bench(config, tmp_path)
    assert report["max_abs_diff"] < 2e-2  # the contrib op answers in float16
    assert set(report["median_ms_per_call"]) == {"unpacking (ours)", "GatherBlockQuantized"}
    assert all(len(r) == 2 for r in report["rounds_ms"].values())
    assert read_json(tmp_path / "int4_gather.json")["contrib_over_ours"] > 0


def test_the_unpacking_graph_is_the_int4_round_trip():
    config = Int4GatherConfig(rows=50, dim=16)
    codes, scale, offset = table(config)
    ids = np.array([3, 0, 49], np.int64)
    rows = session(unpacking_model(codes, scale, offset, 16)).run(None, {"ids": ids})[0]
    nibbles = np.stack([codes[ids] & 15, codes[ids] >> 4], axis=-1).reshape(3, 16)
    expected = nibbles * scale[ids].astype(np.float32) + offset[ids].astype(np.float32)
    np.testing.assert_allclose(rows, expected, rtol=1e-6)
