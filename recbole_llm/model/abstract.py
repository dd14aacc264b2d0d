"""``LLMRecommender``: what every recbole-llm LLM model shares with the trainer and the checkpoint code.

A model lists its stages in order (``stages()``); ``LLMTrainer.fit`` runs them through the stage cache,
then trains the final stage with RecBole's loop. Frozen LLM weights never go into a checkpoint: they are
rebuilt from ``llm_path``, so a checkpoint holds only what training changed.
"""
from dataclasses import dataclass, field
from typing import Callable, List, Optional


@dataclass
class Stage:
    """One step of a model's pipeline.

    ``build(trainer, train_data, valid_data) -> artifact`` computes the stage's output (an object torch can
    save; a training stage calls ``trainer.train_stage``);
    ``load(artifact)`` installs it into the model (also when it comes from the cache).
    ``config_keys``: the config values the output depends on (the dataset, split and seed always count).
    """

    name: str
    build: Callable
    load: Callable
    config_keys: List[str] = field(default_factory=list)


class LLMRecommender:
    """Mix-in for RecBole models that hold an LLM (``self.llm``), trained by ``LLMTrainer``.

    A model provides ``stages()`` (run in order before the final stage), ``start_final_stage()`` (sets which
    parameters the final stage trains), ``train_batches(train_data, epoch)`` (the final stage's batches) and
    ``calculate_loss(batch)``.
    """

    def stages(self) -> List[Stage]:
        return []

    def start_final_stage(self):
        pass

    def train_batches(self, train_data, epoch):
        raise NotImplementedError

    @property
    def llm_dtype(self):
        return next(self.llm.parameters()).dtype

    def state_dict(self, *args, **kwargs):
        """Everything but the LLM's frozen tensors (LoRA adapters and new token rows train, so they stay)."""
        state = super().state_dict(*args, **kwargs)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        for key in [k for k in state if k.startswith("llm.") and k not in trainable]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            missing = [k for k in result.missing_keys if not k.startswith("llm.")]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"checkpoint does not match the model: missing {missing}, "
                                   f"unexpected {result.unexpected_keys}")
        return result

    def trainable_parameters(self) -> Optional[list]:
        return [p for p in self.parameters() if p.requires_grad]
