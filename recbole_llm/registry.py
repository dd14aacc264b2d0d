"""Model lookup: ``get_model``, ``available_models``, ``PROPERTIES_DIR``.

Model files are found by name on disk (``<package>/<submodule>/<model>.py``) and only the one asked for is
imported: this module imports no model, so any module (config, backbone, a model itself) can import it without
an import cycle.
"""
import importlib
import importlib.util
import os
import re

import recbole_llm.properties
from recbole_llm.errors import ConfigError

PROPERTIES_DIR = os.path.dirname(os.path.realpath(recbole_llm.properties.__file__))

_OUR_SUBMODULES = ["general_recommender", "sequential_recommender", "context_aware_recommender"]
_RECBOLE_SUBMODULES = ["general_recommender", "context_aware_recommender", "sequential_recommender",
                       "knowledge_aware_recommender", "exlib_recommender"]
_PACKAGES = (("recbole_llm.model", _OUR_SUBMODULES), ("recbole.model", _RECBOLE_SUBMODULES))


def _model_files(package, submodules):
    """(submodule, file stem, path) of every model file, found without importing the modules."""
    spec = importlib.util.find_spec(package)
    root = os.path.dirname(spec.origin)
    for sub in submodules:
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py") and not name.startswith("_"):
                yield sub, name[:-3], os.path.join(folder, name)


def _exlib_importable():
    return all(importlib.util.find_spec(lib) is not None for lib in ("lightgbm", "xgboost"))


def available_models():
    """Model class names, ours and RecBole's (RecBole's exlib models only if their libraries import)."""
    names = []
    for package, subs in _PACKAGES:
        for sub, stem, path in _model_files(package, subs):
            if sub == "exlib_recommender" and not _exlib_importable():
                continue
            with open(path, encoding="utf-8") as f:
                classes = re.findall(r"^class (\w+)\(", f.read(), flags=re.M)
            names += [c for c in classes if c.lower() == stem]
    return sorted(set(names), key=str.lower)


def get_model(model_name):
    """The model class named ``model_name``: recbole_llm's first, then RecBole's."""
    stem = model_name.lower()
    for package, subs in _PACKAGES:
        for sub, file_stem, _ in _model_files(package, subs):
            if file_stem != stem:
                continue
            if sub == "exlib_recommender" and not _exlib_importable():
                raise ConfigError(f"model {model_name} needs lightgbm and xgboost: pip install lightgbm xgboost")
            module = importlib.import_module(f"{package}.{sub}.{stem}")
            for attr in dir(module):
                if attr.lower() == stem and isinstance(getattr(module, attr), type):
                    return getattr(module, attr)
    raise ConfigError(f"unknown model '{model_name}'; available: {', '.join(available_models())}")
