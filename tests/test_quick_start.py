"""``recbole_llm.quick_start``: checkpoints that load back (also a GPU one on CPU), and the CLI's one-line errors."""
import glob
import os
import subprocess
import sys

import pytest
import torch

from recbole_llm.compat import torch_load
from recbole_llm.quick_start import load_data_and_model, run_recbole_llm
from recbole_llm.utils import get_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_RECBOLE_LLM = os.path.join(ROOT, "run_recbole_llm.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """BPR trained for 1 epoch on ml-100k, saved: (test result, checkpoint path, working directory)."""
    workdir = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)  # RecBole writes log/ and log_tensorboard/ in the working directory
        mp.setattr(sys, "argv", [sys.argv[0]])  # RecBole's Config reads --key=value from the command line
        result = run_recbole_llm("BPR", "ml-100k", config_dict={
            "epochs": 1, "learning_rate": 0.01, "show_progress": False,
            "checkpoint_dir": str(workdir / "saved")}, saved=True)
    (checkpoint,) = glob.glob(str(workdir / "saved" / "*.pth"))
    return result["test_result"], checkpoint, workdir


def _evaluate(config, model, test_data):
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return dict(trainer.evaluate(test_data, load_best_model=False))


def _gpu_checkpoint(checkpoint, path, monkeypatch):
    """A copy of ``checkpoint`` as a GPU run writes it: config device cuda, tensors stored with a cuda location."""
    state = torch_load(checkpoint, map_location="cpu")
    state["config"]["device"] = torch.device("cuda")
    state["config"]["gpu_id"] = "0"
    with monkeypatch.context() as mp:
        mp.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)
    return path


def test_load_data_and_model_evaluates_like_training(trained, monkeypatch):
    test_result, checkpoint, workdir = trained
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    config, model, dataset, train_data, valid_data, test_data = load_data_and_model(checkpoint)
    assert not model.training
    assert _evaluate(config, model, test_data) == pytest.approx(dict(test_result))


def test_load_data_and_model_in_a_fresh_process(trained):
    """A new process that only loads a checkpoint evaluates NDCG / MRR (RecBole's numpy aliases are set)."""
    test_result, checkpoint, workdir = trained
    code = ("import sys; from recbole_llm.quick_start import load_data_and_model; "
            "from recbole.trainer import Trainer; c, m, _, _, _, t = load_data_and_model(sys.argv[1]); "
            "print('NDCG', Trainer(c, m).evaluate(t, load_best_model=False)['ndcg@10'])")
    out = subprocess.run([sys.executable, "-c", code, checkpoint], cwd=str(workdir), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split("NDCG")[-1]) == pytest.approx(test_result["ndcg@10"])


def test_full_sort_topk_on_loaded_model(trained, monkeypatch):
    from recbole.utils.case_study import full_sort_topk

    _, checkpoint, workdir = trained
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    config, model, dataset, _, _, test_data = load_data_and_model(checkpoint)
    uids = dataset.token2id(dataset.uid_field, ["196", "186", "22"])
    scores, items = full_sort_topk(uids, model, test_data, k=10, device=config["device"])
    assert items.shape == (3, 10) and torch.isfinite(scores).all()
    for row, uid in zip(items.tolist(), uids):
        seen = set(test_data.uid2history_item[uid].tolist())  # training and validation items are masked
        assert not seen & set(row) and 0 not in row


def test_gpu_checkpoint_loads_on_cpu(trained, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("checks loading a GPU checkpoint on a machine without one")
    test_result, checkpoint, workdir = trained
    gpu_file = _gpu_checkpoint(checkpoint, str(tmp_path / "gpu.pth"), monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):  # the copy really asks for a GPU
        torch.load(gpu_file, weights_only=False)

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    config, model, dataset, _, _, test_data = load_data_and_model(gpu_file)
    assert config["device"] == torch.device("cpu") and config["gpu_id"] == ""
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert _evaluate(config, model, test_data) == pytest.approx(dict(test_result))


def test_no_ray_import():
    """``recbole.quick_start`` imports ray; nothing we use may pull it in."""
    code = ("import sys, recbole_llm.quick_start, recbole.utils.case_study, recbole.trainer; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--model=Nope"], "unknown model 'Nope'; available: "),
    (["--model=BPR", "--config_files=missing.yaml"], "config file not found: missing.yaml"),
    (["--model=BPR", "--dataset=nonexistent"], "dataset 'nonexistent' not found"),
], ids=["unknown-model", "missing-config-file", "missing-dataset"])
def test_cli_errors_are_one_line(args, message, tmp_path):
    proc = subprocess.run([sys.executable, RUN_RECBOLE_LLM, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    if args == ["--model=Nope"]:
        assert "BPR" in lines[0] and "LightGCN" in lines[0]
