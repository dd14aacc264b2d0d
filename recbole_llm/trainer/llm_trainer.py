"""``LLMTrainer``: RecBole's Trainer for models that run an LLM forward pass.

What it adds to RecBole's loop:
- the model's stages (``model.stages()``) run first, through the stage cache (``recbole_llm.stages``);
  a stage that trains uses ``train_steps`` below, the same loop the final stage uses;
- batches come from the model (``model.train_batches``): prompts per user rather than RecBole's pairs;
- bf16/fp16 autocast in the LLM's dtype, gradient accumulation, an optimizer over trainable parameters
  only, linear learning-rate warm-up, gradient clipping, tqdm bars, TensorBoard scalars;
- multi-process training: batches are split across ranks and gradients all-reduced (RecBole's hooks).
"""
import torch
from recbole.trainer import Trainer
from recbole.utils import init_seed, set_color
from torch.nn.utils import clip_grad_norm_
from tqdm import tqdm

from recbole_llm.compat import wrap_distributed
from recbole_llm.stages import StageCache


class LLMTrainer(Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.accumulation = max(1, int(config["gradient_accumulation_steps"] or 1))
        self.warmup_steps = int(config["warmup_steps"] or 0)
        self.optimizer_steps = 0

    # ----- stages -------------------------------------------------------------------------------------
    def run_stages(self, train_data, valid_data):
        cache = StageCache(self.config, train_data._dataset)
        for stage in self.model.stages():
            cache.run(stage, self, train_data, valid_data)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.run_stages(train_data, valid_data)
        # Seed the final stage: a run resumed from cached stages trains exactly like an uninterrupted one.
        init_seed(self.config["seed"] + self.config["local_rank"], self.config["reproducibility"])
        self.model.start_final_stage()
        self._rewrap_distributed()
        self.optimizer = self._build_optimizer(params=self.model.trainable_parameters())
        self.optimizer_steps = 0
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def _rewrap_distributed(self):
        """DDP registers the parameters that require grad when it wraps: wrap again when a stage changes them."""
        if not self.config["single_spec"]:
            self.distributed_model = wrap_distributed(self.model, self.config)

    def sync_grad_loss(self):
        """RecBole's zero-valued loss that touches every parameter, over trainable ones only (not the LLM)."""
        return sum((p.sum() * 0 for p in self.model.parameters() if p.requires_grad), torch.zeros(()))

    # ----- the training loop shared by stages and the final stage ---------------------------------------
    def _autocast(self):
        dtype = self.model.llm_dtype
        enabled = bool(self.config["llm_autocast"]) and dtype in (torch.bfloat16, torch.float16)
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=enabled)

    def _warmup(self, optimizer, base_lrs):
        if self.warmup_steps and self.optimizer_steps <= self.warmup_steps:
            scale = min(1.0, (self.optimizer_steps + 1) / self.warmup_steps)
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * scale

    def train_steps(self, batches, loss_fn, optimizer, desc, show_progress=None):
        """One pass over ``batches`` (this rank's share): returns the mean loss over batches."""
        show_progress = self.config["show_progress"] if show_progress is None else show_progress
        if not self.config["single_spec"]:  # equal shares (every rank must take part in every all-reduce)
            world = self.config["world_size"]
            batches = batches[:len(batches) - len(batches) % world][self.config["local_rank"]::world]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group.setdefault("initial_lr", lr)
        self.model.train()
        total, count = 0.0, 0
        optimizer.zero_grad()
        bar = tqdm(batches, desc=set_color(desc, "pink"), ncols=100, disable=not show_progress)
        for i, batch in enumerate(bar):
            sync_loss = 0
            if not self.config["single_spec"]:
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            with self._autocast():
                loss = loss_fn(batch)
            self._check_nan(loss)
            ((loss + sync_loss) / self.accumulation).backward()
            total, count = total + loss.item(), count + 1
            if (i + 1) % self.accumulation == 0 or i + 1 == len(batches):
                self._warmup(optimizer, base_lrs)
                if self.clip_grad_norm:
                    clip_grad_norm_(params, **self.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                self.optimizer_steps += 1
            bar.set_postfix(loss=f"{total / count:.4f}")
        return total / max(count, 1)

    def train_stage(self, name, batches_fn, loss_fn, params, epochs, learning_rate):
        """Train ``params`` for ``epochs`` passes of ``batches_fn(epoch)``: used by a model's training stages."""
        self._rewrap_distributed()
        optimizer = self._build_optimizer(params=params, learning_rate=learning_rate)
        saved_steps, self.optimizer_steps = self.optimizer_steps, 0
        for epoch in range(epochs):
            loss = self.train_steps(batches_fn(epoch), loss_fn, optimizer, f"{name} {epoch:>3}")
            self.logger.info(set_color(f"stage {name}", "green") + f" epoch {epoch} loss {loss:.4f}")
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(f"Loss/{name}", loss, epoch)
        self.optimizer_steps = saved_steps

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        batches = self.model.train_batches(train_data, epoch_idx)
        return self.train_steps(batches, loss_func or self.model.calculate_loss, self.optimizer,
                                f"Train {epoch_idx:>5}", show_progress)
