"""Frozen-LLM forward+backward through recbole-llm's LLM layer vs a plain transformers loop, same batch.

    python bench/llm_step.py [--llm_path smollm2] [--batch 8] [--length 128] [--repeats 5]

Prints tokens/s of both (interleaved repeats, medians, measured in this one run), their ratio, the achieved
TFLOP/s as a fraction of this machine's bf16 matmul throughput (measured here with a large matmul), and the
same for GLTA's two alignment stages (item-text and user-item loss + backward on real ml-100k prompts) against
the plain loop on the very same token batch.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_llm.data.prompts import collate  # noqa: E402
from recbole_llm.llm import last_hidden_states, load_llm  # noqa: E402


def bf16_peak_tflops(size=2048, repeats=10):
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start) / 1e12)
    return best


def plain_step(llm, input_ids, attention, placeholder, vectors):
    """The plain transformers way: embed, write the vectors in, run the base model, loss, backward."""
    embeds = llm.get_input_embeddings()(input_ids).clone()
    embeds[placeholder] = vectors.to(embeds.dtype)
    hidden = llm.model(inputs_embeds=embeds, attention_mask=attention).last_hidden_state
    loss = hidden[:, -8:].float().pow(2).mean()
    loss.backward()


def our_step(llm, input_ids, attention, placeholder, vectors):
    hidden = last_hidden_states(llm, input_ids, attention, placeholder, vectors)
    loss = hidden[:, -8:].float().pow(2).mean()
    loss.backward()


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def synthetic_batch(tokenizer, hidden, batch, length, n_vectors=16):
    input_ids = torch.randint(100, 40000, (batch, length))
    attention = torch.ones_like(input_ids)
    placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
    placeholder[:, 4:4 + n_vectors] = True
    vectors = torch.randn(batch * n_vectors, hidden, requires_grad=True)
    return input_ids, attention, placeholder, vectors


def flops_per_token(llm, length):
    """Forward 2N + backward to the inputs only (frozen weights) 2N, plus attention scores, per token."""
    n = sum(p.numel() for name, p in llm.named_parameters() if "embed" not in name and "lm_head" not in name)
    cfg = llm.config
    attention = 2 * 2 * cfg.num_hidden_layers * length * cfg.hidden_size
    return 2 * (2 * n + attention)


def compare(name, llm, batch_args, repeats, peak):
    tokens = int(batch_args[1].sum())
    ours, plain = [], []
    our_step(llm, *batch_args)  # warm-up
    plain_step(llm, *batch_args)
    for _ in range(repeats):
        ours.append(tokens / timed(our_step, llm, *batch_args))
        plain.append(tokens / timed(plain_step, llm, *batch_args))
    o, p = statistics.median(ours), statistics.median(plain)
    tflops = o * flops_per_token(llm, batch_args[0].shape[1]) / 1e12
    print(f"{name:<34} {tokens:>7} {o:>12.1f} {p:>12.1f} {o / p:>8.3f} {tflops:>9.3f} {tflops / peak:>9.1%}")
    return o / p


def glta_batches(llm_path, batch):
    """Real GLTA prompts on ml-100k (random CF embeddings: throughput does not depend on their values)."""
    from recbole_llm.config import Config
    from recbole_llm.model.general_recommender.glta import GLTA
    from recbole_llm.utils import create_dataset, data_preparation

    config = Config("GLTA", "ml-100k", config_dict={"llm_path": llm_path, "show_progress": False,
                                                    "train_batch_size": batch})
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    model = GLTA(config, train._dataset)
    model.user_emb.normal_()
    model.item_emb.normal_()
    model.profile_texts = ["likes light comedies and classic dramas from the nineties"] * model.n_users
    model.prediction_texts = ["will enjoy a romantic comedy or a thriller next"] * model.n_users
    model.start_final_stage()
    ia = model.item_text_batches(0)[0]
    ua = model.train_batches(train, 0)[0]
    return model, ia, ua


def glta_compare(name, model, encoded, loss_fn, batch, repeats, peak):
    """GLTA's stage loss + backward vs the plain loop on the same token batch."""
    llm = model.llm
    input_ids, attention, placeholder, vectors, _ = collate(encoded, model.tokenizer.pad_token_id, "left")
    vectors = vectors.detach().requires_grad_(True)
    tokens = int(attention.sum())

    def ours():
        loss_fn(batch).backward()

    loss_fn(batch).backward()
    plain_step(llm, input_ids, attention, placeholder, vectors)
    o_times, p_times = [], []
    for _ in range(repeats):
        o_times.append(tokens / timed(ours))
        p_times.append(tokens / timed(plain_step, llm, input_ids, attention, placeholder, vectors))
    o, p = statistics.median(o_times), statistics.median(p_times)
    tflops = o * flops_per_token(llm, input_ids.shape[1]) / 1e12
    print(f"{name:<34} {tokens:>7} {o:>12.1f} {p:>12.1f} {o / p:>8.3f} {tflops:>9.3f} {tflops / peak:>9.1%}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm_path", default="smollm2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_glta", action="store_true")
    args = parser.parse_args()

    config = {"llm_path": args.llm_path, "llm_dtype": "auto", "llm_quantization": "auto", "llm_cache_dir": None,
              "llm_gradient_checkpointing": False, "lora_r": 0, "device": torch.device("cpu")}
    llm, tokenizer = load_llm(config)
    peak = bf16_peak_tflops()
    print(f"threads {torch.get_num_threads()}, bf16 matmul peak measured here: {peak:.3f} TFLOP/s")
    print(f"{'step':<34} {'tokens':>7} {'ours tok/s':>12} {'plain tok/s':>12} {'ratio':>8} {'TFLOP/s':>9} {'of peak':>9}")
    batch = synthetic_batch(tokenizer, llm.config.hidden_size, args.batch, args.length)
    ratio = compare(f"frozen LLM fwd+bwd {args.batch}x{args.length}", llm, batch, args.repeats, peak)
    print(f"overhead of our layer vs plain transformers: {(1 / ratio - 1):+.1%} (target < +5%)")
    if args.skip_glta:
        return
    del llm
    model, ia, ua = glta_batches(args.llm_path, args.batch)
    glta_compare("GLTA item-text alignment step", model, model.item_text_prompts(ia)[0], model.item_text_loss, ia,
                 args.repeats, peak)
    glta_compare("GLTA user-item alignment step", model, model.user_item_prompts(ua), model.calculate_loss, ua,
                 args.repeats, peak)


if __name__ == "__main__":
    main()
