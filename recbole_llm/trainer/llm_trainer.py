"""``LLMTrainer``: RecBole's Trainer for models that declare stages (``recbole_llm.stages``).

What it adds to RecBole's loop:
- the model's ``stages()`` run first, through the stage cache; a ``TrainStage`` is trained here (``train_stage``)
  and its artifact is the tensors it trained; any other ``Stage`` builds its own artifact;
- the final stage (``model.final_stage()``) sets which modules train, on which batches, with which loss; RecBole's
  fit loop then trains, validates, early-stops and checkpoints it;
- one training loop (``train_steps``) for every stage: on RecBole's own dataloaders (Interactions moved to the
  device, ``sampler.set_epoch`` under DDP, already sharded by RecBole's sampler) or on batches the model builds
  (split here across ranks); tuple losses summed and logged part by part, as RecBole does;
- autocast per stage: LLM stages in the LLM's dtype (bf16 / fp16), others in fp32; a grad scaler for fp16 on
  CUDA; gradient accumulation, an optimizer over trainable parameters only, linear warm-up, clipping, tqdm bars
  and TensorBoard scalars.
"""
from collections.abc import Sequence

import torch
from recbole.data.dataloader import AbstractDataLoader
from recbole.data.interaction import Interaction
from recbole.trainer import Trainer
from recbole.utils import init_seed, set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_llm.compat import wrap_distributed
from recbole_llm.llm.precision import autocast_context, grad_scaler
from recbole_llm.stages import StageCache


def _loss_text(loss):
    if isinstance(loss, tuple):
        return ", ".join(f"loss {i + 1}: {part:.4f}" for i, part in enumerate(loss))
    return f"loss {loss:.4f}"


class LLMTrainer(Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.accumulation = max(1, int(config["gradient_accumulation_steps"] or 1))
        self.warmup_steps = int(config["warmup_steps"] or 0)
        self.optimizer_steps = 0
        self.final = None

    # ----- stages -------------------------------------------------------------------------------------
    def run_stages(self, train_data, valid_data):
        cache = StageCache(self.config, train_data._dataset, resolved={"llm_dtype": str(self.model.llm_dtype)})
        for stage in self.model.stages():
            if stage.trains:
                cache.run(stage, lambda: self.train_stage(stage, train_data), self.model.load_trained_state)
            else:
                cache.run(stage, lambda: stage.build(self, train_data, valid_data), stage.load)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        for stage in [*self.model.stages(), self.model.final_stage()]:  # bad learning rates fail before any stage
            if stage.trains:
                stage.learning_rates(self.config)
        self.run_stages(train_data, valid_data)
        # Seed the final stage: a run resumed from cached stages trains exactly like an uninterrupted one.
        init_seed(self.config["seed"] + self.config["local_rank"], self.config["reproducibility"])
        self.final = self.model.final_stage()
        self.epochs = self.final.setting(self.config, "epochs")
        self.optimizer = self._stage_optimizer(self.final)
        self.optimizer_steps = 0
        if valid_data and self.config["eval_before_training"]:
            self._evaluate_start(valid_data, verbose, saved, show_progress)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def _evaluate_start(self, valid_data, verbose, saved, show_progress):
        """Validate the model the final stage starts from and seed early stopping with it: training can then
        only return a model at least as good on validation (the start is the best checkpoint until beaten)."""
        score, result = self._valid_epoch(valid_data, show_progress=show_progress)
        self.best_valid_score, self.best_valid_result, self.cur_step = score, result, 0
        if verbose:
            self.logger.info(set_color("before training", "green") + f" valid_score: {score:f}")
        if saved:
            self._save_checkpoint(-1, verbose=verbose)

    def train_stage(self, stage, train_data):
        """Train a ``TrainStage``; returns its artifact (the tensors it trained)."""
        optimizer = self._stage_optimizer(stage)
        saved_steps, self.optimizer_steps = self.optimizer_steps, 0
        for epoch in range(stage.setting(self.config, "epochs")):
            batches = train_data if stage.batches is None else stage.batches(train_data, epoch)
            loss = self.train_steps(batches, stage.loss, optimizer, f"{stage.name} {epoch:>3}",
                                    autocast=stage.autocast, epoch=epoch)
            self.logger.info(set_color(f"stage {stage.name}", "green") + f" epoch {epoch} " + _loss_text(loss))
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(f"Loss/{stage.name}", sum(loss) if isinstance(loss, tuple) else loss,
                                            epoch)
        self.optimizer_steps = saved_steps
        return self.model.trained_state(stage.modules)

    def _stage_optimizer(self, stage):
        """Unfreeze the stage's modules; RecBole's optimizer over them, one parameter group per module with a
        learning rate of its own (``TrainStage.module_learning_rates``) and one for the rest."""
        params = self.model.set_trainable(stage.modules)
        self._rewrap_distributed()
        rates = stage.learning_rates(self.config)
        if rates:
            own = {name: [p for _, p in self.model.stage_parameters([name]) if p.requires_grad] for name in rates}
            taken = {id(p) for group in own.values() for p in group}
            groups = [{"params": [p for p in params if id(p) not in taken]}] + [
                {"params": group, "lr": rates[name]} for name, group in own.items()]
            params = [group for group in groups if group["params"]]
        return self._build_optimizer(params=params, learning_rate=stage.setting(self.config, "learning_rate"))

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        final = self.final or self.model.final_stage()
        batches = train_data if final.batches is None else final.batches(train_data, epoch_idx)
        return self.train_steps(batches, loss_func or final.loss, self.optimizer, f"Train {epoch_idx:>5}",
                                show_progress, autocast=final.autocast, epoch=epoch_idx)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """RecBole's evaluation; the model first learns which items this evaluation masks (``set_eval_data``)."""
        self.model.set_eval_data(eval_data)
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)

    def _rewrap_distributed(self):
        """DDP registers the parameters that require grad when it wraps: wrap again when a stage changes them."""
        if not self.config["single_spec"]:
            self.distributed_model = wrap_distributed(self.model, self.config)

    def sync_grad_loss(self):
        """RecBole's zero-valued loss that touches every parameter, over trainable ones only (not the LLM)."""
        return sum((p.sum() * 0 for p in self.model.parameters() if p.requires_grad), torch.zeros(()))

    # ----- the training loop shared by stages and the final stage ---------------------------------------
    def _precision(self, autocast):
        """(autocast context, grad scaler) for a stage: the LLM's dtype for LLM stages, fp32 otherwise."""
        dtype = self.model.llm_dtype if autocast and self.config["llm_autocast"] else torch.float32
        return autocast_context(self.device, dtype), grad_scaler(self.device, dtype)

    def _warmup(self, optimizer, base_lrs):
        if self.warmup_steps and self.optimizer_steps <= self.warmup_steps:
            scale = min(1.0, (self.optimizer_steps + 1) / self.warmup_steps)
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * scale

    def _shard(self, batches, epoch):
        """This rank's share: RecBole's loaders are sharded by their sampler, model-built lists here."""
        if self.config["single_spec"]:
            return batches
        if isinstance(batches, AbstractDataLoader):
            if batches.shuffle:
                batches.sampler.set_epoch(epoch)
            return batches
        world = self.config["world_size"]  # equal shares: every rank takes part in every all-reduce
        if not isinstance(batches, Sequence):  # a Sequence (e.g. packed batches) is sliced without being built
            batches = list(batches)
        return batches[:len(batches) - len(batches) % world][self.config["local_rank"]::world]

    def train_steps(self, batches, loss_fn, optimizer, desc, show_progress=None, autocast=True, epoch=0):
        """One pass over ``batches``: the mean loss per batch (a tuple for tuple losses, part by part)."""
        show_progress = self.config["show_progress"] if show_progress is None else show_progress
        batches = self._shard(batches, epoch)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group.setdefault("initial_lr", lr)
        context, scaler = self._precision(autocast)
        self.model.train()
        total, count, n_batches = None, 0, len(batches)
        optimizer.zero_grad()
        bar = tqdm(batches, total=n_batches, desc=set_color(desc, "pink"), ncols=100, disable=not show_progress)
        for i, batch in enumerate(bar):
            if isinstance(batch, Interaction):
                batch = batch.to(self.device)
            sync_loss = 0
            if not self.config["single_spec"]:
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            with context:
                losses = loss_fn(batch)
            loss = sum(losses) if isinstance(losses, tuple) else losses
            parts = tuple(part.item() for part in losses) if isinstance(losses, tuple) else loss.item()
            total = parts if total is None else (
                tuple(a + b for a, b in zip(total, parts)) if isinstance(parts, tuple) else total + parts)
            count += 1
            self._check_nan(loss)
            scaler.scale((loss + sync_loss) / self.accumulation).backward()
            if (i + 1) % self.accumulation == 0 or i + 1 == n_batches:
                self._warmup(optimizer, base_lrs)
                if self.clip_grad_norm:
                    scaler.unscale_(optimizer)
                    clip_grad_norm_(params, **self.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
                self.optimizer_steps += 1
            mean = tuple(t / count for t in total) if isinstance(total, tuple) else total / count
            bar.set_postfix(loss=f"{sum(mean) if isinstance(mean, tuple) else mean:.4f}")
        if total is None:
            return 0.0
        return tuple(t / count for t in total) if isinstance(total, tuple) else total / count
