"""`generate` and `chat` on a terminal: what the model writes is printed with control characters escaped, a
chat's stop text is neither printed nor kept, Ctrl-C drops the turn it interrupts, and the state a chat carries is
always that of a fresh pass over its history.

The model here is built to write a known text: its layers add nothing (`out_proj` and `fc2` are zero), so the
logits follow from the last token alone, and `lm_head` sends each word to a chosen next word. Its state is still a
real retention state, which the tests compare with a fresh forward over the history.
"""

import io
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from retnet_hf import CACHE_NAME, RetNetConfig, RetNetForCausalLM
from retnet_hf.cli import main
from retnet_hf.text_generation import ChatSession, escape_controls


RED = "\x1b[31mred\x0c"  # an escape sequence and a form feed inside one word
# ("abcdef": transformers' stop-string criterion reads each token's text after that word)
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "###", "Human:", "Assistant:", "hi", "there", RED, "again", "more", "more2"]
WORDS += ["abcdef"]
# what each word is followed by (the model's greedy text): after "Assistant:" comes "hi RED there ### Human:" (it
# starts the next turn itself); after an unknown word (the user's) "more"
NEXT = {"Assistant:": "hi", "hi": RED, RED: "there", "there": "###", "###": "Human:", "Human:": "again"}
NEXT.update({"<unk>": "more", "again": "more", "more": "more2", "more2": "more"})
ANSWER = f"hi {RED} there"


def word_tokenizer():
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    # the guanaco form, with spaces so that a word-level tokenizer sees the markers as words
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}### Human: {{ m['content'] }} {% else %}### Assistant: "
        "{{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}### Assistant:{% endif %}"
    )
    return tokenizer


def scripted_model(dtype=torch.float64):
    """A RetNet whose greedy text follows NEXT, with a real recurrent state."""
    torch.manual_seed(0)
    vocab = len(WORDS)
    config = RetNetConfig(
        vocab_size=vocab,
        decoder_embed_dim=32,
        decoder_value_embed_dim=32,
        decoder_ffn_embed_dim=32,
        decoder_layers=2,
        decoder_retention_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = RetNetForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.retention.out_proj.weight.zero_()
            layer.ffn.fc2.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab, dtype=dtype)
        model.lm_head.weight.zero_()
        for word, following in NEXT.items():
            model.lm_head.weight[WORDS.index(following), WORDS.index(word)] = 10.0
    model.generation_config.eos_token_id = None
    return model


def fresh_state(model, history):
    with torch.no_grad():
        return getattr(model(history, use_cache=True), CACHE_NAME).states


def assert_same_states(states, expected):
    for (s, scale), (s_ref, scale_ref) in zip(states, expected):
        torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(scale, scale_ref, rtol=1e-10, atol=1e-10)


def test_control_characters_are_printed_escaped():
    assert escape_controls("a\x1b[2Jb\x0c\r\x07\x7f\x9b\tc\nd") == "a\\x1b[2Jb\\x0c\\x0d\\x07\\x7f\\x9b\tc\nd"


def test_a_chat_reply_stops_before_the_stop_text_and_keeps_the_state_of_the_clean_history():
    model, tokenizer = scripted_model(), word_tokenizer()
    session = ChatSession(model, tokenizer, max_new_tokens=8, do_sample=False)
    printed = io.StringIO()
    assert session.reply("hello", out=printed) == ANSWER
    assert "###" not in printed.getvalue() and "Human" not in printed.getvalue()
    words = tokenizer.convert_ids_to_tokens(session.history[0])
    assert words[-4:] == ["Assistant:", "hi", RED, "there"]  # no "### Human:" after the answer
    assert_same_states(session.cache.states, fresh_state(model, session.history))
    # the next turn equals a fresh generate on the clean history: the same words, the same state
    history = session.history
    assert session.reply("and you", out=printed) == ANSWER
    assert words.count("###") == 2 and tokenizer.convert_ids_to_tokens(session.history[0]).count("###") == 4
    assert_same_states(session.cache.states, fresh_state(model, session.history))
    turn = tokenizer.apply_chat_template(
        [{"role": "user", "content": "and you"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.cat([history, tokenizer(turn, return_tensors="pt", add_special_tokens=False).input_ids], dim=1)
    fresh = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(fresh, session.history)


def test_ctrl_c_while_a_reply_streams_drops_that_turn_only():
    """The first turn ends normally, the second is interrupted while it prints: history and state are the first
    turn's, and a third turn goes on from there as if the second had never been."""
    model, tokenizer = scripted_model(), word_tokenizer()
    session = ChatSession(model, tokenizer, max_new_tokens=8, do_sample=False)
    session.reply("hello", out=io.StringIO())
    history, states = session.history.clone(), [tuple(t.clone() for t in s) for s in session.cache.states]

    class CtrlCWhilePrinting(io.StringIO):
        def write(self, text):
            if text.strip():
                raise KeyboardInterrupt
            return super().write(text)

    assert session.reply("interrupted", out=CtrlCWhilePrinting()) is None
    assert torch.equal(session.history, history)
    assert_same_states(session.cache.states, states)
    assert session.reply("again", out=io.StringIO()) == ANSWER
    assert_same_states(session.cache.states, fresh_state(model, session.history))


def test_chat_on_the_command_line_escapes_and_survives_ctrl_c(tmp_path, capsys, monkeypatch):
    """`retnet-hf chat`: the model's escape sequence is printed escaped; Ctrl-C at the prompt ends the session."""
    model, tokenizer = scripted_model(torch.float32), word_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lines = iter(["hello\n"])

    def read_line():
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt

    monkeypatch.setattr("retnet_hf.text_generation._read_line", read_line)
    code = main(["chat", str(tmp_path / "model"), "--max-new-tokens", "8", "--greedy"])
    out, err = capsys.readouterr()
    assert code == 130 and "interrupted" in err
    assert "hi \\x1b[31mred\\x0c there" in out and "\x1b" not in out and "\x0c" not in out and "###" not in out


def test_chat_samples_from_its_seed(tmp_path, capsys, monkeypatch):
    """`chat --seed` makes a sampled session reproducible, whatever torch's random state was before."""
    model, tokenizer = scripted_model(torch.float32), word_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    sampling = ["--temperature", "50", "--top-k", str(len(WORDS)), "--top-p", "1.0", "--max-new-tokens", "12"]
    replies = []
    for earlier in (1, 2):
        monkeypatch.setattr("retnet_hf.text_generation._read_line", iter(["hello\n", None]).__next__)
        torch.manual_seed(earlier)
        assert main(["chat", str(tmp_path / "model"), "--seed", "3", *sampling]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()


def test_generate_prints_what_the_model_writes_escaped(tmp_path, capsys):
    model, tokenizer = scripted_model(torch.float32), word_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["generate", str(tmp_path / "model"), "--prompt", "hi", "--max-new-tokens", "3", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hi") and "\\x1b[31mred\\x0c" in out and "\x1b" not in out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
