"""``run_hyper.py``: RecBole's HyperTuning (hyperopt) over our ``objective_function``."""
import os
import subprocess
import sys

import pytest

from tests.conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_HYPER = os.path.join(ROOT, "run_hyper.py")


def _load_run_hyper():
    return load_script("run_hyper.py", "run_hyper")


def test_exhaustive_search_runs_every_trial(tmp_path):
    (tmp_path / "bpr.hyper").write_text("learning_rate choice [0.005,0.01]\n")
    (tmp_path / "fixed.yaml").write_text(
        f"epochs: 1\nshow_progress: False\ncheckpoint_dir: {tmp_path / 'saved'}\n")
    output = tmp_path / "BPR.result"
    # One thread per process keeps the run short on a small, shared CPU; it changes no result.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, RUN_HYPER, "--model=BPR", "--dataset=ml-100k", "--algo=exhaustive",
         f"--params_file={tmp_path / 'bpr.hyper'}", f"--config_files={tmp_path / 'fixed.yaml'}",
         f"--output_file={output}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = output.read_text()
    assert "learning_rate:0.005\n" in text and "learning_rate:0.01\n" in text, text
    assert text.count("Valid result:") == 2 and text.count("Test result:") == 2, text
    assert "best params:" in proc.stdout


def test_glta_hyper_file_is_recbole_format():
    from recbole.trainer.hyper_tuning import HyperTuning, _spacesize

    space = HyperTuning._build_space_from_file(os.path.join(ROOT, "properties", "hyper", "GLTA.hyper"))
    assert set(space) == {"learning_rate", "gllm_k"}
    assert _spacesize(space) == 6


@pytest.mark.parametrize("argv, message", [
    (["--tool=Ray", "--params_file=x.hyper"], "only Hyperopt"),
    (["--model=BPR"], "--params_file is required"),
    (["--model=BPR", "--params_file=missing.hyper"], "missing.hyper"),
])
def test_bad_options_give_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _load_run_hyper().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
