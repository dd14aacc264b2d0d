"""The validator's verdict on atomic files agrees with RecBole's own loader (issue #30), in both directions.

A differential test: each case is a small ``.inter`` (or ``.item``) file and what it means (its rows, or ``None``
for a file with no one reading, e.g. a row with a field left out). RecBole's ``create_dataset`` (through our
Config, so the RecBole fixes apply) loads it, and "RecBole reads it correctly" means: no exception, the rows
``Dataset._load_feat`` returns are the meant ones (values of the loaded columns, missing values as NaN), and the
(user, item) pairs left after RecBole's filtering are the meant rows that have both ids. ``validate``'s atomic
file check must accept exactly those files, and refuse the others with one line naming the file and the line.

Then RecBole's own test data (``tests/test_data/test/test.inter`` of RecBole 1.2.1 ends with the row
``130\\t121\\t5\\t876250746\\t1``, 5 fields under a 4-column header, and no final newline): a file of that shape
passes the validator and trains BPR through ``objective_function``. ``RECBOLE_SRC`` (a RecBole 1.2.1 source
checkout: its test data is in no installable package) runs the same on the real files;
``bench/recbole_model_tests.py`` runs all of RecBole's ``test_model_auto.py`` models that way.
"""
import math
import os
import sys

import numpy as np
import pytest
from recbole.data.dataset import Dataset

from recbole_llm.config import Config
from recbole_llm.errors import ConfigError
from recbole_llm.utils import create_dataset
from recbole_llm.validate import check_atomic_files, validate

H = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ROWS = "1\t1\t5\t1\n1\t2\t4\t2\n2\t2\t3\t3\n"
MEANT = [["1", "1", "5", "1"], ["1", "2", "4", "2"], ["2", "2", "3", "3"]]
ALL = {"load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"]}}  # BPR's default: user_id, item_id
ITEM_H = "item_id:token\tvec:float_seq\ttitle:token_seq\n"
ITEM_ROWS = "1\t0.5 1.5\tA b\n2\t2\tC\n"
ITEM_MEANT = [["1", "0.5 1.5", "A b"], ["2", "2", "C"]]
WITH_ITEM = {"load_col": {"inter": ["user_id", "item_id"], "item": ["item_id", "vec", "title"]}}
BOM = "\ufeff"

# (id, .inter text, options, the .inter's meant rows or None, accepted by RecBole and so by the validator)
# + optional .item text and its meant rows. RecBole's verdict, as measured, in the comment.
CASES = [
    ("plain", H + ROWS, ALL, MEANT, True),
    ("trailing-separator", H + "1\t1\t5\t1\n1\t2\t4\t2\t\n2\t2\t3\t3\t\n", ALL, MEANT, True),
    # pandas reads the first row's extra (empty) field as a row index: every column shifts by one
    ("trailing-separator-every-row", H + "".join(r + "\t\n" for r in ROWS.splitlines()), ALL, MEANT, False),
    # RecBole's own tests/test_data/test/test.inter: 5 fields on its last row, no final newline
    ("extra-field-last-row", H + ROWS + "3\t1\t5\t4\t1", ALL, MEANT + [["3", "1", "5", "4"]], True),
    ("extra-field-first-row", H + "1\t1\t5\t1\t9\n1\t2\t4\t2\n2\t2\t3\t3\n", ALL, MEANT, False),  # shifted
    # a second row with twice the header's fields: pandas reads the first row as index names (crash)
    ("second-row-twice-the-fields", H + "1\t1\t5\t1\n1\t2\t4\t2\tx\ty\tz\tw\n2\t2\t3\t3\n", ALL, MEANT, False),
    ("blank-trailing-lines", H + ROWS + "\n\n\n", ALL, MEANT, True),
    ("blank-and-white-space-lines", H + "1\t1\t5\t1\n\n  \n1\t2\t4\t2\n2\t2\t3\t3\n", ALL, MEANT, True),
    ("crlf", (H + ROWS).replace("\n", "\r\n"), ALL, MEANT, True),
    ("cr-only", (H + ROWS).replace("\n", "\r"), ALL, MEANT, True),
    ("no-final-newline", H + ROWS[:-1], ALL, MEANT, True),
    ("utf8-bom", BOM + H + ROWS, ALL, MEANT, False),  # RecBole's column is '\ufeffuser_id': KeyError
    ("utf8-bom-utf-8-sig", BOM + H + ROWS, dict(ALL, encoding="utf-8-sig"), MEANT, True),
    ("junk-in-column-not-loaded", H + "1\t1\tfive\tx\n1\t2\t4\t2\n2\t2\t3\t3\n", {}, MEANT, True),
    ("stray-quote", H + '1\t"1\t5\t1\n1\t2\t4\t2\n2\t2\t3\t3\n', ALL, None, False),  # quote never closed
    # two stray quotes pair up over a line end: RecBole reads 2 rows, the first with item '1\t5\t1\n1\t2'
    ("stray-quotes-over-lines", H + '1\t"1\t5\t1\n1\t2"\t4\t2\n2\t2\t3\t3\n', ALL, None, False),
    ("quote-inside-a-field", H + '1\t1"\t5\t1\n1\t2\t4\t2\n', ALL, [["1", '1"', "5", "1"], MEANT[1]], True),
    ("quoted-field", H + '1\t"a\tb"\t5\t1\n1\t2\t4\t2\n', ALL, [["1", "a\tb", "5", "1"], MEANT[1]], True),
    ("text-after-closing-quote", H + '1\t"a"b\t5\t1\n1\t2\t4\t2\n', ALL, None, False),  # ParserError
    # a row with a field left out: which one is unknown (here the rating); pandas pads the end with NaN
    ("too-few-fields", H + "1\t1\t5\t1\n1\t2\t2\n", ALL, [MEANT[0], ["1", "2", "", "2"]], False),
    ("too-few-fields-loaded-columns-first", H + "1\t1\t5\t1\n1\t4\t2\n", {},  # the item left out
     [MEANT[0], ["1", "", "4", "2"]], False),
    ("float-not-a-number", H + "1\t1\tfive\t1\n1\t2\t4\t2\n", ALL, None, False),  # ValueError
    ("float-white-space-only", H + "1\t1\t \t1\n1\t2\t4\t2\n", ALL, None, False),  # ValueError
    ("float-empty", H + "1\t1\t\t1\n1\t2\t4\t2\n", ALL, [["1", "1", "", "1"], MEANT[1]], True),  # NaN
    ("float-NA", H + "1\t1\tNA\t1\n1\t2\t4\t2\n", ALL, [["1", "1", "", "1"], MEANT[1]], True),  # NaN
    ("float-spaces-around", H + "1\t1\t 5 \t1\n1\t2\t4\t2\n", ALL, [MEANT[0], MEANT[1]], True),
    ("float-True-among-numbers", H + "1\t1\tTrue\t1\n1\t2\t4\t2\n", ALL, None, False),  # ValueError
    # RecBole 1.2.1 drops the wrong row here (recbole_llm.compat._filter_nan_user_or_item drops the right one)
    ("no-user-then-no-item", H + "\t1\t5\t1\n1\t2\t4\t2\n1\t\t4\t2\n2\t2\t3\t3\n", ALL,
     [["", "1", "5", "1"], MEANT[1], ["1", "", "4", "2"], MEANT[2]], True),
    ("no-item-id-at-all", H + "1\t\t5\t1\n2\t\t4\t2\n", ALL, [["1", "", "5", "1"], ["2", "", "4", "2"]], False),
    ("header-trailing-separator", H[:-1] + "\t\n" + ROWS, ALL, None, False),  # ValueError
    ("header-unknown-type", H.replace("rating:float", "rating:int") + ROWS, ALL, None, False),  # ValueError
    ("header-only", H, ALL, None, False),
    ("comma-separator-quoted", (H + ROWS).replace("\t", ",") + '3,"a,b",1,4\n', dict(ALL, field_separator=","),
     MEANT + [["3", "a,b", "1", "4"]], True),
    ("two-character-separator-trailing", (H + ROWS).replace("\t", "::").replace("2::2::3::3", "2::2::3::3::"),
     dict(ALL, field_separator="::"), MEANT, True),
    ("item-trailing-separator", H + ROWS, WITH_ITEM, MEANT, True, ITEM_H + "1\t0.5 1.5\tA b\n2\t2\tC\t\n",
     ITEM_MEANT),
    ("item-float-seq-not-a-number", H + ROWS, WITH_ITEM, MEANT, False, ITEM_H + "1\t0.5 x\tA b\n2\t2\tC\n", None),
    ("item-float-seq-empty", H + ROWS, WITH_ITEM, MEANT, True, ITEM_H + "1\t\tA b\n2\t2\tC\n",
     [["1", "", "A b"], ITEM_MEANT[1]]),
    ("item-bom", H + ROWS, WITH_ITEM, MEANT, False, BOM + ITEM_H + ITEM_ROWS, ITEM_MEANT),
]


def _write(folder, inter, item=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tiny.inter"), "w", encoding="utf-8", newline="") as f:
        f.write(inter)
    if item is not None:
        with open(os.path.join(folder, "tiny.item"), "w", encoding="utf-8", newline="") as f:
            f.write(item)


def _config(root, options):
    config = {"data_path": str(root), "checkpoint_dir": os.path.join(str(root), "saved"), "show_progress": False,
              "log_wandb": False, "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)"}
    config.update(options)
    return Config("BPR", "tiny", config_dict=config)


def _same(got, meant, ftype):
    """A loaded value against the meant string ("" = missing)."""
    if ftype == "float_seq":
        return list(got) == [float(x) for x in meant.split()]
    if ftype == "token_seq":
        return list(got) == meant.split()
    if meant == "":
        return isinstance(got, float) and math.isnan(got)
    return got == (float(meant) if ftype == "float" else meant)


def _rows_match(df, meant, header):
    """The loaded columns of ``df`` (``_load_feat``'s frame) hold the ``meant`` rows."""
    if df is None or len(df) != len(meant):
        return False
    columns = [column.split(":") for column in header.rstrip("\r\n").split("\t")]
    return all(_same(df[name].iloc[r], row[i], ftype) for i, (name, ftype) in enumerate(columns)
               if name in df.columns for r, row in enumerate(meant))


def recbole_verdict(config, meant, item_meant, monkeypatch):
    """'correct', 'misread' or 'crash: <exception>' for RecBole's own ``create_dataset`` on ``config``."""
    loaded = {}
    load_feat = Dataset._load_feat

    def capture(self, filepath, source):
        df = load_feat(self, filepath, source)
        loaded[os.path.splitext(filepath)[1]] = None if df is None else df.copy()
        return df

    monkeypatch.setattr(Dataset, "_load_feat", capture)
    try:
        dataset = create_dataset(config)
    except Exception as e:  # noqa: BLE001 - any failure of RecBole's loading is the verdict
        return f"crash: {type(e).__name__}"
    if meant is None or not _rows_match(loaded.get(".inter"), meant, _header(config, "inter")):
        return "misread"
    if item_meant is not None and not _rows_match(loaded.get(".item"), item_meant, _header(config, "item")):
        return "misread"
    # after RecBole's filtering: the meant rows that have both ids, as (user, item) tokens
    inter = dataset.inter_feat
    pairs = sorted(zip(dataset.id2token("user_id", np.asarray(inter["user_id"])).tolist(),
                       dataset.id2token("item_id", np.asarray(inter["item_id"])).tolist()))
    return "correct" if pairs == sorted((r[0], r[1]) for r in meant if r[0] and r[1]) else "misread"


def _header(config, source):
    path = os.path.join(config["data_path"], f"tiny.{source}")
    with open(path, encoding="utf-8-sig") as f:
        return f.readline().replace(config["field_separator"], "\t")


def validator_verdict(config):
    try:
        warnings = check_atomic_files(config)
    except ConfigError as e:
        return "refused", str(e)
    return "accepted", warnings


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_validator_accepts_exactly_what_recbole_reads_correctly(case, tmp_path, monkeypatch):
    name, inter, options, meant, accepted = case[:5]
    item, item_meant = case[5:] if len(case) > 5 else (None, None)
    _write(str(tmp_path / "tiny"), inter, item)
    monkeypatch.setattr(sys, "argv", ["x"])
    config = _config(tmp_path, options)
    verdict, detail = validator_verdict(config)
    recbole = recbole_verdict(config, meant, item_meant, monkeypatch)
    assert (recbole == "correct") == accepted, f"{name}: RecBole {recbole}"
    assert (verdict == "accepted") == accepted, f"{name}: RecBole {recbole}, validator {verdict}: {detail}"
    if verdict == "refused":
        assert "\n" not in detail and "tiny." in detail, detail


# ----- RecBole's own test data ------------------------------------------------------------------------------
def _recbole_test_inter(folder, users=20, items=15):
    """A file shaped like RecBole 1.2.1's ``tests/test_data/test/test.inter``: its last row has a fifth field
    (``130\\t121\\t5\\t876250746\\t1``) and no final newline."""
    os.makedirs(folder, exist_ok=True)
    lines = [f"{u}\t{i}\t{1 + (u * i) % 5}\t{874965758 + 97 * k}" for k, (u, i) in
             enumerate((u, i) for u in range(1, users + 1) for i in range(1, items + 1))]
    with open(os.path.join(folder, "test.inter"), "w", newline="") as f:
        f.write(H + "\n".join(lines) + "\n130\t121\t5\t876250746\t1")


def test_recbole_test_inter_shape_passes_and_trains_bpr(tmp_path, monkeypatch):
    from recbole_llm.quick_start import objective_function

    _recbole_test_inter(str(tmp_path / "data" / "test"))
    monkeypatch.setattr(sys, "argv", ["x"])
    options = {"model": "BPR", "dataset": "test", "data_path": str(tmp_path / "data"),
               "checkpoint_dir": str(tmp_path / "saved"), "epochs": 1, "show_progress": False, "log_wandb": False,
               "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)"}
    (warning,) = validate(Config(config_dict=options))
    assert "test.inter, line 302: more fields than the header's 4: RecBole reads the first 4" in warning, warning
    result = objective_function(options, saved=False)
    assert result["model"] == "BPR" and "recall@10" in result["test_result"], result


@pytest.mark.skipif(not os.environ.get("RECBOLE_SRC"), reason="RECBOLE_SRC (a RecBole 1.2.1 checkout) not set")
def test_recbole_own_test_data_trains_bpr(tmp_path, monkeypatch):
    """RecBole's ``tests/test_data`` with its ``tests/model/test_model.yaml``, as its own model tests run BPR."""
    from recbole_llm.quick_start import objective_function

    src = os.environ["RECBOLE_SRC"]
    monkeypatch.setattr(sys, "argv", ["x"])
    options = {"model": "BPR", "dataset": "test", "data_path": os.path.join(src, "tests", "test_data"),
               "checkpoint_dir": str(tmp_path / "saved"), "epochs": 1, "show_progress": False, "log_wandb": False}
    config_files = [os.path.join(src, "tests", "model", "test_model.yaml")]
    result = objective_function(options, config_files, saved=False)
    assert result["model"] == "BPR", result


def test_sasrec_with_bpr_loss_samples_negatives_as_in_recbole(monkeypatch):
    """Our SASRec.yaml drops negative sampling for the CE loss only: RecBole's test_sasrec_with_BPR_loss_* run."""
    monkeypatch.setattr(sys, "argv", ["x"])
    assert Config("SASRec", "ml-100k")["train_neg_sample_args"]["distribution"] == "none"
    bpr = Config("SASRec", "ml-100k", config_dict={"loss_type": "BPR"})["train_neg_sample_args"]
    assert bpr["distribution"] == "uniform" and bpr["sample_num"] == 1, bpr
