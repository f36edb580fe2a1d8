"""Faults and hostile input against the server's data plane, driven by plain calls."""

import asyncio
import json
import shutil
import threading

import numpy as np
import onnx
import pytest

import serve.dataplane as dataplane
from bench.load.request_bodies import encode_inputs
from serve.dataplane import DataPlane, PlaneConfig
from serve.protocol import HEADER_LENGTH, InferenceError


def json_body(spec, rows: int, seed: int = 0) -> bytes:
    inputs = spec.random_inputs(rows, np.random.default_rng(seed))
    return json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": t.datatype, "shape": list(v.shape), "data": v.tolist()}
                for (n, v), t in zip(inputs.items(), spec.inputs, strict=True)
            ]
        }
    ).encode()


def copy_model(tiny_repo, tmp_path, name="full"):
    repo = tmp_path / "models"
    shutil.copytree(tiny_repo / name, repo / name)
    return repo


# -- model control (Triton's --model-control-mode) -------------------------------------


def test_model_control_none_refuses_load_and_unload_but_lists_the_index(tiny_repo, tmp_path):
    plane = DataPlane(copy_model(tiny_repo, tmp_path))
    plane.load_all()

    async def scenario():
        for action in (plane.load, plane.unload):
            with pytest.raises(InferenceError, match="model control mode 'none'") as error:
                await action("full")
            assert error.value.status == 400
        await plane.close()

    asyncio.run(scenario())
    assert plane.index() == [{"name": "full", "version": "1", "state": "READY"}]


def test_failed_loads_of_made_up_names_keep_nothing(tiny_repo, tmp_path):
    plane = DataPlane(copy_model(tiny_repo, tmp_path), PlaneConfig(model_control="explicit"))
    plane.load_all()

    async def scenario():
        for i in range(500):
            with pytest.raises(InferenceError) as error:
                await plane.load(f"made-up-{i}")
            assert error.value.status == 404
        await plane.close()

    asyncio.run(scenario())
    assert plane.failures == {}
    assert [entry["name"] for entry in plane.index()] == ["full"]
    assert not hasattr(plane, "_locks")  # no per-name lock left behind either


# -- sha256 of the model files at load ---------------------------------------------------


def test_a_bit_flipped_model_is_unavailable_with_the_reason(tiny_repo, tmp_path):
    repo = tmp_path / "models"
    for name in ("full", "mlet"):
        shutil.copytree(tiny_repo / name, repo / name)
    # one weight changed in place: still a valid model that ONNX Runtime would run
    path = repo / "mlet" / "1" / "model.onnx"
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(weight.raw_data)
    raw[3] ^= 0x01
    weight.raw_data = bytes(raw)
    onnx.save(model, str(path))
    plane = DataPlane(repo)
    plane.load_all()
    assert list(plane.models) == ["full"]
    entry = next(e for e in plane.index() if e["name"] == "mlet")
    assert entry["state"] == "UNAVAILABLE"
    assert "model.onnx has sha256" in entry["reason"] and "the manifest says" in entry["reason"]
    asyncio.run(plane.close())


def test_config_pbtxt_stays_the_operators_to_edit(tiny_repo, tmp_path):
    repo = copy_model(tiny_repo, tmp_path)
    config = repo / "full" / "config.pbtxt"
    config.write_text(config.read_text().replace("count: 1", "count: 2"))
    plane = DataPlane(repo)
    plane.load_all()
    assert plane.models["full"].batcher.config.instances == 2
    asyncio.run(plane.close())


# -- config.pbtxt as Triton reads it -----------------------------------------------------


def edit_config(repo, old, new):
    config = repo / "full" / "config.pbtxt"
    assert old in config.read_text()
    config.write_text(config.read_text().replace(old, new))


def test_config_max_batch_size_applies(tiny_repo, tmp_path):
    repo = copy_model(tiny_repo, tmp_path)
    edit_config(repo, "max_batch_size: 512", "max_batch_size: 16")
    edit_config(repo, "preferred_batch_size: [ 64, 256 ]", "preferred_batch_size: [ 8 ]")
    plane = DataPlane(repo)
    plane.load_all()
    handle = plane.models["full"]
    assert handle.spec.max_batch_size == 16 and handle.batcher.config.max_batch_rows == 16
    body = json_body(handle.spec, 17)

    async def scenario():
        with pytest.raises(InferenceError, match="above the model's maximum of 16"):
            await plane.infer("full", None, body, None)
        await plane.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("preferred_batch_size: [ 64, 256 ]", "preferred_batch_size: [ -5, 0 ]", "positive"),
        ("preferred_batch_size: [ 64, 256 ]", "preferred_batch_size: [ 1024 ]", "<= max"),
        ("max_batch_size: 512", "max_batch_size: -1", "non-negative"),
    ],
)
def test_configs_triton_refuses_are_refused(tiny_repo, tmp_path, old, new, message):
    repo = copy_model(tiny_repo, tmp_path)
    edit_config(repo, old, new)
    with pytest.raises(ValueError, match=message):
        DataPlane(repo).load_all(["full"])


def test_instance_count_zero_counts_as_one_as_in_triton(tiny_repo, tmp_path):
    repo = copy_model(tiny_repo, tmp_path)
    edit_config(repo, "count: 1", "count: 0")
    plane = DataPlane(repo)
    plane.load_all()
    assert plane.models["full"].batcher.config.instances == 1
    asyncio.run(plane.close())


# -- a crash mid-replace leaves a repository the server serves ---------------------------


def test_server_start_restores_a_model_a_crashed_replace_moved_aside(tiny_repo, tmp_path):
    repo = tmp_path / "models"
    retired = repo / ".full.999999999.abc.old"
    shutil.copytree(tiny_repo / "full", retired / "full")  # the old model, moved aside
    staging = repo / ".full.999999999.def.partial"
    shutil.copytree(tiny_repo / "full", staging)  # the new one, never renamed in
    plane = DataPlane(repo)
    plane.load_all()
    assert list(plane.models) == ["full"]
    assert sorted(p.name for p in repo.iterdir()) == ["full"]
    asyncio.run(plane.close())


# -- non-finite answers are never served as null -----------------------------------------


def test_a_model_answering_nan_is_a_server_error_not_null(tiny_repo, tmp_path):
    repo = copy_model(tiny_repo, tmp_path)
    plane = DataPlane(repo)
    plane.load_all()
    handle = plane.models["full"]
    handle.batcher.run_batch = lambda inputs: {
        "probability": np.full((len(inputs["dense"]), 1), np.nan, np.float32)
    }
    body = json_body(handle.spec, 2)

    async def scenario():
        with pytest.raises(InferenceError, match="not finite") as error:
            await plane.infer("full", None, body, None)
        await plane.close()
        return error.value.status

    assert asyncio.run(scenario()) == 500


# -- large JSON bodies: bounded per model and parsed off the event loop ---------------


def test_large_bodies_are_decoded_on_a_decode_thread(tiny_repo, tmp_path, monkeypatch):
    plane = DataPlane(copy_model(tiny_repo, tmp_path))
    plane.load_all()
    spec = plane.models["full"].spec
    threads = []
    real = dataplane.decode_and_validate

    def recording(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(dataplane, "decode_and_validate", recording)
    monkeypatch.setattr(dataplane, "DECODE_INLINE_BYTES", 4096)  # the tiny model's bodies
    small, large = json_body(spec, 1), json_body(spec, 256)
    assert len(small) <= dataplane.DECODE_INLINE_BYTES < len(large)
    inputs = spec.random_inputs(256, np.random.default_rng(0))
    binary, headers = encode_inputs(spec, inputs, binary=True)
    header_length = int(headers[HEADER_LENGTH])
    assert header_length <= dataplane.DECODE_INLINE_BYTES < len(binary)

    async def scenario():
        for body, length in ((small, None), (large, None), (binary, header_length)):
            await plane.infer("full", None, body, length)
        await plane.close()

    asyncio.run(scenario())
    assert threads[0] == "MainThread" and threads[1].startswith("decode")
    # binary tensors are read in place: only a large JSON part goes to a decode thread
    assert threads[2] == "MainThread"


def test_the_body_bound_follows_the_models_max_batch(tiny_repo, tmp_path):
    plane = DataPlane(copy_model(tiny_repo, tmp_path))
    plane.load_all()
    spec = plane.models["full"].spec
    limit, what = plane.body_limit("full", 64 << 20)
    assert "max batch 512" in what
    assert len(json_body(spec, spec.max_batch_size)) < limit < 64 << 20
    assert plane.body_limit("nope", 1000) == (1000, "the limit")
    asyncio.run(plane.close())
