"""LLM step throughput per dtype, the dtype ``auto`` picks here, and recbole-llm's LLM layer vs plain transformers.

    python bench/llm_step.py [--device cpu|cuda] [--llm_path smollm2] [--dtypes fp32,bf16] [--batch 4]
                             [--length 64] [--repeats 3] [--skip_glta] [--llm7b]

Prints the hardware it detected (CPU: AMX / AVX512-BF16 as torch detects them and the /proc/cpuinfo flags;
CUDA: the GPU), what ``llm_dtype: auto`` and ``llm_quantization: auto`` choose here and why, then for each dtype
side by side (one run, interleaved repeats, medians):
  - a frozen-LLM forward + backward to the inputs through our layer vs the plain transformers loop, same batch:
    tok/s of both, their ratio, TFLOP/s and MFU (model FLOPs / step time / the matmul peak measured in this run,
    in bf16 on CUDA; on CPU in the row's own dtype);
  - greedy generation (our KV-cache loop, as profile generation runs it): prompts x decode steps / time;
then GLTA's two alignment steps (real ml-100k prompts, ``auto`` dtype), each one optimizer step through
``LLMTrainer.train_steps`` (the loop every stage trains with: autocast, loss, backward, clipping, step), vs the
plain transformers forward + backward on the same tokens.
On CUDA, ``--llm7b`` adds a Llama-2-7B-shaped random model in bf16 and 4-bit (saved once under the LLM cache).
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
from recbole_llm.llm.generation import chat_prompt, greedy_decode  # noqa: E402
from recbole_llm.llm.loading import _atomic_folder, default_cache_dir, smollm2_folder  # noqa: E402
from recbole_llm.llm.precision import (DTYPE_NAMES, DTYPES, choose_dtype,  # noqa: E402
                                       choose_quantization, cpu_bf16_features)

HEADER = (f"{'step':<36} {'dtype':>8} {'tokens':>7} {'ours tok/s':>11} {'plain tok/s':>11} {'ratio':>6} "
          f"{'TFLOP/s':>8} {'MFU':>6}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, *args):
    sync(device)
    start = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - start


def hardware(device):
    """One line naming the hardware and what torch and the kernel say about its bf16 support."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"GPU {props.name}, {props.total_memory / 1024 ** 3:.0f} GiB, compute capability {props.major}.{props.minor}"
    model, flags = "unknown CPU", set()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    detected = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_bf16_features().items())
    cpuinfo = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("amx_tile", "amx_bf16", "avx512_bf16", "avx2"))
    return (f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch detects {detected} "
            f"(capability {torch.backends.cpu.get_cpu_capability()}); /proc/cpuinfo: {cpuinfo}")


def matmul_peak_tflops(device, dtype, seconds=1.0):
    """The best TFLOP/s of a square matmul in ``dtype`` on ``device`` (repeated for about ``seconds``)."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    timed(device, torch.matmul, a, b)
    best, spent = 0.0, 0.0
    while spent < seconds:
        elapsed = timed(device, torch.matmul, a, b)
        spent += elapsed
        best = max(best, 2 * size ** 3 / elapsed / 1e12)
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


def synthetic_batch(hidden, batch, length, device, n_vectors=16):
    input_ids = torch.randint(100, 30000, (batch, length), device=device)
    attention = torch.ones_like(input_ids)
    placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
    placeholder[:, 4:4 + n_vectors] = True
    vectors = torch.randn(batch * n_vectors, hidden, device=device, requires_grad=True)
    return input_ids, attention, placeholder, vectors


def flops_per_token(llm, length):
    """Forward 2N + backward to the inputs only (frozen weights) 2N, plus attention scores, per token."""
    n = sum(p.numel() for name, p in llm.named_parameters() if "embed" not in name and "lm_head" not in name)
    if getattr(llm, "is_loaded_in_4bit", False):
        n *= 2  # bitsandbytes packs two 4-bit weights into one uint8 element
    cfg = llm.config
    attention = 2 * 2 * cfg.num_hidden_layers * length * cfg.hidden_size
    return 2 * (2 * n + attention)


def interleaved(device, repeats, ours, plain):
    """Medians of ``ours`` and ``plain`` timings, run alternately after one warm-up each."""
    ours(), plain()
    o_times, p_times = [], []
    for _ in range(repeats):
        o_times.append(timed(device, ours))
        p_times.append(timed(device, plain))
    return statistics.median(o_times), statistics.median(p_times)


def row(name, dtype, tokens, ours, plain=None, flops=None, peak=None):
    o = tokens / ours
    p = f"{tokens / plain:>11.1f} {plain / ours:>6.3f}" if plain else f"{'-':>11} {'-':>6}"
    f = f"{o * flops / 1e12:>8.3f} {o * flops / 1e12 / peak:>6.1%}" if flops else f"{'-':>8} {'-':>6}"
    print(f"{name:<36} {dtype:>8} {tokens:>7} {o:>11.1f} {p} {f}", flush=True)
    return o


def llm_rows(label, llm, tokenizer, device, args, peak):
    """Frozen-LLM fwd+bwd (ours vs plain) and greedy generation, one model in one dtype."""
    batch = synthetic_batch(llm.config.hidden_size, args.batch, args.length, device)
    ours, plain = interleaved(device, args.repeats, lambda: our_step(llm, *batch), lambda: plain_step(llm, *batch))
    tokens = int(batch[1].sum())
    fwd_bwd = row(f"frozen LLM fwd+bwd {args.batch}x{args.length}", label, tokens, ours, plain,
                  flops_per_token(llm, args.length), peak)
    prompts = [chat_prompt(tokenizer, f"Describe in one sentence a film a viewer of item {i} would like.")
               for i in range(args.gen_prompts)]
    enc = tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors="pt").to(device)
    decode = lambda: greedy_decode(llm, enc["input_ids"], enc["attention_mask"], args.gen_tokens,  # noqa: E731
                                   tokenizer.eos_token_id, tokenizer.pad_token_id)
    steps = decode().shape[1]
    gen = row(f"generate {args.gen_prompts} prompts x {steps} tokens", label, args.gen_prompts * steps,
              timed(device, decode))
    return fwd_bwd, gen


def llm_config(device, llm_path, dtype="auto", quantization="none"):
    return {"llm_path": llm_path, "llm_dtype": dtype, "llm_quantization": quantization, "llm_cache_dir": None,
            "llm_gradient_checkpointing": False, "lora_r": 0, "device": device}


def glta_batches(llm_path, batch, device):
    """Real GLTA prompts on ml-100k (random CF embeddings: throughput does not depend on their values)."""
    from recbole_llm.config import Config
    from recbole_llm.model.general_recommender.glta import GLTA
    from recbole_llm.utils import create_dataset, data_preparation

    sys.argv = sys.argv[:1]  # RecBole's Config would read this script's --key=value options as its own
    config = Config("GLTA", "ml-100k", config_dict={"llm_path": llm_path, "show_progress": False,
                                                    "train_batch_size": batch, "use_gpu": device.type == "cuda"})
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    model = GLTA(config, train._dataset).to(config["device"])
    model.user_emb.normal_()
    model.item_emb.normal_()
    model.profile_texts = ["likes light comedies and classic dramas from the nineties"] * model.n_users
    model.prediction_texts = ["will enjoy a romantic comedy or a thriller next"] * model.n_users
    from recbole_llm.trainer import LLMTrainer

    trainer = LLMTrainer(config, model)
    ia = model.item_text_batches(train, 0)[0]
    ua = model.train_batches(train, 0)[0]
    return trainer, ia, ua


def glta_row(name, trainer, stage, encoded, batch, repeats, peak):
    """One step of a GLTA stage's loss through the trainer's loop (what that stage trains) vs the plain loop on
    the same token batch."""
    model = trainer.model
    trainer.optimizer = trainer._build_optimizer(params=model.set_trainable(stage.modules))
    loss_fn = stage.loss
    device, llm = model.device, model.llm
    input_ids, attention, placeholder, vectors, _ = collate(encoded, model.tokenizer.pad_token_id, "left")
    input_ids, attention, placeholder = input_ids.to(device), attention.to(device), placeholder.to(device)
    vectors = vectors.detach().to(device).requires_grad_(True)

    def ours():
        trainer.train_steps([batch], loss_fn, trainer.optimizer, name, show_progress=False)

    o, p = interleaved(device, repeats, ours, lambda: plain_step(llm, input_ids, attention, placeholder, vectors))
    row(name, DTYPE_NAMES[model.llm_dtype], int(attention.sum()), o, p, flops_per_token(llm, input_ids.shape[1]),
        peak)


def random_7b_folder(cache_dir=None):
    """A Llama-2-7B-shaped model with random bf16 weights, saved once (13.5 GB) like any HF folder."""
    target = os.path.join(cache_dir or default_cache_dir(), "random-llama-7b")

    def write(tmp):
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(cache_dir))
        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_folder(target, write)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--llm_path", default="smollm2")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default: fp32,bf16 on CPU, bf16 on CUDA)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen_prompts", type=int, default=8)
    parser.add_argument("--gen_tokens", type=int, default=8)
    parser.add_argument("--glta_batch", type=int, default=2)
    parser.add_argument("--skip_glta", action="store_true")
    parser.add_argument("--llm7b", action="store_true", help="CUDA: also a 7B-shaped random model, bf16 and 4-bit")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    dtypes = (args.dtypes or ("fp32,bf16" if device.type == "cpu" else "bf16")).split(",")
    folder = smollm2_folder() if args.llm_path == "smollm2" else args.llm_path

    print(hardware(device))
    auto, reason = choose_dtype("auto", device)
    print(f"llm_dtype auto -> {DTYPE_NAMES[auto]} ({reason})")
    print(f"llm_quantization auto -> %s (%s)" % choose_quantization("auto", device, folder, auto))
    peaks = {name: matmul_peak_tflops(device, DTYPES[name]) for name in dict.fromkeys(dtypes + ["bf16"])}
    print("matmul peak measured here: " + ", ".join(f"{n} {p:.3f} TFLOP/s" for n, p in peaks.items())
          + ("; MFU against the bf16 peak" if device.type == "cuda" else "; MFU against the row's own dtype peak"))
    print(HEADER)

    def peak_for(name):
        return peaks["bf16"] if device.type == "cuda" else peaks[name]

    results = {}
    for name in dtypes:
        llm, tokenizer = load_llm(llm_config(device, args.llm_path, name))
        results[name] = llm_rows(name, llm, tokenizer, device, args, peak_for(name))
        del llm
    if device.type == "cuda" and "bf16" in dtypes:
        llm, tokenizer = load_llm(llm_config(device, args.llm_path, "bf16", "4bit"))
        llm_rows("4bit", llm, tokenizer, device, args, peaks["bf16"])
        del llm
    if "fp32" in results and "bf16" in results:
        (f_step, f_gen), (b_step, b_gen) = results["fp32"], results["bf16"]
        print(f"bf16 / fp32 tok/s: fwd+bwd {b_step / f_step:.2f}x, generation {b_gen / f_gen:.2f}x "
              f"(auto chose {DTYPE_NAMES[auto]})")
    if device.type == "cuda" and args.llm7b:
        folder = random_7b_folder()
        for name, quantization in (("bf16", "none"), ("4bit", "4bit")):
            llm, tokenizer = load_llm(llm_config(device, folder, "bf16", quantization))
            llm_rows(f"7B {name}", llm, tokenizer, device, args, peaks["bf16"])
            del llm
            torch.cuda.empty_cache()
    if args.skip_glta:
        return
    trainer, ia, ua = glta_batches(args.llm_path, args.glta_batch, device)
    model = trainer.model
    peak = peak_for(DTYPE_NAMES[model.llm_dtype])
    item_text = next(s for s in model.stages() if s.name == "item_text_alignment")
    glta_row("GLTA item-text alignment step", trainer, item_text, model.item_text_prompts(ia)[0], ia, args.repeats,
             peak)
    glta_row("GLTA user-item alignment step", trainer, model.final_stage(), model.user_item_prompts(ua), ua,
             args.repeats, peak)


if __name__ == "__main__":
    main()
