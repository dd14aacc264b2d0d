"""dataset_converters: tiny raw files in each real format (written here, never downloaded) -> atomic files ->
RecBole's loaders; presets' windows and thresholds; clear errors and no half-written output on bad input."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from dataset_converters import amazon, common, goodreads, movielens
from dataset_converters.common import ConversionError, read_atomic_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------- helpers

def ts(day, hour=12):
    """Unix time of ``YYYY-MM-DD`` at ``hour`` UTC."""
    return common.parse_date(day) + 3600 * hour


def write_lines(path, lines, encoding="utf-8"):
    data = ("\n".join(lines) + "\n").encode(encoding)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def load_recbole(out, name, model="BPR", **extra):
    from recbole_llm.config import Config
    from recbole_llm.utils import create_dataset, data_preparation

    config = Config(model=model, dataset=name, config_dict={
        "data_path": str(out), "checkpoint_dir": str(out / "_saved"), "show_progress": False,
        "train_batch_size": 64, "eval_batch_size": 64, **extra})
    dataset = create_dataset(config)
    dataset.counts = (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num)  # before the split
    return config, dataset, data_preparation(config, dataset)


def recbole_text(dataset, field, item_token):
    """The value RecBole loaded for ``field`` of an item, as a string (token_seq tokens joined by spaces)."""
    row = dataset.item_feat[dataset.iid_field].numpy().tolist().index(dataset.token2id(dataset.iid_field, item_token))
    value = dataset.item_feat[field][row]
    if value.dim() == 0:
        return dataset.id2token(field, int(value))
    return " ".join(dataset.id2token(field, [int(v) for v in value if int(v) != 0]))


def rows(path):
    return list(read_atomic_file(str(path)))


def assert_clean_failure(capsys, rc, out_root, name, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("dataset_converters: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not os.path.exists(os.path.join(out_root, name))
    if os.path.isdir(out_root):
        assert not [f for f in os.listdir(out_root) if ".tmp-" in f or ".old-" in f]


# ----------------------------------------------------------------------------------- raw fixtures

ML1M_TITLES = {1: "Toy Story (1995)", 2: "Misérables, Les (1995)", 3: '"Great" Cats (1998)',
               4: "City of Lost Children, The (Cité des enfants perdus, La) (1995)", 5: "Heat (1995)",
               6: "Unrated Movie (1999)"}
ML1M_GENRES = {1: "Animation|Children's|Comedy", 2: "Drama|Musical", 3: "Documentary", 4: "Adventure|Sci-Fi",
               5: "Action|Crime|Thriller", 6: "Drama"}


def make_ml1m(folder, ratings):
    folder.mkdir(parents=True, exist_ok=True)
    write_lines(folder / "ratings.dat", [f"{u}::{m}::{r}::{t}" for u, m, r, t in ratings])
    write_lines(folder / "movies.dat", [f"{m}::{ML1M_TITLES[m]}::{ML1M_GENRES[m]}" for m in ML1M_TITLES],
                encoding="latin-1")
    users = sorted({u for u, *_ in ratings})
    write_lines(folder / "users.dat", [f"{u}::{'FM'[u % 2]}::{[1, 18, 25, 35][u % 4]}::{u % 21}::{10000 + u}"
                                       for u in users])
    return folder


def dense_ml1m_ratings(n_users=8, movies=(1, 2, 3, 4, 5)):
    """Every user rates every movie but one (BPR needs an item left to sample as a negative)."""
    return [(u, m, 1 + (u + m) % 5, 978300000 + 1000 * u + m) for u in range(1, n_users + 1) for m in movies
            if m != 1 + u % len(movies)]


def review(user, asin, rating, when, text="Good.", **extra):
    record = {"overall": rating, "verified": True, "reviewTime": "01 1, 2017", "reviewerID": user, "asin": asin,
              "reviewerName": "X", "reviewText": text, "summary": "S", "unixReviewTime": when}
    record.update(extra)
    return json.dumps(record)


def meta(asin, title, description=("A thing.",), category=("Video Games", "PC"), brand="Acme"):
    return json.dumps({"category": list(category), "tech1": "", "description": list(description), "fit": "",
                       "title": title, "also_buy": [], "brand": brand, "feature": [], "rank": "1 in X",
                       "main_cat": "Video Games", "date": "", "price": "$1.00", "asin": asin})


# --------------------------------------------------------------------------------------- MovieLens

def test_ml1m_converts_and_loads_with_exact_text(tmp_path):
    ratings = dense_ml1m_ratings()
    raw, out = make_ml1m(tmp_path / "raw", ratings), tmp_path / "out"
    assert movielens.main(["--input", str(raw), "--output", str(out), "--no-progress"]) == 0
    folder = out / "ml-1m"
    assert sorted(os.listdir(folder)) == ["ml-1m.inter", "ml-1m.item", "ml-1m.user"]

    items = {r["item_id"]: r for r in rows(folder / "ml-1m.item")}
    assert set(items) == {"1", "2", "3", "4", "5"}  # movie 6 has no ratings
    assert items["2"]["movie_title"] == "Misérables, Les" and items["2"]["release_year"] == "1995"
    assert items["3"]["movie_title"] == '"Great" Cats'
    assert items["4"]["movie_title"] == "City of Lost Children, The (Cité des enfants perdus, La)"
    assert items["1"]["genre"] == "Animation Children's Comedy"
    inter = rows(folder / "ml-1m.inter")
    assert len(inter) == len(ratings) == 32
    assert inter[0] == {"user_id": "1", "item_id": "1", "rating": "3", "timestamp": "978301001"}
    assert rows(folder / "ml-1m.user")[0] == {"user_id": "1", "age": "18", "gender": "M", "occupation": "1",
                                              "zip_code": "10001"}

    config, dataset, (train, valid, test) = load_recbole(
        out, "ml-1m", load_col={"inter": ["user_id", "item_id", "rating", "timestamp"],
                                "item": ["item_id", "movie_title", "release_year", "genre"],
                                "user": ["user_id", "age", "gender"]})
    assert config["item_text_fields"] == ["movie_title", "release_year", "genre"]  # our ml-1m.yaml
    assert dataset.counts == (8, 5, 32)
    for token in items:
        assert recbole_text(dataset, "movie_title", token) == items[token]["movie_title"]
        assert recbole_text(dataset, "genre", token) == items[token]["genre"]
    assert len(train.dataset) + len(valid.dataset) + len(test.dataset) == 32


def test_ml1m_sellarec_preset_uses_collm_month_windows(tmp_path):
    days = {"2001-05-31": None, "2001-06-01": "train", "2002-03-31": "train", "2002-04-01": "valid",
            "2002-08-31": "valid", "2002-09-01": "test", "2003-01-31": "test", "2003-02-01": None}
    ratings = [(u, m, 1 + (u * m) % 5, ts(day)) for u in (1, 2, 3) for m, day in enumerate(days, 1) if m <= 6]
    ratings += [(4, 1, 5, ts("2001-05-31")), (4, 2, 2, ts("2003-02-10"))]  # user 4: outside the window only
    ratings += [(3, 5, 4, ts("2002-09-01", 0))]
    raw, out = make_ml1m(tmp_path / "raw", ratings), tmp_path / "out"
    assert movielens.main(["--input", str(raw), "--output", str(out), "--preset", "sellarec", "--no-progress"]) == 0
    folder = out / "ml-1m-sellarec"
    counts = {s: len(rows(folder / f"ml-1m-sellarec.{s}.inter")) for s in ("train", "valid", "test")}
    assert counts == {"train": 6, "valid": 6, "test": 3 + 0}
    assert {r["user_id"] for r in rows(folder / "ml-1m-sellarec.user")} == {"1", "2", "3"}

    config, dataset, (train, valid, test) = load_recbole(out, "ml-1m-sellarec", model="FM")
    assert config["threshold"] == {"rating": 4}
    assert [len(d.dataset) for d in (train, valid, test)] == [6, 6, 3]
    labels = train.dataset.inter_feat["label"].numpy()
    train_rows = rows(folder / "ml-1m-sellarec.train.inter")
    assert labels.tolist() == [float(r["rating"]) > 3 for r in train_rows]


def test_ml100k_raw_matches_recbole_bundled_columns(tmp_path):
    raw, out = tmp_path / "ml-100k", tmp_path / "out"
    raw.mkdir()
    write_lines(raw / "u.data", [f"{u}\t{m}\t{1 + (u + m) % 5}\t{881250949 + u * 10 + m}"
                                 for u in range(1, 7) for m in range(1, 5) if m != 1 + u % 4])
    genres = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
              "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
              "War", "Western"]
    write_lines(raw / "u.genre", [f"{g}|{k}" for k, g in enumerate(genres)] + [""])

    def item(m, title, date, flags):
        return "|".join([str(m), title, date, "", "http://x"] + ["1" if g in flags else "0" for g in genres])
    write_lines(raw / "u.item", [item(1, "Toy Story (1995)", "01-Jan-1995", {"Animation", "Children's", "Comedy"}),
                                 item(2, "Misérables, Les (1995)", "01-Jan-1995", {"Drama", "Musical"}),
                                 item(3, "unknown", "", {"unknown"}),
                                 item(4, "Heat (1995)", "01-Jan-1996", {"Action"})], encoding="latin-1")
    write_lines(raw / "u.user", [f"{u}|{20 + u}|{'MF'[u % 2]}|technician|8571{u}" for u in range(1, 7)])
    assert movielens.main(["--input", str(raw), "--output", str(out), "--no-progress"]) == 0  # format detected
    folder = out / "ml-100k"
    bundled = os.path.join(os.path.dirname(pd.__file__), "..", "recbole", "dataset_example", "ml-100k")
    for suffix in ("inter", "item", "user"):
        assert common.atomic_file_header(folder / f"ml-100k.{suffix}") == \
            common.atomic_file_header(os.path.join(bundled, f"ml-100k.{suffix}"))
    items = {r["item_id"]: r for r in rows(folder / "ml-100k.item")}
    assert items["1"] == {"item_id": "1", "movie_title": "Toy Story", "release_year": "1995",
                          "class": "Animation Children's Comedy"}
    assert items["2"]["movie_title"] == "Misérables, Les"
    assert items["3"]["release_year"] == "" and items["4"]["release_year"] == "1996"  # release date wins
    # RecBole 1.2.1 always loads its bundled copy for the name ml-100k, whatever data_path says.
    assert movielens.main(["--input", str(raw), "--output", str(out), "--dataset-name", "ml-100k-raw",
                           "--no-progress"]) == 0
    _, dataset, _ = load_recbole(out, "ml-100k-raw")
    assert dataset.counts == (6, 4, 18)


# ------------------------------------------------------------------------------------------ Amazon

LONG_DESCRIPTION = " ".join(f"word{k}" for k in range(1000))  # 6,889 characters


def make_amazon(folder, reviews_gz=False, meta_gz=True, category="Video_Games"):
    """7 users x 6 items, each user missing one item (5-core holds), plus noise the 5-core removes, an item
    without metadata, a repeated review, and text that needs cleaning."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for u in range(7):
        for k in range(6):
            if k == (u + 1) % 6:
                continue
            text = "Great game!\tFun\nwith &amp; friends <br/>ok" if (u, k) == (0, 0) else f"review {u} {k}"
            lines.append(review(f"U{u}", f"B{k:09d}", float(1 + (u + k) % 5), 1500000000 + 86400 * (u * 10 + k),
                                text))
    lines.append(review("U0", "B000000000", 1.0, 1600000000, "again"))  # repeated pair: the earliest stays
    lines.append(review("U_noise", "B000000001", 5.0, 1500000000))      # user with one review: 5-core drops it
    lines.append(review("U1", "NOMETA0001", 4.0, 1500000000))            # item without metadata
    metas = [meta("B000000000", "Caf\u00e9 &amp; <b>Games</b>\u00a0Deluxe\u200b",
                  description=["<p>Line one.</p>", "Line&nbsp;two\twith tab"], brand="by\nAcme"),
             meta("B000000001", '"Weird" Edition', description=[LONG_DESCRIPTION]),
             meta("B000000002", "Old title"), meta("B000000002", "New title"),  # later record wins
             meta("B000000003", "Plain", category=["Video Games", "PC", "</span></span></span>"]),
             meta("B000000004", "NA"), meta("B000000005", "Game five", description=[]),
             meta("B000000099", "Never reviewed")]
    reviews = folder / f"{category}.json{'.gz' if reviews_gz else ''}"
    write_lines(reviews, lines)
    write_lines(folder / f"meta_{category}.json{'.gz' if meta_gz else ''}", metas)
    return reviews


@pytest.mark.parametrize("reviews_gz,meta_gz", [(False, True), (True, False)])
def test_amazon_aligntokenrec_preset_plain_and_gz(tmp_path, reviews_gz, meta_gz):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_amazon(raw, reviews_gz, meta_gz)
    assert amazon.main(["--input", str(raw), "--output", str(out), "--preset", "aligntokenrec",
                        "--no-progress"]) == 0  # category from the file names
    folder = out / "amazon-games"
    inter = rows(folder / "amazon-games.inter")
    assert len(inter) == 35 and {r["user_id"] for r in inter} == {f"U{u}" for u in range(7)}
    first = [r for r in inter if r["user_id"] == "U0" and r["item_id"] == "B000000000"]
    assert len(first) == 1 and first[0]["review_text"] == "Great game! Fun with & friends ok"
    items = {r["item_id"]: r for r in rows(folder / "amazon-games.item")}
    assert set(items) == {f"B{k:09d}" for k in range(6)}
    assert items["B000000000"] == {"item_id": "B000000000", "title": "Café & Games Deluxe",
                                   "description": "Line one. Line two with tab", "categories": "Video Games, PC",
                                   "brand": "Acme"}
    assert items["B000000001"]["title"] == '"Weird" Edition'
    assert items["B000000001"]["description"] == LONG_DESCRIPTION
    assert items["B000000002"]["title"] == "New title"
    assert items["B000000003"]["categories"] == "Video Games, PC"
    assert items["B000000005"]["description"] == ""

    # Long text loads unsplit as a `token` when asked for; the shipped YAML keeps it out of load_col.
    config, dataset, (train, valid, test) = load_recbole(
        out, "amazon-games", model="SASRec", train_neg_sample_args=None,
        load_col={"inter": ["user_id", "item_id", "rating", "timestamp"],
                  "item": ["item_id", "title", "description"]})
    assert config["MAX_ITEM_LIST_LENGTH"] == 20 and config["item_text_fields"] == ["title", "description"]
    assert dataset.counts == (7, 6, 35)
    assert items["B000000004"]["title"] == "NA"  # exact in the file; pandas (RecBole) reads it as missing
    assert recbole_text(dataset, "title", "B000000004") == ""
    for token, item in items.items():
        if token != "B000000004":
            assert recbole_text(dataset, "title", token) == item["title"]
        if item["description"]:
            assert recbole_text(dataset, "description", token) == item["description"]
    assert len(test.dataset) == 7  # leave-one-out: one test target per user


def test_amazon_sellarec_preset_collm_book_split(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    lines, metas = [], []
    for k in range(22):
        metas.append(meta(f"I{k:02d}", f"Book {k}", category=["Books"]))
    for u in range(22):  # 22 x 22 in 2017: every user and item has 22 > 20 interactions
        for k in range(22):
            day = "2017-12-%02d" % (1 + (u + k) % 28) if (u + k) % 11 == 0 else "2017-%02d-15" % (1 + (u + k) % 11)
            lines.append(review(f"U{u:02d}", f"I{k:02d}", float(1 + (u * k) % 5), ts(day, 0)))
    lines.append(review("U00", "I00", 5.0, ts("2016-12-31", 0)))  # outside 2017
    lines.append(review("U99", "I00", 5.0, ts("2017-03-01", 0)))  # a user with one review
    write_lines(raw / "Books_5.json.gz", lines)
    write_lines(raw / "meta_Books.json.gz", metas)
    assert amazon.main(["--input", str(raw), "--output", str(out), "--preset", "sellarec", "--no-progress"]) == 0
    folder = out / "amazon-book-sellarec"
    parts = {s: rows(folder / f"amazon-book-sellarec.{s}.inter") for s in ("train", "valid", "test")}
    december = sum(1 for u in range(22) for k in range(22) if (u + k) % 11 == 0)
    assert len(parts["train"]) == 484 - december
    assert len(parts["valid"]) == december // 2 and len(parts["test"]) == december - december // 2
    assert max(int(r["timestamp"]) for r in parts["valid"]) <= min(int(r["timestamp"]) for r in parts["test"])
    assert all(r["user_id"] != "U99" for p in parts.values() for r in p)


def test_amazon_glta_preset_with_overrides(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    lines = [review(f"U{u}", f"G{k:02d}", 5.0, 1500000000 + 1000 * k) for u in range(6) for k in range(30 - u * 3)]
    lines += [review("U9", "G00", 4.0, 1500000000)]
    metas = [meta(f"G{k:02d}", f"Snack {k}", description=[] if k == 29 else [f"Tasty snack {k}."],
                  category=["Grocery & Gourmet Food"]) for k in range(30)]
    write_lines(raw / "Grocery_and_Gourmet_Food.json", lines)
    write_lines(raw / "meta_Grocery_and_Gourmet_Food.json", metas)
    assert amazon.main(["--input", str(raw), "--output", str(out), "--preset", "glta", "--sample-users", "3",
                        "--max-history", "15", "--no-progress"]) == 0
    inter = rows(out / "amazon-grocery-glta" / "amazon-grocery-glta.inter")
    users = {r["user_id"] for r in inter}
    # users with >= 20 reviews of described items: U0 (29), U1 (27), U2 (24), U3 (21); 3 of them drawn
    assert len(users) == 3 and users <= {"U0", "U1", "U2", "U3"}
    assert len(inter) == 45 and all(r["item_id"] != "G29" for r in inter)
    for user in users:  # the 15 most recent
        assert sorted(int(r["timestamp"]) for r in inter if r["user_id"] == user)[0] >= 1500000000 + 1000 * 6


def test_amazon_1000_word_description_does_not_blow_up_recbole(tmp_path):
    """The shipped YAML keeps the description out of load_col; loaded as a token it is one value."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_amazon(raw)
    assert amazon.main(["--input", str(raw), "--output", str(out), "--kcore", "5", "--no-progress",
                        "--dataset-name", "games-x"]) == 0
    _, dataset, _ = load_recbole(out, "games-x", load_col={"inter": ["user_id", "item_id"],
                                                           "item": ["item_id", "description"]})
    assert dataset.field2seqlen["description"] == 1
    assert recbole_text(dataset, "description", "B000000001") == LONG_DESCRIPTION


# ---------------------------------------------------------------------------------------- Goodreads

def gr_date(k):
    return f"Thu Dec {1 + k % 28:02d} 10:44:25 -0800 2013"


GR_PAIRS = [(u, b) for u in range(5) for b in range(6) if b != u % 5]  # book 5 has no description


def make_goodreads(folder, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".json.gz" if gz else ".json"
    inters = [json.dumps({"user_id": f"u{u}", "book_id": str(100 + b), "review_id": f"r{u}{b}",
                          "is_read": (u + b) % 3 != 0, "rating": (u + b) % 6, "review_text_incomplete": "",
                          "date_added": gr_date(u + b), "date_updated": gr_date(u), "read_at": "",
                          "started_at": ""})
              for u, b in GR_PAIRS]
    books = [json.dumps({"book_id": str(100 + b), "title": f"History of Things, Vol. {b}",
                         "description": "<i>A</i> history&#8212;of things.<br />Second line." if b != 5 else "",
                         "isbn": "", "authors": [{"author_id": "1", "role": ""}], "publication_year": "2001"})
             for b in range(6)]
    write_lines(folder / f"goodreads_interactions_history_biography{ext}", inters)
    write_lines(folder / f"goodreads_books_history_biography{ext}", books)


def test_goodreads_converts_and_loads(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_goodreads(raw)
    assert goodreads.main(["--input", str(raw), "--output", str(out), "--require-text", "description",
                           "--no-progress"]) == 0
    folder = out / "goodreads-history-biography"
    items = {r["item_id"]: r for r in rows(folder / "goodreads-history-biography.item")}
    assert set(items) == {"100", "101", "102", "103", "104"}  # book 105 has no description
    assert items["100"] == {"item_id": "100", "title": "History of Things, Vol. 0",
                            "description": "A history\u2014of things. Second line."}
    inter = rows(folder / "goodreads-history-biography.inter")
    n = sum(1 for u, b in GR_PAIRS if b != 5)
    assert len(inter) == n == 20
    assert inter[0]["timestamp"] == str(ts("2013-12-02", 18) + 44 * 60 + 25)  # -0800 -> UTC
    _, dataset, _ = load_recbole(out, "goodreads-history-biography")
    assert dataset.counts == (5, 5, 20)

    assert goodreads.main(["--input", str(raw), "--output", str(out), "--only-read", "--min-rating", "1",
                           "--dataset-name", "gr-read", "--no-progress"]) == 0
    kept = rows(out / "gr-read" / "gr-read.inter")
    assert len(kept) == sum(1 for u, b in GR_PAIRS if (u + b) % 3 and (u + b) % 6)

    assert goodreads.main(["--input", str(raw), "--output", str(out), "--preset", "glta", "--kcore", "2",
                           "--sample-users", "2", "--no-progress"]) == 0
    kept = rows(out / "goodreads-history-glta" / "goodreads-history-glta.inter")
    assert len({r["user_id"] for r in kept}) == 2 and all(r["item_id"] != "105" for r in kept)


# ------------------------------------------------------------------------------------------ bad input

def test_wrong_separator(tmp_path, capsys):
    raw, out = make_ml1m(tmp_path / "raw", dense_ml1m_ratings()), tmp_path / "out"
    write_lines(raw / "ratings.dat", ["1::1::5::978300760", "1\t2\t3\t978300761"])
    rc = movielens.main(["--input", str(raw), "--output", str(out), "--no-progress"])
    assert_clean_failure(capsys, rc, out, "ml-1m", "ratings.dat, line 2", "separated by '::'", "tabs")
    assert not out.exists()  # the output root was created by the run, and removed with it


def test_bad_encoding_utf16_where_latin1_expected(tmp_path, capsys):
    raw, out = make_ml1m(tmp_path / "raw", dense_ml1m_ratings()), tmp_path / "out"
    (raw / "movies.dat").write_bytes("1::Toy Story (1995)::Comedy\n".encode("utf-16"))
    rc = movielens.main(["--input", str(raw), "--output", str(out), "--no-progress"])
    assert_clean_failure(capsys, rc, out, "ml-1m", "movies.dat, line 1", "UTF-16")


def test_invalid_utf8_in_json(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    reviews = make_amazon(raw)
    data = reviews.read_bytes().split(b"\n")
    data[2] = data[2].replace(b'"reviewText": "', b'"reviewText": "\xff\xfe')
    reviews.write_bytes(b"\n".join(data))
    rc = amazon.main(["--input", str(raw), "--output", str(out), "--no-progress"])
    assert_clean_failure(capsys, rc, out, "amazon-video-games", "Video_Games.json, line 3", "not valid utf-8")


def test_malformed_json_line(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_amazon(raw)
    with gzip.open(raw / "meta_Video_Games.json.gz", "ab") as f:
        f.write(b'{"asin": "B000000003", "title": "cut off\n')
    rc = amazon.main(["--input", str(raw), "--output", str(out), "--no-progress"])
    assert_clean_failure(capsys, rc, out, "amazon-video-games", "meta_Video_Games.json.gz, line 9", "malformed JSON")


def test_missing_required_field(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_goodreads(raw, gz=False)
    path = raw / "goodreads_interactions_history_biography.json"
    lines = path.read_text().splitlines()
    record = json.loads(lines[3])
    del record["book_id"]
    lines[3] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    rc = goodreads.main(["--input", str(raw), "--output", str(out), "--no-progress"])
    assert_clean_failure(capsys, rc, out, "goodreads-history-biography",
                         "goodreads_interactions_history_biography.json, line 4", "missing required field 'book_id'")


def test_failed_rerun_leaves_previous_output_intact(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    reviews = make_amazon(raw)
    assert amazon.main(["--input", str(raw), "--output", str(out), "--no-progress"]) == 0
    folder = out / "amazon-video-games"
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    capsys.readouterr()

    rc = amazon.main(["--input", str(raw), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists (pass --overwrite" in err

    with open(reviews, "a") as f:
        f.write('{"reviewerID": "U1", "overall": 5.0, "unixReviewTime": 1500000000}\n')
    rc = amazon.main(["--input", str(raw), "--output", str(out), "--overwrite", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "line 39: missing required field 'asin'" in err and "\n" not in err
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before
    assert sorted(os.listdir(out)) == ["amazon-video-games"]


def test_overwrite_replaces_previous_output(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_amazon(raw)
    assert amazon.main(["--input", str(raw), "--output", str(out), "--no-progress"]) == 0
    assert amazon.main(["--input", str(raw), "--output", str(out), "--overwrite", "--kcore", "5",
                        "--no-review-text", "--no-progress"]) == 0
    inter = rows(out / "amazon-video-games" / "amazon-video-games.inter")
    assert len(inter) == 35 and "review_text" not in inter[0]
    assert sorted(os.listdir(out)) == ["amazon-video-games"]


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_amazon(raw)
    with open(raw / "Video_Games.json", "a") as f:
        f.write("{not json}\n")
    result = subprocess.run([sys.executable, "-m", "dataset_converters.amazon", "--input", str(raw),
                             "--output", str(out), "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"dataset_converters: error: {raw / 'Video_Games.json'}, line 39: "
                   "malformed JSON: Expecting property name enclosed in double quotes at column 2"], result.stderr
    result = subprocess.run([sys.executable, "-m", "dataset_converters.movielens", "--output", str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "dataset_converters: error: the following arguments are required: --input\n"


# ------------------------------------------------------------------------------------- shared pieces

def test_atomic_file_round_trip_through_recbole_reader(tmp_path):
    values = ['"Quoted" start', 'mid "quote"', '"', "tab\there", "new\nline", "ünïcode", "plain"]
    path = tmp_path / "x.item"
    with common.AtomicFileWriter(str(path), [("item_id", "token"), ("text", "token"),
                                             ("tags", "token_seq"), ("score", "float")]) as w:
        for k, v in enumerate(values):
            w.write([str(k), v, ["a b", "c"], 1.5 if k else 2.0])
    expected = [v.replace("\t", " ").replace("\n", " ") for v in values]
    assert [r["text"] for r in rows(path)] == expected
    assert rows(path)[0]["tags"] == "a_b c" and rows(path)[0]["score"] == "2"
    df = pd.read_csv(path, delimiter="\t", dtype=str, engine="python")  # what RecBole's loader does
    assert df["text:token"].tolist() == expected


def test_conversion_error_names_file_and_line():
    assert issubclass(ConversionError, ValueError)
    with pytest.raises(ConversionError, match=r"^reviews\.json, line 7: malformed JSON: .* \(single-quoted keys"):
        common.parse_json_line("reviews.json", 7, "{'asin': 'B0001'}")
    with pytest.raises(ConversionError, match=r"^meta\.json, line 3: missing required field 'asin'$"):
        common.require({"asin": " "}, "asin", "meta.json", 3)


def test_clean_text():
    assert common.clean_text("&lt;b&gt;Bold&lt;/b&gt; &amp;amp; <script>x()</script>fine") == "Bold & fine"
    assert common.clean_text(["<p>One</p>", None, "Two\u00a0\u00a0three\u200b"]) == "One Two three"
    assert common.clean_text("ｆｕｌｌ\u3000width I <3 U") == "full width I <3 U"
    assert common.clean_text("a " * 10 + "end", max_chars=8) == "a a a a"


def test_kcore_iterates_to_a_fixed_point_or_once():
    # user 0 rates items 0, 1; user 1 rates 0; user 2 rates 0, 1
    u, i = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 0, 0, 1])
    keep = np.ones(5, dtype=bool)
    assert common.kcore(u, i, keep, 2, 2).tolist() == [True, True, False, True, True]
    assert common.kcore(u, i, keep, 2, 3, iterate=True).tolist() == [False] * 5
    assert common.kcore(u, i, keep, 2, 3, iterate=False).tolist() == [True, False, False, True, False]


def test_history_cap_and_count_split():
    u, t, line = np.array([0, 0, 0, 1, 1]), np.array([5, 1, 9, 3, 3]), np.arange(5)
    keep = np.ones(5, dtype=bool)
    assert common.cap_history(u, t, line, keep, 2).tolist() == [True, False, True, True, True]
    split = common.split_by_dates(t, line, keep, [0, 4, 100])
    assert split.tolist() == [1, 0, 2, 0, 0]
    split = common.split_by_dates(np.array([10, 20, 30, 40, 50]), line, keep, [0, 25, 100])
    assert split.tolist() == [0, 0, 1, 2, 2]


# --------------------------------------------------------------------------------------- an LLM model on it

@pytest.mark.parametrize("converter", ["movielens", "amazon", "goodreads"])
def test_glta_trains_one_step_on_converted_data(tmp_path, converter):
    """Each converter's output feeds GLTA (tiny-random LLM, one epoch of each stage) through RecBole."""
    from recbole_llm.quick_start import run_recbole_llm
    from tests.conftest import tiny_config

    raw, out = tmp_path / "raw", tmp_path / "out"
    if converter == "movielens":
        make_ml1m(raw, dense_ml1m_ratings())
        args, name = [], "ml-1m"
    elif converter == "amazon":
        make_amazon(raw)
        args, name = ["--preset", "aligntokenrec"], "amazon-games"
    else:
        make_goodreads(raw)
        args, name = ["--require-text", "description"], "goodreads-history-biography"
    main = {"movielens": movielens, "amazon": amazon, "goodreads": goodreads}[converter].main
    assert main(["--input", str(raw), "--output", str(out), "--no-progress"] + args) == 0

    config = tiny_config(out, checkpoint_dir=str(tmp_path / "saved"), epochs=1, gllm_k=2, topk=[1, 2],
                         valid_metric="NDCG@2", cf_config={"epochs": 1})
    del config["item_text_fields"]  # the dataset YAML the converter ships names them
    if converter == "goodreads":
        config["item_text_fields"] = ["title", "description"]  # no YAML for this non-preset name
    result = run_recbole_llm("GLTA", name, config_dict=config)
    assert 0.0 <= result["test_result"]["ndcg@2"] <= 1.0
