"""``Config``: RecBole's configurator, with our models found first and our YAML overlaid on RecBole's.

Order of the internal (default) configuration, later wins:
  RecBole's overall / model / sample / dataset YAML and its model-type preset (``quick_start_config``:
  sequential, context-aware, knowledge)
  -> our ``properties/overall.yaml`` (keys RecBole does not have: LLM, stage cache)
  -> our ``properties/dataset/<dataset>.yaml``, except the keys the model type's preset sets
  -> our ``properties/model/<Model>.yaml``.
Anything the user passes (config files, config dict, command line) wins over all of these, as in RecBole.

The dataset rule: in RecBole a model type's preset is loaded after the dataset YAML and wins over it, so a
sequential model keeps leave-one-out (``split: {LS: valid_and_test}``, ``order: TO``) and a context-aware model
keeps labeled evaluation on any dataset. Our dataset YAML keeps that place: a key it shares with the preset
(``eval_args``, ``repeatable``, ``train_neg_sample_args``, ``metrics``, ``valid_metric``, ``load_col``, ...)
is dropped, so e.g. ``dataset/ml-1m.yaml``'s random split applies to general models only. A model YAML of ours
(the model's own protocol) and the user's values still override the preset.
"""
import os

import recbole
import torch
import yaml
from recbole.config import Config as RecBoleConfig

from recbole_llm import compat, validate
from recbole_llm.errors import ConfigError
from recbole_llm.registry import PROPERTIES_DIR, get_model

_RECBOLE_PRESETS_DIR = os.path.join(os.path.dirname(recbole.__file__), "properties", "quick_start_config")


class Config(RecBoleConfig):
    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        compat.apply()
        if isinstance(config_file_list, str):
            config_file_list = config_file_list.split()
        for file in config_file_list or []:
            if not os.path.isfile(file):
                raise ConfigError(f"config file not found: {file}")
        super().__init__(model, dataset, config_file_list, config_dict)

    def __setstate__(self, state):
        compat.apply()  # a Config unpickled from a checkpoint skips __init__, which applies the RecBole fixes
        self.__dict__.update(state)

    def _load_config_files(self, file_list):
        """RecBole's, with a YAML error given as one line with the file and line (``validate.load_yaml_file``)."""
        self._option_source = {}
        file_config_dict = {}
        for file in file_list or []:
            loaded = validate.load_yaml_file(file, self.yaml_loader)
            file_config_dict.update(loaded)
            self._option_source.update(dict.fromkeys(loaded, file))
        return file_config_dict

    def _load_cmd_line(self):
        try:
            return super()._load_cmd_line()
        except SyntaxError as e:  # RecBole's message for --key=a --key=b
            raise ConfigError(f"command line: {e.msg}") from None

    def _merge_external_config_dict(self):
        """RecBole's merge, then every value the user gave checked against ``validate.OPTIONS``
        (before RecBole's own checks, which would raise deep in the run or with a traceback)."""
        super()._merge_external_config_dict()

        def where(key):
            if key in self.cmd_config_dict:
                return f"--{key} on the command line"
            if key in self.variable_config_dict:
                return "config_dict"
            return f"in {self._option_source[key]}" if key in self._option_source else ""

        validate.check_options(self.external_config_dict, where)

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise ConfigError("no model given: pass --model=NAME (or `model:` in a config file)")
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise ConfigError("no dataset given: pass --dataset=NAME (or `dataset:` in a config file)")
        if isinstance(model, str):
            return model, get_model(model), dataset
        return model.__name__, model, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        self._preset_keys = set()
        super()._load_internal_config_dict(model, model_class, dataset)
        dataset_file = os.path.join(PROPERTIES_DIR, "dataset", f"{dataset}.yaml")
        self._update_internal_config_dict(os.path.join(PROPERTIES_DIR, "overall.yaml"))
        if os.path.isfile(dataset_file):
            loaded = self._load_yaml(dataset_file)
            # RecBole's model-type preset wins over a dataset YAML (module docstring).
            loaded = {k: v for k, v in loaded.items() if k not in self._preset_keys}
            self.internal_config_dict.update(loaded)
            self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]
        model_file = os.path.join(PROPERTIES_DIR, "model", f"{model}.yaml")
        if os.path.isfile(model_file):
            recbole_sampling = self.internal_config_dict.get("train_neg_sample_args")
            loaded = self._update_internal_config_dict(model_file) or {}
            # Our SASRec.yaml drops negative sampling for RecBole's default CE loss (RecBole's Config refuses the
            # two together); a loss_type the input type follows from (BPR) gets RecBole's sampling back.
            loss_type = self.external_config_dict.get("loss_type", self.internal_config_dict.get("loss_type"))
            if ("train_neg_sample_args" in loaded and loaded["train_neg_sample_args"] is None
                    and not hasattr(model_class, "input_type") and loss_type not in (None, "CE")):
                self.internal_config_dict["train_neg_sample_args"] = recbole_sampling

    def _update_internal_config_dict(self, file):
        """RecBole's, noting the keys its model-type presets (``quick_start_config/*.yaml``) set."""
        loaded = super()._update_internal_config_dict(file) or {}
        if os.path.samefile(os.path.dirname(file), _RECBOLE_PRESETS_DIR):
            self._preset_keys.update(loaded)
        return loaded

    def _load_yaml(self, file):
        with open(file, encoding="utf-8") as f:
            return yaml.load(f.read(), Loader=self.yaml_loader) or {}

    def _init_device(self):
        """RecBole's device set-up, with gloo on CPU and nccl on GPU for multi-process runs."""
        gpu_id = self.final_config_dict["gpu_id"]
        if isinstance(gpu_id, tuple):
            gpu_id = ",".join(map(str, gpu_id))
        gpu_id = self.final_config_dict["gpu_id"] = str(gpu_id)
        if "CUDA_VISIBLE_DEVICES" not in os.environ or gpu_id:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
        use_cuda = len(gpu_id) > 0 and self.final_config_dict.get("use_gpu", True) and torch.cuda.is_available()
        # torchrun sets LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT: honour them like RecBole's options.
        if "local_rank" not in self.final_config_dict and "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
            self.final_config_dict.update(
                local_rank=int(os.environ["LOCAL_RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                nproc=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
                offset=int(os.environ.get("RANK", os.environ["LOCAL_RANK"])) - int(os.environ["LOCAL_RANK"]),
                ip=os.environ.get("MASTER_ADDR", "localhost"), port=os.environ.get("MASTER_PORT", "5678"),
                torchrun=True)
        cfg = self.final_config_dict
        if use_cuda:
            _check_visible_gpus(int(cfg.get("nproc") or 1), gpu_id)
        if "local_rank" not in cfg:
            cfg["single_spec"] = True
            cfg["local_rank"] = 0
            cfg["device"] = torch.device("cuda") if use_cuda else torch.device("cpu")
            return
        rank = cfg["local_rank"] + cfg.get("offset", 0)
        if not torch.distributed.is_initialized():
            init_method = "env://" if cfg.get("torchrun") else f"tcp://{cfg['ip']}:{cfg['port']}"
            torch.distributed.init_process_group(
                backend="nccl" if use_cuda else "gloo", rank=rank,
                world_size=cfg["world_size"], init_method=init_method)
        if use_cuda:
            torch.cuda.set_device(cfg["local_rank"])
            cfg["device"] = torch.device("cuda", cfg["local_rank"])
        else:
            cfg["device"] = torch.device("cpu")
        cfg["single_spec"] = False
        if cfg["local_rank"] != 0:
            cfg["state"] = "error"
            cfg["show_progress"] = False
            cfg["verbose"] = False


def _check_visible_gpus(nproc, gpu_id):
    """Each of the ``nproc`` processes on this machine takes one GPU: fail in one line, before any is spawned."""
    named = len([i for i in gpu_id.split(",") if i.strip()])
    count = torch.cuda.device_count()
    if nproc <= min(named, count):
        return
    prefix = f"nproc: {nproc} processes on CUDA need {nproc} GPUs, but "
    cpu = "or --use_gpu=False to run them on CPU (gloo)"
    if named < nproc:
        default = " (the default)" if gpu_id == "0" else ""
        raise ConfigError(f"{prefix}gpu_id='{gpu_id}'{default} names {named}: pass --gpu_id="
                          f"{','.join(map(str, range(nproc)))} on a machine with {nproc} GPUs, {cpu}")
    raise ConfigError(f"{prefix}only {count} of gpu_id='{gpu_id}' are visible: use --nproc={count}, {cpu}")
