"""``LLMRecommender``: what every recbole-llm LLM model shares with the trainer and the checkpoint code.

A model declares its pipeline: ``stages()`` (``Stage`` / ``TrainStage``, run in order through the stage cache)
and ``final_stage()`` (a ``TrainStage`` that RecBole's fit loop trains, validates and checkpoints).
``LLMTrainer`` does the rest.

Checkpoint rule: everything but the LLM's frozen base weights. The LLM's adapters (LoRA) and new-token rows
(peft trainable tokens) are kept whether or not the final stage trains them, since an earlier stage may have;
a checkpoint that lacks them fails to load with a clear message. Frozen LLM weights are rebuilt from
``llm_path``.
"""
from typing import List

import torch

from recbole_llm.errors import ConfigError
from recbole_llm.llm.loading import is_adapter_parameter
from recbole_llm.stages import Stage, TrainStage  # noqa: F401  (models import them from here)


class LLMRecommender:
    """Mix-in for RecBole models that hold an LLM (``self.llm``), trained by ``LLMTrainer``."""

    def stages(self) -> List[Stage]:
        return []

    def final_stage(self) -> TrainStage:
        """The final stage: by default every non-LLM module trains on RecBole's train dataloader."""
        return TrainStage("final", modules=[n for n, _ in self.named_children() if n != "llm"],
                          loss=self.calculate_loss)

    def set_eval_data(self, eval_data):
        """Called by the trainer before each evaluation (models that rank from a top-K list use it to skip the
        items RecBole will mask: see ``recbole_llm.model.ranking``)."""

    @property
    def llm_dtype(self):
        llm = getattr(self, "llm", None)
        if llm is None:
            return torch.float32
        return next(p for p in llm.parameters() if p.is_floating_point()).dtype

    # ----- which parameters train ----------------------------------------------------------------------
    def stage_parameters(self, names):
        """(name, parameter) pairs of the named attributes: modules or parameters; ``"llm"`` = its adapters."""
        own = dict(self.named_parameters())
        pairs = []
        for name in names:
            target = getattr(self, name, None)
            if target is None:
                raise AttributeError(f"{type(self).__name__} has no module or parameter '{name}' to train")
            if name == "llm":
                pairs += [(f"llm.{n}", p) for n, p in target.named_parameters() if is_adapter_parameter(n)]
            elif isinstance(target, torch.nn.Parameter):
                pairs.append((name, own[name]))
            else:
                pairs += [(f"{name}.{n}", p) for n, p in target.named_parameters()]
        return pairs

    def set_trainable(self, names):
        """Freeze everything, then unfreeze the named modules; returns the parameters that now train."""
        self.requires_grad_(False)
        params = []
        for _, p in self.stage_parameters(names):
            p.requires_grad_(True)
            params.append(p)
        return params

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def trained_state(self, names):
        """A training stage's artifact: ``{parameter name: tensor}`` of what it trained."""
        return {n: p.detach().cpu().clone() for n, p in self.stage_parameters(names)}

    @torch.no_grad()
    def load_trained_state(self, state):
        params = dict(self.named_parameters())
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))

    # ----- checkpoints --------------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Everything but the LLM's frozen base weights (its adapters and new-token rows stay)."""
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.startswith("llm.") and not is_adapter_parameter(k)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            adapters = [k for k in result.missing_keys if k.startswith("llm.") and is_adapter_parameter(k)]
            if adapters:
                raise ConfigError(f"checkpoint lacks the LLM's trained adapter / new-token weights "
                                  f"({len(adapters)} tensors, e.g. {adapters[0]}): it was not saved by this model "
                                  "with these LLM settings (lora_r, new tokens)")
            missing = [k for k in result.missing_keys if not k.startswith("llm.")]
            if missing or result.unexpected_keys:
                raise ConfigError(f"checkpoint does not match the model: missing {missing[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]}")
        return result
