"""Pieces every converter shares: errors, streaming input, text clean-up, atomic output, filtering, CLI.

Input is read line by line (plain or gzip, found by its magic bytes, never by its name) with a progress
bar; every problem is a :class:`ConversionError` naming the file and line. Converters keep only ids,
ratings and timestamps in memory (compact arrays) during a first pass; filtering (date window, dedup,
k-core, user sampling, history cap, time split) runs on those arrays; a second pass over the raw files
writes the surviving rows with their text. Output goes to a temporary folder next to the destination
and is renamed into place only when everything has been written.

Atomic files are RecBole's: a ``name:type`` header and tab-separated rows. Text is cleaned so that it
holds no tab, newline or control character; a value that starts with a double quote is written in CSV
quotes (``"..."`` with inner quotes doubled), which is how RecBole's reader (pandas, python engine)
parses it back, so every value round-trips exactly through RecBole and through :func:`read_atomic_file`.
(Values pandas reads as missing -- ``NA``, ``None``, ``nan``, empty -- come back from RecBole as
NaN; :func:`read_atomic_file` returns them unchanged.)
"""
import argparse
import calendar
import contextlib
import csv
import datetime
import gzip
import html
import json
import os
import re
import shutil
import sys
import tempfile
import unicodedata
import zlib
from array import array

import numpy as np

PROG = "dataset_converters"
# Hard cap for any text value: Python's csv module (which RecBole's pandas reader uses) refuses fields
# longer than 131072 characters.
HARD_MAX_TEXT_CHARS = 100_000
LONG_USER_THRESHOLD = 20  # AlignTokenRec Table 2 reports the share of users with more than 20 interactions


class ConversionError(ValueError):
    """A problem with the input (or the output folder), located by file and line where there is one."""

    def __init__(self, message, path=None, line=None):
        self.message, self.path, self.line = message, path, line
        where = ""
        if path is not None:
            where = f"{path}, line {line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


# ----------------------------------------------------------------------------------------------- input

def _open_binary(path):
    """(stream of byte lines, raw file) for a plain or gzipped file."""
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise ConversionError("file not found", path) from None
    except IsADirectoryError:
        raise ConversionError("is a folder, expected a file", path) from None
    except OSError as e:
        raise ConversionError(f"cannot open: {e.strerror}", path) from None
    magic = raw.read(2)
    raw.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def iter_lines(path, encoding="utf-8", desc=None, progress=True):
    """Yield ``(line_number, text)`` for every non-blank line of ``path`` (1-based numbers).

    Handles ``.gz`` or plain files; decodes each line with ``encoding`` strictly. A line that does not
    decode, or that holds NUL bytes (UTF-16 or binary data read as a single-byte encoding), raises
    :class:`ConversionError` with the file and line number.
    """
    from tqdm import tqdm

    stream, raw = _open_binary(path)
    total = os.path.getsize(path)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc or os.path.basename(path),
               disable=not progress, leave=False, file=sys.stderr, mininterval=0.5)
    line_no = 0
    try:
        with stream, raw:
            while True:
                try:
                    data = stream.readline()
                except (EOFError, OSError, zlib.error) as e:
                    raise ConversionError(f"corrupt or truncated gzip data ({e})", path, line_no + 1) from None
                if not data:
                    break
                line_no += 1
                if line_no % 8192 == 0:
                    bar.update(raw.tell() - bar.n)
                if b"\x00" in data:
                    raise ConversionError(
                        f"NUL byte in the line: the file looks like UTF-16 or binary data, expected {encoding} text",
                        path, line_no)
                try:
                    text = data.decode(encoding)
                except UnicodeDecodeError as e:
                    raise ConversionError(
                        f"not valid {encoding} text (byte 0x{data[e.start]:02x} at column {e.start + 1})",
                        path, line_no) from None
                if line_no == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                text = text.rstrip("\r\n")
                if text.strip():
                    yield line_no, text
        bar.update(total - bar.n)
    finally:
        bar.close()


def iter_selected_lines(path, line_numbers, encoding="utf-8", desc=None, progress=True):
    """Yield ``(k, line_number, text)`` for the lines whose numbers are in the sorted ``line_numbers``
    (``k`` is the position in ``line_numbers``): the second pass over a raw file."""
    line_numbers = np.asarray(line_numbers)
    k, n = 0, len(line_numbers)
    if n == 0:
        return
    for line_no, text in iter_lines(path, encoding, desc, progress):
        if line_no < line_numbers[k]:
            continue
        yield k, line_no, text
        k += 1
        if k == n:
            break


def parse_json_line(path, line_no, text):
    """The JSON object on one line of a JSON-lines file."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if text.lstrip().startswith("{'"):
            hint = " (single-quoted keys: this looks like the Python-literal format of the 2014 dumps, " \
                   "not JSON lines)"
        raise ConversionError(f"malformed JSON: {e.msg} at column {e.colno}{hint}", path, line_no) from None
    if not isinstance(record, dict):
        raise ConversionError(f"expected a JSON object, found {type(record).__name__}", path, line_no)
    return record


def require(record, field, path, line_no):
    """``record[field]``; a missing, null or empty value is a :class:`ConversionError`."""
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConversionError(f"missing required field '{field}'", path, line_no)
    return value


def as_number(value, field, path, line_no, kind=float):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConversionError(f"field '{field}' is not a number: {value!r}", path, line_no) from None
    if kind is float and number != number:
        raise ConversionError(f"field '{field}' is NaN", path, line_no)
    return number


def as_int(value, field, path, line_no):
    """An integer given as int, integral float or digit string."""
    if isinstance(value, bool):
        raise ConversionError(f"field '{field}' is not an integer: {value!r}", path, line_no)
    if isinstance(value, int):
        return value
    number = as_number(value, field, path, line_no, float)
    if not number.is_integer():
        raise ConversionError(f"field '{field}' is not an integer: {value!r}", path, line_no)
    return int(number)


# --------------------------------------------------------------------------------------------- text

_BLOCK_TAG_RE = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|td|th|table|h[1-6]|hr)\b[^<>]*>", re.I)
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_SCRIPT_RE = re.compile(r"<(script|style)\b[^<>]*>.*?</\1\s*>", re.I | re.S)
_WS_RE = re.compile(r"\s+")


def clean_text(value, max_chars=None):
    """Readable single-line text from raw text or a list of text pieces.

    HTML entities are unescaped (twice-escaped ones too), tags and scripts removed, the text is NFKC
    normalised, control and invisible format characters dropped, whitespace runs (tabs and newlines
    included) collapsed to one space. ``max_chars`` truncates at a word boundary.
    """
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return _truncate(" ".join(t for t in (clean_text(v) for v in value) if t), max_chars)
    text = str(value)
    for _ in range(2):
        if "&" not in text:
            break
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    if "<" in text:
        text = _SCRIPT_RE.sub(" ", text)
        text = _BLOCK_TAG_RE.sub(" ", text)
        text = _TAG_RE.sub("", text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    if not text.isprintable():
        text = "".join(
            " " if c.isspace() else c for c in text if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
    text = _WS_RE.sub(" ", text).strip()
    return _truncate(text, max_chars)


def _truncate(text, max_chars):
    limit = min(max_chars or HARD_MAX_TEXT_CHARS, HARD_MAX_TEXT_CHARS)
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit + 1)
    if cut < limit * 0.8:
        cut = limit
    return text[:cut].rstrip()


def single_line(text):
    """Tabs, newlines and other control characters replaced by spaces (ids and short fields)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else " " for c in text)


# ------------------------------------------------------------------------------------ atomic files

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")


def _format_number(value):
    if value is None:
        return ""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if value != value:
        return ""
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def format_value(value, ftype):
    """One field of an atomic-file row (without the quoting step)."""
    if ftype == "float":
        return _format_number(value)
    if ftype == "float_seq":
        return " ".join(_format_number(v) for v in value or [])
    if value is None:
        return ""
    if ftype == "token_seq" and isinstance(value, (list, tuple)):
        return " ".join(t for t in (single_line(str(v)).replace(" ", "_") for v in value) if t)
    return single_line(str(value))


def quote_field(text):
    """CSV-quote a field that starts with a double quote, the one case RecBole's reader would alter."""
    if text.startswith('"'):
        return '"' + text.replace('"', '""') + '"'
    return text


class AtomicFileWriter:
    """Writes one RecBole atomic file: a ``field:type`` header, then tab-separated rows."""

    def __init__(self, path, fields):
        for name, ftype in fields:
            if ftype not in FIELD_TYPES:
                raise ValueError(f"unknown RecBole field type {ftype!r} for field {name!r}")
        self.path, self.fields, self.rows = path, list(fields), 0
        self._types = [ftype for _, ftype in fields]
        self._file = open(path, "w", encoding="utf-8", newline="\n")
        self._file.write("\t".join(f"{name}:{ftype}" for name, ftype in fields) + "\n")

    def write(self, values):
        if len(values) != len(self._types):
            raise ValueError(f"{self.path}: row has {len(values)} values for {len(self._types)} fields")
        self._file.write("\t".join(quote_field(format_value(v, t)) for v, t in zip(values, self._types)) + "\n")
        self.rows += 1

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


SPLIT_SUFFIXES = (("train.inter", 0), ("valid.inter", 1), ("test.inter", 2))


class InterWriters:
    """The ``.inter`` file, or with a time split the three RecBole benchmark files
    ``<name>.train.inter`` / ``.valid.inter`` / ``.test.inter`` (``benchmark_filename`` in the YAML)."""

    def __init__(self, folder, name, fields, split=None):
        suffixes = SPLIT_SUFFIXES if split is not None else (("inter", 0),)
        self.files = [f"{name}.{suffix}" for suffix, _ in suffixes]
        self._writers = [AtomicFileWriter(os.path.join(folder, f), fields) for f in self.files]

    def write(self, values, code=0):
        self._writers[code].write(values)

    def close(self):
        for w in self._writers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_inter_files(folder, name, fields, split, rows):
    """Write the ``.inter`` file(s) (see :class:`InterWriters`) from ``rows``, pairs of (index into the
    interaction arrays, values); ``split`` picks each row's file. Returns the file names."""
    with InterWriters(folder, name, fields, split) as writers:
        for index, values in rows:
            writers.write(values, 0 if split is None else int(split[index]))
    return list(writers.files)


def reread_kept_rows(path, encoding, line, keep, make_row, desc, progress):
    """Second pass over a raw interaction file: yield ``(index, make_row(line_no, text))`` for every kept
    row (``line`` holds each row's line number), in file order, for :func:`write_inter_files`."""
    rows = np.flatnonzero(keep)
    for k, line_no, text in iter_selected_lines(path, line[rows], encoding, desc, progress):
        yield rows[k], make_row(line_no, text)


def scan_item_file(path, item_index, id_field, text_of, required, keep_missing, desc, progress):
    """First pass over an item metadata file (JSON lines) for the items in ``item_index``.

    Returns ``(item_line, item_ok)`` indexed like ``item_index``: the line of each item's last record
    (later records win; -1 if none) and whether the item may be kept: its record's text fields named in
    ``required`` are non-empty (``text_of(record)`` gives the cleaned fields as a dict; it runs only when
    needed), or it has no record, ``keep_missing`` is set and nothing is required.
    """
    required = set(required or [])
    item_line = np.full(len(item_index), -1, dtype=np.int64)
    item_ok = np.zeros(len(item_index), dtype=bool)
    for line_no, text in iter_lines(path, "utf-8", desc, progress):
        record = parse_json_line(path, line_no, text)
        index = item_index.get(str(require(record, id_field, path, line_no)))
        if index is None:
            continue
        item_line[index] = line_no
        fields = text_of(record) if required else {}
        item_ok[index] = all(fields[f] for f in required)
    item_ok |= (item_line < 0) & bool(keep_missing and not required)
    return item_line, item_ok


def write_item_file(folder, name, fields, raw_path, item_tokens, kept_items, item_line, text_of, desc, progress):
    """Second pass over the item metadata: ``<name>.item`` with one row per kept item, in the metadata
    file's order; items without a record (kept only on request) get empty text at the end. Returns the
    file name."""
    filename = f"{name}.item"
    with AtomicFileWriter(os.path.join(folder, filename), [("item_id", "token")] + list(fields)) as w:
        found = kept_items[item_line[kept_items] >= 0]
        found = found[np.argsort(item_line[found], kind="stable")]
        for k, line_no, text in iter_selected_lines(raw_path, item_line[found], "utf-8", desc, progress):
            values = text_of(parse_json_line(raw_path, line_no, text))
            w.write([item_tokens[found[k]]] + [values[field] for field, _ in fields])
        for index in kept_items[item_line[kept_items] < 0]:
            w.write([item_tokens[index]] + [""] * len(fields))
    return filename


def atomic_file_header(path):
    """``[(field, type), ...]`` from an atomic file's header."""
    with open(path, encoding="utf-8") as f:
        head = f.readline().rstrip("\n")
    return [tuple(item.split(":", 1)) for item in head.split("\t")]


def read_atomic_file(path):
    """Yield each row of an atomic file as ``{field: exact string}`` (field names without types).

    Parses the same dialect RecBole's reader does (tab-separated, ``"`` quoting), so it gives back
    exactly what :class:`AtomicFileWriter` wrote, including values RecBole would read as missing.
    """
    csv.field_size_limit(max(csv.field_size_limit(), 2 * HARD_MAX_TEXT_CHARS))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quotechar='"', doublequote=True, strict=False)
        header = next(reader)
        names = [item.split(":", 1)[0] for item in header]
        for row in reader:
            yield dict(zip(names, row))


# ---------------------------------------------------------------------------------- atomic output

@contextlib.contextmanager
def atomic_output_dir(output_root, name, overwrite=False):
    """Yield a temporary folder ``<output_root>/<name>.tmp-XXXX``; rename it to ``<output_root>/<name>``
    when the block succeeds, remove it when anything fails (the previous ``<name>`` folder, if any, is
    left as it was)."""
    final = os.path.join(output_root, name)
    if os.path.lexists(final) and not overwrite:
        raise ConversionError("already exists (pass --overwrite to replace it)", final)
    if os.path.lexists(final) and not os.path.isdir(final):
        raise ConversionError("exists and is not a folder", final)
    created_root = not os.path.isdir(output_root)
    try:
        os.makedirs(output_root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=output_root)
    except OSError as e:
        raise ConversionError(f"cannot create the output folder: {e.strerror}", output_root) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old = None
        if os.path.lexists(final):
            old = tempfile.mkdtemp(prefix=f"{name}.old-", dir=output_root)
            os.rmdir(old)
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_root:
            with contextlib.suppress(OSError):
                os.rmdir(output_root)
        raise


# ------------------------------------------------------------------------------ interaction table

class InteractionTable:
    """Ids, ratings, timestamps and raw line numbers of interactions, in compact arrays (no text)."""

    def __init__(self):
        self.user_index, self.item_index = {}, {}
        self._u, self._i = array("i"), array("i")
        self._t, self._line = array("q"), array("q")
        self._r = array("f")

    def add(self, user, item, timestamp, rating, line_no):
        u = self.user_index.setdefault(user, len(self.user_index))
        i = self.item_index.setdefault(item, len(self.item_index))
        self._u.append(u)
        self._i.append(i)
        self._t.append(timestamp)
        self._r.append(rating)
        self._line.append(line_no)

    def __len__(self):
        return len(self._u)

    def arrays(self):
        """``(user, item, timestamp, rating, line)`` as numpy arrays (views of the compact buffers)."""
        def view(buffer, dtype):
            return np.frombuffer(buffer, dtype=dtype) if len(buffer) else np.zeros(0, dtype=dtype)
        return (view(self._u, np.int32), view(self._i, np.int32), view(self._t, np.int64),
                view(self._r, np.float32), view(self._line, np.int64))

    def item_tokens(self):
        tokens = [None] * len(self.item_index)
        for token, index in self.item_index.items():
            tokens[index] = token
        return tokens

    def user_tokens(self):
        tokens = [None] * len(self.user_index)
        for token, index in self.user_index.items():
            tokens[index] = token
        return tokens


INTER_FIELDS = (("user_id", "token"), ("item_id", "token"), ("rating", "float"), ("timestamp", "float"))


def read_interactions(path, encoding, parse, desc, progress, empty_message, wanted=None):
    """First pass over a raw interaction file: an :class:`InteractionTable` of its rows.

    ``parse(path, line_no, text)`` gives ``(record, user, item, rating, timestamp)``; rows for which
    ``wanted(record, rating)`` is false are skipped. No row left is a :class:`ConversionError` saying
    ``empty_message``.
    """
    table = InteractionTable()
    for line_no, text in iter_lines(path, encoding, desc, progress):
        record, user, item, rating, ts = parse(path, line_no, text)
        if wanted is None or wanted(record, rating):
            table.add(user, item, ts, rating, line_no)
    if not len(table):
        raise ConversionError(empty_message, path)
    return table


def dedup_first(u, i, t, line, keep):
    """Keep only the earliest interaction of each (user, item) pair (ties: the earlier line)."""
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return keep
    order = idx[np.lexsort((line[idx], t[idx], i[idx], u[idx]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (u[order][1:] != u[order][:-1]) | (i[order][1:] != i[order][:-1])
    out = np.zeros_like(keep)
    out[order[first]] = True
    return out


def kcore(u, i, keep, min_user=0, min_item=0, iterate=True):
    """Drop users with fewer than ``min_user`` and items with fewer than ``min_item`` interactions,
    repeatedly until none is left to drop (``iterate``), or once on the counts of the input."""
    keep = keep.copy()
    if min_user <= 1 and min_item <= 1:
        return keep
    n_users = int(u.max()) + 1 if len(u) else 0
    n_items = int(i.max()) + 1 if len(i) else 0
    while True:
        user_count = np.bincount(u[keep], minlength=n_users)
        item_count = np.bincount(i[keep], minlength=n_items)
        bad = keep & ((user_count[u] < min_user) | (item_count[i] < min_item))
        if not bad.any():
            break
        keep &= ~bad
        if not iterate:
            break
    return keep


def sample_users(u, keep, n_users, seed):
    """Keep the interactions of ``n_users`` users drawn uniformly (seeded) from those left."""
    users = np.unique(u[keep])
    if n_users >= len(users):
        return keep
    chosen = np.random.default_rng(seed).choice(users, size=n_users, replace=False)
    return keep & np.isin(u, chosen)


def cap_history(u, t, line, keep, max_len):
    """Keep each user's ``max_len`` most recent interactions."""
    idx = np.flatnonzero(keep)
    if len(idx) == 0:
        return keep
    order = idx[np.lexsort((-line[idx], -t[idx], u[idx]))]  # per user, newest first
    users = u[order]
    start = np.ones(len(order), dtype=bool)
    start[1:] = users[1:] != users[:-1]
    group_start = np.maximum.accumulate(np.where(start, np.arange(len(order)), 0))
    rank = np.arange(len(order)) - group_start
    out = np.zeros_like(keep)
    out[order[rank < max_len]] = True
    return out


def split_by_dates(t, line, keep, dates):
    """Split codes (0 train, 1 valid, 2 test, -1 dropped) from UTC epoch boundaries.

    Four boundaries ``d0 < d1 < d2 < d3``: train ``[d0, d1)``, valid ``[d1, d2)``, test ``[d2, d3)``.
    Three boundaries ``d0 < d1 < d2``: train ``[d0, d1)``; the interactions of ``[d1, d2)``, in time
    order (ties: input order), are cut in two halves by count, valid first (CoLLM's Amazon-Book split).
    """
    split = np.full(len(t), -1, dtype=np.int8)
    if len(dates) == 4:
        for code, (lo, hi) in enumerate(zip(dates[:-1], dates[1:])):
            split[keep & (t >= lo) & (t < hi)] = code
        return split
    d0, d1, d2 = dates
    split[keep & (t >= d0) & (t < d1)] = 0
    tail = np.flatnonzero(keep & (t >= d1) & (t < d2))
    tail = tail[np.lexsort((line[tail], t[tail]))]
    half = len(tail) // 2
    split[tail[:half]] = 1
    split[tail[half:]] = 2
    return split


def interaction_stats(u, i, keep, split=None):
    """Counts the papers' statistics tables use."""
    users, per_user = np.unique(u[keep], return_counts=True)
    n_users, n_items, n_inter = len(users), len(np.unique(i[keep])), int(keep.sum())
    stats = {
        "users": n_users, "items": n_items, "interactions": n_inter,
        "density": n_inter / (n_users * n_items) if n_users and n_items else 0.0,
        "avg_len": n_inter / n_users if n_users else 0.0,
        "long_users": float((per_user > LONG_USER_THRESHOLD).mean()) if n_users else 0.0,
    }
    if split is not None:
        stats.update(train=int((split == 0).sum()), valid=int((split == 1).sum()), test=int((split == 2).sum()))
    return stats


def select(u, i, t, line, opts, row_ok=None):
    """Apply the filters in ``opts`` (an argparse namespace from :func:`add_filter_args`) in this order:
    date window, the converter's own row mask ``row_ok`` (e.g. items with metadata), dedup, k-core,
    user sampling, history cap, time split. Returns ``(keep, split)``; ``split`` is None without
    ``--split-dates``."""
    keep = np.ones(len(u), dtype=bool)
    if opts.start_date is not None:
        keep &= t >= opts.start_date
    if opts.end_date is not None:
        keep &= t < opts.end_date
    if row_ok is not None:
        keep &= row_ok
    if opts.dedup == "first":
        keep = dedup_first(u, i, t, line, keep)
    keep = kcore(u, i, keep, opts.min_user_inter or 0, opts.min_item_inter or 0, iterate=not opts.kcore_once)
    if opts.sample_users:
        keep = sample_users(u, keep, opts.sample_users, opts.seed)
    if opts.max_history:
        keep = cap_history(u, t, line, keep, opts.max_history)
    split = None
    if opts.split_dates:
        split = split_by_dates(t, line, keep, opts.split_dates)
        keep &= split >= 0
    return keep, split


# ------------------------------------------------------------------------------------------- CLI

class ConverterArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (``dataset_converters: error: ...``, exit 2) and a presets epilog."""

    def __init__(self, *args, presets=None, **kwargs):
        if presets:
            kwargs.setdefault("epilog", presets_epilog(presets))
            kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message}\n")


def _day(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d")


def _option_text(key, value):
    flag = "--" + key.replace("_", "-")
    if value is True:
        return flag
    if isinstance(value, list) and key == "split_dates":
        value = ",".join(_day(d) for d in value)
    elif isinstance(value, list):
        return " ".join(f"{flag} {v}" for v in value)
    elif key.endswith("_date"):
        value = _day(value)
    return f"{flag} {value}"


def presets_epilog(presets):
    """``--help`` text for the presets: the options each one sets and the paper statistics it targets."""
    lines = ["presets (explicit options override a preset's):"]
    for name, preset in presets.items():
        options = " ".join(_option_text(k, v) for k, v in preset["options"].items()) or "(no filtering)"
        lines.append(f"  {name}: {options}")
        lines.append(f"      {preset['note']}")
    return "\n".join(lines)


def parse_date(text):
    """``YYYY-MM-DD`` (UTC midnight) to a Unix timestamp."""
    try:
        day = datetime.datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None
    return calendar.timegm(day.timetuple())


def parse_split_dates(text):
    dates = [parse_date(part.strip()) for part in text.split(",")]
    if len(dates) not in (3, 4):
        raise argparse.ArgumentTypeError("give 3 or 4 comma-separated dates")
    if any(a >= b for a, b in zip(dates, dates[1:])):
        raise argparse.ArgumentTypeError("dates must increase")
    return dates


def add_common_args(parser, default_name_help):
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="data_path for RecBole: the dataset is written to DIR/<name>/<name>.*")
    parser.add_argument("--dataset-name", metavar="NAME", help=f"dataset (folder) name; default: {default_name_help}")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/<name> folder")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")


def add_filter_args(parser):
    g = parser.add_argument_group("filtering and splitting (applied in this order)")
    g.add_argument("--start-date", type=parse_date, metavar="YYYY-MM-DD",
                   help="drop interactions before this day (UTC)")
    g.add_argument("--end-date", type=parse_date, metavar="YYYY-MM-DD",
                   help="drop interactions from this day on (UTC)")
    g.add_argument("--dedup", choices=["first", "none"], default="first",
                   help="repeated (user, item) pairs: keep the earliest (default) or keep all")
    g.add_argument("--kcore", type=int, metavar="K", help="shorthand for --min-user-inter K --min-item-inter K")
    g.add_argument("--min-user-inter", type=int, metavar="N", help="keep users with at least N interactions")
    g.add_argument("--min-item-inter", type=int, metavar="N", help="keep items with at least N interactions")
    g.add_argument("--kcore-once", action="store_true",
                   help="apply the user/item thresholds once on the input counts instead of to a fixed point")
    g.add_argument("--sample-users", type=int, metavar="N", help="keep N users drawn at random (seeded)")
    g.add_argument("--seed", type=int, default=2024, help="seed for --sample-users (default 2024)")
    g.add_argument("--max-history", type=int, metavar="N", help="keep each user's N most recent interactions")
    g.add_argument("--split-dates", type=parse_split_dates, metavar="D0,D1,D2[,D3]",
                   help="time split into <name>.train/.valid/.test.inter files: 4 dates give three windows; "
                        "3 dates give train [D0,D1) and [D1,D2) halved by count into valid and test")


def finish_filter_args(parser, args):
    if args.kcore is not None and args.kcore < 1:
        parser.error("--kcore must be at least 1")
    if args.kcore is not None:
        args.min_user_inter = args.min_user_inter if args.min_user_inter is not None else args.kcore
        args.min_item_inter = args.min_item_inter if args.min_item_inter is not None else args.kcore
    for name in ("min_user_inter", "min_item_inter", "sample_users", "max_history"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def parse_with_preset(parser, argv, presets):
    """Parse ``argv``; a ``--preset`` fills in its options as defaults, which explicit options override."""
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        parser.set_defaults(**presets[args.preset]["options"])
        args = parser.parse_args(argv)
    return args


def parse_converter_args(parser, argv, presets):
    """A converter's options: ``argv`` parsed with its preset (:func:`parse_with_preset`), the filter
    options checked and completed (:func:`finish_filter_args`), and ``--max-text-chars`` checked where the
    converter has it."""
    args = parse_with_preset(parser, argv, presets)
    finish_filter_args(parser, args)
    if getattr(args, "max_text_chars", 1) < 1:
        parser.error("--max-text-chars must be at least 1")
    return args


def check_output(output_root, name, overwrite):
    """Fail before any reading when the output folder exists and --overwrite is not given."""
    final = os.path.join(output_root, name)
    if os.path.lexists(final) and not overwrite:
        raise ConversionError("already exists (pass --overwrite to replace it)", final)


def run(main_fn, argv):
    """Run a converter's ``main_fn(argv)``: input problems print one line and return 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return main_fn(argv) or 0
    except ConversionError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted (no output written)", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{PROG}: error: out of memory (no output written)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line unless --debug
        if debug:
            raise
        print(f"{PROG}: error: internal error: {type(e).__name__}: {e} (rerun with --debug for a traceback)",
              file=sys.stderr)
        return 2


def find_file(folder, candidates, what):
    """The first of ``candidates`` (names, tried also with ``.gz``) present in ``folder``."""
    for name in candidates:
        for suffix in ("", ".gz"):
            path = os.path.join(folder, name + suffix)
            if os.path.isfile(path):
                return path
    raise ConversionError(f"no {what} file found (looked for {', '.join(candidates)}, plain or .gz)", folder)


def format_stats(stats, paper=None):
    """A small table of the statistics, with the paper's figures beside them when given."""
    rows = [("users", "users", "{:,}"), ("items", "items", "{:,}"), ("interactions", "interactions", "{:,}"),
            ("density", "density", "{:.3%}"), ("avg_len", "avg length", "{:.3f}"),
            ("long_users", f"users > {LONG_USER_THRESHOLD}", "{:.2%}"),
            ("train", "train", "{:,}"), ("valid", "valid", "{:,}"), ("test", "test", "{:,}")]
    lines = [f"  {'':<14}{'converted':>14}" + (f"{'paper':>14}" if paper else "")]
    for key, label, fmt in rows:
        if key not in stats:
            continue
        line = f"  {label:<14}{fmt.format(stats[key]):>14}"
        if paper:
            line += f"{fmt.format(paper[key]) if key in paper else '-':>14}"
        lines.append(line)
    return "\n".join(lines)


def report(name, output_root, stats, files, paper=None, note=None):
    """Print what was written, the statistics (beside the paper's when given) and how to use it."""
    print(f"wrote {os.path.join(output_root, name)}: {', '.join(files)}")
    print(format_stats(stats, paper))
    if note:
        print(f"  note: {note}")
    print(f"use it with: --dataset={name} --data_path={output_root}")
