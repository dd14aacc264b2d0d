"""SeLLaRec: Enhancing LLM-based Recommendation through Semantic-Aligned Collaborative Knowledge (Wang et al., 2025).

Click-through prediction in RecBole's labeled mode: a prompt holds the user's recently liked items (titles, up to
``history_len``) and a target item; the score is ``softmax([l_Yes, l_No])[Yes]`` of the LLM's next-token logits
after the prompt (eqs. 2-3; the answer token ids come from the tokenizer). Labels: RecBole's ``threshold``
(``{rating: 4}``: rating > 3), read by ``recbole_llm.data.SeLLaRecDataset`` (also the month-window split).

Stages, in the paper's order (Table 1; each cached by ``StageCache``):
  1. tallrec         LoRA fine-tuning on the text prompts (TALLRec, eqs. 4-5). ``sft_loss``: ``answer`` (default)
                     the causal-LM loss of the answer token; ``choice`` eq. 5's cross-entropy on
                     softmax([l_Yes, l_No]); ``prompt`` the causal-LM loss over the whole prompt and answer, as
                     the authors' code does (ours supervises the answer by default).
  2. distill         item semantic vectors E^L_I: the last-layer hidden state of the last token of
                     ``Movie: {title}`` under the stage-1 LLM (``distill_pooling: mean`` averages the tokens).
     collab_align    MF on the labels (eq. 6; ``mf_loss``: ``bce`` as CoLLM's MF, or ``mse``, eq. 6's squared
                     error) plus lambda * InfoNCE between Proj^{C->L}(e^C_i) = W2 GELU(W1 e^C_i + b1) + b2 and e^L_i
                     (eqs. 7-9; cosine / tau over the batch's items). E^C, Proj^{C->L} and E^L train.
     projector_init  stage 3's Proj^{C->L}: the stage-2 one (warm start) or a random one (SeLLa-Proj); the
                     projections' outputs are rescaled to the spread of the LLM's token embeddings.
  3. projection      (final stage, RecBole's fit loop) <User_ID> = Proj^{C->L}(e^C_u), <Item_ID> =
                     Proj^{C->L}(e^C_i), <Warm_ID> = Proj^{W->L}(e^L_i) (eq. 10) fill their placeholder positions;
                     the LLM and its LoRA are frozen; E^C, E^L and both projections train on eq. 11.
                     ``stage3_order``: ``joint`` (default) or the paper's ``W-UI`` / ``UI-W`` (the warm-token
                     components, then the user/item ones, or the reverse).

Why stage 2 is a ``TrainStage`` of this model and not the shared CF-backbone service: the service trains a RecBole
model with that model's own loss and hands it back frozen; here MF learns pointwise labels with an extra InfoNCE term
through a projector and semantic embeddings that train with it, and stage 3 trains the MF embeddings again.

Baselines and ablations from the same code (``ABLATIONS``): ``MF`` (stage 2's MF alone, no LLM), ``TALLRec``
(stage 1 alone, trained by the fit loop), ``SeLLa-w/o`` (= CoLLM: MF tokens, no alignment, no warm token),
``SeLLa-Proj`` (random stage-3 projector), ``SeLLa-Warm`` (no <Warm_ID>), ``SeLLa-UI`` (no <User_ID>/<Item_ID>),
``SeLLa-W-UI`` / ``SeLLa-UI-W`` (training orders).

History: a training row's prompt lists the user's liked training items before its time; an evaluated row lists
the user's liked training items before its time (all of them under a temporal split). Training rows with fewer
than ``min_history`` liked items before them do not train the LLM stages (TALLRec / CoLLM keep such rows out);
every evaluated row is scored.
"""
import bisect

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.utils import InputType, ModelType
from torch import nn
from tqdm import tqdm

from recbole_llm.data.item_text import load_item_texts
from recbole_llm.data.prompts import PromptTemplate, collate, length_batches
from recbole_llm.errors import ConfigError
from recbole_llm.llm import (answer_labels, answer_token_ids, causal_lm_loss, choice_logits, embedding_std,
                             encode_texts, load_llm)
from recbole_llm.llm.scoring import IGNORE
from recbole_llm.model.abstract import LLMRecommender, Stage, TrainStage
from recbole_llm.model.layers import Projector

TOKENS = ("user_item", "warm")
ORDERS = ("joint", "W-UI", "UI-W")
# The paper's baselines and variants (Tables 3 and 5), as config overrides.
ABLATIONS = {
    "MF": {"backbone_only": True},
    "TALLRec": {"tokens": []},
    "SeLLa-w/o": {"align": False, "tokens": ["user_item"]},
    "SeLLa-Proj": {"warm_start_projector": False},
    "SeLLa-Warm": {"tokens": ["user_item"]},
    "SeLLa-UI": {"tokens": ["warm"]},
    "SeLLa-W-UI": {"stage3_order": "W-UI"},
    "SeLLa-UI-W": {"stage3_order": "UI-W"},
    "SeLLaRec": {},
}


class SeLLaRec(LLMRecommender, GeneralRecommender):
    type = ModelType.CONTEXT  # labeled (CTR) evaluation; ids only, so GeneralRecommender's bookkeeping suffices
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self._check_options(config)

        # load parameters info
        self.LABEL = config["LABEL_FIELD"]
        self.TIME = config["TIME_FIELD"]
        self.backbone_only = bool(config["backbone_only"])
        self.tokens = list(config["tokens"] or [])
        self.align = bool(config["align"])
        self.history_len = int(config["history_len"])
        self.min_history = int(config["min_history"])
        self.order = config["stage3_order"]

        # define layers and loss: MF (E^C)
        d = int(config["mf_embedding_size"])
        self.user_embedding = nn.Embedding(self.n_users, d)
        self.item_embedding = nn.Embedding(self.n_items, d)
        nn.init.xavier_normal_(self.user_embedding.weight)
        nn.init.xavier_normal_(self.item_embedding.weight)
        self.llm = None
        if not self.backbone_only:
            self.llm, self.tokenizer = load_llm(config)
            hidden = self.llm.config.hidden_size
            self.token_std = embedding_std(self.llm)
            self.semantic_embedding = nn.Embedding(self.n_items, hidden)  # E^L_I, filled by the distill stage
            self.collab_proj = nn.Sequential(nn.Linear(d, int(config["proj_hidden_size"])), nn.GELU(),
                                             Projector(int(config["proj_hidden_size"]), hidden))  # eq. 7
            self.warm_proj = Projector(hidden, hidden)  # Proj^{W->L}
            self.answer_ids = answer_token_ids(self.tokenizer, config["answer_words"])
            self.text_template = self._template([])
            self.token_template = self._template(self.tokens)
            titles = load_item_texts(config, dataset, fields=config["item_title_fields"] or None)
            self.titles = titles
            self._title_ids = [self._ids(f'"{t}"') for t in titles]
            self._separator_ids = self._ids(", ")
        self._index_history(dataset)
        self.requires_grad_(False)

    # ----- options and data ------------------------------------------------------------------------------
    @staticmethod
    def _check_options(config):
        unknown = [t for t in (config["tokens"] or []) if t not in TOKENS]
        if unknown:
            raise ConfigError(f"tokens: unknown '{unknown[0]}' (choose from {', '.join(TOKENS)})")
        if config["stage3_order"] not in ORDERS:
            raise ConfigError(f"stage3_order: unknown '{config['stage3_order']}' (choose from {', '.join(ORDERS)})")
        if config["sft_loss"] not in ("answer", "choice", "prompt"):
            raise ConfigError(f"sft_loss: unknown '{config['sft_loss']}' (choose from answer, choice, prompt)")
        if config["mf_loss"] not in ("bce", "mse"):
            raise ConfigError(f"mf_loss: unknown '{config['mf_loss']}' (choose from bce, mse)")
        if config["distill_pooling"] not in ("last", "mean"):
            raise ConfigError(f"distill_pooling: unknown '{config['distill_pooling']}' (choose from last, mean)")
        for key in ("history_len", "mf_embedding_size", "proj_hidden_size", "mf_batch_size"):
            if not isinstance(config[key], int) or config[key] < 1:
                raise ConfigError(f"{key}: must be a positive integer, got {config[key]!r}")

    def _ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _template(self, tokens):
        """The prompt segments (YAML ``prompt_template``) without those holding a token not in use."""
        fields = {"user": "user_item", "item": "user_item", "warm": "warm"}
        segments = [s for s in self.config["prompt_template"]
                    if not any("{" + f + "}" in s and group not in tokens for f, group in fields.items())]
        return PromptTemplate(segments, self.tokenizer)

    def _index_history(self, dataset):
        """Each user's liked training items in time order, and the training rows with enough history."""
        inter = dataset.inter_feat
        if self.LABEL not in inter:
            raise ConfigError(f"threshold: {type(self).__name__} needs the label field '{self.LABEL}' "
                              "(set threshold, e.g. {rating: 4})")
        users, items = inter[self.USER_ID].numpy(), inter[self.ITEM_ID].numpy()
        labels = inter[self.LABEL].numpy()
        self.has_time = self.TIME is not None and self.TIME in inter
        times = inter[self.TIME].numpy() if self.has_time else np.arange(len(users), dtype=np.float64)
        self.liked_times = [[] for _ in range(self.n_users)]
        self.liked_items = [[] for _ in range(self.n_users)]
        for idx in np.argsort(times, kind="stable"):
            if labels[idx] > 0.5:
                self.liked_times[users[idx]].append(float(times[idx]))
                self.liked_items[users[idx]].append(int(items[idx]))
        self.train_feat = inter
        n_before = np.array([bisect.bisect_left(self.liked_times[u], float(t)) for u, t in zip(users, times)])
        self.llm_rows = np.flatnonzero(n_before >= self.min_history)

    def _history(self, user, time, target):
        if self.has_time and time is not None:
            items = self.liked_items[user][:bisect.bisect_left(self.liked_times[user], time)]
        else:
            items = [i for i in self.liked_items[user] if i != target]
        return items[-self.history_len:]

    # ----- stages -------------------------------------------------------------------------------------------
    def stages(self):
        if self.backbone_only:
            return []
        prompt_keys = ["prompt_template", "history_len", "min_history", "item_title_fields", "answer_words",
                       "threshold", "llm_train_rows"]
        sft = TrainStage("tallrec", modules=["llm"], batches=self.llm_batches, loss=self.sft_loss,
                         epochs="sft_epochs", learning_rate="sft_learning_rate",
                         config_keys=prompt_keys + ["sft_loss"])
        if not self.tokens:
            return []  # TALLRec: stage 1 is the final stage
        stages = [sft]
        if self.align or "warm" in self.tokens:
            stages.append(Stage("distill", self.distill, self.load_distilled,
                                ["distill_template", "distill_pooling", "item_title_fields"], uses_llm=True))
        stages.append(self._collab_stage("collab_align"))
        stages.append(Stage("projector_init", self.init_projectors, self.load_projectors,
                            ["warm_start_projector"]))
        if self.order != "joint" and len(self.tokens) == 2:
            first = ["warm"] if self.order == "W-UI" else ["user_item"]
            stages.append(TrainStage(f"stage3_{self.order}", modules=self._stage3_modules(first),
                                     batches=self.llm_batches, loss=self.calculate_loss,
                                     config_keys=prompt_keys + ["tokens", "stage3_order"]))
        return stages

    def final_stage(self):
        if self.backbone_only:
            return self._collab_stage("mf")
        if not self.tokens:
            return TrainStage("tallrec", modules=["llm"], batches=self.llm_batches, loss=self.sft_loss,
                              epochs="sft_epochs", learning_rate="sft_learning_rate")
        tokens = self.tokens
        if self.order != "joint" and len(tokens) == 2:
            tokens = ["user_item"] if self.order == "W-UI" else ["warm"]
        return TrainStage("projection", modules=self._stage3_modules(tokens), batches=self.llm_batches,
                          loss=self.calculate_loss)

    def _collab_stage(self, name):
        align = self.align and not self.backbone_only
        modules = ["user_embedding", "item_embedding"] + (["collab_proj", "semantic_embedding"] if align else [])
        return TrainStage(name, modules=modules, batches=self.mf_batches, loss=self.collab_loss,
                          epochs="mf_epochs", learning_rate="mf_learning_rate", uses_llm=False,
                          config_keys=["mf_embedding_size", "mf_loss", "mf_batch_size", "align", "align_temperature",
                                       "align_weight", "proj_hidden_size", "threshold"])

    @staticmethod
    def _stage3_modules(tokens):
        """Table 1, stage 3: the components behind the tokens in use."""
        modules = []
        if "user_item" in tokens:
            modules += ["user_embedding", "item_embedding", "collab_proj"]
        if "warm" in tokens:
            modules += ["semantic_embedding", "warm_proj"]
        return modules

    # Batches: rows of the training split (Interactions), shuffled per epoch.
    def _row_batches(self, rows, size, epoch):
        rng = np.random.default_rng(self.config["seed"] * 1000 + epoch)
        rows = rng.permutation(rows)
        return [self.train_feat[torch.from_numpy(rows[i:i + size])] for i in range(0, len(rows), size)]

    def llm_batches(self, train_data, epoch):
        """Rows with at least ``min_history`` liked items before them; ``llm_train_rows`` of them if set (a
        fixed sample, the same for every epoch and stage)."""
        rows, limit = self.llm_rows, self.config["llm_train_rows"]
        if limit and limit < len(rows):
            rows = np.sort(np.random.default_rng(self.config["seed"]).choice(rows, limit, replace=False))
        return self._row_batches(rows, self.config["train_batch_size"], epoch)

    def mf_batches(self, train_data, epoch):
        return self._row_batches(np.arange(len(self.train_feat)), self.config["mf_batch_size"], epoch)

    # Stage 1: TALLRec (eqs. 4-5).
    def sft_loss(self, interaction):
        encoded = self._prompts(interaction, self.text_template)
        if self.config["sft_loss"] == "choice":
            return self._choice_loss(encoded, interaction[self.LABEL])
        answers = [self.answer_ids[0] if y > 0.5 else self.answer_ids[1] for y in interaction[self.LABEL].tolist()]
        input_ids, attention, _, _, _ = collate([(ids + [a], [], {}) for (ids, _, _), a in zip(encoded, answers)],
                                                self.tokenizer.pad_token_id, "left")
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        if self.config["sft_loss"] == "prompt":  # the authors' loss: every real token of prompt and answer
            labels = input_ids.masked_fill(attention == 0, IGNORE)
        else:
            labels = answer_labels(input_ids, [1] * len(answers))
        return causal_lm_loss(self.llm, input_ids, attention, labels)

    # Stage 2: item semantic vectors, then MF with the alignment loss (eqs. 6-9).
    def distill(self, trainer, train_data, valid_data):
        texts = [self.config["distill_template"].format(title=t or "unknown") for t in self.titles]
        return encode_texts(self.llm, self.tokenizer, texts, pooling=self.config["distill_pooling"],
                            batch_size=self.config["llm_eval_batch_size"], desc="Distill items",
                            show_progress=self.config["show_progress"])

    @torch.no_grad()
    def load_distilled(self, artifact):
        self.semantic_embedding.weight.copy_(artifact.to(self.semantic_embedding.weight.device))

    def mf_logits(self, interaction):
        return (self.user_embedding(interaction[self.USER_ID]) * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def collab_loss(self, interaction):
        label = interaction[self.LABEL].float()
        logits = self.mf_logits(interaction)
        if self.config["mf_loss"] == "mse":
            loss = F.mse_loss(logits, label)  # eq. 6
        else:
            loss = F.binary_cross_entropy_with_logits(logits, label)
        if not (self.align and not self.backbone_only):
            return loss
        items = interaction[self.ITEM_ID].unique()
        z = F.normalize(self.collab_proj(self.item_embedding(items)), dim=-1)  # eq. 7
        s = F.normalize(self.semantic_embedding(items), dim=-1)
        align = F.cross_entropy(z @ s.T / self.config["align_temperature"],
                                torch.arange(len(items), device=items.device))  # eq. 8, the batch's items
        return loss, self.config["align_weight"] * align  # eq. 9

    # Stage 3 set-up: warm start (or not) and the scale of the projected tokens.
    def init_projectors(self, trainer, train_data, valid_data):
        if not self.config["warm_start_projector"]:  # SeLLa-Proj: a fresh, random projector
            for layer in (self.collab_proj[0], self.collab_proj[2]):
                layer.reset_parameters()
        with torch.no_grad():
            if "user_item" in self.tokens:
                hidden = self.collab_proj[1](self.collab_proj[0](self.item_embedding.weight[1:]))
                self.collab_proj[2].calibrate(hidden, self.token_std)
            if "warm" in self.tokens:
                self.warm_proj.calibrate(self.semantic_embedding.weight[1:], self.token_std)
        return {"collab_proj": {k: v.cpu().clone() for k, v in self.collab_proj.state_dict().items()},
                "warm_proj": {k: v.cpu().clone() for k, v in self.warm_proj.state_dict().items()}}

    def load_projectors(self, artifact):
        self.collab_proj.load_state_dict(artifact["collab_proj"])
        self.warm_proj.load_state_dict(artifact["warm_proj"])

    # Stage 3: the prompt with the three tokens (eqs. 10-11).
    def token_vectors(self, interaction):
        """{field: (B, H)} the projected vectors of the tokens in use (eq. 10's e_user, e_item, e_warm)."""
        vectors = {}
        if "user_item" in self.tokens:
            vectors["user"] = self.collab_proj(self.user_embedding(interaction[self.USER_ID]))
            vectors["item"] = self.collab_proj(self.item_embedding(interaction[self.ITEM_ID]))
        if "warm" in self.tokens:
            vectors["warm"] = self.warm_proj(self.semantic_embedding(interaction[self.ITEM_ID]))
        return vectors

    def _prompts(self, interaction, template, vectors=None):
        users = interaction[self.USER_ID].tolist()
        items = interaction[self.ITEM_ID].tolist()
        times = interaction[self.TIME].tolist() if self.has_time and self.TIME in interaction else [None] * len(users)
        encoded = []
        for row, (u, i, t) in enumerate(zip(users, items, times)):
            history = []
            for n, h in enumerate(self._history(u, t, i)):
                history += (self._separator_ids if n else []) + self._title_ids[h]
            fields = {name: v[row:row + 1] for name, v in (vectors or {}).items()}
            encoded.append(template.encode(history=history or self._ids("none"), target=self._title_ids[i],
                                           **fields))
        return encoded

    def _encode(self, interaction):
        """The rows' prompts: with the placeholder tokens in use (stage 3), else the text prompt (TALLRec)."""
        if self.tokens:
            return self._prompts(interaction, self.token_template, self.token_vectors(interaction))
        return self._prompts(interaction, self.text_template)

    def _choice_logits(self, encoded):
        input_ids, attention, placeholder, vectors, _ = collate(encoded, self.tokenizer.pad_token_id, "left")
        return choice_logits(self.llm, input_ids.to(self.device), attention.to(self.device), self.answer_ids,
                             placeholder.to(self.device), vectors)

    def choice_logits(self, interaction):
        """(B, 2) [l_Yes, l_No] at the answer position (eq. 2)."""
        return self._choice_logits(self._encode(interaction))

    def _choice_loss(self, encoded, label):
        return F.cross_entropy(self._choice_logits(encoded).float(), (label < 0.5).long())  # class 0 = Yes (eq. 5)

    def calculate_loss(self, interaction):
        """Eq. 11: cross-entropy of P(Yes) = softmax([l_Yes, l_No])[Yes] against the label."""
        if self.backbone_only:
            return self.collab_loss(interaction)
        logits = self.choice_logits(interaction)
        return F.cross_entropy(logits.float(), (interaction[self.LABEL] < 0.5).long())

    # ----- inference -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, interaction):
        """P(like) per row: softmax([l_Yes, l_No])[Yes] (eq. 3), or MF's sigmoid(e_u . e_i) for ``MF``."""
        if self.backbone_only:
            logits = self.mf_logits(interaction)
            return logits.clamp(0, 1) if self.config["mf_loss"] == "mse" else torch.sigmoid(logits)
        size = int(self.config["llm_eval_batch_size"])
        autocast = bool(self.config["llm_autocast"]) and self.llm_dtype in (torch.bfloat16, torch.float16)
        encoded = self._encode(interaction)
        scores = torch.empty(len(encoded), device=self.device)
        with torch.autocast(self.device.type, dtype=self.llm_dtype, enabled=autocast):
            batches = length_batches([len(ids) for ids, _, _ in encoded], size)  # less left padding
            # RecBole's evaluation bar counts eval_batch_size rows: one of its steps is minutes of LLM passes
            for rows in tqdm(batches, desc="Score (LLM)", ncols=100, leave=False,
                             disable=not self.config["show_progress"] or len(batches) < 2):
                logits = self._choice_logits([encoded[row] for row in rows])
                scores[torch.as_tensor(rows, device=self.device)] = torch.softmax(logits.float(), -1)[:, 0]
        return scores
