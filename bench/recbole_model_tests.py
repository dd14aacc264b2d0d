"""RecBole 1.2.1's own model tests, run through the plugin: every RecBole model runs unchanged through us.

    python bench/recbole_model_tests.py --recbole-src PATH [-k NAME] [--threads 1] [--list]

``PATH`` is a RecBole 1.2.1 source checkout (``git clone -b v1.2.1 https://github.com/RUCAIBox/RecBole``):
RecBole's tests and their data (``tests/model/test_model_auto.py``, ``tests/model/test_model.yaml``,
``tests/test_data/``) are in neither its wheel nor its sdist. Each test of ``test_model_auto.py`` (137 models
and variants; read with ``ast``, not imported: it imports ``recbole.quick_start``, which imports ray) runs as
RecBole runs it, ``objective_function(config_dict, [test_model.yaml], saved=False)``, but with
``recbole_llm.quick_start.objective_function``: our Config, the input validation (``recbole_llm.validate``),
our model / trainer / dataset lookup and the RecBole fixes (``recbole_llm.compat``). RecBole's test data is
used as it is (its ``test.inter`` ends with a row of 5 fields under a 4-column header: issue #30).

Prints one line per test (time, ok / FAIL with the error's last line / SKIP for an optional package that is not
installed: faiss, lightgbm, xgboost, dgl, torch_scatter), then the counts, the wall time, the CPU and the
thread count. Exit code 1 if any test failed. ~9 min for all on 2 cores (one thread).
"""
import argparse
import ast
import os
import platform
import re
import sys
import tempfile
import time
import traceback

OPTIONAL = ("faiss", "lightgbm", "xgboost", "dgl", "torch_scatter")


def read_tests(path):
    """``[(Class.test_name, config_dict)]`` of RecBole's ``test_model_auto.py``: each test builds one literal
    ``config_dict`` and calls ``quick_test(config_dict)``."""
    with open(path) as f:
        tree = ast.parse(f.read())
    tests = []
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for fn in cls.body:
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test"):
                continue
            (assign,) = [s for s in fn.body if isinstance(s, ast.Assign)]
            tests.append((f"{cls.name}.{fn.name}", ast.literal_eval(assign.value)))
    return tests


def cpu_model():
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def missing_optional(error):
    """The optional packages a failure is about (named in the error: RecBole's ImportError, or our registry's
    "model X needs lightgbm and xgboost" line), if it is not installed."""
    import importlib.util

    names = [(error.name or "").split(".")[0]] if isinstance(error, ImportError) else []
    text = str(error)
    names += [name for name in OPTIONAL if re.search(rf"\b{name}\b", text)]
    missing = [name for name in dict.fromkeys(names) if name in OPTIONAL and importlib.util.find_spec(name) is None]
    return ", ".join(missing) or None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recbole-src", required=True, help="a RecBole 1.2.1 source checkout")
    parser.add_argument("-k", default="", help="run only the tests whose name contains this (case-insensitive)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--list", action="store_true", help="list the tests and exit")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value options from the command line

    src = os.path.abspath(args.recbole_src)
    model_dir = os.path.join(src, "tests", "model")
    data_path = os.path.join(src, "tests", "test_data")
    for needed in (os.path.join(model_dir, "test_model_auto.py"), os.path.join(model_dir, "test_model.yaml"),
                   os.path.join(data_path, "test", "test.inter")):
        if not os.path.isfile(needed):
            parser.error(f"{needed} not found: --recbole-src must be a RecBole 1.2.1 source checkout")
    tests = [t for t in read_tests(os.path.join(model_dir, "test_model_auto.py")) if args.k.lower() in t[0].lower()]
    if args.list:
        for name, config_dict in tests:
            print(name, config_dict)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from recbole_llm.quick_start import objective_function

    config_files = [os.path.join(model_dir, "test_model.yaml")]
    passed, failed, skipped = [], [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # RecBole writes log/ and log_tensorboard/ into the working directory
        for name, config_dict in tests:
            # the yaml's data_path is relative to RecBole's root (where its tests run)
            options = dict(config_dict, data_path=data_path, checkpoint_dir=os.path.join(tmp, "saved"))
            t = time.perf_counter()
            try:
                objective_function(config_dict=options, config_file_list=config_files, saved=False)
            except Exception as e:  # noqa: BLE001 - a test's failure is a figure here, the run goes on
                optional = missing_optional(e)
                last = traceback.format_exception_only(type(e), e)[-1].strip()
                if optional:
                    skipped.append(name)
                    status = f"SKIP ({optional} not installed)"
                else:
                    failed.append(name)
                    status = f"FAIL {last[:300]}"
            else:
                passed.append(name)
                status = "ok"
            print(f"{time.perf_counter() - t:7.1f} s  {name} {config_dict}: {status}", flush=True)
    wall = time.perf_counter() - start
    print(f"\nRecBole 1.2.1 tests/model/test_model_auto.py through recbole_llm.quick_start.objective_function: "
          f"{len(tests)} tests, {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped "
          f"(optional package not installed)")
    print(f"wall time {wall / 60:.1f} min; CPU {cpu_model()}, {os.cpu_count()} cores visible, "
          f"torch threads {args.threads}")
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
