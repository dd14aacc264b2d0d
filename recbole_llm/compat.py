"""Every fix recbole 1.2.1 needs on today's stack, applied once (``apply()``), nowhere else.

1. ``torch.load`` defaults to ``weights_only=True`` since torch 2.6, but RecBole checkpoints pickle the
   Config object: RecBole's trainer gets a ``torch`` proxy whose ``load`` defaults to ``weights_only=False``.
2. ``recbole.utils.get_model`` imports every RecBole module, including ``lightgbm``/``xgboost`` ones that
   are not installed: unknown names must give one clear line instead (done in ``recbole_llm.registry``).
3. RecBole's ``Config._init_device`` hard-codes the ``nccl`` backend and ``torch.cuda.set_device``:
   ``recbole_llm.config.Config`` chooses gloo on CPU, nccl on GPU; and RecBole's trainer wraps the model in
   ``DistributedDataParallel(device_ids=[rank])``, which fails for a CPU model: ``device_ids`` only on CUDA.
   Its ``evaluate(load_best_model=True)`` also has every rank read its own ``saved_model_file``, which only
   rank 0 writes (and whose name holds a timestamp taken per rank), with no wait for rank 0 to finish
   writing it: every rank now reads rank 0's file, once rank 0 has saved it.
4. In a multi-process run RecBole's ``evaluate(load_best_model=True)`` has each rank load its own (never written)
   checkpoint name: every rank loads the file rank 0 wrote (broadcast, which also waits for the write).
5. numpy<2, pandas<3, scipy<1.12 and setuptools<81 are pinned in ``pyproject.toml`` (recbole uses
   ``np.float``-era APIs, ``dok_matrix._update`` and ray's ``pkg_resources``); ``check_versions`` says so
   in one line if the environment drifted.
6. ``recbole.trainer.hyper_tuning`` draws exhaustive-search points with ``np.random.RandomState``, which
   hyperopt>=0.2.7 cannot use (it calls ``rng.integers``), and ``plot_hyper`` casts with ``np.str``, which
   numpy 1.24 removed: that module gets a ``numpy`` proxy with ``default_rng`` and ``str``. Scripts that
   build a ``HyperTuning`` call ``apply()`` first (the exhaustive search runs before any Config exists).
7. RecBole's metric registry (``recbole.evaluator.register``: ``metric_types``, ``metric_information``,
   ``metrics_dict``, ``smaller_metrics``) is built once from ``recbole.evaluator.metrics``, so Config rejects
   any other metric: ``register_metric`` adds ours (``recbole_llm.evaluator.metrics``: ``UAUC``), usable in
   ``metrics`` and as ``valid_metric``.
8. RecBole's ``Collector`` passes no user ids to the metrics, and in a multi-process run each rank computes
   every metric on its own shard (with the ``DistributedSampler``'s padding row) before ``_map_reduce``
   averages them: wrong for per-user metrics, approximate for AUC. RecBole's trainer gets
   ``recbole_llm.evaluator.collector.Collector`` (``data.user`` for metrics that need it; padding dropped and
   rows gathered from all ranks before the metrics run), ``evaluate`` tells it which loader it evaluates, and
   ``_map_reduce`` returns the already global result unchanged.
9. RecBole's trainer saves checkpoints with ``torch.save`` straight to the final name: a Ctrl-C, a kill or a
   full disk mid-save leaves a truncated ``.pth`` (and overwrites the previous best one). Its ``torch`` proxy
   (fix 1) saves atomically (``atomic_save``): a temporary file in the same folder, renamed over the target
   once complete; on any failure the temporary file is removed, the previous checkpoint is intact and an
   ``OSError`` becomes one ``WriteError`` line (``cannot write checkpoint PATH: No space left on device``).
   RecBole's own models (BPR, LightGCN, ...) and ours get it alike; the stage cache saves the same way.
10. ``recbole/model/sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)`` when it is
   imported, and the package imports it with every sequential model: once any RecBole sequential model is loaded
   (SASRec as a backbone, ``get_model``), every backward of the process, the LLM's included, runs in anomaly
   mode (a NaN check of every gradient, a traceback kept per op; a SASRec step on ml-100k 1.5x slower here).
   The package is imported here and the mode switched back off (``torch.autograd.set_detect_anomaly(True)``
   after this still turns it on for debugging).
11. ``recbole.utils.ensure_dir`` checks that a folder exists, then creates it: two processes of one run (the ranks
   of ``--nproc``, each building its trainer) can both find it missing, and the second ``makedirs`` raises
   ``FileExistsError``. Every module that imported it gets one that creates with ``exist_ok=True``.
12. ``Dataset._filter_nan_user_or_item`` drops the rows without a user or item id with
   ``feat.drop(feat.index[labels])``: it reads the labels as positions, so once an earlier drop has left a gap
   (an ``.inter`` row without a user id before one without an item id; a duplicate ``.item`` / ``.user`` id,
   dropped at loading, before a row without an id) it drops the wrong rows or raises ``IndexError``. It drops
   them by label (``_filter_nan_user_or_item``), so a file the validator accepts loads as written.
"""
import _thread
import os
import sys
import threading
import types
import warnings

import torch

from recbole_llm.errors import WriteError

_APPLIED = False


def torch_load(f, map_location=None, **kwargs):
    """``torch.load`` for RecBole checkpoints (they pickle a Config object)."""
    kwargs.setdefault("weights_only", False)
    return torch.load(f, map_location=map_location, **kwargs)


def atomic_save(obj, f, **kwargs):
    """``torch.save`` to a path that is replaced only by a complete file (see fix 9)."""
    if not isinstance(f, (str, os.PathLike)):
        return torch.save(obj, f, **kwargs)
    path = os.fspath(f)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "xb") as out:
            torch.save(obj, out, **kwargs)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _interrupted(e):  # Ctrl-C mid-save: torch's zip writer can replace it with its own RuntimeError
            raise KeyboardInterrupt from None
        if isinstance(e, OSError):
            raise WriteError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
        raise


def reraise_swallowed_interrupts():
    """Python ignores an exception raised in a finalizer (a ``__del__``, a generator's clean-up, a weakref
    callback): it prints "Exception ignored in ..." and goes on. A Ctrl-C that lands while one runs would be lost
    and training would go on; this re-delivers it to the main thread, as if pressed again at once."""
    if getattr(sys.unraisablehook, "reraises_interrupts", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            # from a thread, a moment later: raised from here it would be ignored in this hook in turn
            threading.Timer(0.05, _thread.interrupt_main).start()
        else:
            previous(unraisable)

    hook.reraises_interrupts = True
    sys.unraisablehook = hook


def _interrupted(error):
    """Whether ``error`` is, or was raised while handling, a KeyboardInterrupt."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__context__
    return False


class _TorchProxy(types.ModuleType):
    """``torch`` as seen from RecBole's trainer module: checkpoint-friendly ``load``, atomic ``save``."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    load = staticmethod(torch_load)
    save = staticmethod(atomic_save)


def check_versions():
    import numpy
    import pandas
    import scipy

    bad = []
    if int(numpy.__version__.split(".")[0]) >= 2:
        bad.append(f"numpy {numpy.__version__} (need <2)")
    if int(pandas.__version__.split(".")[0]) >= 3:
        bad.append(f"pandas {pandas.__version__} (need <3)")
    major, minor = (int(x) for x in scipy.__version__.split(".")[:2])
    if (major, minor) >= (1, 12):
        bad.append(f"scipy {scipy.__version__} (need <1.12)")
    if bad:
        raise RuntimeError("recbole 1.2.1 does not work with " + ", ".join(bad) +
                           ": reinstall with `pip install -e .` (pyproject.toml pins them)")


def _abstract_trainer_init(self, config, model):
    """``recbole.trainer.AbstractTrainer.__init__`` that also works for multi-process training on CPU
    and for models with nothing to train yet (an LLM model before its stages set what trains)."""
    self.config = config
    self.model = model
    self.distributed_model = None
    if not config["single_spec"] and any(p.requires_grad for p in model.parameters()):
        self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.distributed_model = wrap_distributed(self.model, config)


def wrap_distributed(model, config):
    """DDP over the parameters that train now (an LLM model's change from stage to stage)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [config["local_rank"]] if config["device"].type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _evaluate_rank0_checkpoint(evaluate):
    """Wrap ``Trainer.evaluate`` so that in a multi-process run every rank loads the checkpoint rank 0 wrote."""
    import functools

    @functools.wraps(evaluate)
    def wrapper(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and not self.config["single_spec"] and torch.distributed.is_initialized():
            # A collective: rank 0 reaches it after its last save, so the file is complete when others read it.
            names = [model_file or self.saved_model_file]
            torch.distributed.broadcast_object_list(names, src=0)
            model_file = names[0]
        return evaluate(self, eval_data, load_best_model=load_best_model, model_file=model_file,
                        show_progress=show_progress)

    return wrapper


class _NumpyProxy(types.ModuleType):
    """``numpy`` as seen from RecBole's hyper_tuning module: ``random.RandomState`` is a ``Generator``."""

    str = str

    def __init__(self):
        import numpy

        super().__init__("numpy")
        self._numpy = numpy
        self.random = types.SimpleNamespace(RandomState=numpy.random.default_rng)

    def __getattr__(self, name):
        return getattr(self._numpy, name)


def register_metric(metric_class):
    """Make ``metric_class`` (RecBole's ``AbstractMetric`` style) a metric RecBole's Config and Evaluator know."""
    from recbole.evaluator import register

    name = metric_class.__name__.lower()
    register.metrics_dict[name] = metric_class
    register.metric_information[name] = metric_class.metric_need
    register.metric_types[name] = metric_class.metric_type
    if metric_class.smaller and name not in register.smaller_metrics:
        register.smaller_metrics.append(name)


def _evaluate_begins_collector(evaluate):
    """Wrap ``Trainer.evaluate`` so that our collector knows the loader (its sampler's padding) first."""
    import functools

    @functools.wraps(evaluate)
    def wrapper(self, eval_data, *args, **kwargs):
        if hasattr(self.eval_collector, "begin"):
            self.eval_collector.begin(eval_data)
        return evaluate(self, eval_data, *args, **kwargs)

    return wrapper


def _filter_nan_user_or_item(self):
    """RecBole's ``Dataset._filter_nan_user_or_item``, dropping the rows by label (fix 12)."""
    for field, name in zip([self.uid_field, self.iid_field], ["user", "item"]):
        feat = getattr(self, name + "_feat")
        if feat is not None:
            dropped_feat = feat.index[feat[field].isnull()]
            if len(dropped_feat):
                self.logger.warning(
                    f"In {name}_feat, line {list(dropped_feat + 2)}, {field} do not exist, so they will be removed.")
                feat.drop(dropped_feat, inplace=True)
        if field is not None:
            dropped_inter = self.inter_feat.index[self.inter_feat[field].isnull()]
            if len(dropped_inter):
                self.logger.warning(
                    f"In inter_feat, line {list(dropped_inter + 2)}, {field} do not exist, so they will be removed.")
                self.inter_feat.drop(dropped_inter, inplace=True)


def _ensure_dir(dir_path):
    """RecBole's ``ensure_dir`` without its race between processes (fix 11)."""
    os.makedirs(dir_path, exist_ok=True)


def _map_reduce_unless_gathered(map_reduce):
    """``Trainer._map_reduce`` averages per-rank metrics; a result from gathered rows is already global."""
    import functools

    @functools.wraps(map_reduce)
    def wrapper(self, result, num_sample):
        if getattr(self.eval_collector, "gathered", False):
            return result
        return map_reduce(self, result, num_sample)

    return wrapper


def apply():
    global _APPLIED
    if _APPLIED:
        return
    check_versions()
    import recbole.trainer.trainer as recbole_trainer

    recbole_trainer.torch = _TorchProxy()
    recbole_trainer.AbstractTrainer.__init__ = _abstract_trainer_init
    recbole_trainer.Trainer.evaluate = _evaluate_rank0_checkpoint(recbole_trainer.Trainer.evaluate)
    from recbole_llm.evaluator.collector import Collector
    from recbole_llm.evaluator.metrics import UAUC

    register_metric(UAUC)
    recbole_trainer.Collector = Collector
    recbole_trainer.Trainer.evaluate = _evaluate_begins_collector(recbole_trainer.Trainer.evaluate)
    recbole_trainer.Trainer._map_reduce = _map_reduce_unless_gathered(recbole_trainer.Trainer._map_reduce)
    import recbole.trainer.hyper_tuning as recbole_hyper_tuning

    recbole_hyper_tuning.np = _NumpyProxy()
    anomaly = torch.is_anomaly_enabled()
    import recbole.model.sequential_recommender  # noqa: F401  (sine.py turns anomaly mode on at import)

    torch.autograd.set_detect_anomaly(anomaly)
    from recbole.data.dataset import Dataset

    Dataset._filter_nan_user_or_item = _filter_nan_user_or_item
    import recbole.data.dataset.dataset as recbole_dataset
    import recbole.data.utils as recbole_data_utils
    import recbole.utils as recbole_utils
    import recbole.utils.logger as recbole_logger
    import recbole.utils.utils as recbole_utils_utils

    for module in (recbole_trainer, recbole_dataset, recbole_data_utils, recbole_utils, recbole_logger,
                   recbole_utils_utils):
        module.ensure_dir = _ensure_dir
    # RecBole's dataloaders warn on every epoch about a pandas-era idiom that is harmless here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="recbole")
    _APPLIED = True
