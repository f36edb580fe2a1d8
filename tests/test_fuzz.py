"""Property-based fuzzing of the infer endpoint (JSON and binary) against a real server:
no 5xx, no hang, valid requests answered with in-process ONNX Runtime's numbers.

`mlet bench fuzz` runs the same properties over thousands of cases."""

import pytest

from mlet.repository import open_model
from serve.fuzz import Fuzzer, fuzz
from serve.process import running_server

CASES = 300


@pytest.fixture(scope="module")
def fuzzer(tiny_repo):
    with running_server(tiny_repo, ["mlet"]) as (url, _):
        opened = open_model(tiny_repo / "mlet")
        yield Fuzzer(url, "mlet", opened.model_path, opened.manifest.spec, hang_s=10.0)


def test_fuzzed_requests_get_no_5xx_no_hang_and_right_numbers(fuzzer):
    report = fuzz(fuzzer, CASES, seed=1)
    assert report.failures() == []
    assert report.cases == CASES and report.hangs == 0
    assert all(status < 500 for status in report.statuses)
    assert report.valid_checked > CASES // 5  # a third of the draws are valid requests
    assert set(report.statuses) >= {200, 400}
