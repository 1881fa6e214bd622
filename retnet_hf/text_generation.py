"""`retnet-hf generate` and `retnet-hf chat`: a model folder's text on a terminal.

What the model writes is printed as it comes (`TerminalStreamer`), with control characters escaped (a byte-level
model can write any byte, an escape sequence or a form feed among them) and a chat's stop text never printed.

A chat (`ChatSession`) feeds only the new text of each turn: the recurrent state carries the conversation, at a
flat cost per token. The history it keeps is exactly what the state has seen: a reply is cut before the stop text
(`### Human:`, where the model starts the next turn itself) and the state is brought to the cut; Ctrl-C while a
reply streams drops that turn (the message and the partial reply) and the conversation goes on from before it.
"""

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from .errors import UsageError
from .options import float_in, non_negative_int, positive_float, positive_int


# C0 and C1 control characters but newline and tab, and DEL: printed as \xNN
_CONTROLS = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)] if code not in (9, 10)}


def escape_controls(text: str) -> str:
    """`text` with every control character other than newline and tab written as `\\xNN`, as terminal tools do."""
    return text.translate(_CONTROLS)


def _held_back(text: str, stop: str) -> int:
    """How many characters at the end of `text` could be the start of `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


def terminal_streamer(tokenizer, stop: Optional[str] = None, out=None):
    """transformers' `TextStreamer` for a terminal (the prompt skipped, special tokens left out): control characters
    escaped, `stop` never printed (text that may begin it is held back until it cannot), the generated tokens
    counted (`tokens`) and `stopped` set once `stop` appeared."""
    from transformers import TextStreamer

    class TerminalStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.out = out
            self.stop, self.held, self.stopped, self.tokens, self._prompt_seen = stop, "", False, 0, False

        def put(self, value):
            if self._prompt_seen:
                self.tokens += value.numel()
            self._prompt_seen = True
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not self.stopped:
                text, self.held = self.held + text, ""
                if self.stop:
                    cut = text.find(self.stop)
                    if cut >= 0:
                        text, self.stopped = text[:cut], True
                    elif not stream_end:
                        size = _held_back(text, self.stop)
                        text, self.held = text[: len(text) - size], text[len(text) - size :]
                print(escape_controls(text), end="", flush=True, file=self.out or sys.stdout)
            if stream_end:
                print(file=self.out or sys.stdout, flush=True)

    return TerminalStreamer()


def load_for_inference(folder: str, trust_remote_code: bool, quantize: Optional[str] = None, **load_kwargs):
    """The folder's causal LM (on the GPU if there is one, in evaluation mode) and tokenizer, for generate, chat and
    eval alike; `load_kwargs` go to `from_pretrained` (`dtype` also as a name: "auto", "float32", "bfloat16", ...).

    With `quantize` ("int8", "int4"), a RetNet runs on ONNX Runtime with quantized weights (its export, made once and
    reused: `onnx_runtime.exported_for_inference`) as an `OnnxRetNetForCausalLM`, the same for `generate()`, chat and
    lm-eval; an `export-onnx` folder runs so as it is.

    It lives here, above `loading` and `onnx_runtime` (it picks between them, and either importing it would close a
    cycle), beside generate and chat, its first users."""
    import torch

    from .loading import load_causal_lm, load_tokenizer
    from .model_folder import require_model_folder
    from .onnx_runtime import MANIFEST, OnnxRetNetForCausalLM, exported_for_inference

    path = require_model_folder(folder, "; train one with `retnet-hf train` first")
    exported = path if (path / MANIFEST).is_file() else None
    dtype = load_kwargs.get("dtype", "auto")
    if isinstance(dtype, str) and dtype != "auto":
        load_kwargs["dtype"] = getattr(torch, dtype)  # a name, as the commands' --dtype gives it
    if quantize is not None:
        if dtype not in ("auto", "float32", torch.float32):
            raise UsageError(f"--quantize {quantize} runs quantized weights; leave out --dtype {dtype}")
        notify = lambda message: print(f"retnet-hf: {message}", file=sys.stderr, flush=True)  # noqa: E731
        exported = exported_for_inference(path, quantize, notify)
    if exported is not None:
        # ONNX Runtime does the work; torch's own threads, busy-waiting after each small operation of generate(),
        # would take the cores from it (125m int4 decode, 2 cores: 37-47 tokens/s with torch's 2, 95-112 with 1)
        torch.set_num_threads(1)
        model = OnnxRetNetForCausalLM.from_folder(exported)
    else:
        model = load_causal_lm(folder, trust_remote_code=trust_remote_code, **load_kwargs)
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval(), load_tokenizer(folder, trust_remote_code=trust_remote_code)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: Optional[int], **sampling) -> int:
    """Print `prompt` and the model's continuation as it comes (escaped), then the speed on stderr; returns the
    number of tokens generated."""
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    if inputs.input_ids.shape[1] == 0:  # no prompt: start from the beginning-of-text token
        if tokenizer.bos_token_id is None:
            raise UsageError("the tokenizer has no beginning-of-text token to start from; give --prompt")
        inputs = tokenizer(tokenizer.bos_token, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = terminal_streamer(tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    print(escape_controls(prompt), end="", flush=True)
    start = time.perf_counter()
    model.generate(
        **inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tokenizer.pad_token_id, **sampling
    )
    seconds = time.perf_counter() - start
    print(f"[{streamer.tokens} tokens in {seconds:.2f} s, {streamer.tokens / seconds:.1f} tokens/s]", file=sys.stderr)
    return streamer.tokens


class ChatSession:
    """A conversation with a model: `reply(message)` streams the answer and keeps the state. `history` `[1, T]` holds
    every token the state (`cache`) has seen, or all but the last one, which the next turn feeds first."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 200, **sampling):
        import torch

        from .data import GUANACO_CHAT_TEMPLATE, HUMAN

        self.model, self.tokenizer, self.max_new_tokens, self.sampling = model, tokenizer, max_new_tokens, sampling
        self.template = tokenizer.chat_template or GUANACO_CHAT_TEMPLATE  # else the guanaco one sft saves
        self.stop = HUMAN
        self.history = torch.empty(1, 0, dtype=torch.long, device=model.device)
        self.cache = None

    def reply(self, message: str, out=None) -> Optional[str]:
        """Stream the answer to `message`; returns it, or None when Ctrl-C stopped it (the turn is then dropped:
        history and state are those from before it)."""
        import torch

        from .model import CACHE_NAME

        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}],
            chat_template=self.template,
            add_generation_prompt=True,
            tokenize=False,
        )
        turn = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(self.model.device)
        before = (self.history, copy.deepcopy(self.cache))
        ids = torch.cat([self.history, turn], dim=1)
        streamer = terminal_streamer(self.tokenizer, self.stop, out)
        self.started = time.perf_counter()
        try:
            result = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                **{CACHE_NAME: self.cache},
                max_new_tokens=self.max_new_tokens,
                streamer=streamer,
                return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id,
                stop_strings=[self.stop],
                tokenizer=self.tokenizer,
                **self.sampling,
            )
        except KeyboardInterrupt:
            self.history, self.cache = before
            return None
        self.tokens, self.seconds = streamer.tokens, time.perf_counter() - self.started
        answer = result.sequences[:, ids.shape[1] :]
        if not streamer.stopped:
            self.history, self.cache = result.sequences, getattr(result, CACHE_NAME)
            return self.tokenizer.decode(answer[0], skip_special_tokens=True)
        # the model began the next turn itself: keep the answer up to the stop text, and the state of just that
        kept = self._tokens_before_stop(answer[0])
        fed = torch.cat([turn, answer[:, :kept]], dim=1)
        self.history, self.cache = torch.cat([before[0], fed], dim=1), before[1]
        with torch.no_grad():
            self.cache = getattr(self.model(fed, **{CACHE_NAME: self.cache}, use_cache=True), CACHE_NAME)
        return self.tokenizer.decode(answer[0, :kept], skip_special_tokens=True)

    def _tokens_before_stop(self, answer) -> int:
        """The number of answer tokens whose text comes before the stop text (a token that holds part of the stop
        text is dropped whole)."""
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        clean = text[: text.find(self.stop)] if self.stop in text else text
        for kept in range(len(answer), -1, -1):
            if clean.startswith(self.tokenizer.decode(answer[:kept], skip_special_tokens=True)):
                return kept
        return 0


def chat(model, tokenizer, max_new_tokens: int, read_line, seed: Optional[int] = None, **sampling) -> None:
    """Talk on the terminal: a line of input per turn (`read_line()`, None at the end of the input; `/exit` or
    `/quit` ends too), the answer streamed, the speed and context on stderr. Ctrl-C while an answer streams drops
    that turn; at the prompt, it ends the session (as Ctrl-D does). `seed` makes a sampled session reproducible."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    session = ChatSession(model, tokenizer, max_new_tokens, **sampling)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = read_line()
        if line is None:
            break
        try:
            message = line.decode("utf-8").strip() if isinstance(line, bytes) else line.strip()
        except UnicodeDecodeError:
            print("that line is not UTF-8 text; type it again (the conversation is kept)", file=sys.stderr)
            continue
        if not message:
            continue
        if message in ("/exit", "/quit"):
            break
        print("assistant> ", end="", flush=True)
        if session.reply(message) is None:
            print(
                "\n[interrupted: this turn is dropped; the conversation goes on from before it]",
                file=sys.stderr,
                flush=True,
            )
            continue
        print(
            f"[{session.tokens / max(session.seconds, 1e-9):.1f} tokens/s, {session.history.shape[1]} tokens of "
            "context]",
            file=sys.stderr,
        )


# ------------------------------------------------------------------------------------ `retnet-hf generate`, `chat`


@dataclass
class SamplingSettings:
    """What `generate` and `chat` share: the model folder, how it runs and how it samples."""

    model: str = field(default="", metadata=dict(positional=True, help="a model folder"))
    max_new_tokens: int = field(default=200, metadata=dict(parse=positive_int))
    greedy: bool = field(default=False, metadata=dict(negatable=False, help="greedy decoding instead of sampling"))
    temperature: float = field(default=0.8, metadata=dict(parse=positive_float))
    top_p: float = field(default=0.9, metadata=dict(parse=float_in(0.0, 1.0), help="nucleus mass in (0, 1]"))
    top_k: int = field(default=50, metadata=dict(parse=positive_int))
    seed: Optional[int] = field(default=None, metadata=dict(parse=non_negative_int))
    quantize: Optional[str] = field(
        default=None,
        metadata=dict(
            choices=("int8", "int4"),
            metavar=None,
            help="run a RetNet with quantized weights on ONNX Runtime (exported once into HF_HOME/retnet-hf/onnx, "
            "reused after): the fastest way on a CPU; the state stays float32",
        ),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=dict(
            negatable=False,
            help="let a folder that is not a RetNet run its own Python code (RetNet folders never need it)",
        ),
    )

    def sampling(self) -> dict:
        """`generate()`'s sampling arguments."""
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


@dataclass
class GenerateSettings(SamplingSettings):
    """One continuation of a prompt; `retnet-hf generate`'s options are made from these fields."""

    prompt: str = field(default="", metadata=dict(help="text to continue"))


@dataclass
class ChatSettings(SamplingSettings):
    """One chat session; `retnet-hf chat`'s options are made from these fields (a shorter reply by default)."""

    max_new_tokens: int = field(default=128, metadata=dict(parse=positive_int))


def generate_command(settings: GenerateSettings) -> None:
    """`retnet-hf generate`: the prompt and its continuation streamed to stdout, the speed to stderr."""
    s = settings
    model, tokenizer = load_for_inference(s.model, s.trust_remote_code, s.quantize)
    generate_text(model, tokenizer, s.prompt, s.max_new_tokens, s.seed, **s.sampling())


def chat_command(settings: ChatSettings) -> None:
    """`retnet-hf chat` through stdin. Each turn feeds only the new text: the recurrent state carries the
    conversation, at a flat cost per token."""
    s = settings
    model, tokenizer = load_for_inference(s.model, s.trust_remote_code, s.quantize)
    chat(model, tokenizer, s.max_new_tokens, _read_line, s.seed, **s.sampling())


def _read_line():
    """One line of stdin, as bytes where stdin has a byte buffer (a line that is not UTF-8 must not end the chat),
    else as text; None at the end of the input."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    line = stream.readline()
    return line if line else None
