"""GLTA: Training Large Recommendation Models via Graph-Language Token Alignment (Yang et al., WWW'25).

Stages, in the paper's order (each cached by ``StageCache``; only projectors, slots and the GLLM head train,
the LLM stays frozen):
  1. cf_pretrain           LightGCN (or ``cf_backbone``) on the training split (``model/backbone.py``, RecBole's
                           defaults unless ``cf_config``); E_u, E_i frozen afterwards.
  2. profile_generation    the LLM writes a *profile* and a *prediction* text per user from the descriptions
                           of the user's items (Fig. 1(c), 1(d)), once, in batches.
  3. item_text_alignment   item projector V_i = W_i E_i + b_i (eq. 1): a prompt holds m item tokens and their
                           m descriptions shuffled; the GLLM logits at output slot t must name the item of
                           description t (cross-entropy over all items).
  4. user_item_alignment   (the final stage, RecBole's training loop) user projector V_u = W_u E_u + b_u (eq. 2);
                           the prompt holds the user token, history item tokens, profile and prediction texts
                           and k output slots; cross-entropy at the k slots against k of the user's training
                           items, shuffled (eq. 3).

GLLM head (``gllm_init``):
  ``random``    Z_t = W h_t + b, a plain linear layer over all items (the paper's description);
  ``backbone``  Z_t = E_i (E_u + g M n(h_t)): a residual on the frozen backbone's scores that is safe to train.
                n(.) centres and normalises the slot states over users (BatchNorm without affine weights:
                SmolLM2's slot states are ~96% shared across users), M maps them into CF space and the scalar
                gate g starts at 0, so step 0 ranks exactly like the backbone; there is no free item bias to
                fit on seen items. With ``mask_other_positives`` each slot's softmax in eq. 3 leaves out the
                user's other training items (they are not negatives). The item-text stage trains its own head
                (``ia_head``, no user, no gate) and its own slots: only the item projector carries over, and
                the final stage starts exactly at the backbone's ranking. Run it with ``eval_before_training``:
                the start is validated and kept unless training beats it (never below the backbone on valid).
                While g = 0 the scores are E_i E_u at every slot, so evaluation then skips the LLM pass.

Inference (``inference``): ``glta`` reads the ranking off the first k slots (slot t places its best item not
yet placed nor masked); ``fl`` places the top-k items of slot 1; ``ar`` feeds the item token chosen
at slot t-1 as the input of slot t (autoregressive); ``mean`` places the top-k items of the mean
log-probability over all k slots (and uses it as the fallback score). Placement skips the items this
evaluation masks (training items at validation, training + validation items at test). Scores for RecBole's
full ranking come from ``recbole_llm.model.ranking`` (the same rule for every variant): the k placed items
first in slot order, then the best log-softmax over the slots (``mean``: the mean) of the next items up to
``ranking_top_k``, every other item tied below. The slot states of the inference prompts are kept while what
feeds the LLM is unchanged, so a test pass after a validation of the same weights runs no second LLM pass.

Cross-fitting (``cross_fit: f``, 0 = off): eq. 3's targets should be items the backbone has not fitted. The
backbone is then trained on a copy of the training split without a held-out fraction f of each user's items
(at least one item kept per user; the copy is ``dataset.copy`` of the split with those rows removed); the final
stage draws its targets from the held-out items and shows the others. GLTA then ranks over that backbone.

Ablations (``ABLATIONS``, as in the paper, changing what the LLM sees *and* what the head uses):
``item_text_alignment: False`` (w/o IA: skip stage 3, train both projectors in stage 4);
``user_alignment: False`` (w/o UA: a learned user-ID embedding in place of the projected user token, and no
backbone user embedding in the head: Z_t = E_i M n(h_t), ungated, so the user reaches the scores only through
the LLM); ``use_profile: False`` / ``use_prediction: False`` (w/o PF / PD: drop those template segments).

Training targets are never shown in the prompt: a user with more than k training items supervises k slots
with k of them (shuffled) and shows others; a user with n <= k items supervises ceil(n / 2) slots and shows the
rest. A user with no training item has an empty history, a generated text from no items, and no training loss.
"""
import hashlib
import logging
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.utils import InputType
from torch import nn

from recbole_llm.data.item_text import load_item_texts
from recbole_llm.data.prompts import PromptTemplate, collate
from recbole_llm.errors import ConfigError
from recbole_llm.llm import embed_inputs, embedding_std, generate_text_variants, last_hidden_states, load_llm
from recbole_llm.llm.inputs import decoder
from recbole_llm.llm.precision import autocast_context
from recbole_llm.model.abstract import LLMRecommender, Stage, TrainStage
from recbole_llm.model.backbone import CFBackbone
from recbole_llm.model.layers import Projector
from recbole_llm.model.ranking import Ranking, TopKRanked

logger = logging.getLogger(__name__)

BACKBONES = {"LightGCN": "LightGCN", "MF": "BPR", "BPR": "BPR", "DCCF": "DCCF"}
INFERENCE = ("glta", "fl", "ar", "mean")
# The paper's ablations (§4.3, §4.4), the GLLM head alternative and cross-fitting, as config overrides.
ABLATIONS = {
    "default": {},
    "wo_ia": {"item_text_alignment": False},
    "wo_ua": {"user_alignment": False},
    "wo_pf": {"use_profile": False},
    "wo_pd": {"use_prediction": False},
    "random_head": {"gllm_init": "random"},
    "cross_fit": {"cross_fit": 0.1},
}


class GLLMHead(nn.Module):
    """Graph-Language Logits Matching: last hidden states -> logits over all items, Z in R^{L x |I|}.

    ``random``: Z = W h + b. ``backbone``: Z = E_i (E_u + g M n(h)) with n a centring / normalising BatchNorm
    (no affine weights) and a scalar gate g (``gated``; zero-initialised) or g = 1.
    """

    def __init__(self, hidden_size, n_items, init, cf_dim, gated=True):
        super().__init__()
        self.init = init
        if init == "random":
            self.linear = nn.Linear(hidden_size, n_items)
        else:
            self.norm = nn.BatchNorm1d(hidden_size, affine=False)
            self.map = nn.Linear(hidden_size, cf_dim, bias=False)
            self.gate = nn.Parameter(torch.zeros(())) if gated else None
            if not gated:  # ungated: M starts at 0, so the logits start uniform (loss ln |I|), not at a random ranking
                nn.init.zeros_(self.map.weight)

    def closed_gate(self):
        """True while a gated residual head adds nothing (g = 0): it then scores exactly like the backbone."""
        return getattr(self, "gate", None) is not None and float(self.gate.detach()) == 0.0

    def forward(self, hidden, item_emb, user_emb=None):
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # logits over all items in fp32
            hidden = hidden.float()
            if self.init == "random":
                return self.linear(hidden)
            states = hidden.flatten(0, 1)
            batch_stats = self.training and len(states) > 1  # one state alone cannot be centred: running stats
            states = F.batch_norm(states, self.norm.running_mean, self.norm.running_var,
                                  training=batch_stats, momentum=self.norm.momentum, eps=self.norm.eps)
            residual = self.map(states.view_as(hidden))
            if self.gate is not None:
                residual = self.gate * residual
            query = residual if user_emb is None else residual + user_emb.unsqueeze(1)
            return query @ item_emb.T


class GLTA(TopKRanked, LLMRecommender, GeneralRecommender):
    input_type = InputType.POINTWISE
    STATE_CACHE_BYTES = 1024 ** 3  # inference slot states kept between evaluations, at most
    other_parameter_name = ["profile_texts", "prediction_texts"]

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self._check_options(config)
        self.k = int(config["gllm_k"])
        self.m = int(config["ia_items_per_prompt"])
        self.inference = config["inference"]
        self.use_ia = bool(config["item_text_alignment"])
        self.use_ua = bool(config["user_alignment"])
        self.use_profile = bool(config["use_profile"])
        self.use_prediction = bool(config["use_prediction"])
        self.mask_other_positives = bool(config["mask_other_positives"])
        self.cross_fit = float(config["cross_fit"] or 0)
        self.backbone = BACKBONES[config["cf_backbone"]]

        # The user's training items (the split RecBole hands the model), most recent last.
        self.item_texts = load_item_texts(config, dataset)
        self.user_items = self._training_items(dataset)
        self.held_out = self._held_out_items() if self.cross_fit else None

        # The frozen LLM and its tokenizer.
        self.llm, self.tokenizer = load_llm(config)
        hidden = self.llm.config.hidden_size
        self.token_std = embedding_std(self.llm)
        self.cf = CFBackbone(config, self.backbone_split(dataset), self.backbone)
        cf_dim = self.cf.embedding_size

        # Stage 1 output (frozen CF embeddings), projectors (eq. 1, 2), output slots and the GLLM head.
        self.register_buffer("user_emb", torch.zeros(self.n_users, cf_dim))
        self.register_buffer("item_emb", torch.zeros(self.n_items, cf_dim))
        self.item_proj = Projector(cf_dim, hidden)
        self.user_proj = Projector(cf_dim, hidden)
        self.user_id_emb = nn.Embedding(self.n_users, hidden) if not self.use_ua else None
        if self.user_id_emb is not None:
            nn.init.normal_(self.user_id_emb.weight, std=self.token_std)
        self.slots = nn.Parameter(torch.randn(self.k, hidden) * self.token_std)
        self.head = GLLMHead(hidden, self.n_items, config["gllm_init"], cf_dim, gated=self.use_ua)
        # The item-text stage's own slots and head: what the final stage starts from is not moved by it.
        self.ia_slots = nn.Parameter(torch.randn(self.m, hidden) * self.token_std)
        self.ia_head = GLLMHead(hidden, self.n_items, config["gllm_init"], cf_dim, gated=False)

        # Templates (from YAML) and the texts stage 2 writes.
        self.ia_template = PromptTemplate(config["ia_template"], self.tokenizer)
        self.ua_template = PromptTemplate(self._ua_segments(config["ua_template"]), self.tokenizer)
        self.profile_texts, self.prediction_texts = [""] * self.n_users, [""] * self.n_users
        self._desc_ids = [self._tokens(t, config["ia_desc_tokens"]) for t in self.item_texts]
        self.ranking = Ranking(config, dataset, self._score_users)  # top-K cache, cleared in calculate_loss
        self._states, self._states_key = {}, None  # inference slot states (``_inference_states``)
        self.requires_grad_(False)
        self.to(self.device)  # the LLM is loaded there already: buffers, projectors and head join it

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cuda()`` / ``.cpu()`` move every tensor; ``self.device`` (where new indices go) follows."""
        module = super()._apply(fn, *args, **kwargs)
        self.device = self.item_emb.device
        return module

    # ----- options and data ------------------------------------------------------------------------------
    @staticmethod
    def _check_options(config):
        if config["cf_backbone"] not in BACKBONES:
            raise ConfigError(f"cf_backbone: unknown '{config['cf_backbone']}' (choose from {', '.join(BACKBONES)})")
        if config["inference"] not in INFERENCE:
            raise ConfigError(f"inference: unknown '{config['inference']}' (choose from {', '.join(INFERENCE)})")
        if config["gllm_init"] not in ("random", "backbone"):
            raise ConfigError(f"gllm_init: unknown '{config['gllm_init']}' (choose from random, backbone)")
        cross_fit = config["cross_fit"] or 0
        if not isinstance(cross_fit, (int, float)) or not 0 <= cross_fit < 1:
            raise ConfigError(f"cross_fit: must be a fraction in [0, 1), got {config['cross_fit']!r}")
        for key in ("gllm_k", "ia_items_per_prompt", "ua_history_len", "gen_history_len"):
            if not isinstance(config[key], int) or config[key] < 1:
                raise ConfigError(f"{key}: must be a positive integer, got {config[key]!r}")

    def _training_items(self, dataset):
        inter = dataset.inter_feat
        users, items = inter[self.USER_ID].numpy(), inter[self.ITEM_ID].numpy()
        has_time = dataset.time_field is not None and dataset.time_field in inter.columns
        order = np.argsort(inter[dataset.time_field].numpy(), kind="stable") if has_time else np.arange(len(users))
        per_user = [[] for _ in range(self.n_users)]
        for idx in order:
            per_user[users[idx]].append(int(items[idx]))
        longest = max(len(items) for items in per_user)
        if self.config["gllm_k"] > longest:
            logger.warning(f"gllm_k={self.config['gllm_k']} exceeds every user's training history "
                           f"(longest {longest}): each user supervises only as many slots as items")
        return per_user

    def _held_out_items(self):
        """Cross-fitting: a fraction ``cross_fit`` of each user's training items (at least one item kept), drawn
        with the seed; the backbone does not see them and eq. 3 draws its targets from them."""
        rng = random.Random(self.config["seed"] * 1000 + 7)
        held = []
        for items in self.user_items:
            n = min(len(items) - 1, round(self.cross_fit * len(items))) if items else 0
            held.append(set(rng.sample(items, n)) if n > 0 else set())
        return held

    def backbone_split(self, dataset):
        """The split the backbone trains on: ``dataset``, or with cross-fitting a copy without the held-out rows."""
        if not self.cross_fit:
            return dataset
        users, items = dataset.inter_feat[self.USER_ID].tolist(), dataset.inter_feat[self.ITEM_ID].tolist()
        keep = torch.tensor([i not in self.held_out[u] for u, i in zip(users, items)])
        return dataset.copy(dataset.inter_feat[keep])

    def _ua_segments(self, segments):
        drop = set()
        if not self.use_profile:
            drop.add("{profile}")
        if not self.use_prediction:
            drop.add("{prediction}")
        segments = [segments] if isinstance(segments, str) else list(segments)
        return [s for s in segments if not any(d in s for d in drop)]

    def _tokens(self, text, limit):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][:limit]

    def _history_text(self, user):
        items = self.user_items[user][-self.config["gen_history_len"]:]
        return "; ".join(self.item_texts[i] for i in items) or "no items yet"

    # ----- stages -------------------------------------------------------------------------------------------
    def stages(self):
        stages = [
            self._cf_stage(),
            Stage("profile_generation", self.generate_profiles, self.load_profiles,
                  ["item_text_fields", "item_text_separator", "profile_prompt", "prediction_prompt",
                   "gen_system_prompt", "gen_history_len", "gen_max_tokens"], uses_llm=True),
        ]
        if self.use_ia:
            stages.append(TrainStage("item_text_alignment", modules=["item_proj", "ia_head", "ia_slots"],
                                     batches=self.item_text_batches, loss=self.item_text_loss,
                                     epochs="ia_epochs", learning_rate="ia_learning_rate",
                                     config_keys=["item_text_fields", "item_text_separator", "ia_template",
                                                  "ia_items_per_prompt", "ia_desc_tokens", "gllm_init"]))
        return stages

    def final_stage(self):
        """Stage 4: user-item alignment, trained by RecBole's loop (validation, early stopping)."""
        modules = ["user_proj" if self.use_ua else "user_id_emb", "head", "slots"]
        if not self.use_ia:
            modules.append("item_proj")
        return TrainStage("user_item_alignment", modules=modules, batches=self.train_batches,
                          loss=self.calculate_loss, module_learning_rates={"head": "head_learning_rate"})

    # Stage 1: graph pretraining (the CF-backbone service's cf_pretrain stage, on backbone_split).
    def _cf_stage(self):
        stage = self.cf.stage(on_load=self.load_graph)
        stage.config_keys = stage.config_keys + ["cross_fit"]  # cross-fitting trains it on fewer rows
        return stage

    def load_graph(self):
        user_emb, item_emb = self.cf.embeddings()
        self.user_emb.copy_(user_emb)
        self.item_emb.copy_(item_emb)
        self.item_proj.calibrate(self.item_emb, self.token_std)
        self.user_proj.calibrate(self.user_emb, self.token_std)

    # Stage 2: profile and prediction texts, written by the LLM.
    def generate_profiles(self, trainer, train_data, valid_data):
        """Both texts per user in one pass: the prompts share their beginning (system message and the user's
        items), which is encoded once and reused for each question (``generate_text_variants``)."""
        templates = [self.config["profile_prompt"], self.config["prediction_prompt"]]
        rows = [[t.format(history=self._history_text(u)) for t in templates]
                for u in range(1, self.n_users)]  # user 0 is RecBole's padding user
        profile, prediction = generate_text_variants(
            self.llm, self.tokenizer, rows, self.config["gen_max_tokens"], self.config["gen_batch_size"],
            desc="Generate profile + prediction", show_progress=self.config["show_progress"],
            system=self.config["gen_system_prompt"])
        return {"profile": [""] + profile, "prediction": [""] + prediction}

    def load_profiles(self, artifact):
        self.profile_texts, self.prediction_texts = artifact["profile"], artifact["prediction"]

    # Stage 3: item-text alignment (a TrainStage: item projector, slots and GLLM head train).
    def item_text_batches(self, train_data, epoch):
        rng = random.Random(self.config["seed"] * 1000 + epoch)
        items = list(range(1, self.n_items))
        rng.shuffle(items)
        groups = [items[i:i + self.m] for i in range(0, len(items), self.m)]
        batch = self.config["train_batch_size"]
        return [groups[i:i + batch] for i in range(0, len(groups), batch)]

    def item_text_prompts(self, groups):
        """Each group of m items: its item tokens, its descriptions shuffled, m slots; targets in description order."""
        rng = random.Random(sum(sum(g) for g in groups))
        encoded, targets = [], []
        for items in groups:
            order = items[:]
            rng.shuffle(order)  # descriptions in another order than the item tokens
            desc = []
            for n, item in enumerate(order, 1):
                desc += self.tokenizer(f" ({n}) ", add_special_tokens=False)["input_ids"] + self._desc_ids[item]
            encoded.append(self.ia_template.encode(items=self.item_tokens(torch.tensor(items)), descriptions=desc,
                                                   slots=self.ia_slots[:len(items)]))
            targets.append(order)
        return encoded, targets

    def item_text_loss(self, groups):
        encoded, targets = self.item_text_prompts(groups)
        return self._slot_loss(self._slot_logits(encoded, None, self.ia_head), targets)

    # Stage 4 (final): user-item alignment, trained by RecBole's loop in LLMTrainer.
    def train_batches(self, train_data, epoch):
        rng = random.Random(self.config["seed"] * 1000 + 500 + epoch)
        pool = self.held_out if self.cross_fit else self.user_items  # where eq. 3's targets come from
        users = [u for u in range(1, self.n_users) if pool[u]]
        rng.shuffle(users)
        batches = []
        for start in range(0, len(users), self.config["train_batch_size"]):
            batch = [(u, *self._targets_and_shown(u, rng)) for u in users[start:start + self.config["train_batch_size"]]]
            batches.append(batch)
        return batches

    def _targets_and_shown(self, user, rng):
        """Up to k of the user's training items as targets, shuffled (eq. 3), and items to show: never a target."""
        items = self.user_items[user][:]
        rng.shuffle(items)
        if self.cross_fit:
            targets = [i for i in items if i in self.held_out[user]][:self.k]
        else:
            targets = items[:self.k] if len(items) > self.k else items[:math.ceil(len(items) / 2)]
        chosen = set(targets)
        shown = [i for i in items if i not in chosen][:self.config["ua_history_len"]]
        return shown, targets

    def user_item_prompts(self, batch):
        return [self._user_prompt(u, shown) for u, shown, _ in batch]

    def calculate_loss(self, batch):
        self.ranking.clear()  # RecBole's restore_* idiom: the weights are about to change
        users = [u for u, _, _ in batch]
        logits = self._slot_logits(self.user_item_prompts(batch), self._head_user(users))
        targets = [targets for _, _, targets in batch]
        if self.mask_other_positives:  # the user's other training items are not negatives of a slot
            others = self._seen(users, logits.device).unsqueeze(1).repeat(1, logits.shape[1], 1)
            for row, items in enumerate(targets):
                others[row, torch.arange(len(items)), torch.tensor(items)] = False
            logits = logits.masked_fill(others, -1e4)
        return self._slot_loss(logits, targets)

    def _seen(self, users, device):
        """(B, |I|) bool: each user's training items."""
        mask = torch.zeros(len(users), self.n_items, dtype=torch.bool)
        for row, u in enumerate(users):
            mask[row, self.user_items[u]] = True
        return mask.to(device)

    def _head_user(self, users):
        """The backbone user embedding the head adds (none for w/o UA: the user comes only through the LLM)."""
        return self.user_emb[torch.tensor(users, device=self.device)] if self.use_ua else None

    # ----- the pieces every stage uses ------------------------------------------------------------------------
    def item_tokens(self, items):
        return self.item_proj(self.item_emb[items.to(self.device)])

    def user_token(self, user):
        user = torch.tensor([user], device=self.device)
        return self.user_proj(self.user_emb[user]) if self.use_ua else self.user_id_emb(user)

    def _user_prompt(self, user, shown, n_slots=None):
        limit = self.config["gen_max_tokens"]
        return self.ua_template.encode(
            user=self.user_token(user),
            history=self.item_tokens(torch.tensor(shown, dtype=torch.long)),
            profile=self._tokens(self.profile_texts[user], limit),
            prediction=self._tokens(self.prediction_texts[user], limit),
            slots=self.slots[:n_slots or self.k])

    def _slot_logits(self, encoded, user_emb, head=None):
        """Logits over all items at each prompt's own output slots: (B, most slots, |I|); a row with fewer slots
        repeats its last one (its labels there are ignored)."""
        return (self.head if head is None else head)(self._slot_states(encoded), self.item_emb, user_emb)

    def _slot_states(self, encoded):
        """The LLM's last hidden states at each prompt's output slots (B, most slots, H)."""
        input_ids, attention, placeholder, vectors, positions = collate(encoded, self.tokenizer.pad_token_id, "left")
        hidden = last_hidden_states(self.llm, input_ids.to(self.device), attention.to(self.device),
                                    placeholder.to(self.device), vectors)
        width = max(len(p["slots"]) for p in positions)
        index = torch.tensor([p["slots"] + p["slots"][-1:] * (width - len(p["slots"])) for p in positions],
                             device=self.device)
        return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    @staticmethod
    def _slot_loss(logits, targets):
        """Cross-entropy at the first len(targets) slots of each row (eq. 3)."""
        labels = torch.full(logits.shape[:2], -100, dtype=torch.long, device=logits.device)
        for row, items in enumerate(targets):
            labels[row, :len(items)] = torch.tensor(items, device=logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    # ----- inference -----------------------------------------------------------------------------------------
    def _inference_history(self, user):
        return self.user_items[user][-self.config["ua_history_len"]:]

    @torch.no_grad()
    def _score_users(self, batch, exclude):
        """``Ranking``'s scorer: the k placed items of each user of ``batch`` and the best log-softmax over the
        slots of every item (the fallback below them)."""
        users = batch[self.USER_ID].tolist()
        if self.head.closed_gate():  # Z = E_i E_u at every slot (fp32), whatever the LLM says: no LLM pass
            logits = (self._head_user(users) @ self.item_emb.T).unsqueeze(1).expand(-1, self.k, -1)
            logp, placed = self._place(logits, exclude)
            return placed, logp[:, 0]
        with autocast_context(self.device, self.llm_dtype, self.config["llm_autocast"]):
            if self.inference == "ar":
                logp, placed = self._autoregressive(users, exclude)
            else:
                states = self._inference_states(users)
                logp, placed = self._place(self.head(states, self.item_emb, self._head_user(users)), exclude)
        return placed, (logp.mean(dim=1) if self.inference == "mean" else logp.max(dim=1).values)

    def _inference_states(self, users):
        """Slot states of the inference prompts of ``users``, kept between evaluations while what feeds the LLM
        is unchanged (a digest of the projectors, slots, CF embeddings and texts; the LLM is frozen): the
        test pass after a validation of the same weights (RecBole reloads the best model, often the one just
        validated) reuses them instead of a second LLM pass. Kept only if all users' states fit in
        ``STATE_CACHE_BYTES``."""
        key = self._input_digest()
        if key != self._states_key:
            self._states, self._states_key = {}, key
        missing = [u for u in users if u not in self._states]
        if missing:
            states = self._slot_states([self._user_prompt(u, self._inference_history(u)) for u in missing])
            if self.n_users * states[0].numel() * states.element_size() > self.STATE_CACHE_BYTES:
                return states  # too many users to keep: nothing is ever kept, so ``missing`` is ``users``
            self._states.update(zip(missing, states))
        return torch.stack([self._states[u] for u in users])

    def _input_digest(self):
        """What the LLM's inputs depend on, as a digest (the frozen LLM aside)."""
        digest = hashlib.blake2b(digest_size=16)
        for name in ("item_proj", "user_proj", "user_id_emb"):
            module = getattr(self, name)
            for tensor in ([] if module is None else module.state_dict().values()):
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
        for tensor in (self.slots, self.user_emb, self.item_emb):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        digest.update("\0".join(self.profile_texts + self.prediction_texts).encode())
        return digest.hexdigest()

    def _place(self, logits, exclude):
        """Log-probabilities per slot and the k placed items, never ``exclude``d (B, |I|): first-k slots (glta)
        or slot 1's top-k (fl) or the top-k of the mean over slots (mean)."""
        logp = F.log_softmax(logits.float(), dim=-1)
        available = logp.masked_fill(exclude.unsqueeze(1), -np.inf)
        if self.inference == "fl":
            return logp, available[:, 0].topk(self.k, dim=-1).indices
        if self.inference == "mean":
            return logp, logp.mean(dim=1).masked_fill(exclude, -np.inf).topk(self.k, dim=-1).indices
        placed = []
        for t in range(self.k):
            slot = available[:, t].clone()
            for chosen in placed:
                slot.scatter_(1, chosen.unsqueeze(1), -np.inf)
            placed.append(slot.argmax(-1))
        return logp, torch.stack(placed, 1)

    def _autoregressive(self, users, exclude):
        """AR: slot t's input is the item token chosen at slot t-1 (KV cache, one slot per step)."""
        encoded = [self._user_prompt(u, self._inference_history(u), n_slots=1) for u in users]
        input_ids, attention, placeholder, vectors, _ = collate(encoded, self.tokenizer.pad_token_id, "left")
        attention = attention.to(self.device)
        base = decoder(self.llm)
        embeds = embed_inputs(self.llm, input_ids.to(self.device), placeholder.to(self.device), vectors)
        user_emb = self._head_user(users)
        seen = exclude
        out = base(inputs_embeds=embeds, attention_mask=attention, use_cache=True)
        logps, placed = [], []
        for t in range(self.k):
            logp = F.log_softmax(self.head(out.last_hidden_state[:, -1:], self.item_emb, user_emb)[:, 0].float(), -1)
            choice = logp.masked_fill(seen, -np.inf).argmax(-1)
            seen = seen.scatter(1, choice.unsqueeze(1), True)
            logps.append(logp)
            placed.append(choice)
            if t + 1 < self.k:
                attention = torch.cat([attention, attention.new_ones(len(users), 1)], 1)
                step = self.item_tokens(choice).unsqueeze(1).to(embeds.dtype)
                out = base(inputs_embeds=step, attention_mask=attention, past_key_values=out.past_key_values,
                           use_cache=True)
        return torch.stack(logps, 1), torch.stack(placed, 1)
