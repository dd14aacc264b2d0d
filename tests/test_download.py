"""A dataset missing here that RecBole can download is downloaded before validation (``recbole_llm.data.download``).

Offline: a small zip in RecBole's layout (``<zip name>.inter|.item|.user`` at its top level) is served by an
HTTP server on 127.0.0.1 in a thread (or read from a ``file://`` URL), and RecBole's URL table is replaced so
that ``ml-1m`` points to it. Checked: the whole run (download -> validate -> BPR training), a body cut off
early (nothing left, the next run downloads again), HTTP 404 and no network (one line with the URL and the
target folder), the > 1 GB confirmation in a run without a terminal (one line naming the option, stdin
untouched), that an unknown dataset keeps the converters line, and multi-process runs (downloaded once before
spawning; torchrun-style ranks wait for local rank 0 and share its error). Our presets' fields are checked
against the headers RecBole documents for its processed ml-1m files.
"""
import http.server
import io
import os
import socket
import sys
import threading
import zipfile

import pytest
import yaml

from recbole_llm.config import Config
from recbole_llm.data import download
from recbole_llm.errors import ConfigError
from recbole_llm.quick_start import main, run
from recbole_llm.registry import PROPERTIES_DIR
from recbole_llm.validate import validate
from tests.conftest import write_tiny_dataset
from tests.test_bad_input import BASE


# RecBole's processed ml-1m headers (RecBole docs, user_guide/data/atomic_files.rst; RecSysDatasets'
# conversion_tools ML1MDataset writes the same names).
ML1M_HEADERS = {
    "inter": ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
    "item": ["item_id:token", "movie_title:token_seq", "release_year:token", "genre:token_seq"],
    "user": ["user_id:token", "age:token", "gender:token", "occupation:token", "zip_code:token"],
}


def recbole_zip(stem="ml-1m", rows=None):
    """A zip as RecBole publishes them: ``<stem>.inter|.item|.user`` at the top level, ml-1m's headers."""
    tiny = rows or _tiny_rows()
    n_items, n_users = 60, 40
    genres = ["Comedy", "Horror", "Documentary"]
    files = {
        "inter": tiny,
        "item": [f"{i}\tMovie number {i}\t{1990 + i % 10}\t{genres[i % 3]} Drama" for i in range(1, n_items + 1)],
        "user": [f"{u}\t{18 + u % 40}\t{'MF'[u % 2]}\t{u % 20}\t{10000 + u}" for u in range(1, n_users + 1)],
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for suffix, lines in files.items():
            z.writestr(f"{stem}.{suffix}", "\t".join(ML1M_HEADERS[suffix]) + "\n" + "\n".join(lines) + "\n")
    return buffer.getvalue()


def _tiny_rows():
    folder = write_tiny_dataset(os.path.join(os.getcwd(), "_rows"), name="rows", item_text=False)
    with open(os.path.join(folder, "rows", "rows.inter")) as f:
        return f.read().splitlines()[1:]


class Server:
    """Routes: path -> (kind, body). kind ``ok`` serves the body, ``cut`` announces it all and sends half,
    ``big`` announces 2 GB and sends nothing; any other path answers 404. ``hits`` counts GET requests."""

    def __init__(self):
        self.routes, self.hits = {}, []
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hold a handler thread

            def do_GET(self):
                hits.append(self.path)
                kind, body = routes.get(self.path, ("404", b""))
                if kind == "404":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(2 ** 31 if kind == "big" else len(body)))
                self.end_headers()
                if kind == "ok":
                    self.wfile.write(body)
                elif kind == "cut":
                    self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def serve(self, path, kind="ok", body=b""):
        self.routes[path] = (kind, body)
        return self.url + path

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def urls(monkeypatch):
    """RecBole's URL table, replaced: ``urls[name] = url``."""
    table = {}
    monkeypatch.setattr(download, "dataset_url", table.get)
    monkeypatch.setattr(download, "TIMEOUT_S", 10)
    return table


def _tree(root):
    return {os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """``cli(*args)`` -> (exit code, stderr lines, new paths) for ``run_recbole_llm.py --model=BPR --dataset=ml-1m``
    with data_path ``tmp_path/data`` (absent at first)."""
    (tmp_path / "base.yaml").write_text(BASE.format(data=tmp_path / "data", saved=tmp_path / "saved"))

    def call(*args):
        given = {a.split("=")[0] for a in args}
        argv = [d for d in ("--model=BPR", "--dataset=ml-1m") if d.split("=")[0] not in given]
        argv += [f"--config_files={tmp_path / 'base.yaml'}", *args]
        before = _tree(tmp_path)
        monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py"] + argv)  # RecBole reads --key=value from here
        code = main(argv)
        return code, capsys.readouterr().err.strip().splitlines(), _tree(tmp_path) - before

    return call


def test_recbole_url_table_is_read():
    assert download.dataset_url("ml-1m") == ("https://recbole.s3-accelerate.amazonaws.com/ProcessedDatasets/"
                                             "MovieLens/ml-1m.zip")
    assert download.dataset_url("amazon-video-games-18").endswith("/Amazon2018/Amazon_Video_Games.zip")
    assert download.dataset_url("nope") is None


def test_run_downloads_validates_and_trains(cli, server, urls, tmp_path):
    """run_recbole_llm.py --model=BPR --dataset=ml-1m on an empty data_path: downloaded once, then trained."""
    urls["ml-1m"] = server.serve("/ProcessedDatasets/MovieLens/ml-1m.zip", body=recbole_zip())
    code, err, _ = cli()
    assert code == 0, err
    folder = tmp_path / "data" / "ml-1m"
    assert sorted(os.listdir(folder)) == ["ml-1m.inter", "ml-1m.item", "ml-1m.user"]
    assert os.listdir(tmp_path / "data") == ["ml-1m"]  # no temporary folder or zip left
    assert (folder / "ml-1m.item").read_text().splitlines()[0] == "\t".join(ML1M_HEADERS["item"])
    assert any("downloading dataset 'ml-1m'" in line for line in err)
    assert server.hits == ["/ProcessedDatasets/MovieLens/ml-1m.zip"]
    assert (tmp_path / "saved").is_dir()  # it trained and saved a checkpoint

    code, err, _ = cli()  # present now: no second download
    assert code == 0, err
    assert len(server.hits) == 1

    # Our ml-1m preset fits RecBole's files: an LLM model's item_text_fields and load_col validate on them.
    config = Config("GLTA", "ml-1m", config_dict={"data_path": str(tmp_path / "data"), "llm_path": "tiny-random",
                                                   "checkpoint_dir": str(tmp_path / "saved")})
    assert config["item_text_fields"] == ["movie_title", "release_year", "genre"]
    validate(config)


def test_cut_off_download_leaves_nothing_and_next_run_downloads(cli, server, urls, tmp_path):
    body = recbole_zip()
    urls["ml-1m"] = server.serve("/cut/ml-1m.zip", "cut", body)
    code, err, new = cli()
    assert code == 2
    assert err[-1].startswith("recbole-llm: error: dataset 'ml-1m': download from ")
    assert f"cut off at {len(body) // 2} of {len(body)} bytes" in err[-1]
    assert not (tmp_path / "data").exists() and new == set()  # not even the data folder it made

    urls["ml-1m"] = server.serve("/ok/ml-1m.zip", body=body)
    code, err, _ = cli()
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "data" / "ml-1m")) == ["ml-1m.inter", "ml-1m.item", "ml-1m.user"]


def _closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-1m.zip"  # nothing listens there: connection refused, as offline


@pytest.mark.parametrize("kind, expected", [
    ("404", ["download failed: {url} answered HTTP 404", "download {url} yourself and unzip it into {target} "]),
    ("offline", ["download failed (", "no network? download {url} yourself and unzip it into {target} "]),
    ("not-zip", ["{url} is not a zip archive; download {url} yourself"]),
    ("no-inter", ["{url} has no .inter file at its top level"]),
])
def test_failed_download_is_one_line_naming_url_and_folder(kind, expected, cli, server, urls, tmp_path):
    if kind == "offline":
        url = _closed_port_url()
    elif kind == "not-zip":
        url = server.serve("/ml-1m.zip", body=b"<html>an error page</html>")
    elif kind == "no-inter":
        url = server.serve("/ml-1m.zip", body=recbole_zip(stem="other-name"))
    else:
        url = server.url + "/missing/ml-1m.zip"
    urls["ml-1m"] = url
    code, err, new = cli()
    assert code == 2
    target = str(tmp_path / "data" / "ml-1m")
    line = [line for line in err if line.startswith("recbole-llm: error:")]
    assert len(line) == 1 and err[-1] == line[0], err
    assert line[0].startswith("recbole-llm: error: dataset 'ml-1m': ")
    for fragment in expected:
        assert fragment.format(url=url, target=target) in line[0], line[0]
    if kind in ("404", "offline"):
        assert err == line  # nothing else printed: no download started
    assert new == set()


def test_over_1gb_without_a_terminal_names_the_option_and_never_reads_stdin(cli, server, urls, monkeypatch, tmp_path):
    urls["ml-1m"] = server.serve("/big/ml-1m.zip", "big")
    stdin = io.StringIO("y\n")  # not a terminal: reading it would "answer" yes
    monkeypatch.setattr(sys, "stdin", stdin)
    code, err, new = cli()
    assert code == 2 and len(err) == 1, err
    assert "is 2.00 GB (over 1 GB)" in err[0] and "pass --download_confirm=True" in err[0]
    assert str(tmp_path / "data" / "ml-1m") in err[0]
    assert stdin.tell() == 0 and new == set()

    code, err, new = cli("--download_confirm=True")  # goes ahead (the test server then sends nothing)
    assert code == 2
    assert "cut off at 0 of 2147483648 bytes" in err[-1]
    assert new == set()


def test_over_1gb_on_a_terminal_asks(cli, server, urls, monkeypatch):
    urls["ml-1m"] = server.serve("/big/ml-1m.zip", "big")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    questions = []
    monkeypatch.setattr("builtins.input", lambda prompt: questions.append(prompt) or "n")
    code, err, new = cli()
    assert code == 2 and "download of 2.00 GB declined" in err[-1]
    assert len(questions) == 1 and "Proceed? (y/N)" in questions[0]
    assert new == set()


def test_unknown_dataset_keeps_the_converters_line(cli, server, urls):
    code, err, new = cli("--dataset=nope")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("recbole-llm: error: dataset 'nope' not found: no .inter file in ")
    assert "dataset_converters" in err[0]
    assert new == set() and server.hits == []


def test_a_folder_with_files_is_not_replaced(cli, server, urls, tmp_path):
    """A known name whose folder holds files but no .inter is the user's data: no download, the usual line."""
    urls["ml-1m"] = server.serve("/ml-1m.zip", body=recbole_zip())
    (tmp_path / "data" / "ml-1m").mkdir(parents=True)
    (tmp_path / "data" / "ml-1m" / "ml-1m.item").write_text("item_id:token\n1\n")
    code, err, _ = cli()
    assert code == 2 and "dataset 'ml-1m' not found: no .inter file" in err[-1]
    assert server.hits == []


def test_file_url_and_renaming_as_recbole(tmp_path):
    """A file:// URL works too; ``Amazon_Video_Games.*`` become ``amazon-video-games-18.*`` (RecBole's renaming)."""
    archive = tmp_path / "Amazon_Video_Games.zip"
    archive.write_bytes(recbole_zip(stem="Amazon_Video_Games"))
    target = tmp_path / "dataset" / "amazon-video-games-18"
    target.mkdir(parents=True)  # an empty folder counts as missing (RecBole would not download there: we do)
    download.download("amazon-video-games-18", archive.as_uri(), str(target), show_progress=False)
    assert sorted(os.listdir(target)) == [f"amazon-video-games-18.{s}" for s in ("inter", "item", "user")]
    assert os.listdir(tmp_path / "dataset") == ["amazon-video-games-18"]


def test_multi_process_run_downloads_once_before_spawning(server, urls, tmp_path, monkeypatch):
    urls["ml-1m"] = server.serve("/ml-1m.zip", body=recbole_zip())
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    result = run("BPR", "ml-1m", config_dict={
        "data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"), "epochs": 1,
        "use_gpu": False, "show_progress": False, "log_wandb": False, "seed": 2020,
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)"}, nproc=2, port=port)
    assert result is not None and "ndcg@10" in result["test_result"]
    assert server.hits == ["/ml-1m.zip"]  # the spawned ranks found it downloaded


def _rank(rank, port, folder, good_url, bad_url):
    """One of 2 gloo ranks (as under torchrun): prepare_dataset with a good URL, then a bad one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    outcome = []
    for name, url in (("ml-1m", good_url), ("ml-10m", bad_url)):
        download.dataset_url = {name: url}.get
        config = {"single_spec": False, "local_rank": rank, "dataset": name, "show_progress": False,
                  "download_confirm": False, "data_path": os.path.join(folder, name)}
        try:
            download.prepare_dataset(config)
            outcome.append("ok")
        except ConfigError as e:
            outcome.append(str(e))
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(outcome))
    dist.destroy_process_group()


def test_ranks_wait_for_local_rank_0_and_share_its_error(tmp_path):
    """torchrun-style ranks: local rank 0 downloads, rank 1 waits; a failed download fails every rank alike."""
    import torch.multiprocessing as mp

    archive = tmp_path / "ml-1m.zip"
    archive.write_bytes(recbole_zip())
    bad = (tmp_path / "missing.zip").as_uri()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path), archive.as_uri(), bad), nprocs=2, join=True)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == "ok" and "dataset 'ml-10m': download failed" in outcomes[0][1]
    assert sorted(os.listdir(tmp_path / "ml-1m")) == ["ml-1m.inter", "ml-1m.item", "ml-1m.user"]
    assert not (tmp_path / "ml-10m").exists()


# ----- presets against RecBole's processed files -------------------------------------------------------------
def _preset(name):
    with open(os.path.join(PROPERTIES_DIR, "dataset", f"{name}.yaml")) as f:
        text = f.read()
    return text, yaml.safe_load(text)


def test_ml1m_preset_fields_are_in_recboles_processed_files():
    _, preset = _preset("ml-1m")
    names = {source: [h.split(":")[0] for h in header] for source, header in ML1M_HEADERS.items()}
    assert set(preset["item_text_fields"]) <= set(names["item"])
    for source, columns in preset["load_col"].items():
        assert set(columns) <= set(names[source]), source
    for key in ("USER_ID_FIELD", "ITEM_ID_FIELD", "RATING_FIELD", "TIME_FIELD"):
        assert preset[key] in names["inter"]


@pytest.mark.parametrize("name", ["ml-1m-sellarec", "amazon-arts", "amazon-games", "amazon-instruments",
                                  "amazon-grocery-glta", "amazon-book-sellarec", "goodreads-history-glta"])
def test_presets_recbole_cannot_download_name_their_converter(name):
    """Not on RecBole's list (its Amazon / Goodreads files are other selections under other names): the preset
    says which converter output it expects."""
    text, _ = _preset(name)
    assert download.dataset_url(name) is None
    assert "python -m dataset_converters." in text and "--preset" in text
