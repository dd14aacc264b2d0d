"""bench/device_check.py, the prepared GPU check: its dry run on this CPU (every step, one JSON and one markdown
table), the install logic (extract what is missing, keep what is present, fall back to the carried copies),
the properties finder the GPU machine uses instead of an editable install, the parsers and the time budget."""
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.py")


@pytest.fixture(scope="module")
def dc():
    return load_script("bench/device_check.py", "device_check")


def test_the_dry_run_runs_every_step_and_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    table = (out / "device_check.md").read_text()
    assert (out / "device_check.log").stat().st_size > 0
    expected = ["install", "setup", "gpu_tests", "llm_step", "nproc2", "model:GLTA", "model:TCA4Rec",
                "model:AlignTokenRec", "model:SeLLaRec"]
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == expected
    for name, step in steps.items():
        assert step["status"] == "ok", (name, step.get("summary"), step.get("tail"))
        assert step["seconds"] <= step["budget_s"] + 15, (name, step)
        assert re.search(rf"^\| {re.escape(name)} \| ok \|", table, flags=re.M), name
    assert report["mode"] == "dry-run" and report["groups"] == [1, 2]
    assert steps["install"]["result"]["imports"]["versions"]["recbole"] == "1.2.1"
    assert steps["setup"]["result"]["llm_path"].endswith("tiny-shaped-random")
    rows = steps["llm_step"]["result"]["rows"]
    assert any(r["step"].startswith("frozen LLM fwd+bwd") and r["mfu"] is not None for r in rows)
    assert report["mfu_goal"]["status"] == "not measured"  # the 7B-shaped rows are CUDA-only
    for name in expected[4:]:
        result = steps[name]["result"]
        assert result["test_result"] and result["stages"], (name, result)
    outcomes = {t["outcome"] for t in steps["gpu_tests"]["result"]["tests"]}
    assert outcomes == ({"skipped"} if not _cuda() else outcomes - {"failed", "error"})


def _cuda():
    import torch

    return torch.cuda.is_available()


def _fake_package(folder, name, version, files):
    """A carried package as --prepare writes it: its installed tree packed as NAME-VERSION.tar.xz."""
    tree = folder / f"tree-{name}"
    for path, text in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    archive = folder / f"{name}-{version}.tar.xz"
    with tarfile.open(archive, "w:xz", preset=1) as tar:
        for path in tree.iterdir():
            tar.add(path, arcname=path.name)
    return {"name": name, "version": version, "requirement": "", "file": archive.name,
            "bytes": archive.stat().st_size}


def test_install_extracts_what_is_missing_keeps_what_is_present_and_falls_back(dc, tmp_path, monkeypatch):
    parts = tmp_path / "wheels"
    part = parts / "part1"
    part.mkdir(parents=True)
    packages = [_fake_package(part, "dc-fake", "1.0", {"dc_fake/__init__.py": "X = 1\n",
                                                       "dc_fake-1.0.dist-info/METADATA": "Name: dc-fake\n"}),
                _fake_package(part, "pytest", "0.1", {"pytest_carried.txt": "carried\n"})]
    (part / "manifest.json").write_text(json.dumps({"packages": packages, "files": []}))
    monkeypatch.setattr(dc, "STATE", dc.State(tmp_path / "state", dry_run=True))
    monkeypatch.setattr(dc, "PACKAGES", [(1, "dc-fake", "1.0", ">=1.0"), (1, "pytest", "0.1", ">=1"),
                                         (1, "dc-absent", "1.0", ">=1")])
    checks = iter([(None, "ImportError: the machine's pytest does not fit"), ({"versions": {}}, "")])
    monkeypatch.setattr(dc, "_check_imports", lambda: next(checks))

    report = dc.install(parts)
    site = tmp_path / "state" / "site"
    assert (site / "dc_fake" / "__init__.py").read_text() == "X = 1\n"
    assert report["kept"] == [f"pytest {pytest.__version__}"]  # present in a version the requirement accepts
    assert report["missing"] == ["dc-absent>=1 (machine: none; not carried)"]
    # the stack did not import with the machine's own pytest: the carried copy goes in too
    assert (site / "pytest_carried.txt").exists()
    assert report["extracted"] == ["dc-fake 1.0 (machine: none)", "pytest 0.1 (fallback over the machine's)"]
    assert report["imports"] == {"versions": {}}
    assert "RecboleLLMPropertiesFinder" in (site / "sitecustomize.py").read_text()

    # a second command on the same (warm) machine reuses what the first extracted
    monkeypatch.setattr(dc, "_check_imports", lambda: ({"versions": {}}, ""))
    again = dc.install(parts)
    assert again["extracted"] == [] and again["reused"] == ["dc-fake 1.0", "pytest 0.1"]


def test_the_sitecustomize_maps_the_properties_folder_without_an_install(dc, tmp_path):
    site, other = tmp_path / "site", tmp_path / "other"
    site.mkdir()
    other.mkdir()
    (site / "sitecustomize.py").write_text(dc.SITECUSTOMIZE.format(properties=os.path.join(ROOT, "properties")))
    (other / "sitecustomize.py").write_text("import os\nos.environ['DC_SHADOWED_RAN'] = '1'\n")
    code = (
        "import os, sys\n"
        # the editable install's finder would map the folder too: take it out, so only ours can
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if 'editable' not in getattr(h, '__module__', '').lower()]\n"
        "sys.path_importer_cache.clear()\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import recbole_llm.properties as p\n"
        "print(os.path.realpath(p.__file__), type(p.__spec__.loader).__name__, os.environ.get('DC_SHADOWED_RAN'))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(other)]))
    done = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    path, _, shadowed = done.stdout.split()
    assert path == os.path.realpath(os.path.join(ROOT, "properties", "__init__.py"))
    assert shadowed == "1"  # the sitecustomize it shadows still runs


GPU_OUTPUT = """\
GPU NVIDIA H200, 140 GiB, compute capability 9.0
llm_dtype auto -> bf16 (this GPU supports bf16)
llm_quantization auto -> none (bf16 weights 0.3 GiB + activations need 2.3 GiB, 139.0 GiB of 139.7 GiB free on cuda:0)
matmul peak measured here: bf16 781.204 TFLOP/s; MFU against the bf16 peak
step                                    dtype  tokens  ours tok/s plain tok/s  ratio  TFLOP/s    MFU
frozen LLM fwd+bwd 16x128                bf16    2048    512345.6    500000.0  0.976  110.000  14.1%
generate 8 prompts x 8 tokens            bf16      64       812.3           -      -        -      -
frozen LLM fwd+bwd 16x128                4bit    2048    212345.6    200000.0  0.942   45.000   5.8%
frozen LLM fwd+bwd 16x128             7B bf16    2048     12000.0     11800.0  0.983  {tflops:>8.3f} {mfu:>6.1%}
generate 8 prompts x 8 tokens         7B bf16      64       210.0           -      -        -      -
frozen LLM fwd+bwd 16x128             7B 4bit    2048      6000.0      5900.0  0.983  160.000  20.5%
GLTA item-text alignment step            bf16     900     90000.0     95000.0  1.056   25.000   3.2%
"""


@pytest.mark.parametrize("mfu, status", [(0.452, "met"), (0.391, "not met")])
def test_the_llm_step_table_gives_the_mfu_goal(dc, mfu, status):
    result = dc.parse_llm_step(GPU_OUTPUT.format(tflops=mfu * 781.2, mfu=mfu).splitlines())
    assert result["peaks"] == {"bf16": 781.204}
    assert result["hardware"].startswith("GPU NVIDIA H200")
    assert result["quantization_auto"].startswith("none (bf16 weights")
    assert [(r["step"], r["dtype"]) for r in result["rows"]][2:5] == [
        ("frozen LLM fwd+bwd 16x128", "4bit"), ("frozen LLM fwd+bwd 16x128", "7B bf16"),
        ("generate 8 prompts x 8 tokens", "7B bf16")]
    goal = result["mfu_goal"]
    assert goal["status"] == status and goal["mfu"] == pytest.approx(mfu, abs=1e-3)
    assert goal["plain_mfu"] == pytest.approx(mfu * 11800 / 12000, abs=1e-3) and goal["shape"] == "16x128"
    assert result["rows"][1]["plain_tok_s"] is None and result["rows"][1]["mfu"] is None


def test_a_stopped_run_is_recorded_with_its_stages_and_last_progress_bar(dc):
    out = dc.Output.__new__(dc.Output)
    out.lines = [(1.0, "04 Dec 17:00 INFO  stage cf_pretrain: running"),
                 (9.5, "04 Dec 17:00 INFO  stage cf_pretrain: saved to saved/x.pth"),
                 (9.6, "04 Dec 17:00 INFO  stage tca_alignment: reused the finished stage saved/y.pth"),
                 (30.0, "04 Dec 17:01 INFO  best valid : OrderedDict([('hit@10', 0.0531), ('ndcg@10', 0.0212)])"),
                 (31.0, "04 Dec 17:01 INFO  test result: OrderedDict([('hit@10', 0.0477), ('ndcg@10', 1.5e-02)])"),
                 (31.1, "04 Dec 17:01 INFO  test result (warm items): OrderedDict([('hit@10', 0.9)])"),
                 (31.2, "| GPU         |  12.31 G/139.80 G  |"), (31.2, "| Memory      | 3.20 G/125.00 G |")]
    out.progress = (40.0, "Train     0:  33%|###      | 1029/3100 [00:21<00:43, 48.01it/s]")
    result = dc.parse_run(out)
    assert [(s["stage"], s["started_s"], s["reused"]) for s in result["stages"]] == [
        ("cf_pretrain", 1.0, False), ("tca_alignment", 9.6, True)]
    assert result["best_valid"] == {"hit@10": 0.0531, "ndcg@10": 0.0212}
    assert result["test_result"] == {"hit@10": 0.0477, "ndcg@10": 0.015}
    assert result["resources"] == {"gpu": "12.31 G/139.80 G", "memory": "3.20 G/125.00 G"}
    assert result["progress"]["done"] == 1029 and result["progress"]["total"] == 3100
    assert result["progress"]["steps_per_s"] == pytest.approx(48.01)


def test_the_gpu_plan_fits_eight_minutes_in_two_commands_and_the_docs_name_them(dc):
    shares = {g: sum(s for _, s in steps) for g, steps in dc.GROUPS.items()}
    assert shares == {1: 240, 2: 240}  # the default --budget of each command; 480 s = 8 min in all
    doc = dc.__doc__
    commands = re.findall(r'run\(command="python3 bench/device_check.py --group (\d) --output \$OUT",\s*'
                          r'carry=\[([^\]]*)\], timeout_s=(\d+)\)', doc)
    assert [c[0] for c in commands] == ["1", "2"]
    for _, carry, timeout in commands:
        assert int(timeout) <= 600 and int(timeout) > 240
        paths = re.findall(r'"([^"]+)"', carry)
        assert paths == [".device_wheels/part1", ".device_wheels/part2"]
        for path in paths:  # ignored: git status stays clean, and only `carry` sends them
            assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
    with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
        benchmarks = f.read()
    assert "## Prepared GPU check" in benchmarks
    for line in re.findall(r"run\(command=.*", doc):
        assert line.strip() in benchmarks


def test_each_step_gets_its_share_of_what_is_left(dc, monkeypatch):
    clock = {"t": 0.0}
    spent = {"a": 5.0, "b": 100.0, "c": 0.0}
    budgets = {}

    def step(name):
        def run(timeout, log, env_info):
            budgets[name] = timeout
            clock["t"] += spent[name]
            return {"status": "ok", "seconds": spent[name], "summary": ""}
        return run

    monkeypatch.setattr(dc.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(dc, "_step_function", step)
    import io

    records = dc.run_steps([("a", 20, 1), ("b", 40, 1), ("c", 40, 1)], 100.0, io.StringIO())
    assert budgets["a"] == pytest.approx(20)
    assert budgets["b"] == pytest.approx(95 * 40 / 80)  # a left 15 s: shared by b and c
    assert records[2]["status"] == "skipped"  # b overran: nothing left for c


def test_merged_reports_keep_both_groups(dc, tmp_path):
    def report(group, names):
        steps = [{"name": n, "group": group, "status": "ok", "seconds": 1.0, "budget_s": 2.0, "summary": n}
                 for n in names]
        return dc.summarize(steps, [group], "gpu", "now", 3.0, 240.0, {"gpu_name": "H200", "gpu_count": 1})

    merged = dc.merge([report(1, ["install", "llm_step"]), report(2, ["install", "model:GLTA"])])
    assert [s["name"] for s in merged["steps"]] == ["install (1)", "llm_step", "install (2)", "model:GLTA"]
    assert merged["groups"] == [1, 2] and merged["budget_s"] == 480.0
    dc.write_report(merged, tmp_path)
    assert "| model:GLTA | ok |" in (tmp_path / "device_check.md").read_text()
