"""Converters from the raw public datasets the papers use into RecBole atomic files, with item text.

Each converter is a command::

    python -m dataset_converters.movielens  --input RAW_DIR --output DATA_DIR [--preset glta|sellarec]
    python -m dataset_converters.amazon     --input RAW_DIR --output DATA_DIR [--preset aligntokenrec|glta|sellarec]
    python -m dataset_converters.goodreads  --input RAW_DIR --output DATA_DIR [--preset glta]

and writes ``DATA_DIR/<name>/<name>.inter|.item|.user`` (RecBole's layout: ``data_path`` is ``DATA_DIR``,
the dataset name is the folder name). The matching ``properties/dataset/<name>.yaml`` ships with the package.
Shared pieces (atomic output folder, atomic-file writer and reader, streaming line reader, k-core, text
clean-up, errors) live in :mod:`dataset_converters.common`.
"""
from dataset_converters.common import ConversionError, read_atomic_file

__all__ = ["ConversionError", "read_atomic_file"]
