"""Tiny random models and a tokenizer built in-test: no download, a few seconds at most."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a is in of city located capital paris rome london tower eiffel colosseum big ben france italy "
    "england was born works for language native sport plays citizen developed by . , and it this that "
    "some text here there which where who what i you because therefore apple google microsoft"
).split()
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "<|endoftext|>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for word in WORDS:  # capitalised forms too
        vocab.setdefault(word.capitalize(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        initializer_range=0.3,
        pad_token_id=0, bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def tiny_gpt2(seed: int = 0, layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tiny_tokenizer()), n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                        initializer_range=0.3,
                        pad_token_id=0, bos_token_id=2, eos_token_id=2)  # fmt: skip
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


CORPUS = [
    "The Eiffel tower is in paris and paris is the capital of france",
    "The Colosseum is located in the city of rome in italy",
    "Big Ben is in london which is the capital of england",
    "Apple and google and microsoft were developed by some people who works for it",
    "This city is where the tower is located because it is big",
    "What language is spoken in france? The native language is french",
    "I was born in rome and you were born in london",
    "Therefore the sport of this city is big",
] * 3


def tiny_editor(model, tok, layer: int = 1, **hp):  # type: ignore[no-untyped-def]
    """A RomeEditor with statistics from a tiny in-test corpus and fixed templates (nothing read from disk)."""
    from editing import RomeEditor, RomeHyperParams
    from editing.stats import compute_second_moment

    params = {"steps": 6, "lr": 0.5, "early_stop_loss": 0.01, "stats_samples": 10, "value_templates": 3, **hp}
    editor = RomeEditor(model, tok, RomeHyperParams(layer=layer, **params))
    editor._templates = ["{}", "Some text here. {}", "Because it is. {}"]
    for lay in range(editor.n_layers):
        cov, _ = compute_second_moment(model, tok, lay, CORPUS)
        editor._covs[(lay, params["stats_samples"])] = cov + 1e-3 * torch.eye(cov.shape[0], dtype=torch.float64)
    return editor


def mlp_trace(mlp: list[list[float]]):  # type: ignore[no-untyped-def]
    """A TraceResult for the 3-token prompt "a b c" (subject "a b") with the given MLP scores (tokens × layers)."""
    from editing.tracing import TraceResult

    return TraceResult(prompt="a b c", subject="a b", tokens=["a", " b", " c"], subject_range=(0, 2),
                       answer=" x", answer_id=0, clean_prob=0.9, corrupted_prob=0.1,
                       scores={"mlp": torch.tensor(mlp)}, noise=0.1, samples=2, window=2, seed=0,
                       model_name="tiny")  # fmt: skip
