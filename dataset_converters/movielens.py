"""MovieLens-1M / MovieLens-100K raw files -> RecBole atomic files with movie text.

    python -m dataset_converters.movielens --input ml-1m/ --output dataset/ [--preset glta|sellarec]
    python -m dataset_converters.movielens --input ml-100k/ --output dataset/ [--format ml-100k]

Raw formats (https://grouplens.org/datasets/movielens/), latin-1 text:
  ml-1m    ratings.dat ``UserID::MovieID::Rating::Timestamp``, movies.dat ``MovieID::Title (Year)::G1|G2``,
           users.dat ``UserID::Gender::Age::Occupation::Zip``
  ml-100k  u.data (tab-separated user, item, rating, timestamp), u.item (``|``-separated: id, title, release
           date, video date, URL, 19 genre flags), u.user (``|``: id, age, gender, occupation, zip), u.genre

Output (RecBole's own column names for these datasets):
  <name>.inter  user_id:token  item_id:token  rating:float  timestamp:float
  <name>.item   item_id:token  movie_title:token_seq  release_year:token  genre:token_seq   (ml-100k: class)
  <name>.user   user_id:token  age:token  gender:token  occupation:token  zip_code:token
The title loses its trailing ``(YYYY)``, which goes to release_year; genres are space-separated (the
MovieLens genre names hold no spaces). Ratings and timestamps are kept for CTR labels and temporal splits;
only movies and users with interactions are written.
"""
import os
import re
import sys

import numpy as np

from dataset_converters import common
from dataset_converters.common import ConversionError

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]
ENCODING = "latin-1"

PRESETS = {
    "glta": {
        "format": "ml-1m", "name": "ml-1m",
        "options": {},
        "paper": {"users": 6040, "items": 3706, "interactions": 1000209, "density": 0.04468},
        "note": "GLTA Table 1 (MovieLens): the full ml-1m; genres serve as item descriptions.",
    },
    "sellarec": {
        "format": "ml-1m", "name": "ml-1m-sellarec",
        # CoLLM's month slots 14-23 / 24-28 / 29-33 counted from April 2000: Feb 2003 is left out.
        "options": {"split_dates": [common.parse_date(d) for d in
                                    ("2001-06-01", "2002-04-01", "2002-09-01", "2003-02-01")]},
        "paper": {"train": 33891, "valid": 10401, "test": 7331, "users": 839, "items": 3256},
        "note": "SeLLaRec Table 2 (CoLLM's split): the last 20 months, 10:5:5 calendar months, label rating > 3 "
                "(threshold rating >= 4 in the YAML). The paper's #User/#Item appear to count a padding id (as "
                "they do for Amazon-Book), like RecBole's user_num/item_num.",
    },
}


def build_parser():
    parser = common.ConverterArgumentParser(
        presets=PRESETS, prog="python -m dataset_converters.movielens",
        description="MovieLens-1M / -100K raw files to RecBole atomic files with movie text.")
    parser.add_argument("--input", required=True, metavar="RAW_DIR",
                        help="folder with ratings.dat/movies.dat/users.dat (ml-1m) or u.data/u.item/u.user (ml-100k)")
    parser.add_argument("--format", choices=["ml-1m", "ml-100k"], help="raw format (default: from the file names)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="options reproducing a paper's dataset")
    common.add_common_args(parser, "ml-1m / ml-100k, or the preset's name")
    common.add_filter_args(parser)
    return parser


def detect_format(folder):
    if not os.path.isdir(folder):
        raise ConversionError("not a folder (give the unzipped ml-1m or ml-100k folder)", folder)
    for fmt, name in (("ml-1m", "ratings.dat"), ("ml-100k", "u.data")):
        if any(os.path.isfile(os.path.join(folder, name + s)) for s in ("", ".gz")):
            return fmt
    raise ConversionError("neither ratings.dat (ml-1m) nor u.data (ml-100k) found", folder)


def _fields(path, line_no, text, sep, count):
    parts = text.split(sep)
    if len(parts) != count:
        hint = ""
        for other, label in (("::", "'::'"), ("\t", "tabs"), ("|", "'|'"), (",", "commas")):
            if other != sep and other in text:
                hint = f" (the line has {label}: wrong file or --format?)"
                break
        raise ConversionError(f"expected {count} fields separated by {sep!r}, found {len(parts)}{hint}",
                              path, line_no)
    return [p.strip() for p in parts]


def _int(value, field, path, line_no):
    if not value.lstrip("-").isdigit():
        raise ConversionError(f"{field} is not an integer: {value!r}", path, line_no)
    return int(value)


_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def split_title(title):
    """``'Toy Story (1995)'`` -> ``('Toy Story', '1995')``."""
    match = _TITLE_YEAR.match(title)
    return (match.group(1), match.group(2)) if match else (title, "")


def read_ratings(path, sep, progress):
    def parse_rating(path, line_no, text):
        user, item, rating, ts = _fields(path, line_no, text, sep, 4)
        _int(user, "user id", path, line_no)
        _int(item, "movie id", path, line_no)
        rating = common.as_number(rating, "rating", path, line_no)
        return None, user, item, rating, _int(ts, "timestamp", path, line_no)

    return common.read_interactions(path, ENCODING, parse_rating, "ratings", progress, empty_message="no ratings")


def read_movies_1m(path, progress):
    movies = {}
    for line_no, text in common.iter_lines(path, ENCODING, "movies", progress):
        item, title, genres = _fields(path, line_no, text, "::", 3)
        _int(item, "movie id", path, line_no)
        title, year = split_title(common.clean_text(title))
        if not title:
            raise ConversionError("missing required field 'title'", path, line_no)
        movies[item] = (title, year, [g for g in genres.split("|") if g])
    return movies


def read_movies_100k(path, genre_names, progress):
    movies = {}
    for line_no, text in common.iter_lines(path, ENCODING, "movies", progress):
        parts = _fields(path, line_no, text, "|", 5 + len(genre_names))
        item, title, release = parts[0], parts[1], parts[2]
        _int(item, "movie id", path, line_no)
        title, title_year = split_title(common.clean_text(title))
        if not title:
            raise ConversionError("missing required field 'movie title'", path, line_no)
        year = release[-4:] if re.fullmatch(r".*\d{4}", release) else title_year
        flags = parts[5:]
        if any(f not in ("0", "1") for f in flags):
            raise ConversionError("genre flags must be 0 or 1", path, line_no)
        movies[item] = (title, year, [g for g, f in zip(genre_names, flags) if f == "1"])
    return movies


def read_genre_names(folder, progress):
    path = os.path.join(folder, "u.genre")
    if not os.path.isfile(path):
        return ML100K_GENRES
    names = {}
    for line_no, text in common.iter_lines(path, ENCODING, "genres", progress):
        name, index = _fields(path, line_no, text, "|", 2)
        names[_int(index, "genre index", path, line_no)] = name.replace(" ", "_")
    if sorted(names) != list(range(len(names))):
        raise ConversionError("genre indices are not 0..n-1", path)
    return [names[k] for k in range(len(names))]


def read_users(path, fmt, progress):
    users = {}
    for line_no, text in common.iter_lines(path, ENCODING, "users", progress):
        if fmt == "ml-1m":
            user, gender, age, occupation, zip_code = _fields(path, line_no, text, "::", 5)
        else:
            user, age, gender, occupation, zip_code = _fields(path, line_no, text, "|", 5)
        _int(user, "user id", path, line_no)
        users[user] = (age, gender, occupation, zip_code)
    return users


def main(argv=None):
    return common.run(_main, argv)


def _main(argv):
    parser = build_parser()
    args = common.parse_converter_args(parser, argv, PRESETS)
    fmt = args.format or detect_format(args.input)
    if args.preset and PRESETS[args.preset]["format"] != fmt:
        parser.error(f"--preset {args.preset} needs {PRESETS[args.preset]['format']} raw files, got {fmt}")
    name = args.dataset_name or (PRESETS[args.preset]["name"] if args.preset else fmt)

    common.check_output(args.output, name, args.overwrite)
    folder, progress = args.input, args.progress
    # pass 1: the ratings (ids, ratings, times), the movies and the users
    if fmt == "ml-1m":
        ratings_path = common.find_file(folder, ["ratings.dat"], "ratings")
        table = read_ratings(ratings_path, "::", progress)
        movies = read_movies_1m(common.find_file(folder, ["movies.dat"], "movies"), progress)
        user_path = common.find_file(folder, ["users.dat"], "users")
        genre_field = "genre"
    else:
        ratings_path = common.find_file(folder, ["u.data"], "ratings")
        table = read_ratings(ratings_path, "\t", progress)
        movies = read_movies_100k(common.find_file(folder, ["u.item"], "movies"),
                                  read_genre_names(folder, progress), progress)
        user_path = common.find_file(folder, ["u.user"], "users")
        genre_field = "class"
    users = read_users(user_path, fmt, progress)

    # filters
    u, i, t, r, line = table.arrays()
    item_tokens, user_tokens = table.item_tokens(), table.user_tokens()
    item_ok = np.array([tok in movies for tok in item_tokens], dtype=bool)
    user_ok = np.array([tok in users for tok in user_tokens], dtype=bool)
    missing_items, missing_users = int((~item_ok).sum()), int((~user_ok).sum())
    if missing_items or missing_users:
        print(f"warning: dropping the ratings of {missing_items} movies missing from the movie file and "
              f"{missing_users} users missing from the user file", file=sys.stderr)
    keep, split = common.select(u, i, t, line, args, row_ok=item_ok[i] & user_ok[u])
    if not keep.any():
        raise ConversionError("no interactions left after filtering", ratings_path)

    with common.atomic_output_dir(args.output, name, args.overwrite) as tmp:
        # the kept ratings, movies and users (all held in memory: no second pass over the raw files)
        files = common.write_inter_files(tmp, name, common.INTER_FIELDS, split, (
            (k, [user_tokens[u[k]], item_tokens[i[k]], float(r[k]), int(t[k])]) for k in np.flatnonzero(keep)))
        kept_items = np.unique(i[keep])
        with common.AtomicFileWriter(os.path.join(tmp, f"{name}.item"),
                                     [("item_id", "token"), ("movie_title", "token_seq"),
                                      ("release_year", "token"), (genre_field, "token_seq")]) as w:
            for index in sorted(kept_items, key=lambda k: _sort_key(item_tokens[k])):
                title, year, genres = movies[item_tokens[index]]
                w.write([item_tokens[index], title, year, genres])
        kept_users = np.unique(u[keep])
        with common.AtomicFileWriter(os.path.join(tmp, f"{name}.user"),
                                     [("user_id", "token"), ("age", "token"), ("gender", "token"),
                                      ("occupation", "token"), ("zip_code", "token")]) as w:
            for index in sorted(kept_users, key=lambda k: _sort_key(user_tokens[k])):
                w.write([user_tokens[index], *users[user_tokens[index]]])
        files += [f"{name}.item", f"{name}.user"]
    # statistics
    if name == "ml-100k":
        print("note: RecBole 1.2.1 loads its bundled ml-100k for the dataset name ml-100k whatever data_path "
              "says; pass --dataset-name to load this conversion under another name", file=sys.stderr)
    preset = PRESETS.get(args.preset) or {}
    common.report(name, args.output, common.interaction_stats(u, i, keep, split), files,
                  paper=preset.get("paper"), note=preset.get("note"))
    return 0


def _sort_key(token):
    return (0, int(token), "") if token.isdigit() else (1, 0, token)


if __name__ == "__main__":
    sys.exit(main())
