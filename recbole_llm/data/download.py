"""A dataset missing here that RecBole can download (its ``properties/dataset/url.yaml``: ml-1m, ml-20m, the
Amazon sets, Yelp, ...) is downloaded before validation, as RecBole's ``Dataset._download`` would do later.

RecBole's steps and layout: the zip's top level holds ``<zip name>.inter|.item|.user``, unpacked into
``data_path`` (``<data_path>/<dataset>``) and renamed to ``<dataset>.*`` by RecBole's ``rename_atomic_files``;
``extract_zip`` is RecBole's too. The byte loop is ours (with a tqdm bar like RecBole's): RecBole's
``download_url`` keeps a body cut off early as if complete, turns Ctrl-C into a ``RuntimeError``, needs a
Content-Length header, and its ``decide_download`` fetches the URL once more and asks on stdin (blocking a
run without a terminal) above 1 GB.

Atomic: the zip is written and unpacked in a temporary folder next to ``data_path`` and renamed into place
only when complete; on any error (no network, HTTP 404, a cut-off body, Ctrl-C) nothing is left in
``data_path`` and the next run downloads again. Above 1 GB a run asks on a terminal and, without one,
stops with one line naming ``--download_confirm=True``.
"""
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile

import recbole
import yaml
from recbole.utils.url import extract_zip, rename_atomic_files

from recbole_llm.errors import ConfigError

URL_FILE = os.path.join(os.path.dirname(recbole.__file__), "properties", "dataset", "url.yaml")
CONFIRM_BYTES = 1 << 30  # RecBole's decide_download asks above 1 GB
TIMEOUT_S = 60  # a connection that answers nothing for this long fails the download
CHUNK = 1 << 20


def dataset_url(name):
    """The URL RecBole downloads dataset ``name`` from, or None if it is not on RecBole's list."""
    with open(URL_FILE, encoding="utf-8") as f:
        return (yaml.safe_load(f) or {}).get(name)


def is_missing(path):
    """No folder, or an empty one: RecBole would download. A folder with files is the user's own data."""
    return not os.path.isdir(path) or not os.listdir(path)


def prepare_dataset(config):
    """Download ``config['dataset']`` into ``config['data_path']`` if it is missing and on RecBole's list.

    A dataset that is present, or that RecBole cannot download, is left to ``validate`` (its not-found line
    names the converters). Multi-process runs: the local rank 0 downloads, the other ranks wait for it and
    raise the same ``ConfigError`` if it fails.
    """
    import torch.distributed as dist

    if config["single_spec"] is not False or not (dist.is_available() and dist.is_initialized()):
        _download_if_missing(config)
        return
    error = None
    if config["local_rank"] == 0:
        try:
            _download_if_missing(config)
        except ConfigError as e:
            error = str(e)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    error = next((e for e in errors if e), None)
    if error:
        raise ConfigError(error)


def _download_if_missing(config):
    path, name = config["data_path"], config["dataset"]
    if not is_missing(path):
        return
    url = dataset_url(name)
    if url is not None:
        download(name, url, path, confirm=bool(config["download_confirm"]),
                 show_progress=config["show_progress"] is not False)


def download(name, url, target, confirm=False, show_progress=True):
    """Download ``url`` (a zip in RecBole's layout) and unpack it as folder ``target``, atomically."""
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    by_hand = (f"download {url} yourself and unzip it into {target} "
               f"(files named {name}.inter, {name}.item, {name}.user)")
    created = _missing_ancestors(parent)
    tmp = None
    done = False
    try:
        try:
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{name}.download-", dir=parent)
        except OSError as e:
            raise ConfigError(f"dataset '{name}': cannot download into {parent}: {e.strerror or e}") from None
        try:
            response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            raise ConfigError(f"dataset '{name}': download failed: {url} answered HTTP {e.code} {e.reason}; "
                              f"{by_hand}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise ConfigError(f"dataset '{name}': download failed ({reason}): no network? {by_hand}") from None
        with response:
            size = _content_length(response)
            if size is not None and size > CONFIRM_BYTES and not confirm:
                _confirm(name, url, target, size, by_hand)
            print(f"recbole-llm: downloading dataset '{name}' from {url}"
                  f"{f' ({size / 2 ** 20:.1f} MiB)' if size is not None else ''} into {target}",
                  file=sys.stderr, flush=True)
            archive = os.path.join(tmp, os.path.basename(url.split("?")[0]) or f"{name}.zip")
            _copy(response, archive, size, name, url, show_progress)
        unpacked = os.path.join(tmp, "unpacked")
        try:
            extract_zip(archive, unpacked)  # RecBole's
        except zipfile.BadZipFile:
            raise ConfigError(f"dataset '{name}': {url} is not a zip archive; {by_hand}") from None
        rename_atomic_files(unpacked, os.path.splitext(os.path.basename(archive))[0], name)  # RecBole's
        if not _has_inter(unpacked, name):
            raise ConfigError(f"dataset '{name}': {url} has no .inter file at its top level "
                              f"(RecBole's layout: <zip name>.inter, ...); {by_hand}")
        _move_into_place(unpacked, target)
        done = True
        print(f"recbole-llm: dataset '{name}' is in {target}", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            for folder in created:  # deepest first: only the folders this call made, and only if empty
                try:
                    os.rmdir(folder)
                except OSError:
                    break


def _missing_ancestors(folder):
    """The folders ``os.makedirs(folder)`` would create, deepest first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def _content_length(response):
    try:
        return int(response.headers["Content-Length"])
    except (TypeError, ValueError):
        return None


def _confirm(name, url, target, size, by_hand):
    """Above 1 GB: ask on a terminal as RecBole does; without one, never block: say what to pass."""
    gb = size / 2 ** 30
    stdin = sys.stdin
    if stdin is None or not hasattr(stdin, "isatty") or not stdin.isatty():
        raise ConfigError(f"dataset '{name}': {url} is {gb:.2f} GB (over 1 GB) and this run cannot ask: "
                          f"pass --download_confirm=True to download it, or {by_hand}")
    try:
        answer = input(f"recbole-llm: dataset '{name}' will download {gb:.2f} GB from {url} into {target}. "
                       "Proceed? (y/N) ")
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise ConfigError(f"dataset '{name}': download of {gb:.2f} GB declined "
                          "(--download_confirm=True downloads without asking)")


def _copy(response, archive, size, name, url, show_progress):
    """The body into ``archive`` with a progress bar; a body shorter than its Content-Length is an error."""
    from tqdm import tqdm

    received = 0
    with open(archive, "wb") as f, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                        desc=f"Downloading {name}", disable=not show_progress) as bar:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise ConfigError(f"dataset '{name}': download from {url} broke off after {received} bytes "
                                  f"({type(e).__name__}: {e}); nothing was kept, the next run starts again") from None
            if not chunk:
                break
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if size is not None and received != size:
        raise ConfigError(f"dataset '{name}': download from {url} was cut off at {received} of {size} bytes; "
                          "nothing was kept, the next run starts again")


def _move_into_place(unpacked, target):
    """Rename the complete folder to ``target`` (an empty ``target`` is replaced). Another process that
    finished the same download first is fine."""
    if os.path.isdir(target) and not os.listdir(target):
        try:
            os.rmdir(target)
        except OSError:
            pass
    try:
        os.replace(unpacked, target)
    except OSError as e:
        if _has_inter(target, os.path.basename(target)):
            return
        raise ConfigError(f"cannot move the downloaded dataset into {target}: {e.strerror or e}") from None


def _has_inter(folder, name):
    """``<name>.inter`` or benchmark files ``<name>.<part>.inter`` in ``folder``."""
    return os.path.isdir(folder) and any(f.startswith(name + ".") and f.endswith(".inter")
                                         for f in os.listdir(folder))
