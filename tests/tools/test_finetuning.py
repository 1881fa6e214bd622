"""Fine-tuning: PEFT LoRA / QLoRA / 8-bit, TRL's SFTTrainer, packing, and `retnet-hf sft`, on tiny models.

Every training path runs real optimiser steps on the CPU, on the guanaco rows of the package's sample data
converted to the guanaco form, with a tokenizer trained here.
"""

import copy
import importlib.util
import json
import math

import pytest
import torch


peft = pytest.importorskip("peft", reason="peft is in the train extras: pip install -e '.[train]'")
trl = pytest.importorskip("trl", reason="trl is in the train extras: pip install -e '.[train]'")
bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the train extras: pip install -e '.[train]'")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402

from retnet_hf import ACTIVATION_CHECKPOINTING, LORA_TARGET_MODULES, RetNetForCausalLM  # noqa: E402
from retnet_hf.data import (  # noqa: E402
    GUANACO_CHAT_TEMPLATE,
    guanaco_messages,
    llama2_to_guanaco,
    load_guanaco,
    save_tokenizer,
    set_chat_template,
    split_prompt_completion,
    to_guanaco,
    train_tokenizer,
)
from retnet_hf.finetuning import (  # noqa: E402
    SFTSettings,
    disable_cpu_inference_repacking,
    linear4bit_modules,
    prepare_for_kbit,
    sft,
)  # noqa: E402
from retnet_hf.sample_data import GUANACO as PARQUET  # noqa: E402

from conftest import tiny_config  # noqa: E402


PROJECTIONS = set(LORA_TARGET_MODULES)
WIDTHS = dict(decoder_embed_dim=64, decoder_value_embed_dim=128, decoder_ffn_embed_dim=128)

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama_rows():
    import pandas as pd

    return list(pd.read_parquet(PARQUET)["text"])


@pytest.fixture(scope="module")
def rows(llama_rows):
    """Guanaco-form rows; the short ones first (several fit in one packed row)."""
    converted = [to_guanaco(text) for text in llama_rows[:300]]
    return sorted(converted, key=len)


@pytest.fixture(scope="module")
def tokenizer(rows):
    return set_chat_template(train_tokenizer(rows, 320))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A tiny RetNet saved with its tokenizer, as `retnet-hf train` leaves one."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    # widths that are multiples of 64 (bitsandbytes' 4-bit block): the CPU inference repacking (finetuning.disable_cpu_inference_repacking)
    # can then happen, and the gradient test below sees whether it breaks the LoRA gradients
    model = RetNetForCausalLM(
        tiny_config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **WIDTHS,
        )
    )
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path


@pytest.fixture(scope="module")
def short_jsonl(tmp_path_factory, rows, llama_rows):
    """Eight short rows as a local jsonl, half of them in the Llama-2 form (the loader converts them)."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    short_llama = sorted(llama_rows[:300], key=len)[:4]
    with path.open("w") as f:
        for text in rows[4:8] + short_llama:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def batch_of(tokenizer, texts, length=48):
    enc = tokenizer([t for t in texts], return_tensors="pt", padding="max_length", truncation=True, max_length=length)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc.input_ids, enc.attention_mask, labels


def adapted_leaf_names(model):
    """{layer index: set of adapted projection names} and the set of adapted module paths."""
    paths = [name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)]
    per_layer = {}
    for name in paths:
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1])
        per_layer.setdefault(layer, set()).add(parts[-1])
    return per_layer, paths


def train_steps(model, batch, steps=8, lr=1e-2):
    input_ids, attention_mask, labels = batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def randomize_lora_b(model, seed=1):
    """LoRA B starts at zero (no gradient reaches A then): give it values so every LoRA weight gets a gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


# ---------------------------------------------------------------- data and template


def test_llama2_rows_convert_to_guanaco(llama_rows):
    text = "<s>[INST] What is 2+2? [/INST] It is 4. </s><s>[INST] And 3+3? [/INST] 6. </s>"
    assert (
        llama2_to_guanaco(text) == "### Human: What is 2+2?### Assistant: It is 4.### Human: And 3+3?### Assistant: 6."
    )
    for original in llama_rows[:200]:
        converted = to_guanaco(original)
        assert converted.count("### Human:") == original.count("[INST]")
        assert converted.count("### Assistant:") == original.count("[/INST]")
        assert "[INST]" not in converted and "</s>" not in converted and not converted.startswith("<s>")
        assert to_guanaco(converted) == converted  # guanaco rows pass unchanged
    with pytest.raises(ValueError):
        to_guanaco("just some text")
    prompt, completion = split_prompt_completion(text := to_guanaco(llama_rows[0]))
    assert prompt + completion == text and prompt.endswith("### Assistant:") and "### Assistant:" not in completion


def test_chat_template_renders_the_guanaco_form(tokenizer, rows):
    assert tokenizer.chat_template == GUANACO_CHAT_TEMPLATE
    multi = next(r for r in rows if r.count("### Human:") > 1)
    messages = guanaco_messages(multi)
    assert [m["role"] for m in messages[:2]] == ["user", "assistant"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == multi
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"### Human: {messages[0]['content']}### Assistant:"


def test_local_files_load_in_every_format(tmp_path, llama_rows, rows):
    import pandas as pd

    texts = llama_rows[:5]
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "d.csv", index=False)
    with (tmp_path / "d.jsonl").open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    expected = [to_guanaco(t) for t in texts]
    for name in ("d.parquet", "d.csv", "d.jsonl"):
        assert load_guanaco(str(tmp_path / name))["text"] == expected
    pairs = load_guanaco(str(tmp_path / "d.jsonl"), completion_only=True)
    assert pairs.column_names == ["prompt", "completion"]
    assert [p + c for p, c in zip(pairs["prompt"], pairs["completion"])] == expected


# ---------------------------------------------------------------- PEFT LoRA


@pytest.mark.parametrize("targets", ["all-linear", "list"])
def test_lora_adapts_all_eight_projections_of_every_layer(targets):
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config())
    target_modules = "all-linear" if targets == "all-linear" else LORA_TARGET_MODULES
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=target_modules))
    per_layer, paths = adapted_leaf_names(peft_model)
    assert per_layer == {i: PROJECTIONS for i in range(model.config.decoder_layers)}
    assert len(paths) == 8 * model.config.decoder_layers
    assert not any("lm_head" in p or "embed" in p for p in paths)


def test_lora_trains_saves_reloads_merges_and_generates_with_the_state(tmp_path, folder, tokenizer, rows):
    base = AutoModelForCausalLM.from_pretrained(folder)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES, lora_dropout=0.0))
    batch = batch_of(tokenizer, rows[:4], length=32)
    losses = train_steps(model, batch, steps=6, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1, losses

    model.eval()
    input_ids, attention_mask, _ = batch
    with torch.no_grad():
        adapted = model(input_ids=input_ids, attention_mask=attention_mask).logits
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=input_ids, attention_mask=attention_mask).logits, adapted, atol=1e-3)

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids, attention_mask=attention_mask).logits, adapted)

    # PeftModel.generate: the prompt in one pass, then one token per step (the recurrent state is used)
    lengths = []
    hook = reloaded.get_base_model().model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    prompt = tokenizer.apply_chat_template(
        guanaco_messages(rows[0])[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = reloaded.generate(
        **prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    hook.remove()
    assert lengths == [prompt["input_ids"].shape[1]] + [1] * 5

    merged = reloaded.merge_and_unload()
    assert type(merged) is RetNetForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=input_ids, attention_mask=attention_mask).logits, adapted, atol=1e-5, rtol=1e-5
        )
    assert torch.equal(
        merged.generate(
            **prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        ),
        out,
    )


# ---------------------------------------------------------------- QLoRA and 8-bit


def load_4bit(folder, compute_dtype=torch.float32, **kwargs):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, **kwargs)


def float_twin(folder, quantized):
    """The float model whose projection weights are the dequantized 4-bit weights (the rest as saved)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    modules = {
        name.removeprefix("base_model.model.").removesuffix(".base_layer"): module
        for name, module in quantized.named_modules()
    }  # a PeftModel's names too
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in PROJECTIONS:
                q = modules[name]
                assert isinstance(q, bnb.nn.Linear4bit)
                module.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float())
    return model


@pytest.mark.parametrize(
    "after_generate", [False, True, "repacked"], ids=["fresh", "after-no-grad-forward", "repacked-then-unpacked"]
)
def test_qlora_gradients_match_a_float_reference(folder, tokenizer, rows, after_generate):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, lora_dropout=0.0)
    quantized = load_4bit(folder)
    assert len(linear4bit_modules(quantized)) == 8 * quantized.config.decoder_layers
    quantized = prepare_for_kbit(quantized, gradient_checkpointing=False)
    model = get_peft_model(quantized, copy.deepcopy(lora))
    randomize_lora_b(model)
    input_ids, attention_mask, labels = batch_of(tokenizer, rows[:2], length=32)

    if after_generate:  # an evaluation or a sample between steps: a no-grad forward of every Linear4bit
        if after_generate == "repacked":  # as bitsandbytes leaves a model on a CPU with AVX512-BF16
            for module in linear4bit_modules(model):
                module.support_avx512bf16_for_cpu = True
        model.eval()
        with torch.no_grad():
            model.generate(input_ids[:1, :8], max_new_tokens=3, do_sample=False, pad_token_id=0)
            model(input_ids=input_ids, attention_mask=attention_mask)
        repacked = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linear4bit_modules(model)]
        # bitsandbytes repacks whenever the flag is set, whatever the CPU (prepare_for_kbit clears it)
        assert all(repacked) if after_generate == "repacked" else not any(repacked)
        disable_cpu_inference_repacking(model)  # what sft() does after get_peft_model: undoes a repacking
        assert not any(
            getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linear4bit_modules(model)
        )
    # the float reference: the 4-bit weights as they are now (bitsandbytes' repack round trip rounds the block
    # scales to bf16, so it is built after it), the same LoRA weights
    reference = get_peft_model(float_twin(folder, model), lora)
    _, unexpected = reference.load_state_dict(
        {n: p for n, p in model.state_dict().items() if "lora_" in n}, strict=False
    )
    assert not unexpected
    for net in (model, reference):
        net.train()
        net(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()

    reference_grads = {n: p.grad for n, p in reference.named_parameters() if "lora_" in n}
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert grads.keys() == reference_grads.keys() and len(grads) == 2 * 8 * quantized.config.decoder_layers
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        ref = reference_grads[name]
        error = (grad - ref).norm() / ref.norm()
        assert error < 1e-3, f"{name}: relative gradient error {error:.2e}"


def test_8bit_loading_is_close_to_float(folder, tokenizer, rows):
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules()) == 8 * model.config.decoder_layers
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids, attention_mask, _ = batch_of(tokenizer, rows[:2], length=32)
    with torch.no_grad():
        logits = model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs().max() < 0.05 * expected.abs().max()


# ---------------------------------------------------------------- TRL SFTTrainer


def sft_rows_dataset(rows, n=4):
    from datasets import Dataset

    return Dataset.from_dict({"text": rows[:n]})  # short rows: several fit in one packed row


def run_trainer(model, tokenizer, dataset, tmp_path, **config):
    from trl import SFTConfig, SFTTrainer

    seen = []  # (position_ids, attention_mask present) of each training forward
    hook = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    handle = hook.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw.get("position_ids"), kw.get("attention_mask") is not None)),
        with_kwargs=True,
    )
    args = dict(
        output_dir=str(tmp_path / "trainer"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        report_to=[],
        max_length=64,
        disable_tqdm=True,
        seed=0,
    )
    # under the running transformers' name (TRL defaults it to on; 5.24 renamed it activation_checkpointing)
    args[ACTIVATION_CHECKPOINTING] = config.pop("gradient_checkpointing", False)
    args.update(config)
    trainer = SFTTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    handle.remove()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses, seen


@pytest.mark.parametrize(
    "method, options",
    [
        ("full", {}),
        ("lora", {"packing": True}),
        ("lora", {"completion_only": True}),
        ("lora", {"gradient_checkpointing": True}),
        ("qlora", {"packing": True, "gradient_checkpointing": True}),
    ],
    ids=["full", "lora-packing", "lora-completion-only", "lora-gradient-checkpointing", "qlora-packing-gc"],
)
def test_sft_trainer(tmp_path, folder, tokenizer, rows, method, options):
    from datasets import Dataset

    if method == "qlora":
        model = prepare_for_kbit(load_4bit(folder), gradient_checkpointing=options.get("gradient_checkpointing"))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    if method != "full":
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET_MODULES, lora_dropout=0.0)
        )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    completion_only = options.pop("completion_only", False)
    if completion_only:
        pairs = [split_prompt_completion(r) for r in rows[:4]]
        dataset = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    else:
        dataset = sft_rows_dataset(rows)
    losses, seen = run_trainer(
        model, tokenizer, dataset, tmp_path, completion_only_loss=completion_only or None, **options
    )
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every trainable weight moved
    if options.get("packing"):
        position_ids, has_mask = seen[0]
        assert position_ids is not None and position_ids.shape[0] == 1 and not has_mask
        assert (position_ids[0] == 0).sum() > 1  # several documents in the row: the state resets at each
    if options.get("gradient_checkpointing"):
        assert model.get_base_model().model.gradient_checkpointing if method != "full" else True


# the recipe as users write it: PEFT (0.21, the newest) enables checkpointing under the name transformers 5.24 deprecated
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_qlora_tutorial_recipe(tmp_path, folder, tokenizer, rows):
    """bf16 compute, norm modules upcast to fp32 by name, gradient checkpointing, length-grouped batches."""
    from peft import prepare_model_for_kbit_training

    model = load_4bit(folder, compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    for name, module in model.named_modules():
        if "norm" in name:
            module.to(torch.float32)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    # fp32 norm outputs meet the bf16 lm_head: like Llama's, this runs under autocast (the trainer's bf16=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    disable_cpu_inference_repacking(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
    per_layer, _ = adapted_leaf_names(model)
    assert per_layer == {i: PROJECTIONS for i in range(model.config.decoder_layers)}
    losses, _ = run_trainer(
        model,
        tokenizer,
        sft_rows_dataset(rows),
        tmp_path,
        gradient_checkpointing=True,
        train_sampling_strategy="group_by_length",
        optim="adamw_torch",
        bf16=True,
    )
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses


# ---------------------------------------------------------------- packing is exact


def test_packed_row_gives_the_per_document_losses_of_the_unpacked_batch(tokenizer, rows):
    """TRL's padding-free collator output (one row, position_ids restarting at 0) vs each document on its own."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config(vocab_size=len(tokenizer), recurrent_chunk_size=8)).double().eval()
    docs = [tokenizer(r).input_ids[:n] for r, n in zip(rows[:3], (21, 13, 30))]
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    packed = collator([{"input_ids": d} for d in docs])
    assert packed["input_ids"].shape == (1, sum(map(len, docs))) and "attention_mask" not in packed

    def per_token_nll(logits, ids):
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")

    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        leaky = model(input_ids=packed["input_ids"]).logits
    nll = per_token_nll(logits, packed["input_ids"])
    nll_leaky = per_token_nll(leaky, packed["input_ids"])
    start = 0
    for i, doc in enumerate(docs):
        ids = torch.tensor([doc])
        with torch.no_grad():
            alone = per_token_nll(model(input_ids=ids).logits, ids).mean()
        inside = nll[start : start + len(doc) - 1].mean()  # the targets within this document
        torch.testing.assert_close(inside, alone, atol=1e-10, rtol=1e-10)
        if i > 0:  # without the resets the earlier documents leak in: the check can tell
            assert (nll_leaky[start : start + len(doc) - 1].mean() - alone).abs() > 1e-6
        start += len(doc)


# ---------------------------------------------------------------- sft() and the command line


def test_sft_command_merges_resumes_and_chats(tmp_path, folder, short_jsonl, capsys):
    from retnet_hf.cli import main

    out = tmp_path / "chatty"
    common = [
        str(folder),
        "--output",
        str(out),
        "--data",
        str(short_jsonl),
        "--max-length",
        "64",
        "--batch-size",
        "4",
        "--limit",
        "4",
        "--lr",
        "1e-2",
        "--rank",
        "8",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
    ]
    assert main(["sft", *common, "--max-steps", "2", "--packing", "--merge"]) == 0
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert json.loads((out / "training_summary.json").read_text())["resumed_from"] is None
    first = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    # the same command with more steps resumes from checkpoint-2
    assert main(["sft", *common, "--max-steps", "4", "--packing", "--merge"]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["merged"] and summary["method"] == "lora"
    assert summary["resumed_from"].endswith("checkpoint-2")
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged == [1, 2, 3, 4]  # steps 1-2 from the first run's checkpoint, 3-4 from the resumed run
    assert [e["loss"] for e in state["log_history"][:2]] == [e["loss"] for e in first[:2]]
    assert (out / "loss.png").stat().st_size > 1000
    if importlib.util.find_spec("retnet_hf.model_card") is not None:  # the project's card writer
        assert "retnet-hf sft" in (out / "README.md").read_text()
    assert "merged model saved" in capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model) is RetNetForCausalLM and not any("lora" in n for n, _ in model.named_parameters())
    tok = AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hola, ¿qué tal?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert tok.decode(prompt["input_ids"][0]).endswith("### Assistant:")
    reply = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert reply.shape[1] == prompt["input_ids"].shape[1] + 8


def test_sft_adapter_folder_loads_with_peft(tmp_path, folder, short_jsonl):
    result = sft(
        SFTSettings(
            model=str(folder),
            output_dir=str(tmp_path / "adapter"),
            data=str(short_jsonl),
            method="qlora",
            rank=4,
            max_steps=2,
            max_length=64,
            batch_size=4,
            learning_rate=1e-2,
            completion_only=True,
            disable_tqdm=True,
            save_steps=100,
        )
    )
    assert not result.merged and (tmp_path / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(folder)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    per_layer, _ = adapted_leaf_names(model)
    assert per_layer == {i: PROJECTIONS for i in range(base.config.decoder_layers)}
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # trained, not the init
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")  # transformers' PEFT integration
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(direct(ids).logits, model.eval()(ids).logits)


def test_sft_refuses_an_output_that_is_or_holds_the_base(tmp_path, folder, short_jsonl, capsys):
    from retnet_hf.cli import main

    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for output in (folder, folder.parent, folder / "."):
        argv = ["sft", str(folder), "--output", str(output), "--data", str(short_jsonl), "--max-steps", "1"]
        assert main(argv + ["--overwrite", "--merge"]) == 2
        assert "is (or holds) the base model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert not (folder / "checkpoints").exists()


def test_a_diverged_sft_run_is_stopped_and_not_saved(tmp_path, folder, short_jsonl, capsys):
    from retnet_hf.cli import main

    out = tmp_path / "diverged"
    argv = ["sft", str(folder), "--output", str(out), "--data", str(short_jsonl), "--max-length", "64"]
    assert main(argv + ["--full", "--lr", "1e6", "--max-steps", "6", "--logging-steps", "1", "--batch-size", "2"]) == 2
    assert "training diverged" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists() and not (out / "training_summary.json").exists()


def test_sft_usage_errors(tmp_path, folder, capsys):
    from retnet_hf.cli import main

    assert main(["sft", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no chat markers here"}) + "\n")
    assert main(["sft", str(folder), "--output", str(tmp_path / "o"), "--data", str(bad), "--max-steps", "1"]) == 2
    assert "neither" in capsys.readouterr().err
    assert main(["sft", str(folder), "--output", str(tmp_path / "o"), "--data", str(tmp_path / "none.txt")]) == 2


def test_sft_reruns_resume_only_what_they_started(tmp_path, folder, short_jsonl, capsys):
    """A finished run's rerun trains nothing; a rerun on another base model, other data or another rank stops
    before any work and names what changed; --no-resume starts afresh."""
    import shutil

    from retnet_hf.cli import main

    out = tmp_path / "adapter"
    common = [str(folder), "--output", str(out), "--data", str(short_jsonl), "--max-length", "64", "--limit", "4"]
    common += ["--batch-size", "4", "--save-steps", "2", "--max-steps", "2"]
    assert main(["sft", *common]) == 0
    adapter = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["sft", *common]) == 0
    assert "finished earlier (2 steps); nothing to train" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert not (out / "checkpoints" / "checkpoint-3").exists()
    (out / "adapter_model.safetensors").unlink()
    assert main(["sft", *common]) == 0
    assert "wrote again what was missing: the adapter" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").read_bytes() == adapter

    other_base = tmp_path / "other-base"
    shutil.copytree(folder, other_base)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(short_jsonl.read_text().splitlines()[0] + "\n")
    for argv, named in [
        ([str(other_base), *common[1:]], "model"),
        ([*common[:4], str(other_data), *common[5:]], "data"),
        ([*common, "--rank", "4"], "lora"),
    ]:
        assert main(["sft", *argv]) == 2
        err = capsys.readouterr().err
        assert f"started with another {named}" in err and "--no-resume" in err, err
        assert (out / "adapter_model.safetensors").read_bytes() == adapter
    assert main(["sft", *common, "--rank", "4", "--no-resume"]) == 0
