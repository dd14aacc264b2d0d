"""Goodreads (Wan and McAuley 2018; Wan et al. 2019) -> RecBole atomic files with book text.

    python -m dataset_converters.goodreads --input raw/ --genre history_biography --output dataset/ [--preset glta]
    python -m dataset_converters.goodreads --interactions FILE --books FILE --output dataset/

Raw files (https://mengtingwan.github.io/data/goodreads), JSON lines, gzipped or not, e.g. the genre
subset ``goodreads_interactions_history_biography.json.gz`` (user_id, book_id, rating (0 = not rated),
is_read, date_added, ...) and ``goodreads_books_history_biography.json.gz`` (book_id, title, description, ...).

Output:
  <name>.inter  user_id:token  item_id:token  rating:float  timestamp:float   (timestamp from date_added)
  <name>.item   item_id:token  title:token_seq  description:token
Text is cleaned as for Amazon; long descriptions are typed ``token`` and kept out of ``load_col``.
Two streaming passes, as in the Amazon converter: memory grows with the number of users and books, not text.
"""
import datetime
import os
import re
import sys

import numpy as np

from dataset_converters import common
from dataset_converters.common import ConversionError

PRESETS = {
    "glta": {
        # The paper states the subset (history books) with descriptions and the sizes in Table 1, not how
        # they were reached. Our reading: books with a description, an iterated 20-core, then 10,131 users
        # drawn at random (seed 2024).
        "genre": "history_biography", "name": "goodreads-history-glta",
        "options": {"require_text": ["description"], "dedup": "first", "kcore": 20, "sample_users": 10131},
        "paper": {"users": 10131, "items": 10725, "interactions": 478334, "density": 0.00440},
        "note": "GLTA Table 1 (Goodreads history books with descriptions). The filtering is our reading (the "
                "paper gives none): only the user count is matched by construction.",
    },
}
ITEM_FIELDS = [("title", "token_seq"), ("description", "token")]
_MONTHS = {m: k for k, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                                       "Nov", "Dec"), 1)}
_DATE = re.compile(r"^\w{3} (\w{3}) (\d{2}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2}) (\d{4})$")


def parse_goodreads_date(text, path, line_no, field):
    """``'Thu Dec 05 10:44:25 -0800 2013'`` to a Unix timestamp."""
    match = _DATE.match(text.strip()) if isinstance(text, str) else None
    if not match or match.group(1) not in _MONTHS:
        raise ConversionError(f"field '{field}' is not a Goodreads date ('Thu Dec 05 10:44:25 -0800 2013'): "
                              f"{text!r}", path, line_no)
    mon, day, hh, mm, ss, sign, oh, om, year = match.groups()
    offset = datetime.timedelta(hours=int(oh), minutes=int(om)) * (1 if sign == "+" else -1)
    try:
        moment = datetime.datetime(int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss),
                                   tzinfo=datetime.timezone(offset))
    except ValueError as e:
        raise ConversionError(f"field '{field}' is not a valid date: {text!r} ({e})", path, line_no) from None
    return int(moment.timestamp())


def build_parser():
    parser = common.ConverterArgumentParser(
        presets=PRESETS, prog="python -m dataset_converters.goodreads",
        description="Goodreads interactions + book metadata (JSON lines) to RecBole atomic files with text.")
    src = parser.add_argument_group("input")
    src.add_argument("--input", metavar="RAW_DIR",
                     help="folder holding goodreads_interactions_<genre>.json[.gz] and "
                          "goodreads_books_<genre>.json[.gz]")
    src.add_argument("--genre", help="e.g. history_biography (default: from the file names, or the preset's)")
    src.add_argument("--interactions", metavar="FILE", help="interactions file (overrides --input)")
    src.add_argument("--books", metavar="FILE", help="book metadata file (overrides --input)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="options reproducing a paper's dataset")
    common.add_common_args(parser, "goodreads-<genre>, or the preset's name")
    sel = parser.add_argument_group("interactions and text")
    sel.add_argument("--only-read", action="store_true", help="keep shelvings with is_read true only")
    sel.add_argument("--min-rating", type=int, default=0, metavar="R",
                     help="keep interactions rated at least R (1-5; ratings of 0 mean 'not rated')")
    sel.add_argument("--require-text", action="append", choices=["title", "description"], metavar="FIELD",
                     help="drop books whose FIELD (title or description) is empty; repeatable")
    sel.add_argument("--keep-items-without-meta", action="store_true",
                     help="keep interactions with books missing from the book file (with empty text)")
    sel.add_argument("--max-text-chars", type=int, default=10000, metavar="N",
                     help="cut descriptions at a word boundary before N characters (default 10000)")
    common.add_filter_args(parser)
    return parser


def resolve_inputs(args, parser):
    """(genre or None, interactions path, books path)."""
    genre = args.genre or (PRESETS[args.preset]["genre"] if args.preset else None)
    inter, books = args.interactions, args.books
    if inter is None or books is None:
        if args.input is None:
            parser.error("give --input RAW_DIR, or --interactions and --books")
        if not os.path.isdir(args.input):
            raise ConversionError("not a folder", args.input)
        if genre is None:
            try:
                names = os.listdir(args.input)
            except OSError as e:
                raise ConversionError(f"cannot list the folder: {e.strerror}", args.input) from None
            genres = sorted({m.group(1) for f in names
                             for m in [re.match(r"^goodreads_interactions_(.+?)\.json(\.gz)?$", f)] if m})
            if len(genres) != 1:
                parser.error(f"cannot tell the genre from the files in {args.input} "
                             f"({'none found' if not genres else 'several: ' + ', '.join(genres)}); pass --genre")
            genre = genres[0]
        inter = inter or common.find_file(args.input, [f"goodreads_interactions_{genre}.json"], "interactions")
        books = books or common.find_file(args.input, [f"goodreads_books_{genre}.json"], "book metadata")
    if genre is None:
        match = re.match(r"^goodreads_interactions_(.+?)\.json(\.gz)?$", os.path.basename(inter))
        genre = match.group(1) if match else None
    if args.preset and genre != PRESETS[args.preset]["genre"]:
        parser.error(f"--preset {args.preset} is for the {PRESETS[args.preset]['genre']} subset, not {genre}")
    return genre, inter, books


def parse_interaction(path, line_no, text):
    record = common.parse_json_line(path, line_no, text)
    user = str(common.require(record, "user_id", path, line_no))
    item = str(common.require(record, "book_id", path, line_no))
    if record.get("rating") is None:
        raise ConversionError("missing required field 'rating'", path, line_no)
    rating = common.as_number(record["rating"], "rating", path, line_no)
    ts = parse_goodreads_date(common.require(record, "date_added", path, line_no), path, line_no, "date_added")
    return record, user, item, rating, ts


def main(argv=None):
    return common.run(_main, argv)


def _main(argv):
    parser = build_parser()
    args = common.parse_converter_args(parser, argv, PRESETS)
    genre, inter_path, books_path = resolve_inputs(args, parser)
    default_name = "goodreads" + (f"-{genre.lower().replace('_', '-')}" if genre else "")
    name = args.dataset_name or (PRESETS[args.preset]["name"] if args.preset else default_name)
    common.check_output(args.output, name, args.overwrite)
    progress = args.progress

    def wanted(record, rating):
        return (not args.only_read or record.get("is_read") is True) and rating >= args.min_rating

    def text_of(record):
        return {"title": common.clean_text(record.get("title"), 1000),
                "description": common.clean_text(record.get("description"), args.max_text_chars)}

    def inter_row(line_no, text):
        _, user, item, rating, ts = parse_interaction(inter_path, line_no, text)
        return [user, item, rating, ts]

    # pass 1: ids, ratings and times of the wanted interactions
    table = common.read_interactions(inter_path, "utf-8", parse_interaction, "interactions (1/2)", progress,
                                     empty_message="no interactions (after --only-read / --min-rating)",
                                     wanted=wanted)
    # pass 1 over the books: where each book's record is, and whether it has the required text
    book_line, item_ok = common.scan_item_file(books_path, table.item_index, "book_id", text_of, args.require_text,
                                               args.keep_items_without_meta, "books (1/2)", progress)

    # filters
    u, i, t, r, line = table.arrays()
    keep, split = common.select(u, i, t, line, args, row_ok=item_ok[i])
    if not keep.any():
        raise ConversionError("no interactions left after filtering", inter_path)

    with common.atomic_output_dir(args.output, name, args.overwrite) as tmp:
        # pass 2: the kept interactions
        files = common.write_inter_files(tmp, name, common.INTER_FIELDS, split, common.reread_kept_rows(
            inter_path, "utf-8", line, keep, inter_row, "interactions (2/2)", progress))
        # pass 2 over the books: the kept books' text
        files.append(common.write_item_file(tmp, name, ITEM_FIELDS, books_path, table.item_tokens(),
                                            np.unique(i[keep]), book_line, text_of, "books (2/2)", progress))

    # statistics
    preset = PRESETS.get(args.preset) or {}
    common.report(name, args.output, common.interaction_stats(u, i, keep, split), files,
                  paper=preset.get("paper"), note=preset.get("note"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
