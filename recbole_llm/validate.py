"""Input validation, done once before a run writes anything (``validate(config)``).

Every bad input gives one ``ConfigError`` that names the option, file and line; nothing is created before
it is raised (the CLI prints it as ``recbole-llm: error: ...`` and exits with code 2).

- Option values: ``OPTIONS`` is the one table of key -> expected type / range / choices, for RecBole's own
  keys and ours. Config checks what the user gave (files, config dict, command line, where RecBole's
  ``eval`` leaves ``--learning_rate=abc`` a string) before RecBole's own post-processing sees it, and
  ``cf_config`` (a backbone's options) against the same table.
- Config files: YAML syntax errors with file and line, a top level that is not a mapping.
- Atomic files (``.inter`` / ``.item`` / ``.user`` that RecBole would load, honouring ``load_col``,
  ``unload_col``, ``field_separator``, ``encoding``, ``seq_separator``, ``benchmark_filename``), read as
  RecBole's loader reads them (pandas' python engine, see ``scan_atomic_file``): accepted exactly when RecBole
  reads them correctly (``tests/test_validate_recbole.py`` holds the two against each other). A header of
  ``name:type`` columns of RecBole's types with the id columns; every row with at least the header's field
  count (more only after the first row: RecBole ignores them, a warning when they hold values); quotes that
  pandas can parse, within a line; loaded float / float_seq values that parse; a row with its ids.
  Streamed (``bench/validate_speed.py``). Items the ``.inter`` references that the ``.item`` lacks are
  returned as a warning with a count.
- LLM models: ``llm_path`` is ``smollm2``, ``gemma3-270m``, ``tiny-random`` or a Hugging Face model folder;
  ``item_text_fields`` are columns of the ``.item`` file; the model's own ``_check_options``.
- Output folders (``checkpoint_dir``, ``log/``, ``log_tensorboard/``, ``llm_cache_dir``): creatable and
  writable, checked without creating anything (the nearest existing ancestor is a writable folder).
- ``run_hyper.py``'s params file (``check_params_file``): each line parses, each name is a known option.
"""
import codecs
import csv
import math
import os
import re

import yaml
from recbole.utils import EvaluatorType

from recbole_llm.errors import ConfigError

FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")


# ----- option table ----------------------------------------------------------------------------------------
class Spec:
    """An expected value: ``ok(value)`` says whether it fits, ``text`` what fits (a string, or a function
    for choices read when the message is written: RecBole's registered metrics, our LLM dtypes)."""

    def __init__(self, ok, text):
        self.ok, self._text = ok, text

    @property
    def text(self):
        return self._text() if callable(self._text) else self._text

    def __or__(self, other):
        return Spec(lambda v: self.ok(v) or other.ok(v), lambda: f"{self.text} or {other.text}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def Int(low=None):
    text = "an integer" if low is None else f"an integer >= {low}"
    return Spec(lambda v: _is_int(v) and (low is None or v >= low), text)


def Number(low=None, high=None, low_open=False, high_open=False):
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")

    def ok(v):
        return (_is_number(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    return Spec(ok, "a number" + (" " + " and ".join(parts) if parts else ""))


def Choice(*choices, case=True):
    def norm(v):
        return v.lower() if isinstance(v, str) and not case else v

    return Spec(lambda v: isinstance(v, str) and norm(v) in {norm(c) for c in choices},
                "one of " + ", ".join(map(str, choices)))


def ListOf(item):
    """One ``item`` or a non-empty list of them (RecBole takes ``topk: 10`` as ``[10]``)."""
    def ok(v):
        return item.ok(v) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(item.ok(x) for x in v))

    spec = Spec(ok, lambda: f"{item.text}, or a list of them")
    spec.item = item  # the message names the first element that does not fit
    return spec


BOOL = Spec(lambda v: isinstance(v, bool), "True or False")
STR = Spec(lambda v: isinstance(v, str) and v != "", "a non-empty string")
NONE = Spec(lambda v: v is None, "~ (None)")
DICT = Spec(lambda v: isinstance(v, dict), "a mapping")


def _metric_ok(name):
    from recbole.evaluator import metric_types  # read at call time: registered metrics count too

    return isinstance(name, str) and name.lower() in metric_types


def _known_metrics():
    from recbole.evaluator import metric_types

    return ", ".join(sorted(metric_types))


METRIC = Spec(_metric_ok, lambda: f"a metric RecBole knows ({_known_metrics()})")
VALID_METRIC = Spec(lambda v: isinstance(v, str) and _metric_ok(v.split("@")[0])
                    and (len(v.split("@")) == 1 or v.split("@")[1].isdigit()),
                    lambda: f"METRIC or METRIC@K, METRIC one RecBole knows ({_known_metrics()})")
ENCODING = Spec(lambda v: isinstance(v, str) and _codec_known(v), "a Python text encoding")
EVAL_MODE = Spec(lambda v: isinstance(v, str) and _eval_mode_ok(v), "full, labeled, uniN or popN")


def _codec_known(name):
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _eval_mode_ok(mode):
    return mode in ("full", "labeled") or (mode[:3] in ("uni", "pop") and mode[3:].isdigit() and int(mode[3:]) > 0)


def _loaded_columns_ok(v):
    return isinstance(v, dict) and all(
        c == "*" or (isinstance(c, (list, tuple)) and all(isinstance(x, str) for x in c)) for c in v.values())


def _check_split(v):
    if not isinstance(v, dict) or len(v) != 1:
        return False
    (kind, args), = v.items()
    if kind == "RS":
        return isinstance(args, (list, tuple)) and len(args) in (2, 3) and all(_is_number(x) and x >= 0 for x in args)
    if kind == "LS":
        return args in ("valid_and_test", "test_only")
    return False


# Nested options: each value of a mapping checked against its own spec.
EVAL_ARGS = {
    "split": Spec(_check_split, "{RS: [train, valid, test] ratios} or {LS: valid_and_test | test_only}"),
    "order": Choice("RO", "TO"),
    "group_by": Choice("user", "none") | NONE,
    "mode": EVAL_MODE | Spec(lambda v: isinstance(v, dict) and set(v) <= {"valid", "test"}
                             and all(isinstance(m, str) and _eval_mode_ok(m) for m in v.values()),
                             "{valid: MODE, test: MODE}"),
}
TRAIN_NEG_SAMPLE_ARGS = {
    "distribution": Choice("uniform", "popularity"),
    "sample_num": Int(1),
    "alpha": Number(),
    "dynamic": BOOL,
    "candidate_num": Int(0),
}

OPTIONS = {
    # RecBole: environment
    "gpu_id": Spec(lambda v: isinstance(v, (str, int, tuple)) and not isinstance(v, bool), "GPU ids, e.g. '0,1'"),
    "worker": Int(0),
    "use_gpu": BOOL,
    "seed": Int(),
    "state": Choice("info", "debug", "warning", "error", "critical", case=False),
    "reproducibility": BOOL,
    "data_path": STR,
    "checkpoint_dir": STR,
    "show_progress": BOOL,
    "save_dataset": BOOL,
    "save_dataloaders": BOOL,
    "log_wandb": BOOL,
    "shuffle": BOOL,
    "nproc": Int(1),
    "world_size": Int(-1),
    # RecBole: training
    "epochs": Int(1),
    "train_batch_size": Int(1),
    "learner": Choice("adam", "sgd", "adagrad", "rmsprop", "sparse_adam", case=False),
    "learning_rate": Number(0),  # 0 is allowed: evaluates the untrained model
    "train_neg_sample_args": NONE | Spec(lambda v: v == "None", "None") | DICT,
    "eval_step": Int(0),
    "stopping_step": Int(0),
    "clip_grad_norm": NONE | DICT,
    "weight_decay": Number(0),
    "loss_decimal_place": Int(0),
    "require_pow": BOOL,
    "enable_amp": BOOL,
    "enable_scaler": BOOL,
    # RecBole: evaluation
    "eval_args": DICT,
    "repeatable": BOOL,
    "metrics": ListOf(METRIC),
    "topk": ListOf(Int(1)),
    "valid_metric": VALID_METRIC,
    "valid_metric_bigger": BOOL,
    "eval_batch_size": Int(1),
    "metric_decimal_place": Int(0),
    # RecBole: data
    "field_separator": STR,
    "seq_separator": STR,
    "encoding": ENCODING,
    "USER_ID_FIELD": STR | NONE,
    "ITEM_ID_FIELD": STR | NONE,
    "RATING_FIELD": STR | NONE,
    "TIME_FIELD": STR | NONE,
    "load_col": NONE | Spec(_loaded_columns_ok, "{inter|item|user: [columns] or '*'}"),
    "unload_col": NONE | Spec(_loaded_columns_ok, "{inter|item|user: [columns]}"),
    "benchmark_filename": NONE | ListOf(STR),
    "user_inter_num_interval": NONE | STR,
    "item_inter_num_interval": NONE | STR,
    # ours (properties/overall.yaml)
    "llm_path": NONE | STR,
    "llm_dtype": Spec(lambda v: isinstance(v, str) and v in _llm_dtypes(),
                      lambda: "one of " + ", ".join(_llm_dtypes())) | NONE,
    "llm_quantization": Spec(lambda v: v is False or (isinstance(v, str) and v.lower() in _llm_quantizations()),
                             lambda: "one of " + ", ".join(_llm_quantizations())) | NONE,
    "llm_cache_dir": NONE | STR,
    "llm_gradient_checkpointing": BOOL,
    "lora_r": Int(0),
    "lora_alpha": Number(0, low_open=True),
    "lora_dropout": Number(0, 1, high_open=True),
    "lora_target_modules": ListOf(STR),
    "llm_autocast": BOOL,
    "gradient_accumulation_steps": Int(1),
    "warmup_steps": Int(0),
    "rebuild_stages": BOOL,
    "eval_before_training": BOOL,
    "ranking_top_k": Int(1),
    "item_text_fields": NONE | ListOf(STR),
    "item_text_separator": Spec(lambda v: isinstance(v, str), "a string"),
    "llm_eval_batch_size": Int(1),
    "exclude_seen_items": BOOL,  # TCA4Rec / AlignTokenRec: beams leave the user's seen items out (through the trie)
    "cf_config": NONE | DICT,
    "download_confirm": BOOL,  # download a dataset of RecBole's list over 1 GB without asking (data/download.py)
}
NESTED = {"eval_args": EVAL_ARGS, "train_neg_sample_args": TRAIN_NEG_SAMPLE_ARGS, "cf_config": OPTIONS}


def _llm_dtypes():
    from recbole_llm.llm.precision import DTYPES

    return DTYPES


def _llm_quantizations():
    from recbole_llm.llm.precision import QUANTIZATIONS

    return QUANTIZATIONS


def check_option(key, value, where="", table=OPTIONS, prefix=""):
    """Raise a ``ConfigError`` naming ``key`` if ``value`` does not fit its entry in ``table`` (unknown keys pass)."""
    spec = table.get(key)
    suffix = f" ({where})" if where else ""
    if spec is not None and not spec.ok(value):
        item = getattr(spec, "item", None)
        if item is not None and isinstance(value, (list, tuple)) and value:
            bad = next(x for x in value if not item.ok(x))
            raise ConfigError(f"{prefix}{key}: {bad!r} in {value!r} is not {item.text}{suffix}")
        raise ConfigError(f"{prefix}{key}: expected {spec.text}, got {value!r}{suffix}")
    nested = NESTED.get(key) if table is OPTIONS else None
    if nested is not None and isinstance(value, dict):
        for sub, sub_value in value.items():
            if nested is not OPTIONS and sub not in nested:
                raise ConfigError(f"{prefix}{key}.{sub}: unknown key (known: {', '.join(nested)}){suffix}")
            check_option(sub, sub_value, where, nested, f"{prefix}{key}.")


def check_options(options, where=None):
    """Check every key of ``options`` (a dict) against ``OPTIONS``; ``where(key)`` says where a value came from."""
    for key, value in options.items():
        check_option(key, value, where(key) if where else "")


def check_final_options(config):
    """What only the merged config can tell: the valid metric is one that is computed."""
    metric, _, k = config["valid_metric"].partition("@")  # RecBole has made metrics and topk lists
    if metric.lower() not in [m.lower() for m in config["metrics"]]:
        raise ConfigError(f"valid_metric: {config['valid_metric']} is not among metrics {config['metrics']}")
    if k and int(k) not in config["topk"]:
        raise ConfigError(f"valid_metric: {config['valid_metric']} needs {k} in topk {config['topk']}")
    if config["warm_cold_report"] and config["eval_type"] != EvaluatorType.VALUE:
        raise ConfigError(f"warm_cold_report: True needs labeled-mode metrics (AUC, UAUC, LogLoss), "
                          f"not {config['metrics']}")


# ----- config files ----------------------------------------------------------------------------------------
def load_yaml_file(path, loader):
    """A config file's mapping, parsed with RecBole's ``loader``; ``{}`` for an empty file."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.load(f.read(), Loader=loader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected `key: value` lines, got a {type(data).__name__}")
    return data


# ----- atomic files ----------------------------------------------------------------------------------------
def atomic_files(config, item_text=False):
    """(path, source) of every atomic file RecBole will load for ``config`` (and the ``.item`` file if
    ``item_text``: our LLM models read it by field name, whatever ``load_col`` says)."""
    path, token = config["data_path"], config["dataset"]
    parts = config["benchmark_filename"] if "benchmark_filename" in config else None
    inter = [f"{token}.{p}.inter" for p in parts] if parts else [f"{token}.inter"]
    files = [(name, "inter") for name in inter] + [(f"{token}.item", "item"), (f"{token}.user", "user")]
    load_col = config["load_col"] if "load_col" in config else None
    return [(os.path.join(path, name), source) for name, source in files
            if os.path.isfile(os.path.join(path, name))
            and (load_col is None or source in load_col or (item_text and source == "item"))]


def _loaded(config, source, column):
    load_col = config["load_col"] if "load_col" in config else None
    unload_col = config["unload_col"] if "unload_col" in config else None
    if load_col is not None and load_col.get(source) != "*" and column not in load_col.get(source, []):
        return False
    return not (unload_col and column in (unload_col.get(source) or []))


def read_header(path, sep, encoding):
    """The header's ``[(name, type)]`` as RecBole reads it (its first line, split at ``field_separator``), each
    a known RecBole type; the error names the file and the column. A UTF-8 byte order mark is not part of the
    first name here (``check_atomic_files`` says when RecBole would trip on it)."""
    name = os.path.basename(path)
    try:
        with open(path, "r", encoding=encoding) as f:  # as RecBole: text mode, universal line ends
            head = f.readline()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}, line {_undecodable_line(path, encoding)}: not valid {encoding} text "
                          "(set encoding)") from None
    if head.endswith("\n"):  # RecBole drops the last character; without a line end there are no rows anyway
        head = head[:-1]
    head = head[1:] if head.startswith(_BOM) else head
    if not head:
        what = "empty file" if os.path.getsize(path) == 0 else "line 1 is blank"
        raise ConfigError(f"{path}: {what} (expected a header of name:type columns on line 1)")
    columns = []
    for column in head.split(sep):
        field, colon, ftype = column.partition(":")
        if not colon or not field:
            raise ConfigError(f"{path}, line 1: column '{column}' is not name:type "
                              f"(separated by field_separator {sep!r}?)")
        if ftype not in FEATURE_TYPES:
            raise ConfigError(f"{path}, line 1: column '{field}' has unknown type '{ftype}' "
                              f"(RecBole's types: {', '.join(FEATURE_TYPES)})")
        if field in (c[0] for c in columns):
            raise ConfigError(f"{path}, line 1: column '{field}' appears twice in {name}")
        columns.append((field, ftype))
    return columns


# RecBole reads the rows with ``pandas.read_csv(path, delimiter=field_separator, usecols=<every loaded column>,
# dtype=<float64 or str>, encoding=encoding, engine="python")`` (``Dataset._load_feat``). What that reads, and
# how (pandas' python engine, checked against RecBole itself in tests/test_validate_recbole.py):
# - a one-character separator goes to Python's ``csv`` module (``'"'`` quotes a field, ``strict``: text after
#   a closing quote or a quote left open is an error); a longer one is a regular expression splitting each
#   stripped line;
# - blank lines (no field, or one field of white space) are skipped; CRLF and CR line ends are line ends;
# - a row with fewer fields than the header is padded with missing values; a row with more keeps the first
#   ones (``usecols``) -- except the first row, whose extra fields become a row index that shifts every column,
#   and a second row with the header's count more fields than the first (read as index names);
# - float columns: ``float()``, except pandas' missing-value strings (empty, NA, null, ...: NaN) and
#   True / False (1 / 0, in a column with no numbers only); float_seq columns: ``float()`` of each non-empty
#   piece between ``seq_separator``s.
try:
    from pandas._libs.parsers import STR_NA_VALUES as _PANDAS_NA
except ImportError:  # pragma: no cover - pandas' default ``na_values``, as of pandas 1.x / 2.x
    _PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                  "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
NA_STRINGS = frozenset(_PANDAS_NA)
_BOOLS = frozenset(("True", "TRUE", "true", "False", "FALSE", "false"))
_BOM = "\ufeff"


class _RegexRows:
    """pandas' rows for a separator longer than one character: ``re.split(sep, line.strip())``."""

    def __init__(self, f, sep):
        self._lines, self._split, self.line_num = f, re.compile(sep).split, 0

    def __iter__(self):
        return self

    def __next__(self):
        line = next(self._lines)
        self.line_num += 1
        return self._split(line.strip())


def _rows(f, sep):
    if len(sep) == 1:
        return csv.reader(f, delimiter=sep, quotechar='"', doublequote=True, escapechar=None,
                          skipinitialspace=False, quoting=csv.QUOTE_MINIMAL, strict=True)
    return _RegexRows(f, sep)


def scan_atomic_file(path, header, sep, encoding, float_columns=(), key_column=None, float_seq_columns=(),
                     seq_separator=" ", id_columns=()):
    """Stream the file's rows as RecBole's loader (pandas) reads them, and refuse what it would crash on or
    silently misread: a row with fewer fields than the ``header`` (``read_header``), extra fields on the first
    row, a quoted field over several lines (a stray ``'"'``), a value of the ``float_columns`` /
    ``float_seq_columns`` (indices) that does not parse. Blank lines are skipped, as pandas does; so are rows
    missing a value of the ``id_columns`` (RecBole drops them), but a file of nothing else is refused.

    Returns (rows, the set of values of column ``key_column`` or None, warnings). Memory: that set only.
    """
    n_fields = len(header)
    keys = set() if key_column is not None else None
    rows = 0
    with_ids = False
    warnings = []
    extra_rows, extra_line = 0, None
    bool_line, has_number = {}, [False] * n_fields
    line_no = end = 0
    width = n_fields if n_fields > 1 else -1  # rows of another width, and a one-field row, are looked at closely
    try:
        with open(path, "r", encoding=encoding, newline="") as f:  # as pandas opens it
            reader = _rows(f, sep)
            try:
                names = next(reader)
            except StopIteration:
                names = []
            if names and names[0].startswith(_BOM):  # pandas drops a byte order mark
                names[0] = names[0][1:]
            if names != [f"{name}:{ftype}" for name, ftype in header]:
                how = "as a regular expression " if len(sep) > 1 else ""
                shown = ", ".join(repr(n) for n in names[:6]) + (", ..." if len(names) > 6 else "")
                raise ConfigError(f"{path}, line 1: RecBole splits the header at field_separator {sep!r}, but its "
                                  f"reader (pandas) splits it {how}into {len(names)} columns: {shown}")
            end = reader.line_num
            for fields in reader:
                line_no, end = end + 1, reader.line_num
                if len(fields) != width or end != line_no or rows < 2:  # else: a row of the header's shape
                    n = len(fields)
                    if n == 0 or (n == 1 and not fields[0].strip()):
                        continue  # a blank line
                    if end != line_no:
                        raise ConfigError(f"{path}, line {line_no}: a quoted field runs over lines {line_no}-{end} "
                                          f"(a stray '\"'?): RecBole would read them as one row")
                    if n < n_fields:
                        raise ConfigError(f"{path}, line {line_no}: {n} fields, the header has {n_fields} "
                                          f"(field_separator {sep!r})")
                    if rows == 0 and n > n_fields:
                        what = ("a trailing field_separator" if not any(fields[n_fields:])
                                else f"{n} fields (the header has {n_fields})")
                        raise ConfigError(f"{path}, line {line_no}: {what} on the first row: RecBole (pandas) "
                                          f"reads the first field as a row index and shifts every column")
                    if rows == 1 and n == 2 * n_fields:
                        raise ConfigError(f"{path}, line {line_no}: {n} fields, twice the header's {n_fields}: "
                                          "RecBole (pandas) reads the row before as index names and misreads "
                                          "every row")
                    if n > n_fields and any(fields[n_fields:]):
                        extra_rows += 1
                        extra_line = extra_line or line_no
                for i in float_columns:
                    value = fields[i]
                    try:
                        number = float(value)
                    except ValueError:
                        if value in NA_STRINGS:
                            continue
                        if value not in _BOOLS:
                            raise ConfigError(f"{path}, line {line_no}: column '{header[i][0]}' is a float "
                                              f"column, got {value!r}") from None
                        bool_line.setdefault(i, (line_no, value))
                    else:
                        if number == number or value not in NA_STRINGS:  # 'nan' is pandas' missing value
                            has_number[i] = True
                for i in float_seq_columns:
                    value = fields[i]
                    if value in NA_STRINGS:
                        continue
                    for piece in value.split(seq_separator):
                        if piece:
                            try:
                                float(piece)
                            except ValueError:
                                raise ConfigError(
                                    f"{path}, line {line_no}: column '{header[i][0]}' is a float_seq column "
                                    f"(seq_separator {seq_separator!r}), got {piece!r} in {value!r}") from None
                rows += 1
                if not with_ids:
                    with_ids = all(fields[i] not in NA_STRINGS for i in id_columns)
                if keys is not None:
                    keys.add(fields[key_column])
    except UnicodeDecodeError:  # text mode decodes ahead of the line it returns: find the line itself
        raise ConfigError(f"{path}, line {_undecodable_line(path, encoding)}: not valid {encoding} text "
                          "(set encoding)") from None
    except csv.Error as e:
        if "end of data" in str(e):
            raise ConfigError(f"{path}, line {end + 1}: a quoted field opened by '\"' is never closed "
                              "(a stray '\"'?)") from None
        if "expected after" in str(e):
            raise ConfigError(f"{path}, line {end + 1}: text after the '\"' that closes a quoted field (a field that "
                              "starts with '\"' is read as quoted; RecBole's reader, pandas, fails)") from None
        raise ConfigError(f"{path}, line {end + 1}: RecBole's reader (pandas) fails: {e}") from None
    for i, (line, value) in bool_line.items():
        if has_number[i]:
            raise ConfigError(f"{path}, line {line}: column '{header[i][0]}' is a float column, got {value!r} "
                              "(pandas reads True / False only in a column with no numbers)")
    if rows == 0:
        raise ConfigError(f"{path}: no rows, only a header")
    if not with_ids:
        ids = " and ".join(f"'{header[i][0]}'" for i in id_columns)
        raise ConfigError(f"{path}: no row has {'both ' if len(id_columns) > 1 else 'a value in '}{ids} (empty or "
                          "a missing-value string such as NA), and RecBole drops the rows without")
    if extra_rows:
        warnings.append(f"{path}, line {extra_line}: more fields than the header's {n_fields}: RecBole reads the "
                        f"first {n_fields} and ignores the rest ({extra_rows} such row{'s' * (extra_rows > 1)})")
    if keys is not None:
        keys -= NA_STRINGS  # pandas' missing values: RecBole drops these rows
    return rows, keys, warnings


def _undecodable_line(path, encoding):
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError:
                return line_no
    return "?"


def _starts_with_bom(path, encoding):
    with open(path, "r", encoding=encoding, errors="replace") as f:
        return f.read(1) == _BOM


def check_atomic_files(config, item_text=False):
    """Check the dataset's atomic files; returns warnings (inter's item ids that the item file lacks, rows with
    fields past the header's that RecBole ignores)."""
    sep = config["field_separator"] or "\t"
    encoding = config["encoding"] or "utf-8"
    seq_sep = config["seq_separator"] or " "
    id_fields = {"inter": [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]], "item": [config["ITEM_ID_FIELD"]],
                 "user": [config["USER_ID_FIELD"]]}
    item_ids, inter_item_ids = None, set()
    warnings = []
    for path, source in atomic_files(config, item_text):
        header = read_header(path, sep, encoding)
        names = [name for name, _ in header]
        for field in id_fields[source]:
            if field is not None and field not in names:
                option = "USER_ID_FIELD" if field == config["USER_ID_FIELD"] else "ITEM_ID_FIELD"
                raise ConfigError(f"{path}: no column '{field}' ({option}); columns: {', '.join(names)}")
        read_by_us = item_text and source == "item"  # recbole_llm.data.item_text reads it by column name
        if (_loaded(config, source, names[0]) or read_by_us) and _starts_with_bom(path, encoding):
            raise ConfigError(f"{path}, line 1: starts with a UTF-8 byte order mark, read as part of column "
                              f"'{names[0]}' (set encoding: utf-8-sig)")
        loaded = [(i, ftype) for i, (name, ftype) in enumerate(header) if _loaded(config, source, name)]
        floats = [i for i, ftype in loaded if ftype == "float"]
        float_seqs = [i for i, ftype in loaded if ftype == "float_seq"]
        iid = config["ITEM_ID_FIELD"]
        key = names.index(iid) if iid in names and source in ("inter", "item") else None
        ids = [names.index(field) for field in id_fields[source] if field in names]
        _, keys, file_warnings = scan_atomic_file(path, header, sep, encoding, floats, key, float_seqs, seq_sep,
                                                  ids)
        warnings += file_warnings
        if source == "item" and keys is not None:
            item_ids = keys
        elif keys is not None:
            inter_item_ids |= keys
    if item_ids is not None:
        missing = inter_item_ids - item_ids
        if missing:
            warnings.append(f"{len(missing)} item ids of {config['dataset']}'s .inter file are not in its .item "
                            f"file (e.g. {sorted(missing)[0]!r}): they have no item features")
    return warnings


def check_item_text_fields(config):
    """For an LLM model: the ``item_text_fields`` are columns of the ``.item`` file."""
    fields = config["item_text_fields"]
    if not fields:
        return
    fields = [fields] if isinstance(fields, str) else list(fields)
    path = os.path.join(config["data_path"], f"{config['dataset']}.item")
    if not os.path.isfile(path):
        raise ConfigError(f"{config['model']} needs item text, but {path} does not exist")
    names = [name for name, _ in read_header(path, config["field_separator"] or "\t", config["encoding"] or "utf-8")]
    missing = [f for f in fields if f not in names]
    if missing:
        raise ConfigError(f"item_text_fields: {path} has no field {', '.join(missing)} (fields: {', '.join(names)})")


# ----- output folders --------------------------------------------------------------------------------------
def check_writable_dir(option, path):
    """``path`` exists as a writable folder, or can be made: nothing is created to find out."""
    path = os.path.abspath(os.path.expanduser(path))
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{option}: cannot create folder {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "folder" if probe == path else f"folder {path}: its parent"
        raise ConfigError(f"{option}: cannot write to {what} {probe} (permission denied)")


def output_dirs(config, llm):
    """(option, folder) of every folder a run writes to."""
    dirs = [("checkpoint_dir", config["checkpoint_dir"]), ("log folder (working directory)", "log"),
            ("TensorBoard folder (working directory)", "log_tensorboard")]
    if llm:
        from recbole_llm.llm.loading import default_cache_dir

        dirs.append(("llm_cache_dir", config["llm_cache_dir"] or default_cache_dir()))
    return dirs


# ----- LLM ---------------------------------------------------------------------------------------------------
def check_llm_path(config):
    from recbole_llm.llm.loading import check_llm_folder

    path = config["llm_path"] or "smollm2"
    if path not in ("smollm2", "gemma3-270m", "tiny-random"):
        check_llm_folder(path)


# ----- all of it -------------------------------------------------------------------------------------------
def validate(config):
    """Check a run's inputs before anything is written; returns warnings to log, raises ``ConfigError``."""
    from recbole_llm.model.abstract import LLMRecommender
    from recbole_llm.utils import check_dataset

    check_final_options(config)
    check_dataset(config)
    llm = isinstance(config.model_class, type) and issubclass(config.model_class, LLMRecommender)
    warnings = check_atomic_files(config, item_text=llm)
    if llm:
        check_llm_path(config)
        check_item_text_fields(config)
    model_check = getattr(config.model_class, "_check_options", None)
    if model_check is not None:
        model_check(config)
    for option, folder in output_dirs(config, llm):
        check_writable_dir(option, folder)
    return warnings


# ----- run_hyper's params file -----------------------------------------------------------------------------
def check_params_file(path, known_keys):
    """RecBole's hyper file format, line by line: ``name choice [...]`` / ``name uniform low,high`` /
    ``name quniform low,high,q`` / ``name loguniform low,high``; each name a known option, each value fits."""
    with open(path, "r") as f:
        lines = f.read().splitlines()
    names = 0
    for line_no, line in enumerate(lines, start=1):
        parts = line.strip().split(" ")
        if not line.strip():
            continue
        where = f"{path}, line {line_no}"
        if len(parts) < 3:
            raise ConfigError(f"{where}: expected `name choice|uniform|quniform|loguniform values`, got {line!r}")
        name, kind, value = parts[0], parts[1], "".join(parts[2:])
        if name not in known_keys:
            raise ConfigError(f"{where}: unknown option '{name}' (not a RecBole, recbole-llm or model option)")
        if kind == "choice":
            try:
                values = eval(value)  # RecBole's own parser evaluates it the same way
            except Exception as e:  # noqa: BLE001 - any failure means the line does not parse
                raise ConfigError(f"{where}: choice values do not parse: {type(e).__name__}: {e}") from None
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"{where}: choice needs a non-empty list, got {value!r}")
            for v in values:
                check_option(name, v, where)
        elif kind in ("uniform", "quniform", "loguniform"):
            n = 3 if kind == "quniform" else 2
            try:
                numbers = [float(x) for x in value.split(",")]
            except ValueError:
                numbers = []
            if len(numbers) != n or numbers[0] >= numbers[1]:
                raise ConfigError(f"{where}: {kind} needs {'low,high,q' if n == 3 else 'low,high'} numbers "
                                  f"with low < high, got {value!r}")
        else:
            raise ConfigError(f"{where}: unknown type '{kind}' (choice, uniform, quniform, loguniform)")
        names += 1
    if not names:
        raise ConfigError(f"{path}: no search space (lines `name choice [..]` etc.)")
