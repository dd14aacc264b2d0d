"""Hyper-parameter search with hyperopt: RecBole's ``run_hyper.py`` with recbole-llm's models and Config.

    python run_hyper.py --model=GLTA --dataset=ml-100k --params_file=properties/hyper/GLTA.hyper \
        --config_files="fixed.yaml" --algo=exhaustive --output_file=GLTA-ml-100k.result

Each trial trains with the fixed config files plus one point of the search space (RecBole's hyper file
format: ``name choice [..]`` / ``uniform low,high`` / ``quniform low,high,q`` / ``loguniform low,high``).
Any other ``--key=value`` goes to every trial's Config, as with RecBole's scripts.
"""
import argparse
import os
import sys

from recbole_llm.errors import ConfigError


def fixed_objective(model=None, dataset=None):
    """``objective_function`` with ``model`` / ``dataset`` added to each trial's config dict.

    ``HyperTuning`` calls its objective with the sampled parameters and the fixed config files only.
    """
    from recbole_llm.quick_start import objective_function

    fixed = {k: v for k, v in (("model", model), ("dataset", dataset)) if v is not None}

    def objective(config_dict=None, config_file_list=None, saved=True):
        return objective_function(dict(fixed, **(config_dict or {})), config_file_list, saved)

    return objective


def check_params_file(params_file, model=None, dataset=None, config_file_list=None):
    """The search space parses and names only options RecBole, recbole-llm or the model's YAML know,
    and the fixed config is valid: one ``ConfigError`` line before any trial runs."""
    from recbole.config.configurator import (dataset_arguments, evaluation_arguments, general_arguments,
                                             training_arguments)

    from recbole_llm.config import Config
    from recbole_llm.validate import OPTIONS, check_params_file as check_space

    if not os.path.isfile(params_file):
        raise ConfigError(f"--params_file: no such file {params_file}")
    config = Config(model, dataset, config_file_list)
    known = (set(config.final_config_dict) | set(OPTIONS) | set(general_arguments) | set(training_arguments)
             | set(evaluation_arguments) | set(dataset_arguments))
    check_space(params_file, known)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Hyper-parameter search for a RecBole / recbole-llm model.")
    parser.add_argument("--model", "-m", type=str, default=None, help="model name (or `model:` in a config file)")
    parser.add_argument("--dataset", "-d", type=str, default=None,
                        help="dataset name (or `dataset:` in a config file)")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated fixed YAML files")
    parser.add_argument("--params_file", type=str, default=None, help="search space, RecBole's hyper format")
    parser.add_argument("--output_file", type=str, default="hyper_example.result", help="where results go")
    parser.add_argument("--display_file", type=str, default=None, help="HTML plot of the trials (plotly)")
    parser.add_argument("--tool", type=str, default="Hyperopt", help="tuning tool: only Hyperopt")
    parser.add_argument("--algo", type=str, default="exhaustive", choices=["exhaustive", "random", "bayes"],
                        help="exhaustive tries every point of a choice-only space (max_evals is then ignored)")
    parser.add_argument("--max_evals", type=int, default=100, help="trials for random / bayes")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after this many trials without progress")
    args, _ = parser.parse_known_args(argv)

    def fail(message):
        print(f"run_hyper: error: {message}", file=sys.stderr)
        return 2

    if args.tool.lower() != "hyperopt":
        return fail(f"--tool={args.tool}: only Hyperopt is supported (RecBole's Ray tuner is not)")
    if not args.params_file:
        return fail("--params_file is required")
    config_file_list = args.config_files.strip().split(" ") if args.config_files else None

    from recbole.trainer import HyperTuning

    from recbole_llm import compat

    compat.apply()
    try:
        check_params_file(args.params_file, args.model, args.dataset, config_file_list)
        hp = HyperTuning(fixed_objective(args.model, args.dataset), algo=args.algo, max_evals=args.max_evals,
                         early_stop=args.early_stop, params_file=args.params_file,
                         fixed_config_file_list=config_file_list, display_file=args.display_file)
        hp.run()
    except (ConfigError, FileNotFoundError) as e:
        return fail(e)
    hp.export_result(output_file=args.output_file)
    print("best params: ", hp.best_params)
    print("best result: ")
    print(hp.params2result[hp.params2str(hp.best_params)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
