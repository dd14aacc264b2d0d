"""Time the pre-run validation (``recbole_llm.validate.validate``) adds, on ml-100k and a generated 1M-row dataset.

    python bench/validate_speed.py [--rows 1000000] [--repeat 3]

ml-100k is RecBole's bundled copy (100k rows; its default ``load_col`` reads the rating and timestamp floats).
The generated dataset has a 1M-row ``.inter`` (user, item, rating, timestamp, all loaded) and a ``.item`` with
a title, like a converted ml-1m / Amazon file. Prints the best of ``--repeat`` wall times of ``validate``,
and RecBole's ``create_dataset`` time for ml-100k as the reference it adds to.
"""
import argparse
import os
import random
import sys
import tempfile
import time

from recbole_llm.config import Config
from recbole_llm.validate import validate


def generate(root, rows, n_users=6040, n_items=3706, seed=0):
    rng = random.Random(seed)
    folder = os.path.join(root, "synthetic")
    os.makedirs(folder)
    with open(os.path.join(folder, "synthetic.inter"), "w") as f:
        f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for t in range(rows):
            f.write(f"{rng.randint(1, n_users)}\t{rng.randint(1, n_items)}\t{rng.randint(1, 5)}\t{978300000 + t}\n")
    with open(os.path.join(folder, "synthetic.item"), "w") as f:
        f.write("item_id:token\ttitle:token_seq\n")
        for i in range(1, n_items + 1):
            f.write(f"{i}\tA movie called number {i}\n")


def best_time(fn, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value options from the command line

    with tempfile.TemporaryDirectory() as tmp:
        config = Config("BPR", "ml-100k", config_dict={"checkpoint_dir": os.path.join(tmp, "saved")})
        t = best_time(lambda: validate(config), args.repeat)
        print(f"ml-100k (100,000 rows): validate {t:.3f} s")

        from recbole.utils import init_logger

        from recbole_llm.utils import create_dataset

        os.chdir(tmp)
        init_logger(config)
        t_ds = best_time(lambda: create_dataset(config), 1)
        print(f"ml-100k: RecBole create_dataset {t_ds:.3f} s (reference)")

        generate(tmp, args.rows)
        config = Config("BPR", "synthetic", config_dict={
            "data_path": tmp, "checkpoint_dir": os.path.join(tmp, "saved"),
            "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"], "item": ["item_id", "title"]}})
        t = best_time(lambda: validate(config), args.repeat)
        print(f"synthetic ({args.rows:,} rows + 3,706 items, all columns loaded): validate {t:.3f} s")


if __name__ == "__main__":
    main()
