"""Peak memory and wall time of the Amazon converter on a generated 1M-line reviews file.

    python bench/converter_memory.py [--lines 1000000] [--gzip] [--kcore 5] [--keep]

Writes an Amazon-2018-format reviews file (JSON lines with HTML-laden review text, ~0.6 KB a line) and a
metadata file into a temporary folder, converts them in a subprocess
(``python -m dataset_converters.amazon ... --kcore 5``) and prints the subprocess's wall time and peak
resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``). The converter keeps ids, ratings and times in
memory, never the text, so the figure grows with users and items, not with the file size. Target: < 1 GB.
"""
import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("game fun great controller graphics story level boss price shipping box disc works well bad good "
         "recommend kids family hours online multiplayer battery screen sound music quality value").split()


def generate(folder, n_lines, use_gzip, seed=0):
    """Reviews and metadata files with skewed user and item activity (many one-off users, a heavy head)."""
    rng = np.random.default_rng(seed)
    n_users, n_items = max(10, n_lines // 3), max(10, n_lines // 25)
    users = rng.permutation(n_users)[(n_users * rng.random(n_lines) ** 3).astype(np.int64)]
    items = rng.permutation(n_items)[(n_items * rng.random(n_lines) ** 4).astype(np.int64)]
    ratings = rng.integers(1, 6, n_lines)
    times = 1_300_000_000 + rng.integers(0, 200_000_000, n_lines)
    opener = gzip.open if use_gzip else open
    ext = ".json.gz" if use_gzip else ".json"
    reviews = os.path.join(folder, f"Video_Games{ext}")
    with opener(reviews, "wt", encoding="utf-8") as f:
        for start in range(0, n_lines, 10_000):  # text in chunks: this process stays small (see main)
            for k in range(start, min(start + 10_000, n_lines)):
                words = [WORDS[w] for w in rng.integers(0, len(WORDS), rng.integers(20, 160))]
                text = " ".join(words[:10]) + " <br />&quot;" + " ".join(words[10:]) + "&quot;"
                f.write(json.dumps({
                    "overall": float(ratings[k]), "verified": True, "reviewTime": "01 1, 2015",
                    "reviewerID": f"A{users[k]:013d}", "asin": f"B{items[k]:09d}", "reviewerName": "Reviewer",
                    "reviewText": text, "summary": " ".join(words[:4]), "unixReviewTime": int(times[k])}) + "\n")
    meta = os.path.join(folder, f"meta_Video_Games{ext}")
    with opener(meta, "wt", encoding="utf-8") as f:
        for i in range(n_items):
            f.write(json.dumps({
                "category": ["Video Games", "PC"], "description": [f"<p>Item {i}: " + " ".join(WORDS[:20]) + "</p>"],
                "title": f"Game {i} &amp; Friends", "brand": "Studio", "asin": f"B{i:09d}"}) + "\n")
    return reviews, meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--gzip", action="store_true", help="gzip the generated files")
    parser.add_argument("--kcore", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="converter-bench-")
    try:
        t0 = time.time()
        reviews, meta = generate(folder, args.lines, args.gzip)
        size = os.path.getsize(reviews)
        print(f"generated {args.lines:,} reviews ({size / 2**20:,.0f} MiB{' gzipped' if args.gzip else ''}) "
              f"in {time.time() - t0:.0f} s")
        cmd = [sys.executable, "-m", "dataset_converters.amazon", "--reviews", reviews, "--meta", meta,
               "--output", os.path.join(folder, "out"), "--kcore", str(args.kcore), "--no-progress"]
        t0 = time.time()
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.time() - t0
        if result.returncode != 0:
            print(result.stdout + result.stderr, file=sys.stderr)
            return result.returncode
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        # A child's figure starts from its parent's size at fork time: show that this one was smaller.
        self_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(result.stdout.rstrip())
        print(f"(this benchmark process peaked at {self_mib:,.0f} MiB)")
        print(f"converter: {args.lines:,} lines, wall {wall:.1f} s, peak RSS {peak_mib:,.0f} MiB "
              f"({'under' if peak_mib < 1024 else 'OVER'} the 1 GiB target)")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
