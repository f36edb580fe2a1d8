"""Architecture flags: any bottom/top MLP and either interaction trains, exports and serves."""

import numpy as np
import pytest
import tritonclient.http as httpclient

from cli import build_parser, main
from mlet.dlrm import DLRMConfig, build_config
from mlet.repository import open_model
from mlet.run import load_run
from mlet.runtime import onnxruntime_runner, torch_runner
from serve.process import running_server
from tests.helpers import tritonclient_inputs


def test_flags_reach_the_run_config_and_the_model(tiny_data, tmp_path):
    run = tmp_path / "cat"
    argv = ["train", "--data", str(tiny_data), "--out", str(run), "--embedding", "mlet",
            "--dim", "4", "--hidden", "8", "--bottom-mlp", "16,8", "--top-mlp", "12",
            "--interaction", "cat", "--epochs", "1", "--batch-size", "256"]  # fmt: skip
    assert main(argv) == 0
    config = load_run(run).model_config
    assert (config.bottom_mlp, config.top_mlp, config.interaction) == ((16, 8), (12,), "cat")
    # cat: the top MLP reads all T+1 vectors of width D
    assert config.top_input_width == (len(config.tables) + 1) * 4


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_exported_and_served_answers_equal_pytorch(tiny_data, tmp_path, interaction):
    run, repo = tmp_path / "run", tmp_path / "models"
    train = ["train", "--data", str(tiny_data), "--out", str(run), "--embedding", "mlet",
             "--dim", "4", "--hidden", "8", "--bottom-mlp", "32,16,8", "--top-mlp", "16,8",
             "--interaction", interaction, "--epochs", "1", "--batch-size", "256"]  # fmt: skip
    assert main(train) == 0
    assert main(["export", str(run), "--repo", str(repo), "--name", "arch"]) == 0
    torch_model, spec = torch_runner(run)
    inputs = spec.random_inputs(9, np.random.default_rng(0))
    expected = torch_model(inputs)
    onnx_model = onnxruntime_runner(open_model(repo / "arch").model_path)
    np.testing.assert_allclose(onnx_model(inputs), expected, atol=1e-5)
    with running_server(repo, ["arch"]) as (url, _):
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        served = client.infer("arch", tritonclient_inputs(inputs)).as_numpy("probability")
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_old_configs_without_interaction_read_as_dot():
    config = build_config(num_dense=2, table_sizes=[5, 6], embedding="full", dim=4)
    data = config.to_dict()
    del data["interaction"]
    assert DLRMConfig.from_dict(data).interaction == "dot"


@pytest.mark.parametrize("text", ["64,x", "", "0,8", "-4"])
def test_bad_architecture_strings_are_refused(text, capsys):
    argv = ["train", "--data", "d", "--out", "o", "--dim", "4", "--bottom-mlp", text]
    if text in ("0,8", "-4"):
        args = build_parser().parse_args(argv)
        with pytest.raises(ValueError, match="bottom_mlp widths must be positive"):
            build_config(2, [5], "full", 4, bottom_mlp=args.bottom_mlp)
        return
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "--bottom-mlp" in capsys.readouterr().err


def test_unknown_interaction_is_refused():
    with pytest.raises(ValueError, match="interaction must be one of"):
        build_config(2, [5], "full", 4, interaction="sum")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--dim", "4",
                                   "--interaction", "sum"])  # fmt: skip
