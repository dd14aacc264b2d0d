"""``run_recbole_llm``, ``objective_function`` (for ``recbole.trainer.HyperTuning``) and ``load_data_and_model``.

Mirrors ``recbole.quick_start`` (which imports ray, so we do not import it) with our Config, model lookup,
trainer lookup and the gloo backend for multi-process runs on CPU.
"""
import argparse
import logging
import os
import sys
from logging import getLogger

import torch
import torch.distributed as dist
from recbole.config import Config as RecBoleConfig
from recbole.utils import get_environment, get_flops, init_logger, init_seed, set_color

from recbole_llm import interrupts
from recbole_llm.compat import reraise_swallowed_interrupts, torch_load
from recbole_llm.config import Config
from recbole_llm.data.download import prepare_dataset
from recbole_llm.errors import ConfigError, WriteError
from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer
from recbole_llm.validate import validate


def _is_llm_model(model_class):
    from recbole_llm.model.abstract import LLMRecommender

    return issubclass(model_class, LLMRecommender)


def run(model, dataset, config_file_list=None, config_dict=None, saved=True,
        nproc=1, world_size=-1, ip="localhost", port="5678", group_offset=0):
    """One process, or ``nproc`` spawned processes (RecBole's options), returning rank 0's result."""
    if nproc == 1 and world_size <= 0:
        return run_recbole_llm(model, dataset, config_file_list, config_dict, saved)
    import torch.multiprocessing as mp

    world_size = nproc if world_size == -1 else world_size
    config_dict = dict(config_dict or {})
    config_dict.update(world_size=world_size, ip=ip, port=port, nproc=nproc, offset=group_offset)
    # Bad input fails here with one ConfigError, not once per spawned process with a traceback; a dataset
    # RecBole can download is downloaded here, once, before any process is spawned.
    config = Config(model, dataset, config_file_list, config_dict)
    prepare_dataset(config)
    validate(config)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_run_rank, args=(model, dataset, config_file_list, config_dict, saved, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def _run_rank(rank, model, dataset, config_file_list, config_dict, saved, queue):
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: the processes share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config_dict["nproc"]))
    run_recbole_llm(model, dataset, config_file_list, dict(config_dict, local_rank=rank), saved, queue)


def run_recbole_llm(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, queue=None):
    """Train and test ``model`` on ``dataset``: RecBole's ``run_recbole`` with recbole-llm's lookups."""
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    prepare_dataset(config)  # missing here and on RecBole's download list: downloaded first (local rank 0)
    warnings = validate(config)  # before logging starts: nothing is written, the CLI prints one line
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    for warning in warnings:
        logger.warning(warning)
    logger.info(sys.argv)
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model_class = get_model(config["model"])
    model = model_class(config, train_data._dataset).to(config["device"])
    logger.info(model)
    if not _is_llm_model(model_class):  # thop would trace a whole LLM
        from recbole.data.transform import construct_transform

        flops = get_flops(model, dataset, config["device"], logger, construct_transform(config))
        logger.info(set_color("FLOPs", "blue") + f": {flops}")

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    test_groups = _test(trainer, train_data, test_data, saved, config["show_progress"])
    test_result = test_groups.pop("all")

    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    for group, group_result in test_groups.items():
        logger.info(set_color(f"test result ({group} items)", "yellow") + f": {group_result or 'no rows'}")
    result = _result(config, best_valid_score, best_valid_result, test_result)
    if test_groups:
        result["test_result_groups"] = test_groups
    if not config["single_spec"]:
        dist.destroy_process_group()
    if config["local_rank"] == 0 and queue is not None:
        queue.put(result)
    return result


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """The objective ``recbole.trainer.HyperTuning`` calls for each trial (RecBole's, without ray)."""
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    prepare_dataset(config)
    warnings = validate(config)
    init_seed(config["seed"], config["reproducibility"])
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    init_logger(config)
    for warning in warnings:
        logger.warning(warning)
    logging.basicConfig(level=logging.ERROR)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(train_data, valid_data, verbose=False, saved=saved)
    test_result = _test(trainer, train_data, test_data, saved)["all"]
    return _result(config, best_valid_score, best_valid_result, test_result)


def _test(trainer, train_data, test_data, saved, show_progress=False):
    """RecBole's test evaluation as ``{"all": result}``; with ``warm_cold_report`` the same scoring pass also
    gives ``"warm"`` and ``"cold"`` (items with / without training rows; ``None`` for a group without rows)."""
    if not trainer.config["warm_cold_report"]:
        return {"all": trainer.evaluate(test_data, load_best_model=saved, show_progress=show_progress)}
    from recbole_llm.evaluator import warm_cold_report

    return warm_cold_report(trainer, train_data.dataset, test_data, load_best_model=saved,
                            show_progress=show_progress)


def _result(config, best_valid_score, best_valid_result, test_result):
    """What RecBole's quick start returns (``HyperTuning`` reads ``model`` and the valid score from it)."""
    return {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
    }


def _load_checkpoint(model_file, device):
    """A checkpoint written by RecBole's trainer (ours included): a dict with a ``config`` and a ``state_dict``."""
    if not os.path.isfile(model_file):
        raise ConfigError(f"checkpoint not found: {model_file}")
    try:
        checkpoint = torch_load(model_file, map_location=device)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means it is not a checkpoint
        raise ConfigError(f"{model_file}: not a checkpoint torch can read ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else 'empty'})") from None
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ConfigError(f"{model_file}: not a recbole-llm / RecBole checkpoint (no config and state_dict)")
    if not isinstance(checkpoint["config"], RecBoleConfig):
        raise ConfigError(f"{model_file}: not a recbole-llm / RecBole checkpoint (its config is a "
                          f"{type(checkpoint['config']).__name__})")
    return checkpoint


def load_data_and_model(model_file):
    """Config, model, dataset and dataloaders from a checkpoint; a GPU checkpoint loads on a CPU machine."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    checkpoint = _load_checkpoint(model_file, device)
    config = checkpoint["config"]
    config["device"] = device
    config["single_spec"], config["local_rank"] = True, 0
    if device.type == "cpu":
        config["gpu_id"] = ""
    config.compatibility_settings()  # RecBole's numpy aliases (np.float ...), set when a Config is built, not unpickled
    prepare_dataset(config)
    validate(config)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(device)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:  # keys or shapes that are not this model's (e.g. another dataset's item count)
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise ConfigError(f"{model_file}: its state_dict does not fit model {config['model']} "
                          f"on {config['dataset']}: {first[0].strip()}") from None
    model.load_other_parameter(checkpoint.get("other_parameter"))
    model.eval()
    return config, model, dataset, train_data, valid_data, test_data


def main(argv=None):
    """``run_recbole_llm.py``: RecBole's ``run_recbole.py`` flags; any other ``--key=value`` goes to Config."""
    parser = argparse.ArgumentParser(description="Train and evaluate a RecBole / recbole-llm model.")
    parser.add_argument("--model", "-m", type=str, default="GLTA", help="model name")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated YAML files")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine")
    parser.add_argument("--ip", type=str, default="localhost", help="master address")
    parser.add_argument("--port", type=str, default="5678", help="master port")
    parser.add_argument("--world_size", type=int, default=-1, help="processes in all")
    parser.add_argument("--group_offset", type=int, default=0, help="rank of this machine's first process")
    args, _ = parser.parse_known_args(argv)
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None
    reraise_swallowed_interrupts()
    with interrupts.guarded() as guard:
        try:
            run(args.model, args.dataset, config_file_list=config_file_list, nproc=args.nproc,
                world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset)
        except ConfigError as e:
            guard.last_line(f"recbole-llm: error: {e}")
            return 2
        except WriteError as e:
            guard.last_line(f"recbole-llm: error: {e}")
            return 1
        except KeyboardInterrupt:
            guard.last_line("recbole-llm: interrupted: no checkpoint or stage file is left half-written; "
                            "finished stages are kept and reused next run")
            return 130
    return 0
