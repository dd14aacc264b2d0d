"""Amazon reviews 2018 (Ni, Li and McAuley 2019) -> RecBole atomic files with item text and review text.

    python -m dataset_converters.amazon --input raw/ --category Video_Games --output dataset/ --preset aligntokenrec
    python -m dataset_converters.amazon --reviews raw/Books_5.json.gz --meta raw/meta_Books.json.gz --output dataset/

Raw files (https://nijianmo.github.io/amazon/), JSON lines, gzipped or not: per-category reviews
``<Category>.json`` or the 5-core ``<Category>_5.json`` (reviewerID, asin, overall, unixReviewTime,
reviewText, ...) and metadata ``meta_<Category>.json`` (asin, title, description, category, brand, ...).

Output:
  <name>.inter  user_id:token  item_id:token  rating:float  timestamp:float  review_text:token
  <name>.item   item_id:token  title:token_seq  description:token  categories:token  brand:token
Free text is cleaned (HTML entities and tags, unicode NFKC, control characters, whitespace) and capped by
``--max-text-chars``. Long text is typed ``token`` (one unsplit value if it is ever loaded) and kept out of
``load_col`` in the shipped YAML: models read it from the file by field name.

Memory: the first pass over the reviews keeps ids, ratings and timestamps only; filters run on those arrays;
a second pass writes the surviving reviews with their text. Peak memory grows with the number of distinct
users and items, not with the text.
"""
import os
import re
import sys

import numpy as np

from dataset_converters import common
from dataset_converters.common import ConversionError

PRESETS = {
    "aligntokenrec": {
        # LC-Rec's processing, which AlignTokenRec's Table 2 matches: items with metadata, repeated
        # (user, item) pairs dropped (earliest kept), iterated 5-core. The history cap of 20 is the model's
        # input length (MAX_ITEM_LIST_LENGTH in the YAML); Table 2's "Len avg" and "Long user" are computed
        # on the uncapped sequences, so the files keep them whole.
        "options": {"kcore": 5, "dedup": "first"},
        "categories": {
            "Video_Games": {"name": "amazon-games", "paper": {
                "users": 50546, "items": 16859, "avg_len": 8.962, "long_users": 0.0480}},
            "Arts_Crafts_and_Sewing": {"name": "amazon-arts", "paper": {
                "users": 45141, "items": 20956, "avg_len": 8.658, "long_users": 0.0434}},
            "Musical_Instruments": {"name": "amazon-instruments", "paper": {
                "users": 24772, "items": 9922, "avg_len": 8.322, "long_users": 0.0348}},
        },
        "note": "AlignTokenRec Table 2 (Games / Arts / Instruments, Amazon 2018, 5-core, model history <= 20).",
    },
    "glta": {
        # The paper states the category, that items come with descriptions, and the sizes in Table 1; it
        # does not say how its 1,032 users were chosen. Our reading: users with at least 20 reviews of
        # described items, 1,032 of them drawn at random (seed 2024), no item threshold.
        "options": {"require_text": ["description"], "dedup": "first", "min_user_inter": 20,
                    "sample_users": 1032},
        "categories": {
            "Grocery_and_Gourmet_Food": {"name": "amazon-grocery-glta", "paper": {
                "users": 1032, "items": 17609, "interactions": 30510, "density": 0.00168}},
        },
        "note": "GLTA Table 1 (Amazon groceries with descriptions). The user selection is our reading (the "
                "paper gives none): only the user count is matched by construction.",
    },
    "sellarec": {
        # CoLLM's Amazon-Book: Books_5 reviews with metadata, 2017 only, users and items with more than 20
        # interactions (one pass on the 2017 counts), Jan-Nov train, December halved by time into valid/test,
        # label rating >= 5 (YAML threshold).
        "options": {"start_date": common.parse_date("2017-01-01"), "end_date": common.parse_date("2018-01-01"),
                    "dedup": "none", "min_user_inter": 21, "min_item_inter": 21, "kcore_once": True,
                    "split_dates": [common.parse_date(d) for d in ("2017-01-01", "2017-12-01", "2018-01-01")]},
        "prefer_5core": True,
        "categories": {
            "Books": {"name": "amazon-book-sellarec", "paper": {
                "train": 727468, "valid": 25747, "test": 25747, "users": 22967, "items": 34154}},
        },
        "note": "SeLLaRec Table 2 (CoLLM's Amazon-Book, from Books_5.json.gz). The paper's #User/#Item count "
                "a padding id (CoLLM's notebook has 22,966 users and 34,153 items; RecBole's user_num/"
                "item_num count [PAD] the same way); its #Train is 5 more than the notebook's 727,463.",
    },
}

_JUNK_TITLE = re.compile(r"getTime\(\)|var\s+aPageStart|\{\s*display\s*:", re.I)


def build_parser():
    parser = common.ConverterArgumentParser(
        presets=PRESETS, prog="python -m dataset_converters.amazon",
        description="Amazon reviews 2018 (reviews + metadata JSON lines) to RecBole atomic files with text.")
    src = parser.add_argument_group("input")
    src.add_argument("--input", metavar="RAW", help="folder holding <Category>[_5].json[.gz] and "
                                                    "meta_<Category>.json[.gz], or the reviews file itself")
    src.add_argument("--category", help="e.g. Video_Games (default: from the file names, or the preset's)")
    src.add_argument("--reviews", metavar="FILE", help="reviews file (overrides --input)")
    src.add_argument("--meta", metavar="FILE", help="metadata file (default: meta_<Category> next to the reviews)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="options reproducing a paper's dataset")
    common.add_common_args(parser, "amazon-<category>, or the preset's name")
    txt = parser.add_argument_group("text")
    txt.add_argument("--require-text", action="append", choices=["title", "description"], metavar="FIELD",
                     help="drop items whose FIELD (title or description) is empty; repeatable")
    txt.add_argument("--keep-items-without-meta", action="store_true",
                     help="keep reviews of items missing from the metadata file (with empty text)")
    txt.add_argument("--no-review-text", dest="review_text", action="store_false",
                     help="leave review_text out of the .inter file")
    txt.add_argument("--max-text-chars", type=int, default=10000, metavar="N",
                     help="cut descriptions and reviews at a word boundary before N characters (default 10000)")
    common.add_filter_args(parser)
    return parser


# ----------------------------------------------------------------------------------- input files

_REVIEW_FILE = re.compile(r"^(?!meta_)(.+?)(_5)?\.json(\.gz)?$")


def resolve_inputs(args, parser):
    """(category, reviews path, meta path)."""
    preset = PRESETS.get(args.preset) if args.preset else None
    category = args.category
    if category is None and preset and len(preset["categories"]) == 1:
        category = next(iter(preset["categories"]))
    reviews = args.reviews
    folder = None
    if reviews is None:
        if args.input is None:
            parser.error("give --input (folder or reviews file) or --reviews")
        if not os.path.exists(args.input):
            raise ConversionError("not found", args.input)
        if os.path.isdir(args.input):
            folder = args.input
        else:
            reviews = args.input
    if reviews is not None:
        folder = os.path.dirname(reviews) or "."
        match = _REVIEW_FILE.match(os.path.basename(reviews))
        if category is None and match:
            category = match.group(1)
    if category is None:
        metas = sorted({m.group(1) for f in _listdir(folder) for m in [re.match(r"^meta_(.+?)\.json(\.gz)?$", f)] if m})
        if len(metas) != 1:
            parser.error(f"cannot tell the category from the files in {folder} "
                         f"({'none found' if not metas else 'several: ' + ', '.join(metas)}); pass --category")
        category = metas[0]
    if preset and category not in preset["categories"]:
        parser.error(f"--preset {args.preset} is for {', '.join(preset['categories'])}, not {category}")
    if reviews is None:
        names = [category, f"{category}_5"]
        if preset and preset.get("prefer_5core"):
            names.reverse()
        reviews = common.find_file(folder, [n + ".json" for n in names], f"{category} reviews")
    meta = args.meta or common.find_file(folder, [f"meta_{category}.json"], f"{category} metadata")
    return category, reviews, meta


def _listdir(folder):
    try:
        return os.listdir(folder)
    except OSError as e:
        raise ConversionError(f"cannot list the folder: {e.strerror}", folder) from None


# -------------------------------------------------------------------------------------- records

def parse_review(path, line_no, text):
    record = common.parse_json_line(path, line_no, text)
    user = str(common.require(record, "reviewerID", path, line_no))
    item = str(common.require(record, "asin", path, line_no))
    rating = common.as_number(common.require(record, "overall", path, line_no), "overall", path, line_no)
    ts = common.as_int(common.require(record, "unixReviewTime", path, line_no), "unixReviewTime", path, line_no)
    return record, user, item, rating, ts


ITEM_FIELDS = [("title", "token_seq"), ("description", "token"), ("categories", "token"), ("brand", "token")]


def item_text(record, max_chars):
    """``{title, description, categories, brand}`` cleaned from a metadata record."""
    title = record.get("title")
    title = "" if isinstance(title, str) and _JUNK_TITLE.search(title) else common.clean_text(title, 1000)
    categories = []
    for c in record.get("category") or record.get("categories") or []:
        if isinstance(c, list):  # 2014-style nested category paths
            c = " > ".join(map(str, c))
        if "</span>" in str(c):  # 2018 dumps: trailing HTML fragments after the real categories
            break
        c = common.clean_text(c, 200)
        if c:
            categories.append(c)
    brand = common.clean_text(record.get("brand"), 200)
    if brand.lower().startswith("by "):
        brand = brand[3:].strip()
    return {"title": title, "description": common.clean_text(record.get("description"), max_chars),
            "categories": ", ".join(categories), "brand": brand}


# ------------------------------------------------------------------------------------------ main

def main(argv=None):
    return common.run(_main, argv)


def _main(argv):
    parser = build_parser()
    args = common.parse_converter_args(parser, argv, PRESETS)
    category, reviews_path, meta_path = resolve_inputs(args, parser)
    preset = PRESETS[args.preset]["categories"][category] if args.preset else None
    name = args.dataset_name or (preset["name"] if preset else "amazon-" + category.lower().replace("_", "-"))
    common.check_output(args.output, name, args.overwrite)
    progress = args.progress

    def text_of(record):
        return item_text(record, args.max_text_chars)

    def review_row(line_no, text):
        record, user, item, rating, ts = parse_review(reviews_path, line_no, text)
        row = [user, item, rating, ts]
        if args.review_text:
            row.append(common.clean_text(record.get("reviewText"), args.max_text_chars))
        return row

    # pass 1: ids, ratings and times of the reviews
    table = common.read_interactions(reviews_path, "utf-8", parse_review, "reviews (1/2)", progress,
                                     empty_message="no reviews")
    # pass 1 over the metadata: where each reviewed item's record is, and whether it has the required text
    meta_line, item_ok = common.scan_item_file(meta_path, table.item_index, "asin", text_of, args.require_text,
                                               args.keep_items_without_meta, "metadata (1/2)", progress)

    # filters
    u, i, t, r, line = table.arrays()
    keep, split = common.select(u, i, t, line, args, row_ok=item_ok[i])
    if not keep.any():
        raise ConversionError("no reviews left after filtering", reviews_path)

    inter_fields = list(common.INTER_FIELDS)
    if args.review_text:
        inter_fields.append(("review_text", "token"))
    with common.atomic_output_dir(args.output, name, args.overwrite) as tmp:
        # pass 2: the kept reviews, with their text
        files = common.write_inter_files(tmp, name, inter_fields, split, common.reread_kept_rows(
            reviews_path, "utf-8", line, keep, review_row, "reviews (2/2)", progress))
        # pass 2 over the metadata: the kept items' text
        files.append(common.write_item_file(tmp, name, ITEM_FIELDS, meta_path, table.item_tokens(),
                                            np.unique(i[keep]), meta_line, text_of, "metadata (2/2)", progress))

    # statistics
    common.report(name, args.output, common.interaction_stats(u, i, keep, split), files,
                  paper=preset and preset["paper"], note=args.preset and PRESETS[args.preset]["note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
