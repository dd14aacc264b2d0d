"""Item text, read straight from the dataset's ``.item`` atomic file as the exact original strings.

RecBole splits ``token_seq`` fields into tokens and remaps them; we read the columns named in
``item_text_fields`` from the file instead and key them by RecBole's internal item ids.
"""
import csv
import os

from recbole_llm.errors import ConfigError


def item_text_file(config):
    return os.path.join(config["data_path"], f"{config['dataset']}.item")


def load_item_texts(config, dataset, fields=None, separator=None):
    """A list indexed by internal item id: the item's text fields joined by ``item_text_separator``.

    Index 0 (RecBole's padding item) and items missing from the file get an empty string.
    """
    fields = list(fields or config["item_text_fields"] or [])
    separator = config["item_text_separator"] if separator is None else separator
    path = item_text_file(config)
    if not fields:
        raise ConfigError(f"{config['model']} needs item text: set item_text_fields (fields of {path})")
    if not os.path.isfile(path):
        raise ConfigError(f"{config['model']} needs item text, but {path} does not exist")
    sep = config["field_separator"] or "\t"
    encoding = config["encoding"] or "utf-8"
    iid_field = dataset.iid_field
    texts = [""] * dataset.item_num
    token2id = dataset.field2token_id[iid_field]
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.reader(f, delimiter=sep)  # quoted values parse as RecBole (pandas) reads them
        header = [column.split(":")[0] for column in next(reader)]
        missing = [name for name in [iid_field] + fields if name not in header]
        if missing:
            raise ConfigError(f"item_text_fields: {path} has no field {', '.join(missing)} "
                              f"(fields: {', '.join(header)})")
        iid_col = header.index(iid_field)
        cols = [header.index(name) for name in fields]
        for row in reader:
            if len(row) <= max(cols + [iid_col]):
                continue
            internal = token2id.get(row[iid_col])
            if internal is not None:
                texts[internal] = separator.join(row[c].strip() for c in cols if row[c].strip())
    return texts
