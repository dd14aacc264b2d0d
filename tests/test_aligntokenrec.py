"""AlignTokenRec on tiny-random: codebooks, unique codes, constrained decoding, negatives, Table 7's trained MLP of
the codes, the query task on review text, new items, the serving cache, and the start-up check of the item text."""
import glob
import os
import random

import pytest
import torch

from recbole_llm.config import Config
from recbole_llm.errors import ConfigError
from recbole_llm.llm.inputs import input_embedding
from recbole_llm.model.quantize import ResidualQuantizer, collision_rate, resolve_collisions
from recbole_llm.model.sequential_recommender.aligntokenrec import AlignTokenRec
from recbole_llm.quick_start import load_data_and_model, main as cli_main, run_recbole_llm
from recbole_llm.serve import TopKCacheFile, TopKServer, main as serve_main
from recbole_llm.trainer import LLMTrainer
from recbole_llm.utils import create_dataset, data_preparation
from tests.conftest import write_sequential_dataset

SMALL = {"llm_path": "tiny-random", "epochs": 1, "train_batch_size": 16, "eval_batch_size": 4096,
         "cf_config": {"epochs": 3}, "show_progress": False, "seed": 2020, "item_text_fields": ["title", "genre"],
         "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
         "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "codebook_size": 8, "codebook_epochs": 5,
         "beam_size": 10, "ranking_top_k": 10, "llm_eval_batch_size": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained model: (checkpoint path, config dict)."""
    tmp = tmp_path_factory.mktemp("atr")
    root = write_sequential_dataset(str(tmp / "data"), name="atr")
    config = dict(SMALL, data_path=root, checkpoint_dir=str(tmp / "saved"))
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        run_recbole_llm("AlignTokenRec", "atr", config_dict=config)
    finally:
        os.chdir(cwd)
    return glob.glob(str(tmp / "saved" / "AlignTokenRec-*.pth"))[0], config


@pytest.fixture(scope="module")
def model_and_data(trained):
    _, model, _, train_data, _, _ = load_data_and_model(trained[0])
    return model, train_data


def _train_codebooks(model, items, steps=100):
    losses = [[float(x) for x in model.tokenization_loss(items)]]
    optimizer = torch.optim.Adam(model.set_trainable(["quantizer", "llm_align"]), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        sum(model.tokenization_loss(items)).backward()
        optimizer.step()
    model.requires_grad_(False)
    return losses + [[float(x) for x in model.tokenization_loss(items)]]


def test_codebook_training_lowers_both_losses(model_and_data):
    """From random codebooks, training lowers L^B and L^L. From the k-means start, L^B is already at a minimum:
    training lowers L^L and the total L = L^B + L^L (eq. 4), trading a little L^B."""
    model, _ = model_and_data
    saved = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("quantizer.", "llm_align."))}
    items = torch.arange(1, model.n_items)
    try:
        model.load_codebooks(model.init_codebooks(None, None, None))  # E^LLM and the k-means start
        (b0, l0), (b1, l1) = _train_codebooks(model, items)
        assert l1 < l0 and b1 + l1 < b0 + l0
        with torch.no_grad():
            torch.manual_seed(0)
            model.quantizer.codebooks.normal_(std=float(model.item_emb[1:].std()))
        (b0, l0), (b1, l1) = _train_codebooks(model, items)
        assert b1 < b0 and l1 < l0, ((b0, l0), (b1, l1))
    finally:
        model.load_state_dict(saved, strict=False)


def test_codes_are_unique_after_collision_handling(model_and_data):
    model, _ = model_and_data
    codes = model.item_codes[1:]
    assert len(torch.unique(codes, dim=0)) == len(codes) == model.n_items - 1
    assert 0.0 <= model.collision_rate <= 1.0

    # forced collisions: every item on the same sequence; deterministic, the closest keeps it, only level N-1 moves
    raw = torch.tensor([[1, 2, 3]] * 5)
    distances = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))
    assert collision_rate(raw) == 1.0
    unique = resolve_collisions(raw, distances)
    assert torch.equal(unique, resolve_collisions(raw, distances))
    assert len(torch.unique(unique, dim=0)) == 5 and (unique[:, :2] == raw[:, :2]).all()
    keeper = int(distances[:, 3].argmin())
    assert unique[keeper, 2] == 3


# ----- Table 7: code_token_init mlp2 / mlp3, the MLP and the code vectors train with the LLM ------------------------
FAST = {"llm_dtype": "fp32", "codebook_epochs": 2, "seq_rows_per_user": 1, "neg_ratio": 1}


def _build(tmp, root, name="atr", **options):
    """(config dict, config, model, train, valid), the stages before fine-tuning run."""
    options = dict(SMALL, data_path=root, checkpoint_dir=str(tmp / "saved"), **dict(FAST, **options))
    config = Config("AlignTokenRec", name, config_dict=options)
    train, valid, _ = data_preparation(config, create_dataset(config))
    model = AlignTokenRec(config, train._dataset)
    LLMTrainer(config, model).run_stages(train, valid)
    return options, config, model, train, valid


@pytest.fixture(scope="module")
def mlp_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atr_mlp")
    return _build(tmp, write_sequential_dataset(str(tmp / "data"), name="atr"), code_token_init="mlp2")


def _expected_code_rows(model):
    """MLP(codebook vectors), standardised to the embedding table's mean and spread (taken when the LLM loaded)."""
    rows = model.code_embedding.mlp(model.code_embedding.vectors)
    return (rows - rows.mean()) / rows.std() * model.code_embedding.std + model.code_embedding.mean


def test_none_keeps_the_trainable_token_rows(model_and_data):
    model, _ = model_and_data
    assert model.code_embedding is None and model.final_stage().modules == ["llm"]
    assert not any(k.startswith("code_embedding") for k in model.state_dict())


def test_mlp_gives_the_code_token_input_rows(mlp_model):
    options, _, model, train, _ = mlp_model
    assert model.final_stage().modules == ["llm", "code_embedding"]
    mlp = model.code_embedding.mlp
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"]  # "MLP-ReLU-MLP"
    assert mlp[0].in_features == model.cf_dim and mlp[-1].out_features == input_embedding(model.llm).weight.shape[1]
    # stage 4: the vectors start as the trained codebooks, the output rows as the MLP's first rows
    assert torch.equal(model.code_embedding.vectors, model.quantizer.codebooks.reshape(-1, model.cf_dim))
    ids, old = model.code_ids.flatten(), torch.arange(10)
    with torch.no_grad():
        expected = _expected_code_rows(model)
        table = input_embedding(model.llm).weight
        assert model.code_embedding.std == pytest.approx(float(table.std()), rel=0.05)
        assert torch.allclose(input_embedding(model.llm)(ids), expected, atol=1e-5)
        assert torch.allclose(input_embedding(model.llm)(old), input_embedding(model.llm).weight[old])
        assert torch.allclose(model.llm.get_output_embeddings().weight[ids], expected, atol=1e-5)
        # mixed in a batch: each code position takes its own row, the others stay
        mixed = torch.stack([ids[:6], torch.cat([old[:3], ids[-3:]])])
        out = input_embedding(model.llm)(mixed)
        assert torch.allclose(out[0], expected[:6], atol=1e-5) and torch.allclose(out[1, 3:], expected[-3:], atol=1e-5)
        assert torch.allclose(out[1, :3], input_embedding(model.llm).weight[old[:3]])
    mlp3 = AlignTokenRec(Config("AlignTokenRec", "atr", config_dict=dict(options, code_token_init="mlp3")),
                         train._dataset)
    assert [type(m).__name__ for m in mlp3.code_embedding.mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


def test_mlp_and_code_vectors_train_from_the_loss(mlp_model):
    _, _, model, train, _ = mlp_model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        params = model.set_trainable(model.final_stage().modules)
        own = dict(model.code_embedding.named_parameters())
        assert all(any(p is q for q in params) for p in own.values())
        before = {n: p.detach().clone() for n, p in own.items()}
        with torch.no_grad():
            rows_before = model.code_embedding().clone()  # cached under no_grad
        batch = next(iter(model.task_batches(train, 0)))
        model.train()
        loss = model.calculate_loss(batch)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own.values()), \
            {n: p.grad is not None and float(p.grad.abs().sum()) for n, p in own.items()}
        torch.optim.Adam(params, lr=1e-3).step()
        assert all(not torch.equal(before[n], p) for n, p in own.items())
        model.eval()
        with torch.no_grad():  # the cache sees the step: the rows are MLP(codebook) of the new weights
            assert not torch.allclose(model.code_embedding(), rows_before)
            ids = model.code_ids.flatten()
            assert torch.allclose(input_embedding(model.llm)(ids), _expected_code_rows(model), atol=1e-5)
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        model.load_state_dict(saved)


def test_mlp_fine_tuning_saves_and_reloads_the_same_scores(mlp_model):
    """The trainer's final stage trains the MLP and the vectors; the checkpoint restores them: same top-K, scores."""
    _, config, model, train, valid = mlp_model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        start = {n: p.detach().clone() for n, p in model.code_embedding.named_parameters()}
        trainer = LLMTrainer(config, model)
        trainer.fit(train, valid, saved=True)
        assert all(not torch.equal(start[n], p) for n, p in model.code_embedding.named_parameters())
        state = torch.load(trainer.saved_model_file, weights_only=False)["state_dict"]
        assert {k for k in state if k.startswith("code_embedding.")} == {f"code_embedding.{n}" for n in start}
        _, loaded, _, _, _, _ = load_data_and_model(trainer.saved_model_file)
        for n, p in loaded.code_embedding.named_parameters():
            assert torch.equal(p, dict(model.code_embedding.named_parameters())[n])
        histories = [[1, 4, 7], [2, 5], [3, 6, 9, 12, 15]]
        model.eval()
        items, scores = model.recommend(histories)
        loaded_items, loaded_scores = loaded.recommend(histories)
        assert torch.equal(items, loaded_items) and torch.allclose(scores, loaded_scores, atol=1e-5)
    finally:
        model.load_state_dict(saved)


def test_unknown_code_token_init_fails_naming_the_option(mlp_model):
    options, _, _, train, _ = mlp_model
    with pytest.raises(ConfigError, match="code_token_init: unknown 'mlp4'"):
        AlignTokenRec(Config("AlignTokenRec", "atr", config_dict=dict(options, code_token_init="mlp4")), train._dataset)


# ----- the query alignment task on review text -----------------------------------------------------------------
def _add_reviews(root, name):
    """The .inter file with a ``review_text`` column: one distinct review per interaction, one empty review,
    and user 1 re-reviewing its first item as its last (test) interaction. Returns (training rows, all rows):
    the rows (user, item, rating, time, review) of each user's interactions but the last two (leave-one-out's
    training split), and of all interactions, in file order."""
    path = os.path.join(root, name, f"{name}.inter")
    with open(path) as f:
        header, *lines = [line.rstrip("\n").split("\t") for line in f]
    first_of_user_1 = next(row for row in lines if row[0] == "1")
    lines.append(["1", first_of_user_1[1], "5", "1999"])  # after user 1's others: its test interaction
    rows = []
    for n, (user, item, rating, time) in enumerate(lines):
        review = "" if n == 5 else f"review {n} by user {user}: item {item} was fine"
        rows.append((user, item, rating, time, review))
    with open(path, "w") as f:
        f.write("\t".join(header + ["review_text:token"]) + "\n")
        f.writelines("\t".join(row) + "\n" for row in rows)
    training = []
    for user in {row[0] for row in rows}:
        mine = sorted((float(r[3]), r) for r in rows if r[0] == user)
        training += [r for _, r in mine[:-2]]
    return training, rows


def test_query_task_builds_one_sample_per_training_review(tmp_path):
    root = write_sequential_dataset(str(tmp_path / "data"), name="atrq", n_users=12, n_items=15, length=6)
    training, rows = _add_reviews(root, "atrq")
    options, config, model, train, valid = _build(tmp_path, root, name="atrq", text_task=False, neg_ratio=0)
    users, items = train._dataset.field2token_id["user_id"], train._dataset.field2token_id["item_id"]
    expected = sorted((users[u], items[i], review) for u, i, _, _, review in training if review)
    assert sorted(model.reviews) == expected and len(expected) == len(training) - 1  # one review is empty
    leak = rows[-1][4]  # user 1's test interaction repeats a training pair: its review is not used
    assert all(review != leak for _, _, review in model.reviews)
    assert any(u == users["1"] and i == items[rows[-1][1]] for u, i, _ in model.reviews)  # the training review is

    samples = [s for batch in model.task_batches(train, epoch=0) for s in batch]
    queries = [s for s in samples if s[0] == "query"]
    assert sorted((user, item, review) for _, _, review, item, user in queries) == expected
    _, _, review, item, _ = queries[0]
    prompt = model.tokenizer.decode(model.encode_sample(queries[0]))
    assert prompt.startswith("You meet a user's query: ") and review in prompt
    assert prompt.endswith(". Please respond to this user by selecting an appropriate item")
    assert model.item_token_ids(item) == model.trie.tokens(item)[:-1]  # the answer: the item's N code tokens
    assert set(model.item_token_ids(item)) <= set(model.code_ids.flatten().tolist())
    assert torch.isfinite(model.calculate_loss(queries[:4]))

    trainer = LLMTrainer(config, model)  # end to end: stages from the cache, one epoch, validation
    score, _ = trainer.fit(train, valid, saved=False)
    assert trainer.optimizer_steps > 0 and 0 <= score <= 1
    assert not AlignTokenRec(Config("AlignTokenRec", "atrq", config_dict=dict(
        options, review_text_field="no_such_field")), train._dataset).reviews


def test_quantizer_kmeans_init_and_encoder_decoder_variant():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    for ed in (False, True):
        q = ResidualQuantizer(8, levels=3, codes=4, distance="l2", encoder_decoder=ed)
        q.init_kmeans(x)
        codes, inputs, chosen, distances = q(x)
        assert codes.shape == (64, 3) and inputs.shape == chosen.shape == (64, 3, 8) and distances.shape == (64, 4)
        assert torch.allclose(inputs[:, 1], inputs[:, 0] - chosen[:, 0], atol=1e-6)  # level 1 sees the residual


def test_the_trie_never_emits_an_invalid_item(model_and_data):
    model, _ = model_and_data
    rng = random.Random(0)
    items = set(range(1, model.n_items))
    histories = [[rng.randrange(1, model.n_items) for _ in range(rng.randrange(0, 25))] for _ in range(24)]
    model.valid_items = model.decoded_items = 0
    recommended, scores = model.recommend(histories)
    assert recommended.shape == (24, model.beam_size)
    assert set(recommended.flatten().tolist()) <= items
    assert model.valid_items == model.decoded_items == recommended.numel()
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # each row's items are distinct real items whose code sequences the trie maps back to them
    for row in recommended.tolist():
        assert len(set(row)) == len(row)
        assert all(model.trie.item(model.item_token_ids(i)) == i for i in row)


def test_negative_prompts_use_only_items_the_user_never_interacted_with(model_and_data):
    model, train_data = model_and_data
    feat = train_data._dataset.inter_feat
    seen = {}
    for u, target, seq, n in zip(feat["user_id"].tolist(), feat["item_id"].tolist(), feat["item_id_list"].tolist(),
                                 feat["item_length"].tolist()):
        seen.setdefault(u, set()).update([target] + seq[:n])
    samples = [s for batch in model.task_batches(train_data, epoch=0) for s in batch]
    negatives = [s for s in samples if s[0] == "neg"]
    assert len(negatives) == model.neg_ratio * sum(s[0] == "seq" for s in samples) > 0
    assert all(target not in seen[user] and 0 < target < model.n_items for _, _, _, target, user in negatives)
    assert sum(s[0] == "text" for s in samples) == model.n_items - 1
    prompt = model.tokenizer.decode(model.encode_sample(negatives[0]))
    assert "what will user hate next?" in prompt and "<a_" in prompt


def test_a_new_item_gets_codes_and_is_recommended(trained, tmp_path):
    server = TopKServer(trained[0], str(tmp_path / "topk.json"))
    model = server.model
    known = {tuple(c) for c in model.item_codes[1:].tolist()}
    codes = server.add_item("new-like-3", embedding=server.item_embedding("3"))
    assert tuple(codes.tolist()) not in known  # unique even though it looks exactly like item 3
    text_codes = server.add_item("new-text", text="Movie number 99, Comedy")
    assert tuple(text_codes.tolist()) not in known | {tuple(codes.tolist())}
    assert len(model.trie) == model.n_items + 1
    model.beam_size = len(model.trie) + 2  # every reachable item comes out of the beams
    server.precompute(["1"], k=model.beam_size)
    assert {"new-like-3", "new-text"} <= {item for item, _ in server.cache.lookup("1")}


def test_the_cache_round_trips_and_refreshes_chosen_users(trained, tmp_path, capsys):
    path = str(tmp_path / "topk.json")
    assert serve_main(["precompute", "--checkpoint", trained[0], "--cache", path, "--k", "5",
                       "--users", "1", "2", "3"]) == 0
    cache = TopKCacheFile(path)
    assert set(cache.data["users"]) == {"1", "2", "3"} and all(len(cache.lookup(u)) == 5 for u in "123")
    capsys.readouterr()
    assert serve_main(["lookup", "--cache", path, "--user", "2"]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [(item, round(score, 4)) for item, score in cache.lookup("2")] == [(i, float(s)) for i, s in printed]

    # refresh one user after adding an item: the others are untouched, the new item is kept in the file
    assert serve_main(["add-item", "--checkpoint", trained[0], "--cache", path, "--item", "fresh",
                       "--like", "5", "--users", "1"]) == 0
    again = TopKCacheFile(path)
    assert again.lookup("2") == cache.lookup("2") and "fresh" in again.data["new_items"]
    server = TopKServer(trained[0], path)
    assert "fresh" in server.item_ids and len(server.model.trie) == server.model.n_items
    assert serve_main(["lookup", "--cache", path, "--user", "nobody"]) == 2


def test_a_dataset_without_the_text_field_fails_at_start_naming_it(tmp_path, capsys):
    root = write_sequential_dataset(str(tmp_path / "data"), name="notext")
    config = dict(SMALL, data_path=root, checkpoint_dir=str(tmp_path / "saved"),
                  item_text_fields=["title", "description"])
    with pytest.raises(ConfigError, match="description"):
        run_recbole_llm("AlignTokenRec", "notext", config_dict=config)
    assert not os.path.exists(tmp_path / "saved" / "stages")  # nothing ran

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_path: {root}\nllm_path: tiny-random\nitem_text_fields: [title, description]\n"
                   "load_col:\n  inter: [user_id, item_id, timestamp]\n")
    assert cli_main(["--model=AlignTokenRec", "--dataset=notext", f"--config_files={cfg}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "description" in err[0] and err[0].startswith("recbole-llm: error:")


def test_tca_soft_labels_plug_into_the_sequential_task(tmp_path):
    """``tca_alpha > 0``: TCA4Rec's SoftLabelLoss on the sequential task's code tokens, the DCCF backbone as teacher;
    through the same path at alpha 0 the loss equals the plain SFT loss, and rows of other tasks stay one-hot."""
    root = write_sequential_dataset(str(tmp_path / "data"), name="atr")
    config = Config("AlignTokenRec", "atr", config_dict=dict(
        SMALL, data_path=root, checkpoint_dir=str(tmp_path / "saved"), llm_dtype="fp32", tca_alpha=0.5,
        tca_loss="soft_ce", code_token_init="mlp2", codebook_epochs=2))
    train, valid, _ = data_preparation(config, create_dataset(config))
    model = AlignTokenRec(config, train._dataset)
    LLMTrainer(config, model).run_stages(train, valid)
    assert model.alignment.trie is model.trie
    samples = [s for batch in model.task_batches(train, 0) for s in batch]
    batch = [s for s in samples if s[0] == "seq"][:4] + [s for s in samples if s[0] != "seq"][:4]
    other = [s for s in samples if s[0] != "seq"][:8]
    soft, soft_other = model.calculate_loss(batch).item(), model.calculate_loss(other).item()
    model.alignment.alpha = 0.0
    zero, zero_other = model.calculate_loss(batch).item(), model.calculate_loss(other).item()
    alignment, model.alignment = model.alignment, None
    plain, plain_other = model.calculate_loss(batch).item(), model.calculate_loss(other).item()
    model.alignment = alignment
    # to fp32 rounding (the LM head runs on differently shaped inputs in the two paths): 1e-6 of the loss
    assert zero == pytest.approx(plain, rel=1e-6) and zero_other == pytest.approx(plain_other, rel=1e-6)
    assert abs(soft - plain) > 1e-4
    assert soft_other == pytest.approx(plain_other, rel=1e-6)  # no sequential row: no soft label
    # TCA4Rec's MSL and temperature: the masked softmax only removes mass from tokens that continue no item
    model.alignment.alpha, model.alignment.masked = 0.0, True
    assert model.calculate_loss(batch).item() < plain - 1e-4
    model.alignment.masked, model.alignment.temperature = False, 2.0
    assert abs(model.calculate_loss(batch).item() - plain) > 1e-4
    for key, value in (("tca_alpha", 1.5), ("tca_temperature", 0)):
        with pytest.raises(ConfigError, match=key):
            AlignTokenRec(Config("AlignTokenRec", "atr", config_dict=dict(
                SMALL, data_path=root, checkpoint_dir=str(tmp_path / "saved"), **{key: value})), train._dataset)
    msl_only = AlignTokenRec(Config("AlignTokenRec", "atr", config_dict=dict(
        SMALL, data_path=root, checkpoint_dir=str(tmp_path / "saved"), tca_msl=True)), train._dataset)
    assert msl_only.alignment.masked and msl_only.alignment.alpha == 0


def test_exclude_seen_items_leaves_the_users_history_out_of_the_beams(trained):
    """``exclude_seen_items``: no top-K item is one the user has seen (the row's history, the training items),
    in evaluation and in ``recommend`` (the given histories); off (the default), nothing changes."""
    from recbole_llm.model.backbone import training_interactions
    from recbole_llm.model.ranking import Ranking

    _, model, _, train_data, _, test_data = load_data_and_model(trained[0])
    assert model.config["exclude_seen_items"] is False and not model.ranking.exclude_seen
    batch = next(iter(test_data))[0]
    plain = training_interactions(train_data._dataset).inter_feat
    seen = torch.zeros(len(batch), model.n_items, dtype=torch.bool)
    rows = {u: r for r, u in enumerate(batch["user_id"].tolist())}  # one test row per user
    for u, i in zip(plain["user_id"].tolist(), plain["item_id"].tolist()):
        if u in rows:
            seen[rows[u], i] = True
    for row, (seq, n) in enumerate(zip(batch["item_id_list"].tolist(), batch["item_length"].tolist())):
        seen[row, seq[:n]] = True
    default = model.full_sort_predict(batch).view(len(batch), -1).topk(10).indices
    assert seen.gather(1, default).any()  # the default ranks seen items

    model.ranking = Ranking(model.config, train_data._dataset, model._score_rows, exclude_seen=True)
    top = model.full_sort_predict(batch).view(len(batch), -1).topk(10).indices
    assert not seen.gather(1, top).any()
    histories = [seq[:n] for seq, n in zip(batch["item_id_list"].tolist(), batch["item_length"].tolist())]
    items, _ = model.recommend(histories)
    assert all(i > 0 and i not in h for row, h in zip(items.tolist(), histories) for i in row)
